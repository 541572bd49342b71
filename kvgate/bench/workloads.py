"""The benchmark's workloads: seeded request traces, replayed identically to every router.

A `Workload` is a list of sessions and a number of clients. The load
generator (`kvgate.bench.load`) runs it closed-loop: that many clients each
take the next session from a shared queue and send its requests one after the
other, each as soon as the previous one has finished, so the number of
requests in flight never exceeds the number of clients. A workload with a
duration stops issuing requests when the duration is over.

Five workloads, each built from a seed by `build_workload`:

- `shared-prefix`: groups (tenants) whose requests share one long system
  prompt, each with its own question; more groups than one engine's KV cache
  holds; all requests in one shuffled order, one request per session.
- `multi-turn`: real ShareGPT conversations. Turn k is sent with the whole
  history: every earlier user turn and the dataset's own assistant answers
  (not the engine's replies: random weights answer gibberish, and replies
  that differ between routers would make the traces differ, so the bound
  could not be computed once for all). A conversation ends before the first
  turn whose prompt plus answer would not fit `max_model_len`; several
  conversations run at once, one per client.
- `mixed`: shared-prefix groups of unequal popularity interleaved with
  one-off prompts (long, unique, never repeated), all in one shuffled order:
  the one-offs churn the engines' caches, so a router must keep the groups'
  prefixes resident while it finds room for prompts no one will send again.
- `skewed-users`: one heavy user with many clients and several light users
  with few, each user with its own system prompt, all sending for a fixed
  duration so the engines stay saturated; for fairness.
- `shared-cache` (built in `kvgate.bench.shared_cache`): where a KV cache
  shared by the engines matters: more long prefixes than the fleet's KV
  caches hold, chats that come back after their history left the engines, a
  burst on one prefix that needs more than one engine, and one engine
  restarted mid-run. Not in the default set: it is run with
  `--engine-sets plain,shared`.

Not here: sending (`load`), the hit-rate bound (`bound`), sizes (`config`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from kvgate.bench import sharegpt
from kvgate.bench.text import derive_seed, filler
from router.prompts import PromptEncoder

#: A chat message as `(role, content)`.
Message = tuple[str, str]


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One chat completion of a trace.

    Attributes:
        id: unique within the workload.
        user: who sends it (the OpenAI `user` field), for fairness accounting.
        messages: the chat, `(role, content)` pairs.
        max_tokens: tokens to generate; the engine is told to ignore EOS so
            every router makes it generate exactly this many.
        after: id of an earlier request of the trace that must have finished
            (answered or failed) before this one is sent; None sends it when
            its client takes it. A chat's next turn waits for its last one.
    """

    id: str
    user: str
    messages: tuple[Message, ...]
    max_tokens: int
    after: str | None = None

    def chat(self) -> list[dict[str, str]]:
        """The messages as OpenAI dicts."""
        return [{"role": role, "content": content} for role, content in self.messages]

    def body(self, model: str) -> dict[str, Any]:
        """The streamed `/v1/chat/completions` body sent for this request.

        Args:
            model: served model name.
        """
        return {
            "model": model,
            "messages": self.chat(),
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": self.user,
        }


@dataclass(frozen=True, slots=True)
class Session:
    """Requests one client sends in order, each after the previous one finished."""

    id: str
    user: str
    requests: tuple[BenchRequest, ...]


@dataclass(frozen=True, slots=True)
class Workload:
    """A trace and how it is driven.

    Attributes:
        name: registry name (`shared-prefix`, ...).
        description: one line for the report.
        seed: what the trace was built from.
        sessions: in the order clients take them.
        clients: closed-loop clients (requests in flight at most).
        duration_s: stop issuing after this many seconds; None runs every session.
        heavy_users: users with outsized demand (fairness workloads).
        light_users: the others, whose share of service is reported.
        params: the sizes it was built with, for the report.
        restart_after: after this many requests have finished, the runner
            kills one engine and starts it again while the load goes on;
            None restarts nothing.
    """

    name: str
    description: str
    seed: int
    sessions: tuple[Session, ...]
    clients: int
    duration_s: float | None = None
    heavy_users: tuple[str, ...] = ()
    light_users: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    restart_after: int | None = None

    def requests(self) -> Iterator[BenchRequest]:
        """Every request, session by session."""
        for session in self.sessions:
            yield from session.requests

    def by_id(self) -> dict[str, BenchRequest]:
        """Request id -> request."""
        return {request.id: request for request in self.requests()}

    @property
    def users(self) -> tuple[str, ...]:
        """Every user, in first-appearance order."""
        return tuple(dict.fromkeys(session.user for session in self.sessions))


