"""Smoke test of the benchmark suite's one command, ``python benchmarks/run.py``, into a temporary folder.

On a machine without a GPU it is the functional run (small shapes, Triton in its CPU interpreter); a subset of the
quick suite keeps it under a minute on two cores: fwd+bwd at the P1 shape's small form, a decode step, a model
training step, a packed batch's fwd+bwd and the packed and padded training steps (P9), a ceiling. On a GPU the
same command runs the P1 and P4 shapes with the main providers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import report, results
from ptv2_kernels.integrations.hf_peft import peft_prefix_tuning_problem

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "benchmarks" / "run.py"


def run_suite(*args, timeout=240):
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    # Under pytest-xdist the child pytest would inherit the worker's identity, and pytest-benchmark then times nothing.
    for name in [name for name in env if name.startswith("PYTEST_XDIST") or name == "PYTEST_CURRENT_TEST"]:
        del env[name]
    return subprocess.run([sys.executable, str(RUN), "--no-progress", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


ON_GPU = torch.cuda.is_available()
# On a GPU the same command measures real shapes: keep to the P1 and P4 shapes and the main providers there.
SUBSET = ["--workload", "bert-fwdbwd", "--workload", "llm-decode", "--workload", "model-train",
          "--workload", "varlen-fwdbwd", "--workload", "packed-vs-padded", "--workload", "ceiling"]
if ON_GPU:
    SUBSET = ["--workload", "bert-fwdbwd", "--workload", "llm-decode", "--workload", "ceiling/copy*"] + [
        arg for name in ("ptv2-triton", "reference", "peft-path", "sdpa-precat", "torch")
        for arg in ("--provider", name)]


def test_the_suite_writes_results_report_and_raw_json(tmp_path):
    done = run_suite("--results", str(tmp_path), *SUBSET, timeout=600 if ON_GPU else 240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert ("GPU run" if ON_GPU else "functional run (CPU), timings meaningless") in done.stdout
    if not ON_GPU:  # the CUDA kernels take CUDA tensors only: skipped, and the summary says why
        assert "\nskipped:\n" in done.stdout and "\n  ptv2-cuda (" in done.stdout

    rows = results.read_csv(tmp_path / results.CSV_NAME)
    checks = {(r["workload"].split("/")[0], r["provider"]): r["status"] for r in rows if r["metric"] == "check"}
    for group in ("bert-fwdbwd", "llm-decode"):
        for provider in ("ptv2-triton", "reference", "peft-path", "sdpa-precat"):
            assert checks[(group, provider)] == "ok", (group, provider, output[-4000:])
    if not ON_GPU:
        # PEFT's baseline is skipped, saying why, where PEFT cannot prefix-tune with the installed transformers
        assert checks[("model-train", "peft-path")] == ("ok" if peft_prefix_tuning_problem() is None else "skipped")
        assert checks[("model-train", "ptv2-triton")] in ("ok", "skipped")
    assert checks[("ceiling", "torch")] == "ok"
    if not ON_GPU:  # packed batches: the varlen op and the padded baselines, the packed and padded training steps
        for provider in ("ptv2-triton", "ptv2-native", "reference", "peft-path", "sdpa-precat"):
            assert checks[("varlen-fwdbwd", provider)] == "ok", (provider, output[-4000:])
        assert checks[("packed-vs-padded", "ptv2-packed")] == checks[("packed-vs-padded", "ptv2-padded")] == "ok"
        real = {r["provider"] for r in rows if r["metric"] == "tokens_per_s" and r["group"] == "varlen-fwdbwd"}
        assert {"ptv2-native", "peft-path"} <= real
    assert {r["device_kind"] for r in rows} == {"cuda" if ON_GPU else "cpu"}
    speedups = [r for r in rows if r["metric"] == "speedup_vs_peft-path" and r["provider"] == "ptv2-triton"]
    assert {r["workload"].split("/")[0] for r in speedups} >= {"bert-fwdbwd", "llm-decode"}

    raw = list((tmp_path / "raw").glob("*.json"))
    assert len(raw) == 1
    benchmarks = json.loads(raw[0].read_text())["benchmarks"]
    timed = {(b["extra_info"]["workload"], b["extra_info"]["provider"]) for b in benchmarks}
    assert any(p == "ptv2-triton" for _, p in timed) and all(b["options"]["timer"] == "device_clock"
                                                              for b in benchmarks)
    text = (tmp_path / report.REPORT_NAME).read_text()
    assert (report.FUNCTIONAL_BANNER in text) != ON_GPU and "### bert-fwdbwd" in text


def test_list_shows_workloads_and_providers():
    done = run_suite("--list", "--full", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bert-fwdbwd/" in done.stdout and "peft-path" in done.stdout and "sdpa-precat" in done.stdout
    assert "[P1 P2]" in done.stdout
    assert "targets (docs/design.md §6):" in done.stdout
    for target in ("P1", "P7", "S1"):  # each target explained in one line, with the workloads measuring it
        assert f"\n  {target:<3} " in done.stdout, target


def test_bias_gradient_memory_script_runs():
    """benchmarks/bias_grad_memory.py (peak memory of a broadcast bias's backward, chunked vs one pass) works at
    its small shape."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bias_grad_memory.py")
    done = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "one pass (before)" in done.stdout and "chunked (as shipped)" in done.stdout


STOP_AFTER_TWO = '''
import os, signal

done = []


def pytest_runtest_logfinish(nodeid, location):
    done.append(nodeid)
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
'''


def test_a_stopped_run_saves_what_it_measured(tmp_path, monkeypatch):
    """SIGTERM (benchmarks/gpu_check.py stopping the stage at its cap) ends the run as Ctrl-C would: the cases
    measured so far are saved and reported, the rest never run, and the exit status says it was stopped."""
    (tmp_path / "stop_after_two.py").write_text(STOP_AFTER_TWO)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    results_dir = tmp_path / "results"
    done = run_suite("--results", str(results_dir), "--workload", "bert-fwd/", "--provider", "reference",
                     "--provider", "peft-path", "--provider", "sdpa-precat", "--", "-p", "stop_after_two",
                     timeout=240)
    assert done.returncode == 1, (done.stdout + done.stderr)[-4000:]
    assert "interrupted" in done.stdout
    rows = results.read_csv(results_dir / results.CSV_NAME)
    measured = {r["provider"] for r in rows if r["metric"] == "check"}
    assert measured == {"reference", "peft-path"}, measured  # the third case never ran
    assert (results_dir / report.REPORT_NAME).exists()
