"""Timing: CUDA events (the calling thread's CPU time on the CPU), L2 flush, input rotation, warm-up, peak memory.

pytest-benchmark drives the rounds and keeps the statistics; this module makes what it measures a GPU time.
The suite runs pytest-benchmark with ``--benchmark-timer=benchmarks.timing.device_clock``: a clock that only
:func:`run_timed` advances, by the CUDA-event time of the call it runs. pytest-benchmark reads the clock before and
after each round, so each round's duration is exactly the device time of one call. On the CPU it is the CPU time
of the calling thread (``time.thread_time``), which runs all of a call's work there (the suite sets one intra-op
thread on the CPU, and autograd runs CPU work on the calling thread): a CPU target (P7, P8) compares what two calls
cost, and a shared machine's other tenants, which stretch wall-clock time by tens of percent, do not enter it. Each round's ``setup`` (untimed) picks the next input set (rotation), flushes the L2
cache by overwriting a buffer twice its size, and queues a short GPU sleep so the CPU can enqueue the call's
kernels before the start event fires: the interval measures the GPU's work, not Python's launch latency (what
``triton.testing.do_bench`` achieves by queueing iterations). Autotuning happens in the correctness check that
precedes timing, then warm-up rounds run untimed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional, Sequence

import torch

from . import env

_clock = [0.0]
GPU_SLEEP_CYCLES = 300_000  # ~150-200 µs at GPU clocks: time for the CPU to queue a call's launches


def device_clock() -> float:
    """The clock pytest-benchmark reads (see the module docstring): seconds of measured device time so far."""
    return _clock[0]


def run_timed(call: Callable[[], object]):
    """Run ``call`` once and advance :func:`device_clock` by its device time. The pytest-benchmark target."""
    if env.ON_GPU:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        result = call()
        end.record()
        end.synchronize()
        _clock[0] += start.elapsed_time(end) / 1e3
    else:
        began = time.thread_time()
        result = call()
        _clock[0] += time.thread_time() - began
    return result


_flush_buffer: list = []


def flush_l2() -> None:
    """Evict the L2 cache: overwrite a buffer twice its size (at least 256 MiB). No-op on the CPU."""
    if not env.ON_GPU:
        return
    if not _flush_buffer:
        l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or 0
        size = max(256 * 2**20, 2 * int(l2))
        _flush_buffer.append(torch.empty(size // 4, dtype=torch.int32, device="cuda"))
    _flush_buffer[0].zero_()


def _gpu_sleep() -> None:
    if env.ON_GPU and hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(GPU_SLEEP_CYCLES)


def rotating_setup(calls: Sequence[Callable[[], object]], before: Optional[Callable[[], None]] = None,
                   flush: bool = True):
    """A pytest-benchmark ``setup``: each round gets the next of ``calls`` (one per input set), after ``before``
    (e.g. resetting a cache), an L2 flush and a GPU sleep, none of it timed."""
    state = [0]

    def setup():
        call = calls[state[0] % len(calls)]
        state[0] += 1
        if before is not None:
            before()
        if flush:
            flush_l2()
            _gpu_sleep()
        return (call,), {}
    return setup


@dataclasses.dataclass(frozen=True)
class Plan:
    warmup_rounds: int
    rounds: int


def estimate(setup: Callable[[], tuple]) -> float:
    """Seconds one call takes (one timed run of the call ``setup`` hands out), for planning the rounds."""
    (call,), _ = setup()
    before = _clock[0]
    run_timed(call)
    return max(_clock[0] - before, 1e-7)


# The targets measured on the CPU itself (host overhead, CPU speed): their workloads get as many rounds on a CPU
# as on a GPU, where every other CPU measurement is functional only.
CPU_TARGETS = ("P7", "P8")


def plan(seconds_per_call: float, budget_s: Optional[float] = None, cpu_target: bool = False) -> Plan:
    """Rounds that fit ``budget_s`` of timed work: on a GPU, and on a CPU for a workload of a CPU target
    (``cpu_target``), 10..200 rounds after 0.1 s or 3 calls of warm-up; for any other CPU workload, where the
    check call already warmed up and the numbers are functional only, 1..10 rounds and no more warm-up."""
    if env.ON_GPU or cpu_target:
        budget = 2.0 if budget_s is None else budget_s
        warmup = min(50, max(3, math.ceil(0.1 / seconds_per_call)))
        return Plan(warmup, int(min(200, max(10, budget / seconds_per_call))))
    budget = 1.0 if budget_s is None else budget_s
    return Plan(0, int(min(10, max(1, budget / seconds_per_call))))


def peak_memory(call: Callable[[], object]) -> tuple[Optional[int], Optional[int]]:
    """(peak bytes allocated during ``call`` in all, peak bytes above what was allocated before it) on a GPU;
    (None, None) on the CPU, where torch keeps no such count."""
    if not env.ON_GPU:
        return None, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return int(peak), int(peak - before)


def input_sets(bytes_per_set: int, limit: int = 4) -> int:
    """How many input sets to rotate: enough to exceed twice the L2 cache (bounded by ``limit`` and by a quarter
    of free memory); 1 on the CPU, where the numbers are functional only."""
    if not env.ON_GPU or bytes_per_set <= 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 * 2**20)
    free, _ = torch.cuda.mem_get_info()
    wanted = math.ceil(2 * (l2 or 50 * 2**20) / bytes_per_set)
    return int(max(1, min(limit, wanted, (free // 4) // bytes_per_set)))
