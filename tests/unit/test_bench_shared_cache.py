"""The `shared-cache` workload: more long prefixes than the fleet holds, chats that return, a hot burst, a restart."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from kvgate.bench.shared_cache import shared_cache
from kvgate.bench.workloads import SharedCacheSpec, WorkloadSizes, build_workload
from tests.support.word_encoder import WordEncoder

ENC = WordEncoder()
SPEC = SharedCacheSpec(
    documents=6, visits=3, prefix_tokens=80, hot_requests=5, chats=2, turns=3, turn_tokens=20, question_tokens=5,
    max_tokens=4, clients=3, restart_at=0.5,
)  # fmt: skip


def _build(spec: SharedCacheSpec = SPEC, seed: int = 4, limit: int = 4096):
    return shared_cache(spec, seed, ENC, limit)


def test_same_seed_same_trace_and_the_registry_builds_it():
    workload = _build()

    assert workload == _build()
    assert [r.messages for r in workload.requests()] != [r.messages for r in _build(seed=5).requests()]
    assert build_workload("shared-cache", WorkloadSizes(shared_cache=SPEC), 4, ENC) == workload


def test_every_document_is_visited_once_per_round_with_the_others_in_between():
    requests = list(_build().requests())
    docs = [r for r in requests if r.user.startswith("doc-")]

    assert Counter(r.user for r in docs) == {f"doc-{d:03d}": SPEC.visits for d in range(SPEC.documents)}
    systems = {r.user: r.messages[0][1] for r in docs}
    assert len(set(systems.values())) == SPEC.documents
    assert all(len(ENC.encode_prompt(text)) >= SPEC.prefix_tokens for text in systems.values())
    for d in range(SPEC.documents):
        visits = [r.id for r in docs if r.user == f"doc-{d:03d}"]
        assert visits == [f"doc{d:03d}-v{v}" for v in range(SPEC.visits)]  # round v holds visit v
    order = [r.user for r in docs]
    assert order[: SPEC.documents] != order[SPEC.documents : 2 * SPEC.documents]  # each round shuffled anew


def test_chats_grow_their_history_and_wait_for_their_previous_turn():
    requests = list(_build().requests())
    position = {r.id: i for i, r in enumerate(requests)}

    for c in range(SPEC.chats):
        turns = [r for r in requests if r.user == f"chat-{c:02d}"]
        assert [t.id for t in turns] == [f"chat{c:02d}-t{k}" for k in range(SPEC.turns)]
        assert turns[0].after is None
        for earlier, later in zip(turns, turns[1:]):
            assert later.after == earlier.id and position[earlier.id] < position[later.id]
            assert later.messages[: len(earlier.messages)] == earlier.messages
            assert later.messages[len(earlier.messages)][0] == "assistant"
            between = position[later.id] - position[earlier.id]
            assert between > SPEC.documents // 2  # other traffic passes between two turns


def test_the_hot_prefix_comes_as_one_burst_and_the_restart_falls_halfway():
    workload = _build()
    users = [r.user for r in workload.requests()]

    first = users.index("hot")
    assert users[first : first + SPEC.hot_requests] == ["hot"] * SPEC.hot_requests
    assert users.count("hot") == SPEC.hot_requests
    assert len({r.messages[0][1] for r in workload.requests() if r.user == "hot"}) == 1
    total = SPEC.documents * SPEC.visits + SPEC.hot_requests + SPEC.chats * SPEC.turns
    assert len(users) == total and all(len(s.requests) == 1 for s in workload.sessions)
    assert workload.restart_after == total // 2
    assert _build(replace(SPEC, restart_at=None)).restart_after is None


def test_sizes_that_cannot_make_a_trace_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        _build(limit=60)
    with pytest.raises(ValueError):
        _build(replace(SPEC, restart_at=1.5))
    with pytest.raises(ValueError):
        _build(replace(SPEC, documents=0))
