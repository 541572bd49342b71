"""`server.cpu_priority`: what the gateway asks the kernel for, what it falls back to, and what it passes on.

Each case runs in a child interpreter, so this process keeps its own scheduling.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from router.cpu_priority import raise_priority
from router.errors import StartupError
from router.settings import Settings
from router.startup import check_settings


def run(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON object."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_realtime_applies_to_the_calling_thread_only_or_falls_back_when_refused():
    seen = run(
        """
        import json, os, subprocess, sys, threading
        from router.cpu_priority import raise_priority
        applied = raise_priority("realtime")
        policy = lambda: os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
        out = {}
        thread = threading.Thread(target=lambda: out.update(thread=policy()))
        thread.start(); thread.join()
        child = subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"], capture_output=True, text=True)
        print(json.dumps({"applied": applied, "main": policy(), "thread": out["thread"],
                          "child": int(child.stdout), "nice": os.getpriority(os.PRIO_PROCESS, 0),
                          "rr": os.SCHED_RR, "other": os.SCHED_OTHER}))
        """
    )
    assert seen["child"] == seen["other"]  # nothing the gateway starts runs real-time
    if seen["applied"] == "realtime":
        assert seen["main"] == seen["rr"] and seen["thread"] == seen["other"]
    elif seen["applied"] == "high":  # refused real-time (no CAP_SYS_NICE for it): nice -10
        assert seen["main"] == seen["other"] and seen["nice"] == -10
    else:
        assert seen["applied"] == "normal" and seen["main"] == seen["other"]


def test_a_refused_realtime_falls_back_to_nice_and_a_refused_nice_to_normal():
    seen = run(
        """
        import json, os
        from router.cpu_priority import raise_priority
        def refuse(*args):
            raise PermissionError(1, "Operation not permitted")
        os.sched_setscheduler = refuse
        first = raise_priority("realtime")
        nice = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority = refuse
        os.getpriority = lambda *args: 0
        print(json.dumps({"first": first, "nice": nice, "second": raise_priority("high")}))
        """
    )
    assert seen["second"] == "normal"
    assert seen["first"] in ("high", "normal")
    if seen["first"] == "high":
        assert seen["nice"] == -10


def test_normal_changes_nothing_and_an_unknown_priority_is_refused():
    seen = run(
        """
        import json, os
        from router.cpu_priority import raise_priority
        before = (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))
        applied = raise_priority("normal")
        print(json.dumps({"applied": applied, "same": before == (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))}))
        """
    )
    assert seen == {"applied": "normal", "same": True}
    with pytest.raises(ValueError, match="realtime, high, normal"):
        raise_priority("urgent")


def test_startup_refuses_an_unknown_cpu_priority():
    settings = Settings()
    settings.server.cpu_priority = "urgent"
    with pytest.raises(StartupError, match="cpu_priority"):
        check_settings(settings)
