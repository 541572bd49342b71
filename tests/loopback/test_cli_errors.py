"""Every `kvgate` command says what is wrong in one line and exits non-zero: no traceback, ever.

Each case runs the real command (`python -m kvgate ...`, this tree first on
the path) in a subprocess: exit status 2 for a mistake in what was written
(flags, config file, URLs, directories), 1 for what the machine refused
(a port in use, a Redis that does not answer, no vLLM). Every case fails
before anything is started, so the whole table takes seconds.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    """A port of 127.0.0.1 that something listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.fixture(scope="module")
def dead_port() -> Iterator[int]:
    """A port of 127.0.0.1 nothing listens on (held, so no one else takes it meanwhile)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "no-tokenizer").mkdir()
    (root / "no-tokenizer" / "config.json").write_text("{}")
    (root / "own").mkdir()
    (root / "own" / "notes.txt").write_text("precious")
    (root / "a-file").write_text("not a directory")
    (root / "bad.yaml").write_text("server: [unclosed\n")
    (root / "unknown.yaml").write_text("server:\n  colour: blue\n")
    (root / "wrong-type.yaml").write_text("server:\n  port: lots\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "bad-url.yaml").write_text("discovery:\n  worker_urls: [pod-a]\n")
    (root / "zero-block.yaml").write_text("routing:\n  block_size: 0\n")
    (root / "big-port.yaml").write_text("server:\n  port: 65536\n")
    (root / "kv-over-one.yaml").write_text("admission:\n  kv_usage_high: 1.5\n")
    (root / "adaptive-word.yaml").write_text("admission:\n  adaptive: sometimes\n")
    # A `vllm` package without its server: vLLM is not usable from this Python.
    (root / "no-vllm" / "vllm").mkdir(parents=True)
    (root / "no-vllm" / "vllm" / "__init__.py").write_text("")
    return root


def run_kvgate(args: list[str], cwd: Path, extra_path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, str(ROOT)]))
    env["KVGATE_HOME"] = str(cwd / "home")
    return subprocess.run(
        [sys.executable, "-m", "kvgate", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


W = ["--worker-urls", "http://127.0.0.1:9"]

CASES = [
    # kvgate serve: flags
    pytest.param(["serve", "--bogus"], 2, "unrecognized arguments: --bogus", id="serve-unknown-flag"),
    pytest.param(["serve", *W, "--port", "eighty"], 2, "invalid int value", id="serve-port-not-a-number"),
    pytest.param(["serve", *W, "--port", "99999"], 2, "not a TCP port", id="serve-port-out-of-range"),
    pytest.param(["serve", *W, "--log-level", "LOUD"], 2, "--log-level", id="serve-bad-log-level"),
    pytest.param(["serve", *W, "--policy", "fastest"], 2, "unknown routing strategy 'fastest'", id="serve-unknown-policy"),
    pytest.param(["serve", *W, "--policy", "random:-1"], 2, "must be positive", id="serve-bad-policy-weight"),
    pytest.param(["serve", *W, "--max-inflight-per-pod", "0"], 2, "--max-inflight-per-pod", id="serve-zero-inflight"),
    pytest.param(["serve", *W, "--drain-grace", "-1"], 2, "--drain-grace", id="serve-negative-grace"),
    pytest.param(["serve"], 2, "no pods", id="serve-no-pods"),
    # kvgate serve: URLs
    pytest.param(["serve", "--worker-urls", "not-a-url"], 2, "'not-a-url' is not an http(s) URL", id="serve-not-a-url"),
    pytest.param(["serve", "--worker-urls", "ftp://pod:21"], 2, "not an http(s) URL", id="serve-wrong-scheme"),
    pytest.param(["serve", "--worker-urls", "http://pod:99999"], 2, "Port out of range", id="serve-url-port-out-of-range"),
    pytest.param(["serve", "--worker-urls", "http://:8000"], 2, "not an http(s) URL", id="serve-url-without-host"),
    pytest.param(["serve", *W, "--kv-events", "no-equals"], 2, "expected POD_URL=ENDPOINT", id="serve-bad-kv-events"),
    pytest.param(["serve", *W, "--kv-events", "pod=tcp://x:1"], 2, "--kv-events: 'pod'", id="serve-kv-events-bad-url"),
    # kvgate serve: files
    pytest.param(["serve", *W, "--config", "{files}/missing.yaml"], 2, "cannot read settings file", id="serve-config-missing"),
    pytest.param(["serve", *W, "--config", "{files}"], 2, "cannot read settings file", id="serve-config-is-a-directory"),
    pytest.param(["serve", *W, "--config", "{files}/bad.yaml"], 2, "cannot read settings file", id="serve-config-bad-yaml"),
    pytest.param(["serve", *W, "--config", "{files}/unknown.yaml"], 2, "unknown setting server.colour", id="serve-config-unknown-key"),
    pytest.param(["serve", *W, "--config", "{files}/wrong-type.yaml"], 2, "port: expected int", id="serve-config-wrong-type"),
    pytest.param(["serve", *W, "--config", "{files}/list.yaml"], 2, "must hold a mapping", id="serve-config-not-a-mapping"),
    pytest.param(["serve", "--config", "{files}/bad-url.yaml"], 2, "'pod-a' is not an http(s) URL", id="serve-config-bad-url"),
    pytest.param(["serve", *W, "--config", "{files}/zero-block.yaml"], 2, "routing.block_size", id="serve-config-zero-block-size"),
    pytest.param(["serve", *W, "--config", "{files}/big-port.yaml"], 2, "not a TCP port", id="serve-config-port-out-of-range"),
    pytest.param(["serve", *W, "--config", "{files}/kv-over-one.yaml"], 2, "admission.kv_usage_high", id="serve-config-kv-over-one"),
    pytest.param(["serve", *W, "--config", "{files}/adaptive-word.yaml"], 2, "admission.adaptive", id="serve-config-adaptive-not-bool"),
    pytest.param(["serve", *W, "--tokenizer", "{files}/no-tokenizer"], 2, "has no tokenizer.json", id="serve-tokenizer-without-json"),
    pytest.param(["serve", *W, "--tokenizer", "{files}/nowhere"], 2, "does not exist", id="serve-tokenizer-missing"),
    # kvgate serve: the machine
    pytest.param(["serve", *W, "--port", "{busy_port}"], 1, "Address already in use", id="serve-port-in-use"),
    pytest.param(["serve", *W, "--host", "no-such-host.invalid", "--port", "0"], 2, "does not resolve", id="serve-host-unknown"),
    pytest.param(["serve", *W, "--host", "192.0.2.1", "--port", "0"], 2, "not an address of this machine", id="serve-host-not-here"),
    # kvgate up (every case fails before an engine or cache node starts)
    pytest.param(["up", "--engines", "0"], 2, "--engines must be at least 1", id="up-no-engines"),
    pytest.param(["up", "--port", "0", "--policy", "nope"], 2, "unknown routing strategy", id="up-unknown-policy"),
    pytest.param(["up", "--port", "0", "--redis-url", "localhost:6379"], 2, "not a Redis URL", id="up-bad-redis-url"),
    pytest.param(["up", "--port", "{busy_port}"], 1, "Address already in use", id="up-port-in-use"),
    pytest.param(["up", "--port", "0", "--model", "{files}/own"], 2, "neither a model directory", id="up-model-dir-not-a-model"),
    pytest.param(["up", "--port", "0", "--model", "{files}/a-file"], 2, "neither a model directory", id="up-model-is-a-file"),
    # kvgate cache-node
    pytest.param(["cache-node", "--capacity-bytes", "lots"], 2, "not a byte count", id="cache-node-bad-size"),
    pytest.param(["cache-node", "--port", "70000"], 2, "not a TCP port", id="cache-node-port-out-of-range"),
    pytest.param(["cache-node", "--port", "{busy_port}"], 1, "Address already in use", id="cache-node-port-in-use"),
    pytest.param(["cache-node", "--metrics-port", "{busy_port}"], 1, "--metrics-port", id="cache-node-metrics-port-in-use"),
    pytest.param(["cache-node", "--peers", "::bad::"], 2, "bad node spec", id="cache-node-bad-peer"),
    pytest.param(["cache-node", "--redis-url", "nope"], 2, "not a Redis URL", id="cache-node-bad-redis-url"),
    pytest.param(
        ["cache-node", "--redis-url", "redis://127.0.0.1:{dead_port}/0"], 1, "cannot register in Redis", id="cache-node-redis-down"
    ),
    # kvgate bench
    pytest.param(["bench", "--engines", "0"], 2, "--engines must be at least 1", id="bench-no-engines"),
    pytest.param(["bench", "--workloads", "nope"], 2, "unknown workloads nope", id="bench-unknown-workload"),
    pytest.param(["bench", "--repeat", "x"], 2, "invalid int value", id="bench-bad-repeat"),
    # kvgate build-model, and the dispatcher
    pytest.param(["build-model", "--out", "{files}/own"], 1, "not a model directory built by kvgate", id="build-model-foreign-dir"),
    pytest.param(["build-model", "--out", "{files}/a-file"], 1, "not a model directory built by kvgate", id="build-model-onto-a-file"),
    pytest.param(["build-model", "--out", "/proc/kvgate-model"], 1, "cannot build in /proc/kvgate-model", id="build-model-unwritable"),
    pytest.param(["build-model", "--colour"], 2, "unrecognized arguments", id="build-model-unknown-flag"),
    pytest.param(["nosuch"], 2, "unknown command 'nosuch'", id="unknown-command"),
]


@pytest.fixture(scope="module")
def results(files: Path, busy_port: int, dead_port: int) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every case's run, by case id; run a few at a time, as each mostly waits for imports."""

    def one(case) -> subprocess.CompletedProcess[str]:  # noqa: ANN001 - a pytest.param
        args = [a.format(files=files, busy_port=busy_port, dead_port=dead_port) for a in case.values[0]]
        cwd = files / "cwd" / case.id
        cwd.mkdir(parents=True)
        return run_kvgate(args, cwd)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip((case.id for case in CASES), pool.map(one, CASES)))


