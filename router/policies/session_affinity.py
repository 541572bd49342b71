"""`session-affinity`: requests with the same session key go to the same pod.

The key comes from a header (`x-session-id` by default). Pods are ranked by
rendezvous (highest random weight) hashing, so when a pod leaves only its own
sessions move. Requests without a key cost the same everywhere and fall to the
router's tie-break (least in flight).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from router.policies.base import PolicyDeps, RouteRequest
from router.pods import Pod


def rendezvous_weight(key: str, pod_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{pod_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class SessionAffinityPolicy:
    name = "session-affinity"

    def __init__(self, deps: PolicyDeps) -> None:
        pass

    def costs(self, request: RouteRequest, pods: Sequence[Pod]) -> list[float]:
        if not request.session_key:
            return [0.0] * len(pods)
        return [-float(rendezvous_weight(request.session_key, pod.id)) for pod in pods]
