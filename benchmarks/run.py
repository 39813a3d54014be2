"""Run the benchmark suite: ``python benchmarks/run.py`` (the quick start's main job).

    python benchmarks/run.py                      # quick suite: the shapes of targets P1-P9 (docs/design.md §6)
    python benchmarks/run.py --full               # plus the sweeps over N, P, B and the mixed-task batches
    python benchmarks/run.py --workload 'bert-*' --provider ptv2-triton --provider peft-path
    python benchmarks/run.py --list               # what would run, and which providers are available here

Every (workload, provider) is checked against the reference, then timed by pytest-benchmark (the files
``benchmarks/test_bench_*.py``) with CUDA events, L2 flush, input rotation and warm-up. The run ends with a summary
table; the results are merged into ``benchmarks/results/results.csv`` (GPU) with pytest-benchmark's raw JSON under
``raw/``, and ``report.md`` and the plots are regenerated (``python benchmarks/report.py``).

Without a GPU the suite runs small shapes — Triton kernels in Triton's CPU interpreter, the torch providers on the
CPU — as a **functional run (CPU), timings meaningless**, written to ``benchmarks/results-cpu/`` (not committed).
Exit status: 0 when no provider was wrong or failed, 1 otherwise, 2 for bad arguments. A run stopped by SIGTERM
(benchmarks/gpu_check.py stopping a stage at its cap, a job's timeout) ends as Ctrl-C does: what was measured so far
is saved and reported, and the exit status is 1.

The tags in brackets after a workload's name (``--list``, the summary, the report) are the performance targets it
measures; ``--help`` and ``--list`` explain them in one line each, and docs/design.md §6 states them in full.
"""

from __future__ import annotations

import argparse
import collections
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import env  # noqa: E402  (first: sets TRITON_INTERPRET before anything imports triton)

BENCH_FILES = ("test_bench_kernels.py", "test_bench_models.py", "test_bench_ceilings.py")


