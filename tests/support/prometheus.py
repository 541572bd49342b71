"""A real Prometheus server for tests: Debian's ``prometheus`` on 127.0.0.1, scraping every second.

`run_prometheus(directory, jobs, rule_files)` writes a configuration with one
static job per entry of `jobs`, checks it with ``promtool check config``
(which checks the rule files too), starts the server on a free port with its
data in `directory`, waits until it is ready, and stops it on exit. The
handle's `query` runs an instant query through the HTTP API.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvgate.engines import free_ports

#: Seconds between scrapes and rule evaluations (short, so a test needs seconds of traffic).
SCRAPE_INTERVAL_S = 1


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        """GET an HTTP API path; returns its ``data`` (raises on an error status)."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            payload = json.load(response)
        assert payload["status"] == "success", payload
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Result vector of an instant query now."""
        return self.api("/api/v1/query", query=expr)["result"]


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"Debian's {name} is not installed (scripts/install.sh installs it)")
    return path


def promtool(*args: str) -> subprocess.CompletedProcess:
    """Run ``promtool ARGS`` (skips the test if it is not installed)."""
    return subprocess.run([_binary("promtool"), *args], capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def run_prometheus(
    directory: Path,
    jobs: Mapping[str, Sequence[str]],
    rule_files: Sequence[Path] = (),
    relabel_pod: Sequence[str] = (),
) -> Iterator[Prometheus]:
    """Start Prometheus scraping `jobs` (job name -> ``host:port`` targets).

    Args:
        directory: for the config, data and log.
        jobs: static scrape jobs.
        rule_files: rule files to load (checked by promtool first).
        relabel_pod: jobs whose targets get a ``pod`` label ``http://host:port``,
            as config/prometheus/prometheus.yml gives vLLM engines.
    """
    binary = _binary("prometheus")
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [{"targets": list(targets)}],
                **(
                    {"relabel_configs": [{"source_labels": ["__address__"], "target_label": "pod", "replacement": "http://$1"}]}
                    if job in relabel_pod
                    else {}
                ),
            }
            for job, targets in jobs.items()
        ],
    }
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    checked = promtool("check", "config", str(config_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    port = free_ports(1)[0]
    log_path = directory / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready: {log_path.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
