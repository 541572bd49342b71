"""CPU accounting from /proc: this process, its group, the machine, and the share others took."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from kvgate.bench.cpu import (
    CpuSample,
    between,
    group_cpu_seconds,
    machine_busy_seconds,
    process_cpu_seconds,
    process_wait_seconds,
    sample,
)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux
def test_this_process_is_counted_alone_and_in_its_group():
    sum(i * i for i in range(300_000))  # burn a little CPU

    mine = process_cpu_seconds(os.getpid())
    group = group_cpu_seconds([os.getpgid(0)])

    assert mine is not None and mine > 0
    assert group is not None and group >= mine - 0.02  # sampled a moment apart
    assert machine_busy_seconds() >= mine
    assert process_cpu_seconds(2**22 + 12345) is None  # no such process
    assert group_cpu_seconds([]) == 0.0


@linux
def test_a_sample_reads_everything():
    taken = sample([os.getpgid(0)], os.getpid())

    assert taken.machine and taken.engines is not None and taken.router is not None and taken.bench > 0


def test_others_share_is_what_the_machine_did_beyond_us():
    cores = os.cpu_count() or 1
    before = CpuSample(at=100.0, machine=1000.0, engines=50.0, router=5.0, bench=1.0)
    after = CpuSample(at=110.0, machine=1000.0 + 10.0 * cores, engines=54.0, router=6.0, bench=2.0)

    use = between(before, after)

    assert use.wall_s == 10.0
    assert (use.engines_s, use.router_s) == (4.0, 1.0)
    assert use.others_share == pytest.approx((10.0 * cores - 6.0) / (10.0 * cores))
    assert between(before, CpuSample(at=110.0, machine=None, engines=None, router=None, bench=2.0)).others_share is None


@linux
def test_run_queue_wait_grows_when_threads_compete_for_one_core():
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat"):
        pytest.skip("the kernel keeps no schedstats")
    before = process_wait_seconds(os.getpid())
    # Two busy threads pinned to one core: each waits while the other runs.
    # NOTE: `sched_setaffinity(0)` pins only the calling thread, so each pins itself.
    core = sorted(os.sched_getaffinity(0))[0]
    stop = threading.Event()

    def spin() -> None:
        os.sched_setaffinity(0, {core})
        while not stop.is_set():
            pass

    threads = [threading.Thread(target=spin) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    after = process_wait_seconds(os.getpid())  # read while the threads live: ended threads are not counted
    stop.set()
    for thread in threads:
        thread.join()

    assert before is not None and after is not None
    assert after - before > 0.1  # about half of 0.5 s for each thread, less the GIL's own hand-offs
    assert process_wait_seconds(2**22 + 12345) is None


def test_a_runs_wait_is_the_difference_of_its_samples():
    before = CpuSample(at=100.0, machine=None, engines=None, router=5.0, bench=1.0, router_wait=2.0)
    after = CpuSample(at=110.0, machine=None, engines=None, router=6.0, bench=2.0, router_wait=2.5)

    assert between(before, after).router_wait_s == pytest.approx(0.5)
    assert between(before, CpuSample(at=110.0, machine=None, engines=None, router=6.0, bench=2.0)).router_wait_s is None