@pytest.mark.parametrize(("args", "status", "says"), CASES)
def test_a_mistake_is_one_line_and_an_exit_status(args, status, says, results, request):
    result = results[request.node.callspec.id]

    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"kvgate {args[0]}: " if args[0] != "nosuch" else "kvgate: ")
    assert says in lines[0]
    assert result.returncode == status, result.stderr


def test_up_without_vllm_says_how_to_install_it(files, tmp_path):
    result = run_kvgate(["up", "--port", "0"], tmp_path, extra_path=str(files / "no-vllm"))

    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert "vLLM is not installed" in result.stderr and "install" in result.stderr
    assert result.returncode == 1


def test_bench_without_vllm_says_how_to_install_it(files, tmp_path):
    result = run_kvgate(["bench", "--quick"], tmp_path, extra_path=str(files / "no-vllm"))

    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert "vLLM is not installed" in result.stderr and "--workloads none" in result.stderr
    assert result.returncode == 1


def test_a_directory_given_by_mistake_is_never_deleted(files, tmp_path):
    for command in (["build-model", "--out"], ["build-model", "--force", "--out"], ["up", "--port", "0", "--model"]):
        run_kvgate([*command, str(files / "own")], tmp_path)

    assert (files / "own" / "notes.txt").read_text() == "precious"
