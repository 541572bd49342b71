"""Errors raised by the KV block store, its tiers and its cache nodes.

Who catches what: the tiered store catches `TierError` from a tier and turns it
into a skipped tier (counted in a metric), so nothing below reaches a request
path as an exception. `ConfigError` is raised at start-up and is meant to stop
the process. Everything else is a bug and propagates.

Hierarchy::

    KVCacheError
    ├── ConfigError              permanent: bad settings, unusable namespace
    ├── CorruptBlock             permanent: a frame failed its length/checksum/key check
    └── TierError                a tier could not serve a call
        ├── TierUnavailable      retryable: connection refused or reset, node gone
        │   └── TierTimeout      retryable: no answer within the deadline
        └── TierRejected         permanent: the tier refused the data (too large, bad request)

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
