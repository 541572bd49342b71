"""What a launcher needs to run the cache: node command lines and the engines' connector config.

`kvgate up` (and later the operator) start L2 cache nodes as processes and
pass every vLLM engine a ``--kv-transfer-config`` that loads
`kvcache.vllm_connector.TieredKVConnector` with the same tiers. This module
builds both, without importing vLLM or starting anything itself::

    token = write_token_file(tmp / "cache.token")
    argv = cache_node_argv(node_id="n0", ready_file=tmp / "n0.json", labels={"host": "h0"}, token_file=token)
    ...start argv, then: spec = wait_ready(tmp / "n0.json").spec()
    extra = connector_extra_config(peers=[spec], l3_redis_url=url_or_none, l3_directory=tmp / "l3", token_file=token)
    engine_args = ["--kv-transfer-config", kv_transfer_config(extra)]

Every engine that should share blocks gets the same `extra` (same peers, same
L3, same `model`).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvcache.ring import NodeInfo

CONNECTOR_CLASS = "TieredKVConnector"
CONNECTOR_MODULE = "kvcache.vllm_connector"


def cache_node_argv(
    *,
    node_id: str,
    ready_file: Path,
    port: int = 0,
    host: str = "127.0.0.1",
    labels: Mapping[str, str] | None = None,
    capacity_bytes: int = 1 << 30,
    peers: Sequence[str] = (),
    redis_url: str | None = None,
    replicas: int = 1,
    token_file: Path | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The command line of one ``kvgate cache-node``.

    Args:
        node_id: unique node name.
        ready_file: where the node writes its address once serving.
        port: port to bind (0: any free one; read it from `ready_file`).
        host: interface to bind.
        labels: failure domains, e.g. ``{"host": "h1", "zone": "z1"}``.
        capacity_bytes: the node's byte budget.
        peers: static member specs (for hand-off on SIGTERM); ignored with `redis_url`.
        redis_url: register in this Redis instead (heartbeat and expiry).
        replicas: replication factor, equal to the connectors' ``l2.replicas``.
        token_file: file holding the cluster token (see `write_token_file`);
            the same file goes to the engines (`connector_extra_config`).
        python: interpreter to run.
    """
    argv = [python, "-m", "kvgate", "cache-node", "--node-id", node_id, "--host", host, "--port", str(port),
            "--capacity-bytes", str(capacity_bytes), "--replicas", str(replicas), "--ready-file", str(ready_file)]
    if labels:
        argv += ["--labels", ",".join(f"{k}={v}" for k, v in sorted(labels.items()))]
    if redis_url:
        argv += ["--redis-url", redis_url]
    elif peers:
        argv += ["--peers", ",".join(peers)]
    if token_file is not None:
        argv += ["--token-file", str(token_file)]
    return argv


def write_token_file(path: Path) -> Path:
    """Write a new random cluster token to `path`, readable by its owner only.

    The token is never put on a command line (where ``ps`` shows it): nodes
    and engines are given the file's path.

    Returns:
        `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32))
    os.replace(tmp, path)
    return path


def wait_ready(ready_file: Path, timeout_s: float = 60.0) -> NodeInfo:
    """Wait for a node's ready file and return the node as clients should list it.

    Raises:
        TimeoutError: the file did not appear in time.
    """
    deadline = time.monotonic() + timeout_s
    while not ready_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{ready_file} did not appear within {timeout_s}s")
        time.sleep(0.05)
    return NodeInfo.parse(json.loads(ready_file.read_text())["spec"])


def connector_extra_config(
    *,
    peers: Sequence[str] = (),
    membership_url: str | None = None,
    replicas: int = 1,
    l3_redis_url: str | None = None,
    l3_directory: Path | None = None,
    l1_capacity_bytes: int = 512 << 20,
    model: str = "",
    token_file: Path | None = None,
) -> dict[str, Any]:
    """``kv_connector_extra_config`` for engines sharing these tiers.

    L3 is Redis when `l3_redis_url` is given, else the directory when given,
    else off (see `redis_reachable` to decide).

    Args:
        peers: L2 node specs (``NodeInfo.spec()``, the ready files' ``spec``).
        membership_url: discover L2 nodes registered in this Redis instead.
        replicas: copies of each block in L2.
        l3_redis_url: Redis for L3 (AOF recommended).
        l3_directory: directory for L3 when there is no Redis.
        l1_capacity_bytes: in-engine L1 budget.
        model: namespace model identity (default: the served model name).
        token_file: file holding the token the L2 nodes accept.
    """
    extra: dict[str, Any] = {"l1": {"capacity_bytes": l1_capacity_bytes}}
    if peers or membership_url:
        extra["l2"] = {"peers": list(peers), "replicas": replicas}
        if membership_url:
            extra["l2"]["membership_url"] = membership_url
        if token_file is not None:
            extra["l2"]["token_file"] = str(token_file)
    if l3_redis_url:
        extra["l3"] = {"kind": "redis", "url": l3_redis_url}
    elif l3_directory is not None:
        extra["l3"] = {"kind": "disk", "path": str(l3_directory)}
    if model:
        extra["connector"] = {"model": model}
    return extra


def kv_transfer_config(extra: Mapping[str, Any]) -> str:
    """The ``--kv-transfer-config`` JSON that loads the connector with `extra`."""
    return json.dumps(
        {
            "kv_connector": CONNECTOR_CLASS,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": dict(extra),
        }
    )


def redis_reachable(url: str, timeout_s: float = 0.5) -> bool:
    """Whether a Redis answers PING at `url` (to choose L3: Redis, else a directory)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.exceptions.RedisError, OSError):
        return False
    finally:
        client.close()
