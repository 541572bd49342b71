"""Loopback relays for the engines' ZMQ KV events, so two connecting ends can meet.

vLLM's event publisher binds only wildcard TCP endpoints (every interface)
and connects to any named host; vllm-router's subscriber connects too and
accepts only `tcp://HOST:PORT`. To keep everything on 127.0.0.1, each engine
gets a relay: an XSUB socket bound on a loopback port, which the engine's
publisher connects to, forwarding to an XPUB socket bound on another loopback
port, which subscribers connect to (their subscriptions travel back up). One
relay per engine, so a subscriber still knows which engine an event came from.

Used by `kvgate.bench.fleet` when a router needs KV events.
"""

from __future__ import annotations

import threading

import zmq

from kvgate.engines import free_ports

_POLL_MS = 100


class EventRelay:
    """One engine's relay: publishers connect to `inbound`, subscribers to `outbound`.

    Args:
        host: loopback address both sockets bind.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        port_in, port_out = free_ports(2, host)
        self.inbound = f"tcp://{host}:{port_in}"
        self.outbound = f"tcp://{host}:{port_out}"
        self._context = zmq.Context()
        self._xsub = self._context.socket(zmq.XSUB)
        self._xpub = self._context.socket(zmq.XPUB)
        self._xsub.bind(self.inbound)
        self._xpub.bind(self.outbound)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._forward, name=f"kv-event-relay-{port_in}", daemon=True)

    def start(self) -> None:
        """Start forwarding in a background thread; returns at once."""
        self._thread.start()

    def _forward(self) -> None:
        poller = zmq.Poller()
        poller.register(self._xsub, zmq.POLLIN)
        poller.register(self._xpub, zmq.POLLIN)
        while not self._stopping.is_set():
            for socket, _ in poller.poll(_POLL_MS):
                if socket is self._xsub:
                    self._xpub.send_multipart(self._xsub.recv_multipart())
                else:
                    self._xsub.send_multipart(self._xpub.recv_multipart())  # a subscription going upstream

    def stop(self) -> None:
        """Stop forwarding and close both sockets (safe to call twice)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if not self._context.closed:
            self._xsub.close(linger=0)
            self._xpub.close(linger=0)
            self._context.term()