@dataclass(frozen=True, slots=True)
class SharedPrefixSpec:
    """Sizes of `shared-prefix`.

    Attributes:
        groups: tenants, each with its own system prompt.
        requests_per_group: requests sharing one system prompt.
        prefix_tokens: least length of each system prompt, in tokens.
        question_tokens: least length of each request's own question.
        max_tokens: tokens generated per request.
        clients: closed-loop clients.
    """

    groups: int = 12
    requests_per_group: int = 16
    prefix_tokens: int = 1024
    question_tokens: int = 48
    max_tokens: int = 32
    clients: int = 8


@dataclass(frozen=True, slots=True)
class MultiTurnSpec:
    """Sizes of `multi-turn`.

    Attributes:
        conversations: ShareGPT chats replayed.
        clients: conversations in progress at once.
        max_turns: user turns kept per conversation.
        max_tokens: tokens generated per turn.
        scan: records read from the head of the dataset to choose from.
        min_user_turns: fewest turns a conversation must fit.
    """

    conversations: int = 24
    clients: int = 6
    max_turns: int = 8
    max_tokens: int = 32
    scan: int = 3000
    min_user_turns: int = 2


@dataclass(frozen=True, slots=True)
class SkewedUsersSpec:
    """Sizes of `skewed-users`.

    Attributes:
        light_users: users besides the heavy one.
        heavy_clients: closed-loop clients of the heavy user.
        light_clients: closed-loop clients of each light user.
        duration_s: seconds every client keeps sending.
        system_tokens: least length of each user's own system prompt.
        question_tokens: least length of each request's question.
        max_tokens: tokens generated per request.
        requests_per_client: requests prepared per client (a client that
            runs out stops early, and the summary says so).
    """

    light_users: int = 6
    heavy_clients: int = 12
    light_clients: int = 2
    duration_s: float = 60.0
    system_tokens: int = 384
    question_tokens: int = 96
    max_tokens: int = 32
    requests_per_client: int = 120


@dataclass(frozen=True, slots=True)
class MixedSpec:
    """Sizes of `mixed`.

    Attributes:
        groups: tenants, each with its own system prompt.
        requests: requests of all groups together; group g gets a share
            proportional to 1 / (g + 1) (Zipf), at least one each.
        prefix_tokens: least length of each system prompt, in tokens.
        question_tokens: least length of each grouped request's question.
        one_offs: prompts sharing nothing with any other.
        one_off_tokens: mean length of a one-off prompt; each is drawn
            uniformly from half to one and a half times this.
        max_tokens: tokens generated per request.
        clients: closed-loop clients.
    """

    groups: int = 10
    requests: int = 160
    prefix_tokens: int = 1024
    question_tokens: int = 48
    one_offs: int = 64
    one_off_tokens: int = 1280
    max_tokens: int = 32
    clients: int = 8


@dataclass(frozen=True, slots=True)
class SharedCacheSpec:
    """Sizes of `shared-cache` (see `kvgate.bench.shared_cache`).

    Attributes:
        documents: distinct long prefixes; with `prefix_tokens` they should
            need more KV blocks than the whole fleet has, so revisits find
            them evicted from the engines.
        visits: requests per document, spread over the trace.
        prefix_tokens: least length of each document prefix, in tokens.
        hot_requests: requests on one more prefix, sent back to back (a
            burst more than one engine must serve).
        chats: conversations that come back later.
        turns: user turns per conversation, spread over the trace, so that
            much other traffic passes between two turns of one chat.
        turn_tokens: least length of each user turn and of each answer kept
            in the history (so a history grows by about twice this per turn).
        question_tokens: least length of each document or hot request's question.
        max_tokens: tokens generated per request.
        clients: closed-loop clients.
        restart_at: share of the trace's requests finished when one engine
            is killed and started again; None restarts nothing.
    """

    documents: int = 24
    visits: int = 3
    prefix_tokens: int = 1024
    hot_requests: int = 24
    chats: int = 6
    turns: int = 3
    turn_tokens: int = 192
    question_tokens: int = 32
    max_tokens: int = 16
    clients: int = 8
    restart_at: float | None = 0.5


@dataclass(frozen=True, slots=True)
class WorkloadSizes:
    """Every workload's sizes, plus the engines' context limit they must fit."""

    shared_prefix: SharedPrefixSpec = SharedPrefixSpec()
    multi_turn: MultiTurnSpec = MultiTurnSpec()
    skewed_users: SkewedUsersSpec = SkewedUsersSpec()
    mixed: MixedSpec = MixedSpec()
    shared_cache: SharedCacheSpec = SharedCacheSpec()
    max_model_len: int = 4096


