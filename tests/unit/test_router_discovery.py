"""Discovery by name, the `kvgate serve` discovery flags, and which Kubernetes pods are routable."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from router.discovery import KINDS, StaticDiscovery, make_discovery
from router.discovery.kubernetes import KubernetesDiscovery, endpoint_of, parse_selector
from router.pods import PodEndpoint, PodSet
from router.server import build_parser, main, settings_from_args
from router.settings import DiscoverySettings

POD = {
    "metadata": {
        "name": "engine-0",
        "uid": "5d1c0a77-0000-4000-8000-000000000001",
        "labels": {"app": "engine", "tier": "gpu"},
        "annotations": {},
    },
    "status": {"podIP": "10.0.0.7", "conditions": [{"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "True"}]},
}
SELECTOR = {"app": "engine"}


def variant(**changes) -> dict:
    pod = copy.deepcopy(POD)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = pod
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return pod


def test_a_ready_pod_is_routable_at_its_ip_and_default_port() -> None:
    endpoint = endpoint_of(POD, selector=SELECTOR, default_port=8000)
    assert endpoint == PodEndpoint("http://10.0.0.7:8000", uid=POD["metadata"]["uid"], name="engine-0")
    assert endpoint.id == "http://10.0.0.7:8000#5d1c0a77"


@pytest.mark.parametrize(
    "pod",
    [
        pytest.param(variant(metadata__deletionTimestamp="2026-01-01T00:00:00Z"), id="being-deleted"),
        pytest.param(variant(status__conditions=[{"type": "Ready", "status": "False"}]), id="not-ready"),
        pytest.param(variant(status__conditions=[]), id="no-conditions"),
        pytest.param(variant(status__podIP=None), id="no-ip"),
        pytest.param(variant(metadata__labels={"app": "other"}), id="other-label"),
        pytest.param(variant(metadata__labels={}), id="no-labels"),
        pytest.param(variant(metadata__annotations={"kvgate.io/port": "http"}), id="bad-port"),
        pytest.param(variant(metadata__annotations={"kvgate.io/port": "70000"}), id="port-out-of-range"),
    ],
)
def test_pods_that_must_not_get_new_requests(pod: dict) -> None:
    assert endpoint_of(pod, selector=SELECTOR, default_port=8000) is None


def test_annotations_name_the_port_and_the_kv_event_endpoint() -> None:
    pod = variant(metadata__annotations={"kvgate.io/port": "9000", "kvgate.io/kv-events-port": "5557"})
    endpoint = endpoint_of(pod, selector=SELECTOR, default_port=8000)
    assert endpoint is not None
    assert (endpoint.url, endpoint.kv_events) == ("http://10.0.0.7:9000", "tcp://10.0.0.7:5557")


def test_an_ipv6_pod_gets_a_bracketed_address() -> None:
    endpoint = endpoint_of(variant(status__podIP="fd00::7"), selector=SELECTOR, default_port=8000)
    assert endpoint is not None and endpoint.url == "http://[fd00::7]:8000"


def test_pods_are_told_apart_by_uid_and_static_pods_by_url() -> None:
    a, b = PodEndpoint("http://10.0.0.7:8000", uid="aaaaaaaa-1"), PodEndpoint("http://10.0.0.7:8000", uid="bbbbbbbb-1")
    assert a.id != b.id
    assert PodEndpoint.of("http://pod:8000/").id == "http://pod:8000"
    pods = PodSet()
    pods.add(a.url, pod_id=a.id)
    pods.add(b.url, pod_id=b.id)
    assert len(pods) == 2 and {p.url for p in pods} == {a.url}


@pytest.mark.parametrize(
    ("items", "labels"),
    [
        pytest.param(("app=engine",), {"app": "engine"}, id="one"),
        pytest.param(("app=engine,tier=gpu",), {"app": "engine", "tier": "gpu"}, id="comma"),
        pytest.param(("app=engine", "tier=gpu"), {"app": "engine", "tier": "gpu"}, id="several"),
        pytest.param((" app = engine ,",), {"app": "engine"}, id="spaces"),
    ],
)
def test_selectors(items, labels) -> None:
    assert parse_selector(items) == labels


def test_discovery_is_chosen_by_name() -> None:
    assert set(KINDS) == {"static", "kubernetes"}
    assert isinstance(make_discovery(DiscoverySettings(worker_urls=("http://a:1",))), StaticDiscovery)
    settings = DiscoverySettings(kind="kubernetes", selector=("app=engine",), kubernetes_api_url="http://127.0.0.1:1", namespace="llm")
    chosen = make_discovery(settings)
    assert isinstance(chosen, KubernetesDiscovery)
    assert (chosen.namespace, chosen.selector, chosen.port) == ("llm", {"app": "engine"}, 8000)
    with pytest.raises(ValueError, match="unknown discovery kind"):
        make_discovery(DiscoverySettings(kind="consul"))
    with pytest.raises(ValueError, match="no pods"):
        make_discovery(DiscoverySettings())


def test_kubernetes_discovery_without_an_api_server_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    """Not in a cluster and no kubeconfig: a ValueError that says so (what `kvgate serve` reports at start)."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))

    with pytest.raises(ValueError, match="no Kubernetes API server"):
        make_discovery(DiscoverySettings(kind="kubernetes", selector=("app=engine",)))


def test_sglang_flags_set_the_discovery_settings() -> None:
    args = build_parser().parse_args(
        ["--service-discovery", "--selector", "app=engine", "tier=gpu", "--service-discovery-namespace", "llm", "--service-discovery-port", "9000"]
    )
    discovery = settings_from_args(args).discovery
    assert (discovery.kind, discovery.selector, discovery.namespace, discovery.pod_port) == (
        "kubernetes", ("app=engine", "tier=gpu"), "llm", 9000
    )
    assert settings_from_args(build_parser().parse_args([])).discovery.kind == "static"


def test_the_config_file_can_choose_kubernetes(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("discovery: {kind: kubernetes, selector: 'app=engine,tier=gpu', pod_port: 9000}\n")
    discovery = settings_from_args(build_parser().parse_args(["--config", str(path)])).discovery
    assert (discovery.kind, discovery.selector, discovery.pod_port) == ("kubernetes", ("app=engine,tier=gpu",), 9000)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--service-discovery"], "selector", id="no-selector"),
        pytest.param(["--service-discovery", "--selector", "app"], "KEY=VALUE", id="bad-selector"),
        pytest.param([], "no pods", id="nothing"),
    ],
)
def test_serve_refuses_unusable_discovery_settings(argv, message, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err
