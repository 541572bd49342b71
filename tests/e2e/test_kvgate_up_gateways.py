"""`kvgate up --gateways 2`: two gateway replicas in front of one engine, sharing state through the given Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import openai
import psutil

from kvgate.engines import free_port
from tests.support.kvcache_servers import RedisServer


def _metric(url: str, name: str) -> float | None:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def test_kvgate_up_runs_replicas_that_share_state(tmp_path, tiny_model_dir):
    redis = RedisServer(tmp_path)
    redis.start()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvgate", "up", "--engines", "1", "--gateways", "2", "--port", str(port),
         "--model", str(tiny_model_dir), "--kv-blocks", "40", "--no-kv-cache", "--redis-url", redis.url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "KVGATE_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and sum(line.startswith("gateway: ") for line in lines) < 2:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
        gateways = [line.split(" ", 1)[1] for line in lines if line.startswith("gateway: ")]
        assert sorted(gateways) == [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"], lines
        assert not any("without shared state" in line for line in lines), lines

        for url in gateways:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            reply = None
            for _ in range(100):  # each replica probes the engine and syncs with the store after it listens
                try:
                    reply = client.chat.completions.create(
                        model="tiny-llama", messages=[{"role": "user", "content": "hello"}], max_tokens=2
                    )
                    break
                except openai.APIStatusError as exc:
                    if exc.status_code != 503:
                        raise
                    time.sleep(0.1)
            client.close()
            assert reply is not None and reply.usage.completion_tokens == 2
            assert _metric(url, "kvgate_state_store_up") == 1.0
            assert _metric(url, "kvgate_state_peers") == 1.0, "each replica holds the other's state"

        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        assert code == 0, proc.stdout.read()[-3000:]
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"processes left behind: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        redis.stop()
