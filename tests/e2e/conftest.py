"""End-to-end fixtures: the tiny model and real vLLM CPU engines, once per session.

Every test under `tests/e2e/` is marked `e2e`. The engines are expensive (about
30 s to start, about 1.7 GB each), so two of them are started in parallel the
first time a test asks for `vllm_engines` and shared by the whole session.

Fixtures for other e2e tests:

- `tiny_model_dir`: the model directory (also the gateway's `--tokenizer`);
- `vllm_engines`: two running `kvgate.engines.Engine` handles (`.url`,
  `.memory()`, `.log_path`), each with `E2E_NUM_GPU_BLOCKS` KV blocks of
  `E2E_BLOCK_SIZE` tokens and prefix caching on, `POST /reset_prefix_cache`
  enabled;
- `vllm_urls`: their base URLs;
- `vllm_event_sources`: `URL=ENDPOINT` pairs of their KV event publishers.

Tests must leave the engines usable: reset their prefix caches rather than
restart them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvgate.engines import Engine, EngineSpec, free_ports, kv_events_args, kv_events_endpoint, stop_engines
from kvgate.model import SERVED_MODEL_NAME, build_model

#: Tokens per KV block on the CPU engine (vLLM's CPU default; `vllm:cache_config_info`).
E2E_BLOCK_SIZE = 128
#: KV capacity per engine in blocks: 48 x 128 = 6144 tokens, little enough that
#: eviction is easy to provoke.
E2E_NUM_GPU_BLOCKS = 48
#: Longest prompt plus output per request (must fit the KV capacity).
E2E_MAX_MODEL_LEN = 4096
#: Seconds an engine may take to start on a busy two-core machine.
E2E_START_TIMEOUT = 300.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama model directory, built once per session."""
    return build_model(tmp_path_factory.mktemp("e2e-model") / SERVED_MODEL_NAME)


@pytest.fixture(scope="session")
def vllm_engines(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Engine]]:
    """Two real vLLM CPU engines serving `tiny-llama`, started concurrently."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    log_dir = tmp_path_factory.mktemp("e2e-engine-logs")
    ports = free_ports(4)
    engines = [
        Engine(
            EngineSpec(
                model_dir=tiny_model_dir,
                port=port,
                served_model_name=SERVED_MODEL_NAME,
                num_gpu_blocks=E2E_NUM_GPU_BLOCKS,
                max_model_len=E2E_MAX_MODEL_LEN,
                extra_args=kv_events_args(event_port, topic=f"kv@engine-{index}"),
            ),
            log_path=log_dir / f"engine-{index}.log",
        )
        for index, (port, event_port) in enumerate(zip(ports[:2], ports[2:]))
    ]
    try:
        for engine in engines:
            engine.start()
        for engine in engines:
            engine.wait_ready_sync(E2E_START_TIMEOUT)
        yield engines
    finally:
        stop_engines(engines)


@pytest.fixture(scope="session")
def vllm_event_sources(vllm_engines: list[Engine]) -> list[str]:
    """`URL=ENDPOINT` pairs: where each engine publishes its KV events (ZMQ)."""
    return [f"{engine.url}={kv_events_endpoint(engine.spec.extra_args)}" for engine in vllm_engines]


@pytest.fixture(scope="session")
def vllm_urls(vllm_engines: list[Engine]) -> list[str]:
    """Base URLs of the session's engines, e.g. `http://127.0.0.1:41233`."""
    return [engine.url for engine in vllm_engines]