class Progress:
    """A pytest plugin: a progress bar over the (workload, provider) cases, and failures printed as they come."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.done = 0
        self.total = 0
        self.problems: list[str] = []

    def pytest_collection_finish(self, session):
        self.total = len(session.items)
        if self.enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, unit="case", desc="benchmarks", dynamic_ncols=True,
                                file=sys.stderr)
            except ImportError:
                self.bar = None

    def pytest_runtest_logstart(self, nodeid, location):
        case = nodeid.split("[", 1)[-1].rstrip("]")
        if self.bar is not None:
            self.bar.set_postfix_str(case[-70:], refresh=True)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {case}", file=sys.stderr, flush=True)

    def pytest_runtest_logreport(self, report):
        if report.failed and report.when != "call":
            self._say(f"{report.nodeid}: {report.when} failed\n{report.longreprtext[-2000:]}")
        if report.when == "teardown":
            self.done += 1
            if self.bar is not None:
                self.bar.update(1)

    def pytest_collectreport(self, report):
        if report.failed:
            self._say(f"collection failed: {report.longreprtext[-3000:]}")

    def _say(self, text: str):
        self.problems.append(text)
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def pytest_args(args, results_dir: Path) -> list[str]:
    bench_dir = Path(__file__).resolve().parent
    argv = [str(bench_dir / name) for name in BENCH_FILES]
    argv += ["-p", "no:terminal", "-p", "no:cacheprovider", "--benchmark-disable-gc",
             "--bench-suite", "full" if args.full else "quick", "--bench-results", str(results_dir),
             "-W", "ignore::DeprecationWarning", "-W", "ignore::FutureWarning"]
    for pattern in args.workload or []:
        argv += ["--bench-workload", pattern]
    for name in args.provider or []:
        argv += ["--bench-provider", name]
    if args.no_save:
        argv.append("--bench-no-save")
    return argv + list(args.pytest_args or [])


def summary(measurements, run: dict) -> str:
    """The table printed at the end: one line per (workload, provider)."""
    from benchmarks import results

    ratios = {(r["workload"], r["provider"], r["metric"]): float(r["value"])
              for r in results.ratio_rows(run, measurements)}
    header = f"{'workload':<44} {'provider':<15} {'status':<8} {'median ms':>10} {'rate':>18} " \
             f"{'x peft-path':>11} {'x sdpa-precat':>13}"
    lines = [header, "-" * len(header)]
    for m in measurements:
        rate = ""
        if m.timed:
            if m.workload.kind == "decode" and math.isfinite(m.bytes):  # decode is bandwidth-bound (P4)
                rate = f"{m.bytes / m.median_s / 1e9:.3g} GB/s"
            elif m.workload.packed and math.isfinite(m.tokens):  # packed batches: real tokens/s
                rate = f"{m.tokens / m.median_s:.4g} tok/s"
            elif math.isfinite(m.flops):
                rate = f"{m.flops / m.median_s / 1e12:.3g} TFLOP/s"
            elif math.isfinite(m.bytes):
                rate = f"{m.bytes / m.median_s / 1e9:.3g} GB/s"
            elif math.isfinite(m.tokens):
                rate = f"{m.tokens / m.median_s:.4g} tok/s"
        median = f"{m.median_s * 1e3:.4g}" if m.timed else ""

        def ratio(baseline):
            value = ratios.get((m.workload.name, m.provider, f"speedup_vs_{baseline}"))
            return f"{value:.2f}" if value is not None else ""
        status = m.status if m.status != "ok" or m.timed else "checked"
        lines.append(f"{m.workload.name[:44]:<44} {m.provider:<15} {status:<8} {median:>10} {rate:>18} "
                     f"{ratio('peft-path'):>11} {ratio('sdpa-precat'):>13}")
        if m.status in ("wrong", "error"):
            lines.append(f"    {m.note.splitlines()[0][:150]}")
    skipped = collections.Counter((m.provider, m.note.splitlines()[0][:240] if m.note else "")
                                  for m in measurements if m.status == "skipped")
    if skipped:
        lines.append("skipped:")
        lines += [f"  {provider} ({count} case{'s' if count > 1 else ''}): {why}"
                  for (provider, why), count in sorted(skipped.items())]
    return "\n".join(lines)


DESIGN_REF = "docs/design.md §6"


def targets_help() -> str:
    """The performance targets, one line each: the epilog of ``--help``."""
    from benchmarks import workloads

    lines = [f"performance targets (the tags in brackets after a workload's name; stated in full in {DESIGN_REF}):"]
    lines += [f"  {target:<3} {text}" for target, text in workloads.TARGETS.items()]
    return "\n".join(lines)


def targets_lines(chosen) -> list[str]:
    """For ``--list``: each target in one line, and which of the ``chosen`` workloads measure it."""
    from benchmarks import workloads

    tagged = {t for full in (False, True) for gpu in (False, True)
              for w in workloads.suite("full" if full else "quick", gpu=gpu) for t in w.targets}
    lines = [f"targets ({DESIGN_REF}):"]
    for target, text in workloads.TARGETS.items():
        measuring = [w.name for w in chosen if target in w.targets]
        if measuring:
            where = "measured by " + ", ".join(measuring)
        elif target in tagged:
            where = "no workload of this selection measures it (see --full, or without --workload)"
        else:
            where = "not measured by this suite yet: no workload carries the tag"
        lines += [f"  {target:<3} {text}", f"        {where}"]
    return lines


def list_cases(args) -> int:
    from benchmarks import models, providers, workloads

    chosen = workloads.select(workloads.suite("full" if args.full else "quick"), args.workload)
    print(f"{'full' if args.full else 'quick'} suite on {env.device_name()}: {len(chosen)} workloads "
          "[the targets each measures]")
    for w in chosen:
        print(f"  {w.name}{'  [' + ' '.join(w.targets) + ']' if w.targets else ''}")
    print("\n".join(targets_lines(chosen)))
    print("kernel providers:")
    sample = next((w for w in chosen if w.kind in workloads.KERNEL_KINDS), None)
    for p in providers.kernel_providers():
        reason = p.unavailable(sample) if sample is not None else None
        print(f"  {p.name:<15} {p.description}" + (f"  (not here: {reason})" if reason else ""))
    missing = models.integration_missing()
    print("model providers: " + ", ".join(models.PROVIDERS)
          + (f"  (patched model not here: {missing})" if missing else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.split("\n\n")[0],
                                     epilog=targets_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the shapes of the targets that have a workload, P1-P9 (the default)")
    size.add_argument("--full", action="store_true", help="plus the sweeps over N, P, B and T")
    parser.add_argument("--workload", action="append", metavar="PATTERN",
                        help="only workloads whose name or group matches this glob or contains it (repeatable)")
    parser.add_argument("--provider", action="append", metavar="NAME", help="only this provider (repeatable)")
    parser.add_argument("--results", type=Path, default=None,
                        help="results folder (default: benchmarks/results on a GPU, benchmarks/results-cpu otherwise)")
    parser.add_argument("--no-save", action="store_true", help="print the summary, write no files")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate report.md and the plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true",
                        help="list the workloads (with their target tags), the targets and the providers; run nothing")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    return parser


def _interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, which pytest turns into the end of the session: its measurements are still
    saved (benchmarks/conftest.py's pytest_sessionfinish) instead of lost with the process."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")
    signal.signal(signal.SIGTERM, interrupt)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        return list_cases(args)

    import pytest

    from benchmarks import harness, report

    results_dir = args.results or env.default_results_dir()
    mode = "GPU run" if env.ON_GPU else env.FUNCTIONAL_LABEL
    print(f"ptv2_kernels benchmarks: {'full' if args.full else 'quick'} suite on {env.device_name()} — {mode}")
    if not env.ON_GPU:
        print("  (no GPU: small shapes, Triton kernels in Triton's CPU interpreter, torch providers on the CPU)")
    warnings.filterwarnings("ignore", message="Not saving anything, no benchmarks have been run")
    progress = Progress(enabled=not args.no_progress)
    started = time.perf_counter()
    _interrupt_on_sigterm()
    try:
        code = pytest.main(pytest_args(args, results_dir), plugins=[progress])
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    measurements = harness.SESSION.measurements
    if measurements:
        print()
        print(summary(measurements, harness.SESSION.run))
    print(f"\n{len(measurements)} measurements in {elapsed:.0f} s"
          + ("" if env.ON_GPU else f" — {env.FUNCTIONAL_LABEL}"))
    if harness.SESSION.saved:
        path, rows = harness.SESSION.saved
        print(f"results: {path} ({len(rows)} rows from this run)")
        if harness.SESSION.raw_json:
            print(f"raw:     {harness.SESSION.raw_json}")
        if not args.no_report:
            report_path, plots = report.generate(results_dir)
            print(f"report:  {report_path}" + (f" and {len(plots)} plot(s)" if plots else ""))
    from benchmarks.providers import OPTIONAL

    bad = [m for m in measurements if m.status in ("wrong", "error")]
    if bad:
        print(f"{len(bad)} provider run(s) wrong or failed: " + ", ".join(f"{m.provider} on {m.workload.name}"
                                                                          for m in bad))
    if any(m.provider not in OPTIONAL for m in bad):
        return 1
    if not measurements:
        if code in (0, pytest.ExitCode.NO_TESTS_COLLECTED):
            print("nothing was measured: no (workload, provider) pair matched the filters (see --list)")
            return 2
        return 1
    if progress.problems:
        return 1
    if code == pytest.ExitCode.INTERRUPTED:
        print("interrupted: the measurements above are all this run made")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
