"""`kvgate up`, the README's main command, as a user runs it: a working cluster, then a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import openai
import psutil

from kvgate.engines import free_port


def granted(priority: str) -> bool:
    """Whether a process started here may take `priority` (`router.cpu_priority`)."""
    code = f"from router.cpu_priority import raise_priority; print(raise_priority({priority!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == priority


def test_kvgate_up_serves_and_stops_cleanly(tmp_path, tiny_model_dir):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvgate", "up", "--engines", "1", "--port", str(port), "--model", str(tiny_model_dir), "--kv-blocks", "40", "--cache-nodes", "1", "--engine-arg=--max-num-seqs=16"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "KVGATE_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if line.startswith("dashboard: "):
                break
        engines = [line.split(" ", 1)[1] for line in lines if line.startswith("engine: ")]
        gateway = next((line.split(" ", 1)[1] for line in lines if line.startswith("gateway: ")), None)
        assert len(engines) == 1 and gateway == f"http://127.0.0.1:{port}", lines
        assert f"dashboard: {gateway}/dashboard" in lines, lines
        assert sum(line.startswith("cache-node: ") for line in lines) == 1, lines
        assert any(line.startswith("l3: ") for line in lines), lines

        client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = None
        for _ in range(50):  # the gateway probes its engine right after it starts listening
            try:
                reply = client.chat.completions.create(
                    model="tiny-llama", messages=[{"role": "user", "content": "hello"}], max_tokens=3
                )
                break
            except openai.APIStatusError as exc:
                if exc.status_code != 503:
                    raise
                time.sleep(0.1)
        assert reply is not None and reply.usage.completion_tokens == 3
        client.close()

        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the engine runs as a child of kvgate up"
        # --engine-arg reaches the engine's command line.
        argvs = [child.cmdline() for child in children]
        assert any("--max-num-seqs=16" in argv for argv in argvs), argvs
        # The gateway's event loop (the main thread) runs ahead of the engine, as this machine allows; what
        # kvgate up started runs at normal priority.
        policy = os.sched_getscheduler(proc.pid) & ~os.SCHED_RESET_ON_FORK
        assert policy == (os.SCHED_RR if granted("realtime") else os.SCHED_OTHER)
        assert all(os.sched_getscheduler(child.pid) == os.SCHED_OTHER for child in children)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"processes left behind: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