def shared_prefix(spec: SharedPrefixSpec, seed: int, encoder: PromptEncoder) -> Workload:
    """Build `shared-prefix` (see the module docstring).

    Args:
        spec: sizes.
        seed: trace seed.
        encoder: tokenizer that measures text lengths.

    Returns:
        The workload; one session per request, in shuffled order.
    """
    systems = [
        filler(encoder, derive_seed(seed, "system", g), spec.prefix_tokens, lead=f"You are the assistant of team {g}.")
        for g in range(spec.groups)
    ]
    requests = []
    for g in range(spec.groups):
        for r in range(spec.requests_per_group):
            question = filler(encoder, derive_seed(seed, "question", g, r), spec.question_tokens, lead=f"Question {r}:")
            requests.append(
                BenchRequest(
                    id=f"g{g:02d}-r{r:03d}",
                    user=f"team-{g:02d}",
                    messages=(("system", systems[g]), ("user", question)),
                    max_tokens=spec.max_tokens,
                )
            )
    random.Random(derive_seed(seed, "order")).shuffle(requests)
    return Workload(
        name="shared-prefix",
        description=(
            f"{spec.groups} groups x {spec.requests_per_group} requests sharing a >= {spec.prefix_tokens}-token "
            f"system prompt, shuffled, {spec.clients} closed-loop clients"
        ),
        seed=seed,
        sessions=tuple(Session(id=r.id, user=r.user, requests=(r,)) for r in requests),
        clients=spec.clients,
        params=asdict(spec),
    )


