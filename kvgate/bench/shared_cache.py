"""The `shared-cache` workload: traffic where a KV cache shared by the engines pays.

Four kinds of request, in one seeded order, one request per session (the
load generator's clients take them in that order):

- documents: `documents` long prefixes (a system prompt each, then a short
  question), each visited `visits` times. The trace goes in rounds; each
  round visits every document once in a shuffled order, so between two visits
  of one document about `documents` others pass. Sized so that all of them
  need more KV blocks than the fleet has, a revisit finds its prefix evicted
  from every engine: plain engines recompute it, engines wired to the shared
  cache load it from L1/L2/L3 (on whichever engine the router picks).
- chats: `chats` conversations of `turns` turns, turn k in round k, so a
  chat comes back after a round of other traffic has pushed its history out
  of the engines. Each turn is sent with the whole history (the earlier user
  turns and fixed answers, as `multi-turn` does) and waits for its previous
  turn (`BenchRequest.after`).
- a hot prefix: `hot_requests` requests on one more prefix, back to back a
  third of the way in, so every client is on it at once: more than one
  engine must serve it, and only a shared cache spares the second engine the
  prefill.
- an engine restart: once `restart_at` of the requests have finished, the
  runner kills one engine and starts it again (`Workload.restart_after`);
  its GPU cache (and on shared-cache engines its L1) is gone, the blocks in
  L2/L3 are not, and the router must send around it meanwhile.

Called through `kvgate.bench.workloads.build_workload`; sizes in
`kvgate.bench.config`. Not here: sending (`load`), engines (`fleet`).
"""

from __future__ import annotations

import random
from dataclasses import asdict

from kvgate.bench.text import derive_seed, filler
from kvgate.bench.workloads import BenchRequest, Message, Session, SharedCacheSpec, Workload
from router.prompts import PromptEncoder


def _chat_turns(spec: SharedCacheSpec, seed: int, encoder: PromptEncoder, chat: int) -> list[tuple[Message, ...]]:
    """Prompts of one chat's turns, each the whole history up to that user turn."""

    def text(kind: str, turn: int, lead: str) -> str:
        return filler(encoder, derive_seed(seed, "chat", chat, kind, turn), spec.turn_tokens, lead=lead)

    history: list[Message] = [("system", text("system", 0, f"You are the assistant of chat {chat}."))]
    prompts = []
    for turn in range(spec.turns):
        history.append(("user", text("user", turn, f"Turn {turn}:")))
        prompts.append(tuple(history))
        history.append(("assistant", text("answer", turn, f"Answer {turn}:")))
    return prompts


def shared_cache(spec: SharedCacheSpec, seed: int, encoder: PromptEncoder, max_model_len: int) -> Workload:
    """Build `shared-cache` (see the module docstring).

    Args:
        spec: sizes.
        seed: trace seed.
        encoder: the model's tokenizer, to size the text and check the chats fit.
        max_model_len: the engines' context limit in tokens.

    Returns:
        The workload; one session per request, in trace order.

    Raises:
        ValueError: sizes that make no trace (no documents, no visits, a
            restart point outside (0, 1)), or a chat whose last turn does
            not fit `max_model_len`.
    """
    if spec.documents < 1 or spec.visits < 1:
        raise ValueError("shared-cache needs at least one document and one visit")
    if spec.restart_at is not None and not 0.0 < spec.restart_at < 1.0:
        raise ValueError(f"restart_at {spec.restart_at} must be between 0 and 1")
    documents = [
        filler(encoder, derive_seed(seed, "document", d), spec.prefix_tokens, lead=f"You answer from document {d}.")
        for d in range(spec.documents)
    ]

    def question(*parts: object) -> str:
        return filler(encoder, derive_seed(seed, "question", *parts), spec.question_tokens, lead="Question:")

    chats = [_chat_turns(spec, seed, encoder, c) for c in range(spec.chats)]
    for c, prompts in enumerate(chats):
        longest = len(encoder.encode_chat([{"role": r, "content": t} for r, t in prompts[-1]]))
        if longest + spec.max_tokens > max_model_len:
            raise ValueError(f"chat {c} grows to {longest} tokens; it does not fit max_model_len {max_model_len}")

    order = random.Random(derive_seed(seed, "order"))
    trace: list[BenchRequest] = []
    for round_ in range(max(spec.visits, spec.turns)):
        batch = []
        if round_ < spec.visits:
            for d in range(spec.documents):
                batch.append(
                    BenchRequest(
                        id=f"doc{d:03d}-v{round_}",
                        user=f"doc-{d:03d}",
                        messages=(("system", documents[d]), ("user", question("document", d, round_))),
                        max_tokens=spec.max_tokens,
                    )
                )
        order.shuffle(batch)
        if round_ < spec.turns:
            for c, prompts in enumerate(chats):
                turn = BenchRequest(
                    id=f"chat{c:02d}-t{round_}",
                    user=f"chat-{c:02d}",
                    messages=prompts[round_],
                    max_tokens=spec.max_tokens,
                    after=f"chat{c:02d}-t{round_ - 1}" if round_ else None,
                )
                batch.insert(order.randrange(len(batch) + 1), turn)
        trace += batch
    if spec.hot_requests:
        hot = filler(encoder, derive_seed(seed, "hot"), spec.prefix_tokens, lead="You answer from the hot document.")
        burst = [
            BenchRequest(
                id=f"hot-r{r:03d}",
                user="hot",
                messages=(("system", hot), ("user", question("hot", r))),
                max_tokens=spec.max_tokens,
            )
            for r in range(spec.hot_requests)
        ]
        at = len(trace) // 3
        trace[at:at] = burst
    restart_after = None if spec.restart_at is None else max(1, int(spec.restart_at * len(trace)))
    return Workload(
        name="shared-cache",
        description=(
            f"{spec.documents} documents of >= {spec.prefix_tokens} tokens x {spec.visits} visits in shuffled rounds, "
            f"{spec.chats} chats x {spec.turns} turns coming back a round later, a burst of {spec.hot_requests} "
            f"requests on one hot prefix, "
            + ("no engine restart" if restart_after is None else f"one engine restarted after {restart_after} requests")
            + f"; {len(trace)} requests, {spec.clients} closed-loop clients"
        ),
        seed=seed,
        sessions=tuple(Session(id=r.id, user=r.user, requests=(r,)) for r in trace),
        clients=spec.clients,
        params={**asdict(spec), "max_model_len": max_model_len, "requests": len(trace)},
        restart_after=restart_after,
    )
