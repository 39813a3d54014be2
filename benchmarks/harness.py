"""One measurement: a (workload, provider) pair checked against the reference, then timed by pytest-benchmark.

:func:`measure` is the only path from a provider to a number. It builds the inputs (shared by every provider of
the workload, so all are timed on the same values), runs the provider once and compares its results with the
oracle (a wrong provider is recorded as ``wrong`` and never timed), then hands the rounds to pytest-benchmark with
the device clock of :mod:`benchmarks.timing`, and records the statistics, the peak memory and the work counts.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
import traceback
from typing import Callable, Optional

from . import env  # first: sets TRITON_INTERPRET before anything imports triton

import torch  # noqa: E402

from . import check, timing, workloads  # noqa: E402
from .workloads import Workload  # noqa: E402

STATUSES = ("ok", "wrong", "error", "oom", "skipped")


@dataclasses.dataclass
class Measurement:
    workload: Workload
    provider: str
    status: str = "ok"  # one of STATUSES
    note: str = ""
    check_ratio: float = math.nan  # worst error / bound of the pre-timing check (<= 1 passes)
    median_s: float = math.nan
    q1_s: float = math.nan
    q3_s: float = math.nan
    mean_s: float = math.nan
    min_s: float = math.nan
    rounds: int = 0
    peak_bytes: Optional[int] = None  # peak allocated during one call, all of it
    peak_extra_bytes: Optional[int] = None  # ... above what was allocated before the call
    flops: float = math.nan
    bytes: float = math.nan
    tokens: float = math.nan

    @property
    def timed(self) -> bool:
        return self.status == "ok" and self.rounds > 0 and math.isfinite(self.median_s)


@dataclasses.dataclass
class Case:
    """What a provider contributes to a measurement: one call per input set (all doing the same work), a check
    that runs the first call once and compares it with the reference, and an optional per-round reset."""

    calls: list
    check: Callable[[], check.CheckResult]
    before: Optional[Callable[[], None]] = None
    flops: float = math.nan
    bytes: float = math.nan
    tokens: float = math.nan
    peak_is_total: bool = False  # model level: report total peak memory (weights included), not the extra


class Unavailable(Exception):
    """The provider cannot run this workload here; the message says why."""


# ----------------------------------------------------------------------------------------------------------------
# Kernel workloads: inputs and oracle shared by the providers of a workload
# ----------------------------------------------------------------------------------------------------------------

class _KernelContext:
    """Input sets and the oracle of the kernel workload being measured (kept while its providers run)."""

    def __init__(self, w: Workload):
        self.workload = w
        first = workloads.make_kernel_inputs(w, env.DEVICE, seed=0)
        count = timing.input_sets(first.nbytes())
        self.sets = [first] + [workloads.make_kernel_inputs(w, env.DEVICE, seed=s) for s in range(1, count)]
        self._oracle = None

    def oracle(self):
        if self._oracle is None:
            x = self.sets[0]
            backward = self.workload.kind == "fwdbwd"
            self._oracle = (check.kernel_reference(x, backward, check.oracle_dtype(x)),
                            check.kernel_reference(x, backward, x.q.dtype))
        return self._oracle


_context: list = [None]


def kernel_context(w: Workload) -> _KernelContext:
    if _context[0] is None or _context[0].workload != w:
        _context[0] = None
        if env.ON_GPU:
            torch.cuda.empty_cache()
        _context[0] = _KernelContext(w)
    return _context[0]


def release() -> None:
    """Drop the cached inputs and oracle (end of a session, or before a model-level workload)."""
    _context[0] = None
    gc.collect()  # a model and its hooks form reference cycles: free them before the next one is built
    if env.ON_GPU:
        torch.cuda.empty_cache()


def kernel_case(w: Workload, provider) -> Case:
    """The :class:`Case` of a kernel-level provider (see :mod:`benchmarks.providers`)."""
    reason = provider.unavailable(w)
    if reason:
        raise Unavailable(reason)
    ctx = kernel_context(w)
    reason = provider.unavailable(w, ctx.sets[0])
    if reason:
        raise Unavailable(reason)
    prepared = [provider.prepare_inputs(w, x) for x in ctx.sets]

    def run_check():
        got = prepared[0].finish(prepared[0].call())
        oracle, same_precision = ctx.oracle()
        return check.check_kernel(got, ctx.sets[0], oracle, same_precision)

    return Case([p.call for p in prepared], run_check, flops=workloads.flops(w), bytes=workloads.bytes_moved(w),
                tokens=w.tokens)


# ----------------------------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------------------------

def measure(w: Workload, provider: str, make_case: Callable[[], Case], benchmark=None) -> Measurement:
    """Check, then time one (workload, provider); never raises for a provider's failure (the status says it)."""
    m = Measurement(w, provider)
    try:
        case = make_case()
        m.flops, m.bytes, m.tokens = case.flops, case.bytes, case.tokens
        began = time.perf_counter()
        result = case.check()
        check_seconds = time.perf_counter() - began
        m.check_ratio = result.worst_ratio
        if not result.ok:
            m.status, m.note = "wrong", f"failed the pre-timing check against the reference: {result.summary()}"
            return m
        m.note = f"check: {result.summary()}"
        if benchmark is None or getattr(benchmark, "disabled", False):
            return m
        _time(m, case, benchmark, check_seconds)
    except Unavailable as reason:
        m.status, m.note = "skipped", str(reason)
    except torch.OutOfMemoryError as error:
        m.status, m.note = "oom", f"out of memory: {str(error).splitlines()[0]}"
    except Exception as error:  # noqa: BLE001 - a provider's failure is a result to report, not a crash
        m.status = "error"
        m.note = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".strip()
        m.note += "\n" + "".join(traceback.format_exception(type(error), error, error.__traceback__)[-6:])
    finally:
        if env.ON_GPU:
            torch.cuda.synchronize()
    if m.status == "oom":  # the exception (and the frames holding its tensors) is gone now: free the memory
        gc.collect()
        if env.ON_GPU:
            torch.cuda.empty_cache()
    return m


