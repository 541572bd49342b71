"""Pure renderers: a custom resource's defaulted spec in, its children out.

One module per kind (`cache`, `engine`, `gateway`); `RENDERERS` picks one by
kind. A renderer never talks to an API server: what it needs of other
objects (the EnginePool a gateway routes to, the KVCache an engine pool
uses) is handed to it as a `Refs` value, so the tests call it on tables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from operators.meta import Owner
from operators.render.base import Refs
from operators.render.cache import render_cache
from operators.render.engine import render_engine
from operators.render.gateway import render_gateway

Renderer = Callable[[Owner, dict[str, Any], Refs], list[dict[str, Any]]]

#: kind -> renderer.
RENDERERS: dict[str, Renderer] = {
    "KVCache": render_cache,
    "EnginePool": render_engine,
    "KVGateway": render_gateway,
}

__all__ = ["RENDERERS", "Refs", "Renderer", "render_cache", "render_engine", "render_gateway"]
