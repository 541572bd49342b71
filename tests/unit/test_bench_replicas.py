"""Router replicas in the benchmark: names, rows, the round-robin client, the group's launch and its report."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from kvgate.bench import cpu
from kvgate.bench.load import run_workload
from kvgate.bench.replica_report import compare, markdown_lines, sharing_costs, spread
from kvgate.bench.replicas import RouterGroup, overhead_rows, replica_rows
from kvgate.bench.routers import LaunchContext, RouterSpec, command, file_label
from kvgate.bench.summary import EngineShare
from kvgate.stub_engine import StubEngine, run_stub

from .test_bench_load import _workload
from .test_bench_report import _results


@pytest.mark.parametrize(
    ("name", "replicas", "shared"),
    [
        pytest.param("kvgate:kv-aware", 1, False, id="one"),
        pytest.param("kvgate:kv-aware*3", 3, False, id="independent-replicas"),
        pytest.param("kvgate:kv-aware*3+state", 3, True, id="shared-state-replicas"),
        pytest.param("kvgate:kv-aware+state", 1, True, id="one-with-shared-state"),
        pytest.param("sglang:cache_aware*3", 3, False, id="peer-replicas"),
        pytest.param("kvgate:kv-aware+fixed", 1, False, id="fixed-admission"),
    ],
)
def test_names_round_trip(name, replicas, shared):
    spec = RouterSpec.parse(name)

    assert (spec.replicas, spec.shared_state, spec.name) == (replicas, shared, name)
    assert spec.single.name == name.split("*")[0].removesuffix("+state")


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("sglang:cache_aware*3+state", id="state-on-a-peer"),
        pytest.param("sglang:cache_aware+fixed", id="fixed-admission-on-a-peer"),
        pytest.param("kvgate:kv-aware*0", id="zero-replicas"),
        pytest.param("kvgate:kv-aware*x", id="not-a-number"),
        pytest.param("kvgate:kv-aware*65", id="too-many"),
        pytest.param("kvgate:no-such*2", id="unknown-policy"),
    ],
)
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError):
        RouterSpec.parse(name)


@pytest.mark.parametrize(
    ("name", "label"),
    [
        pytest.param("kvgate:kv-aware", "kvgate-kv-aware", id="plain"),
        pytest.param("kvgate:kv-aware*3+state", "kvgate-kv-aware-x3-state", id="group"),
    ],
)
def test_file_labels_have_no_shell_characters(name, label):
    assert file_label(name) == label


def test_replica_rows_follow_each_router():
    routers = [RouterSpec.parse(n) for n in ("kvgate:kv-aware", "sglang:cache_aware", "kvgate:kv-aware*3")]

    rows = [r.name for r in replica_rows(routers, 3)]

    assert rows == ["kvgate:kv-aware", "kvgate:kv-aware*3+state", "kvgate:kv-aware*3", "sglang:cache_aware", "sglang:cache_aware*3"]
    with pytest.raises(ValueError):
        replica_rows(routers, 1)


def test_overhead_rows_add_shared_state_beside_each_kvgate():
    gateways = [RouterSpec.parse(n) for n in ("kvgate:kv-aware", "sglang:cache_aware")]

    assert [g.name for g in overhead_rows(gateways)] == ["kvgate:kv-aware", "kvgate:kv-aware+state", "sglang:cache_aware"]


def _ctx(tmp_path: Path) -> LaunchContext:
    return LaunchContext(worker_urls=("http://e0", "http://e1"), model_dir=tmp_path, log_dir=tmp_path, kvgate_args=("--x",))


def test_a_shared_state_group_gives_every_replica_the_store_and_a_cluster_of_its_own(tmp_path):
    first = RouterGroup(RouterSpec.parse("kvgate:kv-aware*3+state"), _ctx(tmp_path), state_url="redis://h:1/2")
    second = RouterGroup(RouterSpec.parse("kvgate:kv-aware*3+state"), _ctx(tmp_path), state_url="redis://h:1/2")

    assert len(first.members) == 3 and len(set(first.urls)) == 3
    assert first.cluster and second.cluster and first.cluster != second.cluster
    for member in first.members:
        argv = command(member.spec, member.ctx, member.port, member.metrics_port)
        assert argv[argv.index("--state-url") + 1] == "redis://h:1/2"
        assert argv[argv.index("--state-cluster") + 1] == first.cluster
        assert "--x" in argv and member.spec.name == "kvgate:kv-aware"
    assert len({m.log_path for m in first.members}) == 3


def test_independent_replicas_share_nothing(tmp_path):
    group = RouterGroup(RouterSpec.parse("kvgate:kv-aware*2"), _ctx(tmp_path))

    assert group.cluster is None
    for member in group.members:
        assert "--state-url" not in command(member.spec, member.ctx, member.port, member.metrics_port)


async def test_requests_go_round_the_replicas_in_turn():
    async with run_stub(StubEngine()) as s0, run_stub(StubEngine()) as s1, run_stub(StubEngine()) as s2:
        trace = await run_workload([s0.url, s1.url, s2.url], _workload(4, 3, clients=2), model="tiny-llama")
        calls = [len(s.calls) for s in (s0, s1, s2)]

    assert all(r.ok for r in trace.records)
    assert calls == [4, 4, 4], "each request to the next replica, whichever client sends it"


async def test_one_session_is_spread_over_the_replicas():
    async with run_stub(StubEngine()) as s0, run_stub(StubEngine()) as s1:
        await run_workload([s0.url, s1.url], _workload(1, 4, clients=1), model="tiny-llama")
        seen = Counter(len(s.calls) for s in (s0, s1))

    assert seen == Counter({2: 2})


def test_cpu_of_replicas_is_summed():
    import os

    one = cpu.sample([], os.getpid()).router
    both = cpu.sample([], [os.getpid(), os.getpid()]).router

    assert one is not None and both is not None and both >= 2 * one * 0.99


@pytest.mark.parametrize(
    ("requests", "expected"),
    [
        pytest.param([5, 5], 0.0, id="even"),
        pytest.param([6, 2], 1.0, id="uneven"),
        pytest.param([0, 0], None, id="nothing"),
        pytest.param([], None, id="no-engines"),
    ],
)
def test_spread_of_requests_over_engines(requests, expected):
    engines = [EngineShare(requests=n, prompt_tokens=0, prefix_queries=0, prefix_hits=0, hit_rate=0, preemptions=0) for n in requests]

    assert spread(engines) == expected


def _with_replica_runs():
    results = _results()
    base = next(r for r in results.runs if r.router == "kvgate:kv-aware")
    group = replace(
        base,
        router="kvgate:kv-aware*3+state",
        summary=replace(base.summary, hit_rate=base.summary.hit_rate * 0.9, ttft_ms_p50=base.summary.ttft_ms_p50 * 1.2),
    )
    gateway = replace(results.overhead.gateways[0], cpu_ms_per_request=0.5)
    shared = replace(
        gateway,
        router="kvgate:kv-aware+state",
        added_ms_p50=gateway.added_ms_p50 + 0.25,
        added_ms_p99=gateway.added_ms_p99 + 1.0,
        cpu_ms_per_request=0.625,
    )
    overhead = replace(results.overhead, gateways=(gateway, *results.overhead.gateways[1:], shared))
    return replace(results, runs=(*results.runs, group), routers=(*results.routers, group.router), overhead=overhead)


def test_replicas_are_compared_with_their_single_router():
    [c] = compare(_with_replica_runs())

    assert (c.router, c.single, c.workload) == ("kvgate:kv-aware*3+state", "kvgate:kv-aware", "skewed-users")
    assert c.hit_ratio == pytest.approx(0.9) and c.ttft_ratio == pytest.approx(1.2)
    assert c.light_share is not None and c.light_share == c.single_light_share


def test_sharing_cost_is_the_shared_gateways_added_latency_minus_the_plain_ones():
    [cost] = sharing_costs(_with_replica_runs().overhead)

    assert cost.router == "kvgate:kv-aware+state" and cost.single == "kvgate:kv-aware"
    assert cost.added_p50_ms == pytest.approx(0.25) and cost.added_p99_ms == pytest.approx(1.0)
    assert cost.added_cpu_ms == pytest.approx(0.125)


def test_sharing_cost_has_no_cpu_figure_when_a_gateway_has_none():
    results = _with_replica_runs()
    gateways = tuple(replace(g, cpu_ms_per_request=None) if g.router == "kvgate:kv-aware" else g for g in results.overhead.gateways)
    [cost] = sharing_costs(replace(results.overhead, gateways=gateways))

    assert cost.added_cpu_ms is None


def test_the_section_appears_only_when_replicas_ran():
    assert markdown_lines(_results()) == []
    text = "\n".join(markdown_lines(_with_replica_runs()))
    assert "## Gateway replicas" in text and "| skewed-users | kvgate:kv-aware*3+state | kvgate:kv-aware | 0.900 | 1.20 |" in text
    assert "| kvgate:kv-aware+state | kvgate:kv-aware | 0.250 | 1.000 | 0.125 |" in text
    assert sharing_costs(None) == []


def test_a_kvgate_row_may_bring_its_own_settings_file(tmp_path):
    settings = tmp_path / "stickier.yaml"
    settings.write_text("routing:\n  prefix_copy_weight: 1\n")
    name = f"kvgate:kv-aware*2+state+fixed@{settings}"

    spec = RouterSpec.parse(name)
    group = RouterGroup(spec, _ctx(tmp_path), state_url="redis://h:1/2")

    assert (spec.name, spec.config, spec.replicas, spec.fixed_admission) == (name, str(settings), 2, True)
    assert spec.single.name == f"kvgate:kv-aware+fixed@{settings}"
    assert file_label(name) == "kvgate-kv-aware-x2-state-fixed-at-stickier"
    for member in group.members:
        argv = command(member.spec, member.ctx, member.port, member.metrics_port)
        assert argv[-2:] == ["--config", str(settings)]  # after --kvgate-arg's, so the row's file wins
        assert argv.index("--x") < argv.index("--config")


@pytest.mark.parametrize(
    "suffix",
    [pytest.param("@", id="no-file"), pytest.param("@absent.yaml", id="missing-file")],
)
def test_a_settings_file_must_be_there(suffix, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="settings file"):
        RouterSpec.parse(f"kvgate:kv-aware{suffix}")


def test_only_kvgate_rows_take_a_settings_file(tmp_path):
    settings = tmp_path / "s.yaml"
    settings.write_text("{}\n")
    with pytest.raises(ValueError, match="only kvgate"):
        RouterSpec.parse(f"sglang:cache_aware@{settings}")