def mixed(spec: MixedSpec, seed: int, encoder: PromptEncoder) -> Workload:
    """Build `mixed` (see the module docstring).

    Args:
        spec: sizes.
        seed: trace seed; also draws the group sizes' rounding and the
            one-offs' lengths.
        encoder: tokenizer that measures text lengths.

    Returns:
        The workload; one session per request, in shuffled order.
    """
    rng = random.Random(derive_seed(seed, "mixed"))
    weights = [1.0 / (g + 1) for g in range(spec.groups)]
    total = sum(weights)
    sizes = [max(1, round(spec.requests * w / total)) for w in weights]
    requests = []
    for g, size in enumerate(sizes):
        system = filler(encoder, derive_seed(seed, "mixed-system", g), spec.prefix_tokens, lead=f"You advise desk {g}.")
        for r in range(size):
            question = filler(encoder, derive_seed(seed, "mixed-question", g, r), spec.question_tokens, lead=f"Q{r}:")
            requests.append(
                BenchRequest(
                    id=f"g{g:02d}-r{r:03d}",
                    user=f"desk-{g:02d}",
                    messages=(("system", system), ("user", question)),
                    max_tokens=spec.max_tokens,
                )
            )
    for k in range(spec.one_offs):
        length = rng.randint(spec.one_off_tokens // 2, spec.one_off_tokens * 3 // 2)
        text = filler(encoder, derive_seed(seed, "one-off", k), length, lead=f"Summarise note {k}.")
        requests.append(
            BenchRequest(id=f"once-{k:03d}", user=f"once-{k:03d}", messages=(("user", text),), max_tokens=spec.max_tokens)
        )
    rng.shuffle(requests)
    return Workload(
        name="mixed",
        description=(
            f"{len(requests) - spec.one_offs} requests in {spec.groups} Zipf-sized groups sharing a "
            f">= {spec.prefix_tokens}-token system prompt, mixed with {spec.one_offs} one-off prompts of about "
            f"{spec.one_off_tokens} tokens, shuffled, {spec.clients} closed-loop clients"
        ),
        seed=seed,
        sessions=tuple(Session(id=r.id, user=r.user, requests=(r,)) for r in requests),
        clients=spec.clients,
        params=asdict(spec),
    )


def _turns(
    chat: sharegpt.Chat, spec: MultiTurnSpec, encoder: PromptEncoder, max_model_len: int
) -> list[tuple[Message, ...]]:
    """Prompts of a chat's turns that fit, each the whole history up to that user turn."""
    prompts: list[tuple[Message, ...]] = []
    for index, (role, _) in enumerate(chat.messages):
        if role != "user":
            continue
        prompt = chat.messages[: index + 1]
        tokens = len(encoder.encode_chat([{"role": r, "content": c} for r, c in prompt]))
        if tokens + spec.max_tokens > max_model_len or len(prompts) == spec.max_turns:
            break
        prompts.append(prompt)
    return prompts


def multi_turn(spec: MultiTurnSpec, seed: int, encoder: PromptEncoder, max_model_len: int) -> Workload:
    """Build `multi-turn` from ShareGPT (see the module docstring).

    Args:
        spec: sizes.
        seed: picks the conversations.
        encoder: the model's tokenizer, to keep prompts within `max_model_len`.
        max_model_len: the engines' context limit in tokens.

    Returns:
        The workload; one session per conversation.

    Raises:
        sharegpt.DatasetMissing: the dataset package is not installed.
        ValueError: fewer usable conversations than asked for.
    """
    chats = sharegpt.load_chats(scan=spec.scan, min_user_turns=spec.min_user_turns)
    random.Random(derive_seed(seed, "chats")).shuffle(chats)
    sessions = []
    for chat in chats:
        prompts = _turns(chat, spec, encoder, max_model_len)
        if len(prompts) < spec.min_user_turns:
            continue
        user = f"conv-{len(sessions):03d}"
        requests = tuple(
            BenchRequest(id=f"{user}-t{turn}", user=user, messages=prompt, max_tokens=spec.max_tokens)
            for turn, prompt in enumerate(prompts)
        )
        sessions.append(Session(id=user, user=user, requests=requests))
        if len(sessions) == spec.conversations:
            break
    if len(sessions) < spec.conversations:
        raise ValueError(f"only {len(sessions)} ShareGPT conversations fit; scan more records")
    turns = sum(len(s.requests) for s in sessions)
    return Workload(
        name="multi-turn",
        description=(
            f"{spec.conversations} ShareGPT conversations ({turns} turns, whole history each turn, "
            f"dataset answers), {spec.clients} at a time"
        ),
        seed=seed,
        sessions=tuple(sessions),
        clients=spec.clients,
        params={**asdict(spec), "max_model_len": max_model_len, "turns": turns},
    )


def skewed_users(spec: SkewedUsersSpec, seed: int, encoder: PromptEncoder) -> Workload:
    """Build `skewed-users` (see the module docstring).

    Args:
        spec: sizes.
        seed: trace seed.
        encoder: tokenizer that measures text lengths.

    Returns:
        The workload; one session per client, all running at once for `duration_s`.
    """
    plan = [("heavy", spec.heavy_clients)] + [(f"light-{u:02d}", spec.light_clients) for u in range(spec.light_users)]
    sessions = []
    for user, clients in plan:
        system = filler(encoder, derive_seed(seed, "system", user), spec.system_tokens, lead=f"You serve {user}.")
        for client in range(clients):
            requests = []
            for k in range(spec.requests_per_client):
                question = filler(
                    encoder, derive_seed(seed, "question", user, client, k), spec.question_tokens, lead=f"Ask {k}:"
                )
                requests.append(
                    BenchRequest(
                        id=f"{user}-c{client:02d}-{k:04d}",
                        user=user,
                        messages=(("system", system), ("user", question)),
                        max_tokens=spec.max_tokens,
                    )
                )
            sessions.append(Session(id=f"{user}-c{client:02d}", user=user, requests=tuple(requests)))
    light = tuple(user for user, _ in plan[1:])
    return Workload(
        name="skewed-users",
        description=(
            f"1 heavy user x {spec.heavy_clients} clients, {spec.light_users} light users x {spec.light_clients} "
            f"clients, all sending for {spec.duration_s:g} s"
        ),
        seed=seed,
        sessions=tuple(sessions),
        clients=len(sessions),
        duration_s=spec.duration_s,
        heavy_users=("heavy",),
        light_users=light,
        params=asdict(spec),
    )


def _shared_cache(sizes: WorkloadSizes, seed: int, encoder: PromptEncoder) -> Workload:
    # NOTE: imported here because that module builds on this one's types.
    from kvgate.bench.shared_cache import shared_cache

    return shared_cache(sizes.shared_cache, seed, encoder, sizes.max_model_len)


_BUILDERS: dict[str, Callable[[WorkloadSizes, int, PromptEncoder], Workload]] = {
    "shared-prefix": lambda sizes, seed, enc: shared_prefix(sizes.shared_prefix, seed, enc),
    "multi-turn": lambda sizes, seed, enc: multi_turn(sizes.multi_turn, seed, enc, sizes.max_model_len),
    "skewed-users": lambda sizes, seed, enc: skewed_users(sizes.skewed_users, seed, enc),
    "mixed": lambda sizes, seed, enc: mixed(sizes.mixed, seed, enc),
    "shared-cache": _shared_cache,
}

#: Workload names, in the order a run replays them.
WORKLOADS: tuple[str, ...] = tuple(_BUILDERS)

#: What `kvgate bench` replays when not told (`shared-cache` restarts an engine: asked for by name).
DEFAULT_WORKLOADS: tuple[str, ...] = ("shared-prefix", "multi-turn", "skewed-users", "mixed")


def build_workload(name: str, sizes: WorkloadSizes, seed: int, encoder: PromptEncoder) -> Workload:
    """Build the workload called `name`.

    Args:
        name: one of `WORKLOADS`.
        sizes: every workload's sizes.
        seed: trace seed.
        encoder: the model's tokenizer.

    Raises:
        KeyError: an unknown name.
    """
    if name not in _BUILDERS:
        raise KeyError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return _BUILDERS[name](sizes, seed, encoder)
