"""Start-up checks of the `kvgate` commands that run a gateway: each mistake is one clear line.

`kvgate serve` (`router.server.main`) and `kvgate up` (`kvgate.cluster`)
check what they were given before they start anything, so a user reads what
is wrong and how to fix it instead of a traceback, and the exit status says
whose mistake it is: 2 for what was written (flags, config values, URLs,
the model directory), 1 for what the machine refused (a port in use).
`CommandParser` gives argparse's own errors the same one-line form.

Every check raises `router.errors.StartupError`. Nothing here runs once the
gateway serves.
"""

from __future__ import annotations

import argparse
import errno
import math
import socket
import urllib.parse
from pathlib import Path
from typing import NoReturn

from router.cpu_priority import PRIORITIES
from router.errors import InvalidRequest, StartupError
from router.kv_events import parse_event_sources
from router.policies import parse_spec
from router.settings import Settings


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: the problem, and where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def check_url(url: str, what: str) -> str:
    """Check an http(s) base URL such as `http://pod-a:8000`.

    Args:
        url: the URL as given.
        what: how the user gave it, for the message (`--worker-urls`).

    Returns:
        The URL without a trailing slash.

    Raises:
        StartupError: not an http or https URL with a host and a valid port.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError when out of range or not a number
    except ValueError as exc:
        raise StartupError(f"{what}: {url!r} is not a URL ({exc}); expected http://HOST:PORT") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StartupError(f"{what}: {url!r} is not an http(s) URL; expected http://HOST:PORT, e.g. http://127.0.0.1:8001")
    if port == 0:
        raise StartupError(f"{what}: {url!r} has port 0; give the port the pod listens on")
    if parts.query or parts.fragment:
        raise StartupError(f"{what}: {url!r} has a query or fragment; give the pod's base URL only")
    return url.rstrip("/")


def check_port(port: int, what: str = "--port") -> None:
    """Raise `StartupError` unless 0 <= port <= 65535."""
    if not 0 <= port <= 65535:
        raise StartupError(f"{what} {port} is not a TCP port; give 1-65535, or 0 for any free port")


def check_listen(host: str, port: int, what: str = "--port") -> None:
    """Check that `host:port` can be listened on now, by binding it once.

    The server binds it again right after; this check only turns the common
    mistakes into one line before anything has started.

    Raises:
        StartupError: the host does not resolve to this machine (exit 2), or
            the port is in use or not allowed (exit 1).
    """
    check_port(port, what)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise StartupError(
            f"--host {host!r} does not resolve ({exc}); give an address of this machine such as 127.0.0.1 or 0.0.0.0"
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            where = f"{host}:{port}"
            if exc.errno == errno.EADDRINUSE:
                hint = f"another process listens there; stop it or pick another {what}"
            elif exc.errno == errno.EACCES:
                hint = f"ports below 1024 need privileges; pick another {what}"
            elif exc.errno == errno.EADDRNOTAVAIL:
                raise StartupError(f"cannot listen on {where}: {host} is not an address of this machine") from None
            else:
                hint = exc.strerror or str(exc)
            raise StartupError(f"cannot listen on {where}: {exc.strerror or exc}: {hint}", exit_status=1) from None


def _positive(value: float, what: str, *, zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise StartupError(f"{what} must be {'zero or more' if zero else 'more than zero'}, got {value!r}")


def check_settings(settings: Settings) -> None:
    """Check values that parse but cannot work: URLs, ports, policy names, limits.

    Raises:
        StartupError: the first problem found (exit status 2).
    """
    for url in settings.discovery.worker_urls:
        check_url(url, "--worker-urls")
    try:
        sources = parse_event_sources(settings.discovery.kv_event_sources)
    except ValueError as exc:
        raise StartupError(f"--kv-events: {exc}") from None
    for url in sources:
        check_url(url, "--kv-events")
    check_port(settings.server.port)
    log_path = settings.routing.decision_log
    if log_path is not None:
        try:
            log_path.open("a").close()  # the gateway appends to it
        except OSError as exc:
            raise StartupError(f"--decision-log {log_path}: {exc.strerror or exc}") from None
    try:
        parse_spec(settings.routing.policy)
    except InvalidRequest as exc:
        raise StartupError(f"--policy: {exc.message}") from None
    _positive(settings.admission.max_inflight_per_pod, "--max-inflight-per-pod (admission.max_inflight_per_pod)")
    _positive(settings.admission.max_queue, "--max-queue (admission.max_queue)", zero=True)
    admission = settings.admission
    _positive(admission.min_inflight_per_pod, "admission.min_inflight_per_pod")
    _positive(admission.engine_waiting_allowed, "admission.engine_waiting_allowed", zero=True)
    _positive(admission.ttft_floor_drift, "admission.ttft_floor_drift", zero=True)
    _positive(admission.hold_for_return_s, "admission.hold_for_return_s", zero=True)
    if not isinstance(admission.adaptive, bool):
        raise StartupError(f"admission.adaptive must be true or false, got {admission.adaptive!r}")
    if not 0 < admission.kv_usage_high <= 1:
        raise StartupError(f"admission.kv_usage_high must be in (0, 1], got {admission.kv_usage_high!r}")
    if not 0 < admission.limit_backoff < 1:
        raise StartupError(f"admission.limit_backoff must be in (0, 1), got {admission.limit_backoff!r}")
    if not admission.ttft_tolerance > 1:
        raise StartupError(f"admission.ttft_tolerance must be above 1, got {admission.ttft_tolerance!r}")
    _positive(settings.server.drain_grace_s, "--drain-grace (server.drain_grace_s)", zero=True)
    _positive(settings.server.max_body_bytes, "server.max_body_bytes")
    if settings.server.cpu_priority not in PRIORITIES:
        raise StartupError(
            f"--cpu-priority (server.cpu_priority) must be one of {', '.join(PRIORITIES)}, got {settings.server.cpu_priority!r}"
        )
    for group in ("discovery", "scrape", "upstream", "admission", "outliers"):
        values = getattr(settings, group)
        for name in values.__slots__:
            value = getattr(values, name)
            if name.endswith("_s") and isinstance(value, (int, float)):
                # Probe, scrape and upstream times of 0 would spin or fail every call.
                _positive(value, f"{group}.{name}", zero=group in ("admission", "outliers"))
    _positive(settings.discovery.unhealthy_after, "discovery.unhealthy_after")
    _positive(settings.routing.block_size, "routing.block_size")
    _positive(settings.routing.default_capacity_blocks, "routing.default_capacity_blocks")
    _positive(settings.routing.min_match_blocks, "routing.min_match_blocks", zero=True)
    _positive(settings.routing.imbalance_abs, "routing.imbalance_abs", zero=True)
    _positive(settings.routing.prefill_tokens_per_decode, "routing.prefill_tokens_per_decode", zero=True)
    _positive(settings.routing.prefill_delay_weight, "routing.prefill_delay_weight", zero=True)
    _positive(settings.routing.prefix_copy_weight, "routing.prefix_copy_weight", zero=True)
    _positive(settings.routing.queued_prefill_weight, "routing.queued_prefill_weight", zero=True)
    _positive(settings.admission.input_weight, "admission.input_weight", zero=True)
    _positive(settings.admission.output_weight, "admission.output_weight", zero=True)
    _positive(settings.upstream.retries, "upstream.retries", zero=True)
    _positive(settings.outliers.consecutive_failures, "outliers.consecutive_failures")
    tier = settings.shared_tier
    if tier.mode not in ("auto", "on", "off"):
        raise StartupError(f"shared_tier.mode must be auto, on or off, got {tier.mode!r}")
    if tier.feed not in ("events", "decisions", "both"):
        raise StartupError(f"shared_tier.feed must be events, decisions or both, got {tier.feed!r}")
    _positive(tier.capacity_blocks, "shared_tier.capacity_blocks", zero=True)
    _positive(tier.load_ratio_prior, "shared_tier.load_ratio_prior")
    if not 0 <= settings.outliers.max_ejection_share <= 1:
        raise StartupError(f"outliers.max_ejection_share must be between 0 and 1, got {settings.outliers.max_ejection_share!r}")
    tokenizer = settings.routing.tokenizer
    if tokenizer is not None and not Path(tokenizer, "tokenizer.json").is_file():
        where = "does not exist" if not Path(tokenizer).exists() else "has no tokenizer.json"
        raise StartupError(f"--tokenizer {tokenizer} {where}; give the model directory that holds tokenizer.json")
