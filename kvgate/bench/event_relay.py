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
        # Steered over an in-process pair: TERMINATE ends the proxy from any thread.
        self._control = self._context.socket(zmq.PAIR)
        self._steer = self._context.socket(zmq.PAIR)
        self._control.bind(f"inproc://relay-{port_in}")
        self._steer.connect(f"inproc://relay-{port_in}")
        self._thread = threading.Thread(target=self._forward, name=f"kv-event-relay-{port_in}", daemon=True)

    def start(self) -> None:
        """Start forwarding in a background thread; returns at once."""
        self._thread.start()

    def _forward(self) -> None:
        # libzmq's own proxy, which runs without the GIL: a relay looping in Python took the
        # GIL for every event batch (one per engine step), from the load generator in this
        # same process, and so delayed the first tokens it timed, for routers that subscribe only.
        zmq.proxy_steerable(self._xsub, self._xpub, None, self._control)

    def stop(self) -> None:
        """Stop forwarding and close the sockets (safe to call twice)."""
        if self._context.closed:
            return
        if self._thread.is_alive():
            self._steer.send(b"TERMINATE")
            self._thread.join(timeout=2)
        for socket in (self._xsub, self._xpub, self._control, self._steer):
            socket.close(linger=0)
        self._context.term()
