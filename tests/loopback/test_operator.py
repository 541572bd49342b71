"""The operator, really run (kopf + the official client) against kmock's Kubernetes emulator.

Creating the sample fleet creates the children with ownerReferences,
anti-affinity, topology spread, preStop hooks and grace periods; updating a
custom resource patches them; a bad spec becomes a status condition while the
operator keeps going; API errors are retried; the status follows the
children and what the engines report on /metrics.
"""

from __future__ import annotations

import copy
import json
import pathlib

import kmock
import yaml

from kvgate.stub_engine import StubEngine, run_stub
from operators.schema import KINDS
from tests.support.operator_env import operator_env, wait_for

SAMPLES = pathlib.Path(__file__).resolve().parents[2] / "config" / "samples"


def sample_fleet() -> dict[str, dict]:
    docs = [d for p in sorted(SAMPLES.glob("kvgate_*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    return {d["kind"]: d for d in docs if d["kind"] in KINDS}


def condition(obj: dict | None, type_: str) -> dict | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return cond
    return None


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def arg(container: dict, flag: str) -> str:
    return container["args"][container["args"].index(flag) + 1]


async def test_sample_fleet_creates_children_wired_and_placed():
    async with operator_env() as env:
        fleet = sample_fleet()
        created = {kind: await env.create(body) for kind, body in fleet.items()}
        uids = {kind: body["metadata"]["uid"] for kind, body in created.items()}

        sts = await wait_for(lambda: env.obj("StatefulSet", "kvcache"), what="cache StatefulSet")
        engines = await wait_for(lambda: env.obj("Deployment", "llama"), what="engine Deployment")
        gateway = await wait_for(lambda: env.obj("Deployment", "gateway"), what="gateway Deployment")
        for name in ("kvcache", "llama", "gateway"):
            await wait_for(lambda: env.obj("PodDisruptionBudget", name), what=f"PDB {name}")
        for name in ("gateway-gateway", "kvcache-cache", "llama-engine"):
            for kind in ("ServiceAccount", "Role", "RoleBinding"):
                await wait_for(lambda: env.obj(kind, name), what=f"{kind} {name}")
        await wait_for(lambda: env.obj("ConfigMap", "gateway-config"), what="gateway ConfigMap")

        # Every child is owned by its custom resource (by UID), so deleting the CR deletes it.
        owners = {"kvcache": "KVCache", "llama": "EnginePool", "gateway": "KVGateway"}
        children = env.children()
        assert len(children) == 19
        for child in children:
            (ref,) = child["metadata"]["ownerReferences"]
            instance = child["metadata"]["labels"]["app.kubernetes.io/instance"]
            assert ref["kind"] == owners[instance] and ref["uid"] == uids[owners[instance]]

        # Cache nodes: stable identities, never two on one host, spread over zones.
        assert sts["spec"]["serviceName"] == "kvcache-nodes" and sts["spec"]["replicas"] == 3
        anti = pod_spec(sts)["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
        assert pod_spec(sts)["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"

        # Engines: spread, drained before SIGTERM, wired to the cache and publishing events.
        engine = pod_spec(engines)["containers"][0]
        assert pod_spec(engines)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert engine["lifecycle"]["preStop"] == {"sleep": {"seconds": 10}}
        assert pod_spec(engines)["terminationGracePeriodSeconds"] == 120
        assert engines["spec"]["template"]["metadata"]["annotations"]["kvgate.io/kv-events-port"] == "5557"
        transfer = json.loads(arg(engine, "--kv-transfer-config"))
        l2 = transfer["kv_connector_extra_config"]["l2"]
        assert "app.kubernetes.io/instance=kvcache" in l2["kubernetes_selector"]
        assert l2["token_file"] == "/etc/kvgate/cache-token/token"
        assert pod_spec(engines)["serviceAccountName"] == "llama-engine"
        assert transfer["kv_connector_extra_config"]["l3"]["kind"] == "redis"

        # Gateways: discover the engine pods, preStop and grace, keys from the Secret.
        gw = pod_spec(gateway)["containers"][0]
        assert "--service-discovery" in gw["args"]
        assert "app.kubernetes.io/instance=llama" in arg(gw, "--selector")
        assert gw["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
        assert pod_spec(gateway)["serviceAccountName"] == "gateway-gateway"

        for kind, body in fleet.items():
            name = body["metadata"]["name"]
            reconciled = await wait_for(lambda: condition(env.obj(kind, name), "Reconciled"), what=f"{kind} status")
            assert reconciled["status"] == "True", reconciled
            assert env.obj(kind, name)["status"]["observedGeneration"] == 1


async def test_update_patches_children():
    async with operator_env() as env:
        fleet = sample_fleet()
        for body in fleet.values():
            await env.create(body)
        await wait_for(lambda: env.obj("Deployment", "llama"), what="engines")
        await wait_for(lambda: env.obj("StatefulSet", "kvcache"), what="cache")

        await env.update_spec("EnginePool", "llama", {"replicas": 4, "lifecycle": {"preStopDelaySeconds": 20}})
        await env.update_spec("KVCache", "kvcache", {"replicas": 5, "replicationFactor": 3})

        def engine_updated():
            d = env.obj("Deployment", "llama")
            c = pod_spec(d)["containers"][0]
            return d["spec"]["replicas"] == 4 and c["lifecycle"]["preStop"]["sleep"]["seconds"] == 20 and d

        await wait_for(engine_updated, what="engine Deployment patched")
        await wait_for(lambda: env.obj("StatefulSet", "kvcache")["spec"]["replicas"] == 5, what="StatefulSet patched")

        # The engines follow the cache's replication factor (resync), through the connector config.
        def replicas():
            c = pod_spec(env.obj("Deployment", "llama"))["containers"][0]
            return json.loads(arg(c, "--kv-transfer-config"))["kv_connector_extra_config"]["l2"]["replicas"] == 3

        await wait_for(replicas, what="engines write 3 copies of each block")
        await wait_for(lambda: env.obj("KVCache", "kvcache")["status"]["observedGeneration"] == 2,
                       what="observedGeneration follows")


async def test_bad_spec_gets_a_condition_and_the_operator_keeps_going():
    async with operator_env() as env:
        bad = {"apiVersion": "kvgate.io/v1alpha1", "kind": "KVCache", "metadata": {"name": "bad"},
               "spec": {"replicas": 1, "replicationFactor": 3}}
        await env.create(bad)
        cond = await wait_for(lambda: condition(env.obj("KVCache", "bad"), "Ready"), what="bad status")
        assert (cond["status"], cond["reason"]) == ("False", "InvalidSpec")
        assert "replicationFactor" in cond["message"]
        assert env.obj("StatefulSet", "bad") is None

        # A gateway whose EnginePool does not exist yet waits for it (a temporary error).
        fleet = sample_fleet()
        await env.create(fleet["KVGateway"])
        cond = await wait_for(lambda: condition(env.obj("KVGateway", "gateway"), "Reconciled"), what="gw status")
        assert (cond["status"], cond["reason"]) == ("False", "DependencyMissing")

        # The operator still works: the pool appears, the gateway follows; the fix is picked up.
        await env.create(fleet["EnginePool"] | {"spec": {k: v for k, v in fleet["EnginePool"]["spec"].items()
                                                         if k != "kvCacheRef"}})
        await wait_for(lambda: env.obj("Deployment", "gateway"), what="gateway after its pool appeared")
        await env.update_spec("KVCache", "bad", {"replicationFactor": 1})
        await wait_for(lambda: env.obj("StatefulSet", "bad"), what="children after the fix")
        cond = await wait_for(lambda: (c := condition(env.obj("KVCache", "bad"), "Reconciled")) and
                              c["status"] == "True" and c, what="condition cleared")
        assert cond["reason"] == "ChildrenApplied"
        assert env.operator_alive()


async def test_api_errors_are_retried():
    async with operator_env() as env:
        failures = iter(range(3))
        statefulsets = kmock.resource("apps", "v1", "statefulsets")
        # The first three writes of any StatefulSet answer 500 (as an overloaded API server might).
        env.emulator[statefulsets][lambda req: req.method in {"PATCH", "POST"} and next(failures, None) is not None] << 500
        body = copy.deepcopy(sample_fleet()["KVCache"])
        await env.create(body)
        sts = await wait_for(lambda: condition(env.obj("KVCache", "kvcache"), "Reconciled"), what="first status")
        assert (sts["status"], sts["reason"]) == ("False", "ApplyFailed")
        await wait_for(lambda: (c := condition(env.obj("KVCache", "kvcache"), "Reconciled")) and c["status"] == "True",
                       what="reconciled after the errors")
        assert next(failures, None) is None, "the injected errors were served"
        assert env.obj("StatefulSet", "kvcache")["spec"]["replicas"] == 3
        assert env.operator_alive()


async def test_status_follows_children_and_engine_metrics():
    async with operator_env() as env, run_stub(StubEngine(block_size=32, num_gpu_blocks=777)) as stub:
        fleet = sample_fleet()
        for body in fleet.values():
            await env.create(body)
        await wait_for(lambda: env.obj("StatefulSet", "kvcache"), what="cache")
        await wait_for(lambda: env.obj("Deployment", "llama"), what="engines")
        await wait_for(lambda: env.obj("Deployment", "gateway"), what="gateway")
        port = stub.url.rsplit(":", 1)[1]

        ready = {"conditions": [{"type": "Ready", "status": "True"}]}
        for i in range(3):
            env.put("Pod", {"apiVersion": "v1", "kind": "Pod",
                            "metadata": {"name": f"kvcache-{i}", "namespace": "default",
                                         "labels": {"app.kubernetes.io/name": "kvgate",
                                                    "app.kubernetes.io/instance": "kvcache",
                                                    "app.kubernetes.io/component": "cache"}},
                            "status": ready})
        env.patch("StatefulSet", "kvcache", {"status": {"replicas": 3, "readyReplicas": 3}})
        env.patch("Deployment", "llama", {"status": {"replicas": 2, "readyReplicas": 2}})
        env.patch("Deployment", "gateway", {"status": {"replicas": 2, "readyReplicas": 2}})
        engine_labels = {"app.kubernetes.io/name": "kvgate", "app.kubernetes.io/instance": "llama",
                         "app.kubernetes.io/component": "engine"}
        env.put("Pod", {"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": "llama-a", "namespace": "default", "labels": engine_labels,
                                     "annotations": {"kvgate.io/port": port}},
                        "status": {**ready, "podIP": "127.0.0.1"}})
        env.put("Pod", {"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": "llama-b", "namespace": "default", "labels": engine_labels,
                                     "deletionTimestamp": "2026-01-01T00:00:00Z"},
                        "status": {**ready, "podIP": "127.0.0.1"}})

        cache = await wait_for(lambda: condition(env.obj("KVCache", "kvcache"), "Ready")["status"] == "True"
                               and len(env.obj("KVCache", "kvcache")["status"]["ringMembers"]) == 3
                               and env.obj("KVCache", "kvcache")["status"], what="cache Ready")
        assert cache["readyNodes"] == 3 and cache["ringMembers"] == ["kvcache-0", "kvcache-1", "kvcache-2"]
        assert cache["ringVersion"]
        pool = await wait_for(lambda: env.obj("EnginePool", "llama")["status"].get("blockSize") and
                              env.obj("EnginePool", "llama")["status"], what="engine report")
        assert (pool["blockSize"], pool["kvCapacityBlocks"], pool["readyReplicas"]) == (32, 777, 2)
        gateway = await wait_for(lambda: condition(env.obj("KVGateway", "gateway"), "Ready")["status"] == "True"
                                 and env.obj("KVGateway", "gateway")["status"], what="gateway Ready")
        # The terminating engine pod is not counted: gateways send it nothing new.
        assert gateway["enginePods"] == 1 and gateway["readyReplicas"] == 2


async def test_namespaced_operator_leaves_other_namespaces_alone():
    async with operator_env(namespaces=("team-a",)) as env:
        for namespace in ("team-a", "team-b"):
            await env.create({"apiVersion": "kvgate.io/v1alpha1", "kind": "KVCache",
                              "metadata": {"name": "kv", "namespace": namespace}, "spec": {"replicas": 1,
                                                                                         "replicationFactor": 1}})
        await wait_for(lambda: env.obj("StatefulSet", "kv", "team-a"), what="watched namespace reconciled")
        await wait_for(lambda: condition(env.obj("KVCache", "kv", "team-a"), "Reconciled"), what="status")
        assert env.obj("StatefulSet", "kv", "team-b") is None
        assert "status" not in env.obj("KVCache", "kv", "team-b")
