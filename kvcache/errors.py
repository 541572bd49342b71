"""Errors raised by the KV block store, its tiers and its cache nodes.

Who catches what: the tiered store catches `TierError` from a tier. A
retryable one (`TierUnavailable`, `TierTimeout`) marks the tier down for a
while; a permanent one (`TierRejected`) costs only that call (its blocks are
dropped or missed and counted) and never takes the tier, or an L2 node, out of
use. Nothing below reaches a request path as an exception. `ConfigError` is
raised at start-up and is meant to stop the process. A cache node raises
`RequestRejected` at a caller that breaks its limits and turns it into a gRPC
status. Everything else is a bug and propagates.

Hierarchy::

    KVCacheError
    ├── ConfigError              permanent: bad settings, unusable namespace
    ├── CorruptBlock             permanent: a frame failed its length/checksum/key check
    ├── RequestRejected          a cache node refuses a caller's request
    │   ├── InvalidRequest       permanent: lies about sizes, bad keys (INVALID_ARGUMENT)
    │   └── OverBudget           retryable: the node's upload budget is full now (RESOURCE_EXHAUSTED)
    └── TierError                a tier could not serve a call
        ├── TierUnavailable      retryable: connection refused or reset, node gone
        │   └── TierTimeout      retryable: no answer within the deadline
        └── TierRejected         permanent: the tier refused this call (too large, bad request,
                                 a node's budget full, Redis out of memory); the tier stays up

Retryable errors mean "try later or elsewhere"; permanent ones mean "the same
call will fail again".
"""

from __future__ import annotations


class KVCacheError(Exception):
    """Base of every error raised by kvcache."""

    #: Whether the same call may succeed later (or on another node).
    retryable: bool = False


class ConfigError(KVCacheError):
    """Settings that cannot work: unknown tier name, bad address, bad size."""


class CorruptBlock(KVCacheError):
    """A stored frame failed its check: wrong magic, length, key or checksum.

    A corrupt block is a miss: it is never handed to an engine.
    """


class TierError(KVCacheError):
    """A tier could not serve a call.

    Attributes:
        tier: name of the tier that failed (e.g. ``"l2"``).
    """

    def __init__(self, tier: str, message: str) -> None:
        super().__init__(f"{tier}: {message}")
        self.tier = tier


class TierUnavailable(TierError):
    """The tier (or every node able to serve the keys) cannot be reached."""

    retryable = True


class TierTimeout(TierUnavailable):
    """The tier did not answer within its deadline."""


class TierRejected(TierError):
    """The tier refused the data; retrying the same call will not help."""


class RequestRejected(KVCacheError):
    """A cache node refuses a request that breaks its limits (raised in the node only).

    Attributes:
        reason: metric label (``key``, ``total``, ``offset``, ``budget``, ...).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidRequest(RequestRejected):
    """The request is malformed or lies (a chunk beyond its total, a total over the limit)."""


class OverBudget(RequestRejected):
    """Accepting the request now would exceed the node's memory budget for uploads."""

    retryable = True