def _time(m: Measurement, case: Case, benchmark, check_seconds: float) -> None:
    setup = timing.rotating_setup(case.calls, before=case.before)
    # Triton's CPU interpreter runs each program in Python: its time says nothing of a CPU target, so it gets the
    # functional rounds only.
    cpu_target = (not env.ON_GPU and m.provider != "ptv2-triton"
                  and any(t in timing.CPU_TARGETS for t in m.workload.targets))
    if env.ON_GPU or cpu_target:
        seconds = min(timing.estimate(setup) for _ in range(2))
    else:  # the functional run: the check's duration bounds a call's, and every interpreted call counts
        seconds = check_seconds
    plan = timing.plan(seconds, cpu_target=cpu_target)
    benchmark._timer = timing.device_clock  # also set through --benchmark-timer; this makes it certain
    benchmark.extra_info.update(workload=m.workload.name, provider=m.provider, device=env.device_name(),
                                **{k: v for k, v in m.workload.params().items() if k != "targets"})
    benchmark.group = m.workload.name
    benchmark.pedantic(timing.run_timed, setup=setup, rounds=plan.rounds, warmup_rounds=plan.warmup_rounds)
    stats = benchmark.stats.stats
    m.median_s, m.q1_s, m.q3_s = stats.median, stats.q1, stats.q3
    m.mean_s, m.min_s, m.rounds = stats.mean, stats.min, stats.rounds
    if case.before is not None:
        case.before()
    total, extra = timing.peak_memory(case.calls[0])
    m.peak_bytes, m.peak_extra_bytes = total, extra
    if case.peak_is_total:
        m.peak_extra_bytes = None
    benchmark.extra_info.update(check_ratio=m.check_ratio, peak_bytes=total, peak_extra_bytes=extra)


def conclude(m: Measurement) -> None:
    """Turn a measurement's status into the pytest outcome: skipped/oom skip, wrong/error fail."""
    import pytest

    if m.status in ("skipped", "oom"):
        pytest.skip(f"{m.provider} on {m.workload.name}: {m.note}")
    if m.status in ("wrong", "error"):
        pytest.fail(f"{m.provider} on {m.workload.name} is {m.status}: {m.note}", pytrace=False)


class Session:
    """The measurements of one pytest session (one run), and where they were saved."""

    def __init__(self):
        self.start({})

    def start(self, environment: dict) -> None:
        from . import results

        self.run = results.new_run(environment)
        self.measurements: list = []
        self.saved = None  # (csv path, rows of this run) once saved
        self.raw_json = None

    def add(self, measurement: Measurement) -> None:
        self.measurements.append(measurement)


SESSION = Session()
