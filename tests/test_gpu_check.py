"""benchmarks/gpu_check.py without a GPU: the budgeted stage runner on stub stages (a stage that passes, fails,
overruns its cap and is stopped with its children, and stages skipped when the budget is spent; the summary written
after every stage), and the ``--dry-run`` end to end: the plan with estimates, the self-check and the functional
benchmark run on the CPU, the summary with the targets' verdicts, and at most 8 files copied to ``$OUT``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

sys.path.insert(0, str(REPO))
from benchmarks import gpu_check  # noqa: E402


def _stage(name, code, cap=30.0, estimate=1.0, **kw):
    return gpu_check.Stage(name, f"stub {name}", lambda ctx: [sys.executable, "-c", code], estimate, cap, **kw)


def test_runner_statuses_caps_and_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 2.0)
    ctx = gpu_check.Context(tmp_path / "run", dry_run=False, budget_s=14.0)
    summaries = []
    # The overrunning stage leaves a grandchild behind: the whole process group must go.
    pid_file = tmp_path / "child.pid"
    overrun = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
               f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    stages = [
        _stage("ok", "print('hello')"),
        _stage("bad", "import sys; print('boom'); sys.exit(3)"),
        _stage("slow", overrun, cap=3.0),
        _stage("not wanted", "print(1)", skip=lambda ctx: "no reason to"),
        _stage("eats the budget", "import time; time.sleep(60)", cap=100.0),
        _stage("too late", "print('never')"),
    ]
    start = time.monotonic()
    results = gpu_check.run_stages(stages, ctx, after_each=lambda c: summaries.append(dict(c.results)),
                                   say=lambda text: None)
    took = time.monotonic() - start
    status = {r.name: r.status for r in results}
    assert status == {"ok": "passed", "bad": "failed", "slow": "timed out", "not wanted": "skipped",
                      "eats the budget": "timed out", "too late": "skipped"}
    by_name = {r.name: r for r in results}
    assert by_name["bad"].returncode == 3 and "boom" in by_name["bad"].note
    assert by_name["slow"].seconds < 20 and "cap of 3 s" in by_name["slow"].note
    assert "budget's end" in by_name["eats the budget"].note
    assert "budget spent" in by_name["too late"].note
    assert took < ctx.budget_s + 5  # the budget holds (plus the stop's grace)
    assert "hello" in (ctx.run_dir / by_name["ok"].log).read_text()
    assert [len(s) for s in summaries] == list(range(1, 7))  # the summary is written after every stage
    child = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the overrunning stage's child process survived")


def test_dry_run_skips_gpu_stages_and_writes_the_summary(tmp_path):
    ctx = gpu_check.Context(tmp_path / "run", dry_run=True, budget_s=60.0)
    stages = [_stage("cpu", "print(1)", on_cpu=True), _stage("gpu", "raise SystemExit(1)")]
    gpu_check.run_stages(stages, ctx, after_each=gpu_check.write_summary, say=lambda text: None)
    assert ctx.results["cpu"].status == "passed"
    assert ctx.results["gpu"].status == "not run (dry run)"
    summary = (ctx.run_dir / "summary.md").read_text()
    assert "| gpu | not run (dry run) |" in summary and "Not measured" in summary
    assert json.loads((ctx.run_dir / "summary.json").read_text())["stages"][0]["status"] == "passed"


def test_plan_orders_stages_and_every_stage_has_a_cap():
    plan = gpu_check.stages()
    names = [s.name for s in plan]
    assert names[0] == "install" and names.index("self-check") < names.index("benchmarks")
    assert {"sanitizer memcheck", "sanitizer racecheck", "sanitizer synccheck", "kernel tests",
            "first-call latency"} <= set(names)
    assert all(0 < s.estimate_s <= s.cap_s for s in plan)
    assert [s.name for s in plan if s.on_cpu] == ["self-check", "benchmarks"]


def test_dry_run_end_to_end(tmp_path):
    """The command as CI runs it, restricted to one benchmark workload and two self-check backends for time."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OUT"] = str(out)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--budget-s", "240", "--results-root", str(tmp_path / "runs"),
         "--bench-arg=--workload=bert-fwdbwd", "--selfcheck-arg=--backend=triton",
         "--selfcheck-arg=--backend=reference"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert "plan (dry run" in text and "estimated total on a GPU" in text
    for name in ("install", "self-check", "benchmarks", "sanitizer memcheck", "kernel tests"):
        assert name in text
    run_dir = next((tmp_path / "runs").iterdir())
    summary = (run_dir / "summary.md").read_text()
    assert "| self-check | passed |" in summary and "| benchmarks | passed |" in summary
    assert "| install | not run (dry run) |" in summary
    assert "functional run (CPU), timings meaningless" in summary and "| P1 |" in summary
    assert "auto" in summary
    assert (run_dir / "bench" / "results.csv").exists()
    copied = sorted(p.name for p in out.iterdir())
    assert 1 <= len(copied) <= gpu_check.OUT_LIMIT and "summary.md" in copied and "results.csv" in copied
    assert text.rstrip().splitlines()[-1].startswith("everything in ")  # the one-screen summary comes last
    print(f"dry run took {took:.0f} s")
