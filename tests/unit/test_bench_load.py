"""The benchmark's load generator against the stub engine, served in-process on 127.0.0.1."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

from kvgate.bench.load import run_workload
from kvgate.bench.workloads import BenchRequest, Session, Workload
from kvgate.stub_engine import StubBehaviour, StubEngine, run_stub


def _workload(sessions: int, per_session: int, *, clients: int, duration_s: float | None = None) -> Workload:
    return Workload(
        name="t",
        description="",
        seed=0,
        sessions=tuple(
            Session(
                id=f"s{s}",
                user=f"u{s % 2}",
                requests=tuple(
                    BenchRequest(id=f"s{s}-{k}", user=f"u{s % 2}", messages=(("user", f"hello {s} {k}"),), max_tokens=3)
                    for k in range(per_session)
                ),
            )
            for s in range(sessions)
        ),
        clients=clients,
        duration_s=duration_s,
    )


async def test_every_request_is_streamed_timed_and_counted():
    seen = []
    async with run_stub(StubEngine(behaviour=StubBehaviour(tokens=8))) as stub:
        trace = await run_workload(stub.url, _workload(4, 3, clients=2), model="tiny-llama", on_record=seen.append)

    assert len(trace.records) == 12 and len(seen) == 12
    assert all(r.ok for r in trace.records), [r.error for r in trace.records]
    assert all(r.completion_tokens == 3 for r in trace.records)  # max_tokens, from the usage event
    assert all(r.prompt_tokens and r.prompt_tokens > 0 for r in trace.records)
    assert all(r.sent_s <= r.first_token_s <= r.done_s for r in trace.records)
    assert len(stub.calls) == 12
    body = stub.calls[0]["body"]
    assert body["stream"] is True and body["ignore_eos"] is True and body["user"] in {"u0", "u1"}


async def test_a_session_sends_in_order_one_request_at_a_time():
    async with run_stub(StubEngine()) as stub:
        trace = await run_workload(stub.url, _workload(1, 5, clients=3), model="tiny-llama")

    ordered = trace.in_send_order()
    assert [r.request_id for r in ordered] == [f"s0-{k}" for k in range(5)]
    assert all(a.done_s <= b.sent_s for a, b in pairwise(ordered))


async def test_failures_are_recorded_not_raised():
    async with run_stub(StubEngine(behaviour=StubBehaviour(fail_status=503))) as stub:
        refused = await run_workload(stub.url, _workload(2, 1, clients=2), model="tiny-llama")
    async with run_stub(StubEngine(behaviour=StubBehaviour(tokens=6, die_after_chunks=2))) as stub:
        broken = await run_workload(stub.url, _workload(1, 1, clients=1), model="tiny-llama")

    assert [r.status for r in refused.records] == [503, 503]
    assert all(not r.ok and r.error.startswith("HTTP 503") for r in refused.records)
    (record,) = broken.records
    assert not record.ok and record.status == 200 and record.error


async def test_timed_workload_stops_issuing_at_its_duration():
    workload = replace(_workload(2, 1000, clients=2), duration_s=0.5)
    async with run_stub(StubEngine(behaviour=StubBehaviour(delay_s=0.05))) as stub:
        trace = await run_workload(stub.url, workload, model="tiny-llama")

    assert 2 <= len(trace.records) < 100
    assert max(r.sent_s for r in trace.records) < 0.5 + 0.05
    assert trace.exhausted_sessions == 0


async def test_timed_workload_reports_sessions_that_ran_dry():
    workload = replace(_workload(3, 2, clients=3), duration_s=5.0)
    async with run_stub(StubEngine()) as stub:
        trace = await run_workload(stub.url, workload, model="tiny-llama")

    assert len(trace.records) == 6
    assert trace.exhausted_sessions == 3


async def test_a_request_after_another_waits_until_that_one_finished():
    first = BenchRequest(id="a", user="u", messages=(("user", "first"),), max_tokens=3)
    later = BenchRequest(id="b", user="u", messages=(("user", "later"),), max_tokens=3, after="a")
    workload = Workload(
        name="t",
        description="",
        seed=0,
        sessions=(Session(id="a", user="u", requests=(first,)), Session(id="b", user="u", requests=(later,))),
        clients=2,
    )
    async with run_stub(StubEngine(behaviour=StubBehaviour(delay_s=0.2))) as stub:
        trace = await run_workload(stub.url, workload, model="tiny-llama")

    by_id = {r.request_id: r for r in trace.records}
    assert by_id["a"].ok and by_id["b"].ok
    assert by_id["b"].sent_s >= by_id["a"].done_s  # two clients, yet b waited for a
