"""pytest plumbing of the benchmark suite: options, parametrization from the suites, the device clock, and saving.

Run through ``python benchmarks/run.py``, or directly: ``python -m pytest benchmarks/ --bench-suite full``.
Each ``test_bench_*.py`` module declares the workload kinds it measures (``KINDS``) and its providers
(``PROVIDERS``); every (workload, provider) pair of the selected suite becomes one test. At the end of the session
the measurements are merged into ``<results>/results.csv`` and pytest-benchmark's raw JSON is written to
``<results>/raw/``; ``python benchmarks/report.py`` turns them into the report and the plots.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import env  # first: sets TRITON_INTERPRET before anything imports triton

import pytest  # noqa: E402

from benchmarks import harness, results, workloads  # noqa: E402

DEFAULT_TIMER = "time.perf_counter"
DEVICE_CLOCK = "benchmarks.timing.device_clock"


def pytest_addoption(parser):
    group = parser.getgroup("ptv2-bench", "ptv2_kernels benchmark suite")
    group.addoption("--bench-suite", choices=("quick", "full"), default="quick",
                    help="quick: the shapes of targets P1-P9; full: plus the sweeps over N, P, B and T")
    group.addoption("--bench-workload", action="append", default=[], metavar="PATTERN",
                    help="only workloads whose name or group matches this glob or contains it (repeatable)")
    group.addoption("--bench-provider", action="append", default=[], metavar="NAME",
                    help="only this provider (repeatable)")
    group.addoption("--bench-results", default=None, metavar="DIR",
                    help="results folder (default: benchmarks/results on a GPU, benchmarks/results-cpu otherwise)")
    group.addoption("--bench-no-save", action="store_true", help="measure and report, but write no files")


def results_dir(config) -> Path:
    chosen = config.getoption("bench_results")
    return Path(chosen) if chosen else env.default_results_dir()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Before pytest-benchmark reads its options: time with the device clock, and keep the raw JSON.
    if str(getattr(config.option, "benchmark_timer", DEFAULT_TIMER)) == DEFAULT_TIMER:
        config.option.benchmark_timer = DEVICE_CLOCK
    harness.SESSION.start(env.environment())
    from benchmarks import providers

    providers.REQUESTED.clear()
    providers.REQUESTED.update(config.getoption("bench_provider"))
    if not env.ON_GPU:
        # The CPU run: one intra-op thread keeps a small, shared CPU from thrashing, and keeps a call's work on the
        # calling thread, whose CPU time the CPU clock measures (benchmarks/timing.py).
        import torch

        torch.set_num_threads(1)
    if not config.getoption("bench_no_save") and getattr(config.option, "benchmark_json", None) is None \
            and hasattr(config.option, "benchmark_json"):
        raw = results_dir(config) / "raw" / f"{env.slug(env.device_name())}-{harness.SESSION.run['run_id']}.json"
        raw.parent.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = raw
        harness.SESSION.raw_json = raw


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    kinds = getattr(metafunc.module, "KINDS")
    names = getattr(metafunc.module, "PROVIDERS")
    chosen = workloads.select(workloads.suite(config.getoption("bench_suite")), config.getoption("bench_workload"))
    wanted = config.getoption("bench_provider")
    pairs = [(w, p) for w in chosen if w.kind in kinds for p in names if not wanted or p in wanted]
    metafunc.parametrize("bench_case", [pytest.param(pair, id=f"{pair[0].name}|{pair[1]}") for pair in pairs])


def pytest_collection_modifyitems(config, items):
    """Drop the placeholder item pytest makes for a module whose parameter set came out empty (all filtered)."""
    def placeholder(item):
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("bench_case") if callspec is not None else None
        return "bench_case" in getattr(item, "fixturenames", ()) and not isinstance(case, tuple)

    empty = [item for item in items if placeholder(item)]
    if empty:
        config.hook.pytest_deselected(items=empty)
        items[:] = [item for item in items if item not in empty]


@pytest.fixture
def bench_record():
    """Record a measurement for the results files, then pass/skip/fail the test by its status."""
    def record(measurement):
        harness.SESSION.add(measurement)
        harness.conclude(measurement)
    return record


def pytest_sessionfinish(session, exitstatus):
    harness.release()
    config = session.config
    if config.getoption("bench_no_save") or not harness.SESSION.measurements:
        return
    path, rows = results.save_run(results_dir(config), harness.SESSION.run, harness.SESSION.measurements)
    harness.SESSION.saved = (path, rows)
