"""The kvgate.io/v1alpha1 custom resources: every field, once.

`KINDS` holds the three resources (`KVCache`, `EnginePool`, `KVGateway`) with
their spec and status trees. `operators.crds` renders them into the CRD YAML
under config/crd/bases/ and the reference table in operators/README.md; the
operator applies the same defaults (`operators.fields.apply_defaults`).
Change a field here, then run `python -m operators.crds --write`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from operators.fields import Field

GROUP = "kvgate.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: The images the Dockerfile builds (targets `kvgate` and `engine`).
KVGATE_IMAGE = "ghcr.io/kvgate/kvgate:0.1.0"
ENGINE_IMAGE = "ghcr.io/kvgate/kvgate-engine:0.1.0"


def _f(name: str, type_: Any, description: str, **kw: Any) -> Field:
    return Field(name, type_, description, **kw)


def _obj(name: str, description: str, *children: Field, **kw: Any) -> Field:
    kw.setdefault("default", {})
    if kw["default"] == {} and "Default" not in description:
        description += " Default: every field at its default."
    return Field(name, "object", description, children=children, **kw)


def _spec(description: str, *children: Field, **kw: Any) -> Field:
    return Field("spec", "object", description, children=children, **kw)


def _ref(name: str, description: str, **kw: Any) -> Field:
    return _obj(name, description, _f("name", "string", "Name of the object in the same namespace.", required=True),
                default=None, **kw)


def _image(default: str) -> Field:
    return _f("image", "string", f"Container image. Default `{default}`.", default=default)


def _resources(what: str) -> Field:
    return _obj(
        "resources", f"Compute resources of each {what} container (Kubernetes ResourceRequirements).",
        _f("requests", "map", "Minimum resources, e.g. `cpu: \"2\"`, `memory: 8Gi` (quantities). Default none.",
           default=None),
        _f("limits", "map", "Maximum resources (quantities), e.g. `nvidia.com/gpu: \"1\"`. Default none.",
           default=None),
    )


def _placement(what: str, anti_affinity: str) -> Field:
    return _obj(
        "placement", f"Where the {what} pods are scheduled.",
        _f("antiAffinity", "string",
           f"Pod anti-affinity on `kubernetes.io/hostname`: `required` (never two {what} pods on one node; "
           f"pods stay Pending if nodes run out), `preferred` (spread when possible) or `none`. "
           f"Default `{anti_affinity}`.", default=anti_affinity, enum=("required", "preferred", "none")),
        _obj("topologySpread", f"Topology spread constraint that spreads {what} pods over zones.",
             _f("enabled", "boolean", "Add the constraint. Default `true`.", default=True),
             _f("topologyKey", "string", "Node label that names the domain. Default `topology.kubernetes.io/zone`.",
                default="topology.kubernetes.io/zone"),
             _f("maxSkew", "integer", "Largest allowed difference of pod counts between domains (pods). Default `1`.",
                default=1, minimum=1),
             _f("whenUnsatisfiable", "string",
                "`ScheduleAnyway` (a soft preference) or `DoNotSchedule` (a hard rule). Default `ScheduleAnyway`.",
                default="ScheduleAnyway", enum=("ScheduleAnyway", "DoNotSchedule"))),
        _f("nodeSelector", "map", "Node labels the pods require. Default none.", default=None),
        _f("tolerations", "array", "Tolerations of the pods (Kubernetes Toleration objects). Default none.",
           items=_f("toleration", "any-object", "A Kubernetes Toleration."), default=None),
    )


def _pdb(default_unavailable: int) -> Field:
    return _obj(
        "podDisruptionBudget", "The PodDisruptionBudget that limits voluntary evictions (node drains).",
        _f("enabled", "boolean", "Create the PodDisruptionBudget. Default `true`.", default=True),
        _f("maxUnavailable", "integer",
           f"Pods that may be evicted at once (pods). Default `{default_unavailable}`.",
           default=default_unavailable, minimum=0),
    )


def _conditions() -> Field:
    condition = _obj(
        "condition", "One condition, as Deployments report theirs.",
        _f("type", "string", "`Ready` (serving at the desired size) or `Reconciled` (children applied).",
           required=True),
        _f("status", "string", "`True`, `False` or `Unknown`.", required=True, enum=("True", "False", "Unknown")),
        _f("reason", "string", "CamelCase reason of the last transition, e.g. `InvalidSpec`."),
        _f("message", "string", "Human-readable details."),
        _f("lastTransitionTime", "string", "When the status last changed (RFC 3339)."),
        _f("observedGeneration", "integer", "The `metadata.generation` this condition was computed for."),
        default=None,
    )
    return _f("conditions", "array", "Conditions `Ready` and `Reconciled` (see `kubectl wait --for=condition=Ready`).",
              items=condition)


def _common_status(*fields: Field) -> Field:
    return _obj(
        "status", "Observed state, written by the operator.",
        _f("observedGeneration", "integer", "The `metadata.generation` the operator last reconciled."),
        *fields,
        _conditions(),
        _f("kopf", "any-object", "Bookkeeping of the operator framework (handler progress)."),
        default=None,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Kind:
    """One custom resource kind and how the CRD presents it.

    Attributes:
        kind: the CamelCase kind.
        plural: the resource name in URLs.
        short_names: `kubectl get` abbreviations.
        description: what one object of this kind is.
        spec: the spec tree.
        status: the status tree.
        columns: printer columns (name, type, JSON path, description).
    """

    kind: str
    plural: str
    short_names: tuple[str, ...]
    description: str
    spec: Field
    status: Field
    columns: tuple[tuple[str, str, str, str], ...]

    @property
    def singular(self) -> str:
        """The lowercase singular name."""
        return self.kind.lower()

    @property
    def resource(self) -> str:
        """`group/version/plural`, as kopf and test servers name the resource."""
        return f"{API_VERSION}/{self.plural}"


_READY = ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status', "Serving at the desired size")
_AGE = ("Age", "date", ".metadata.creationTimestamp", "Time since creation")

KVCACHE = Kind(
    kind="KVCache",
    plural="kvcaches",
    short_names=("kvc",),
    description="A ring of kvgate L2 KV cache nodes (a StatefulSet) and the L3 tier the engines share.",
    spec=_spec(
        "Desired state of the cache ring.",
        _f("replicas", "integer", "Cache nodes in the ring (pods). Default `3`.", default=3, minimum=1),
        _image(KVGATE_IMAGE),
        _f("port", "integer", "gRPC port of the KV block service. Default `50051`.", default=50051,
           minimum=1, maximum=65535),
        _f("metricsPort", "integer", "Port of each node's Prometheus `/metrics` (0: off). Default `9400`.",
           default=9400, minimum=0, maximum=65535),
        _f("capacityPerNode", "quantity",
           "Bytes of KV blocks one node keeps in memory before evicting (quantity, e.g. `4Gi`). Default `1Gi`; "
           "the container's memory request is this plus 256Mi unless `resources` says otherwise.", default="1Gi"),
        _f("replicationFactor", "integer",
           "Copies of each block in the ring, placed on nodes of different hosts, then zones (copies). "
           "At most `replicas`. Default `2`.", default=2, minimum=1, maximum=5),
        _f("evictionPolicy", "string", "Eviction policy of each node. Default `lru`.", default="lru",
           enum=("lru", "s3fifo")),
        _f("vnodes", "integer", "Points per node on the consistent-hash ring. Default `160`.", default=160,
           minimum=1),
        _obj("l3", "The persistent tier (L3) that engines using this cache write through to; at most one of "
             "`redis` and `pvc`. Default none (L1 and L2 only).",
             _obj("redis", "L3 in Redis; the URL comes from a Secret. Default none.",
                  _f("secretName", "string", "Secret holding the Redis URL.", required=True),
                  _f("key", "string", "Key of the URL in the Secret. Default `url`.", default="url"),
                  _f("prefix", "string", "Key prefix of blocks in Redis. Default `kvgate:kv:`.",
                     default="kvgate:kv:"),
                  default=None),
             _obj("pvc", "L3 in a directory on a PersistentVolumeClaim that every engine mounts "
                  "(needs ReadWriteMany when there are several engines). Default none.",
                  _f("claimName", "string", "The PersistentVolumeClaim.", required=True),
                  _f("mountPath", "string", "Where engines mount it. Default `/var/lib/kvgate/l3`.",
                     default="/var/lib/kvgate/l3"),
                  default=None),
             rules=(("!(has(self.redis) && has(self.pvc))", "l3 takes redis or pvc, not both"),)),
        _obj("auth", "The cluster token cache nodes demand of every caller (the engines' connectors get it "
             "too). Default none: nodes accept anyone who reaches their port (keep them behind a "
             "NetworkPolicy).",
             _f("secretName", "string", "Secret holding the token.", required=True),
             _f("key", "string", "Key of the token in the Secret. Default `token`.", default="token"),
             default=None),
        _placement("cache", "preferred"),
        _resources("cache node"),
        _pdb(1),
        _f("terminationGracePeriodSeconds", "integer",
           "Seconds a leaving node has to hand its blocks to their new owners before it is killed. "
           "Default `90`.", default=90, minimum=15),
        rules=(("self.replicationFactor <= self.replicas", "replicationFactor must not exceed replicas"),),
    ),
    status=_common_status(
        _f("replicas", "integer", "Cache node pods that exist."),
        _f("readyNodes", "integer", "Cache node pods that are Ready."),
        _f("ringMembers", "array", "Node IDs in the ring (the Ready pods' names), sorted.",
           items=_f("member", "string", "A node ID.")),
        _f("ringVersion", "string", "Digest of the ring's members and vnodes; changes exactly when the ring "
           "layout does."),
    ),
    columns=(
        ("Nodes", "integer", ".spec.replicas", "Desired cache nodes"),
        ("Ready-Nodes", "integer", ".status.readyNodes", "Cache nodes Ready"),
        ("Ring", "string", ".status.ringVersion", "Ring version"),
        _READY,
        _AGE,
    ),
)

ENGINEPOOL = Kind(
    kind="EnginePool",
    plural="enginepools",
    short_names=("ep", "engines"),
    description="vLLM engine pods serving one model, optionally wired to a KVCache.",
    spec=_spec(
        "Desired state of the engine pool.",
        _f("model", "string", "Model vLLM serves: a Hugging Face ID or a path inside the pod.", required=True),
        _f("servedModelName", "string", "Name clients use in requests. Default: `model`.", default=None),
        _image(ENGINE_IMAGE),
        _f("replicas", "integer", "Engine pods (pods). Default `1`.", default=1, minimum=0),
        _f("port", "integer", "HTTP port of the OpenAI API of each engine. Default `8000`.", default=8000,
           minimum=1, maximum=65535),
        _f("engineArgs", "array", "Further `vllm serve` arguments, e.g. `[--max-model-len, \"8192\"]`. "
           "Default `[]`.", items=_f("arg", "string", "One argument."), default=[]),
        _f("env", "array", "Extra environment variables (Kubernetes EnvVar objects). Default none.",
           items=_f("var", "any-object", "A Kubernetes EnvVar."), default=None),
        _f("gpus", "integer", "GPUs per engine (`nvidia.com/gpu` request and limit; GPUs). Default `0`.",
           default=0, minimum=0),
        _resources("engine"),
        _f("shmSize", "quantity", "Size of the in-memory /dev/shm (quantity; tensor parallelism needs it). "
           "Default `2Gi`.", default="2Gi"),
        _f("modelVolumeClaim", "string", "PersistentVolumeClaim mounted read-only at /models, for model files. "
           "Default none.", default=None),
        _obj("kvCacheRef", "The KVCache whose tiers the engines share through the kvgate vLLM connector "
             "(`--kv-transfer-config`). Default none (no shared cache).",
             _f("name", "string", "Name of the KVCache in the same namespace.", required=True),
             _f("l1Capacity", "quantity", "In-engine L1 budget (quantity). Default `512Mi`.", default="512Mi"),
             default=None),
        _obj("kvEvents", "vLLM KV cache events (ZMQ PUB) that gateways subscribe to.",
             _f("enabled", "boolean", "Publish KV events. Default `true`.", default=True),
             _f("port", "integer", "Port the engine's publisher binds. Default `5557`.", default=5557,
                minimum=1, maximum=65535),
             _f("topic", "string", "Topic prefix of the events. Default `kv`.", default="kv")),
        _placement("engine", "preferred"),
        _obj("lifecycle", "Graceful shutdown.",
             _f("terminationGracePeriodSeconds", "integer", "Seconds from deletion to SIGKILL (seconds); covers "
                "the preStop delay and in-flight requests. Default `120`.", default=120, minimum=1),
             _f("preStopDelaySeconds", "integer", "Seconds the pod keeps serving after it is marked for deletion, "
                "before vLLM gets SIGTERM; gateways stop sending it new requests at once (seconds). Default `10`.",
                default=10, minimum=0)),
        _f("startupTimeoutSeconds", "integer", "Seconds an engine may take to load the model before it is "
           "restarted. Default `1800`.", default=1800, minimum=30),
        _pdb(1),
    ),
    status=_common_status(
        _f("replicas", "integer", "Engine pods that exist."),
        _f("readyReplicas", "integer", "Engine pods that are Ready."),
        _f("blockSize", "integer", "Tokens per KV block, as the engines report it (`vllm:cache_config_info`)."),
        _f("kvCapacityBlocks", "integer", "KV blocks per engine, as the engines report it (`num_gpu_blocks`)."),
    ),
    columns=(
        ("Model", "string", ".spec.model", "Served model"),
        ("Replicas", "integer", ".spec.replicas", "Desired engines"),
        ("Ready-Replicas", "integer", ".status.readyReplicas", "Engines Ready"),
        ("Block-Size", "integer", ".status.blockSize", "Tokens per KV block"),
        _READY,
        _AGE,
    ),
)

KVGATEWAY = Kind(
    kind="KVGateway",
    plural="kvgateways",
    short_names=("kvgw", "gw"),
    description="The kvgate gateway (a Deployment and Service) in front of one EnginePool.",
    spec=_spec(
        "Desired state of the gateway.",
        _ref("enginePoolRef", "The EnginePool whose pods this gateway discovers and routes to.", required=True),
        _f("replicas", "integer", "Gateway pods (pods). Default `2`.", default=2, minimum=1),
        _image(KVGATE_IMAGE),
        _f("port", "integer", "HTTP port of the gateway container. Default `8000`.", default=8000,
           minimum=1, maximum=65535),
        _obj("routing", "Routing settings.",
             _f("policy", "string", "Routing policy, or a weighted mix such as `prefix-cache:2,least-request:1`. "
                "Default `kv-aware`.", default="kv-aware"),
             _f("tokenizer", "string", "Directory with the model's tokenizer.json and chat template inside the "
                "gateway pod (see `tokenizerVolumeClaim`). Default none.", default=None),
             _f("tokenizerVolumeClaim", "string", "PersistentVolumeClaim mounted read-only at /models. "
                "Default none.", default=None),
             _f("stateSecretName", "string", "Secret with key `url`: a Redis URL through which replicas share "
                "routing state (`--state-url`). Default none.", default=None)),
        _obj("admission", "Admission control.",
             _f("maxInflightPerPod", "integer", "Most requests in flight per engine: the cap of the adaptive "
                "limit, or the limit itself with `adaptive: false`; beyond it requests queue. Default `64`.",
                default=64, minimum=1),
             _f("adaptive", "boolean", "Each engine's limit follows what the engine reports (waiting queue, KV "
                "usage, time to first token) under `maxInflightPerPod`. Default `true`.", default=True),
             _f("maxQueue", "integer", "Requests allowed to wait before 429. Default `1024`.", default=1024,
                minimum=0)),
        _obj("apiKeys", "Bearer tokens clients must present, from a Secret. Default none (open).",
             _f("secretName", "string", "The Secret.", required=True),
             _f("keys", "array", "Keys of the Secret, one token each. Default `[api-key]`.",
                items=_f("key", "string", "A key of the Secret."), default=["api-key"]),
             default=None),
        _obj("service", "The Service in front of the gateway pods.",
             _f("type", "string", "Service type. Default `ClusterIP`.", default="ClusterIP",
                enum=("ClusterIP", "NodePort", "LoadBalancer")),
             _f("port", "integer", "Service port. Default `80`.", default=80, minimum=1, maximum=65535),
             _f("annotations", "map", "Annotations of the Service (e.g. for a cloud load balancer). Default none.",
                default=None)),
        _placement("gateway", "preferred"),
        _resources("gateway"),
        _obj("lifecycle", "Graceful shutdown.",
             _f("terminationGracePeriodSeconds", "integer", "Seconds from deletion to SIGKILL. Default `60`.",
                default=60, minimum=1),
             _f("preStopDelaySeconds", "integer", "Seconds the pod keeps serving after it is marked for "
                "deletion, while load balancers drop it, before SIGTERM (seconds). Default `5`.", default=5,
                minimum=0),
             _f("drainGraceSeconds", "integer", "Seconds in-flight requests get after SIGTERM "
                "(`--drain-grace`). Default `30`.", default=30, minimum=0)),
        _pdb(1),
    ),
    status=_common_status(
        _f("replicas", "integer", "Gateway pods that exist."),
        _f("readyReplicas", "integer", "Gateway pods that are Ready."),
        _f("enginePods", "integer", "Engine pods of the EnginePool that are Ready and not terminating (the "
           "pods the gateway routes to)."),
    ),
    columns=(
        ("Pool", "string", ".spec.enginePoolRef.name", "EnginePool routed to"),
        ("Ready-Replicas", "integer", ".status.readyReplicas", "Gateways Ready"),
        ("Engines", "integer", ".status.enginePods", "Engine pods discovered"),
        _READY,
        _AGE,
    ),
)

#: kind -> its description, in the order the operator documents them.
KINDS: dict[str, Kind] = {k.kind: k for k in (KVCACHE, ENGINEPOOL, KVGATEWAY)}
