"""benchmarks/static_report.py: the compiled resource use of the kernels, without a GPU (target S1 of
docs/design.md §6).

The CI test compiles, for sm_80 and sm_90, the configurations the autotuner may choose at the target shapes (P1,
P3, P4; ``--kept``) and every CUDA kernel (``nvcc -Xptxas -v``), and requires S1 to hold: every configuration the
autotuner may choose is spill-free and fits shared memory, at least one exists per attention kernel and target, the
shared-memory estimate that prunes before autotuning is an upper bound of the compiled size, and the CUDA kernels
spill nothing. ``python benchmarks/static_report.py`` (no ``--kept``) compiles every configuration, pruned ones
too. The report's own helpers are tested on made-up rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptv2_kernels import backends

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "static_report.py"
sys.path.insert(0, str(REPO))
from benchmarks import static_report  # noqa: E402  (imports no triton: safe under the interpreter)

needs_triton = pytest.mark.skipif(backends.unavailable_reason("triton") == "the triton package is not installed",
                                  reason="the triton package is not installed")


def _run(*args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_blocks_per_sm():
    h100 = static_report.ARCHS[90]
    assert h100.blocks_per_sm(255, 8, 224 * 1024) == 1
    assert h100.blocks_per_sm(128, 4, 40 * 1024) == 4  # registers: 65536 / (128 * 32) = 16 warps
    assert h100.blocks_per_sm(32, 4, 0) == 16  # threads: 2048 / 128
    assert h100.blocks_per_sm(64, 4, 228 * 1024) == 0  # more than a block may have: cannot launch
    assert static_report.ARCHS[80].blocks_per_sm(168, 4, 72 * 1024) == 2  # shared: 164 KiB / 73 KiB


def test_parse_nvcc_log_and_names():
    log = """ptxas info    : Compiling entry function '_ZN4ptv220forward_tiled_kernelI6__halfLi64EEEvNS_6ParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN4ptv220forward_tiled_kernelI6__halfLi64EEEvNS_6ParamsE
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 140 registers, used 1 barriers, 512 bytes smem
ptxas info    : Compiling entry function '_ZN4ptv221forward_simple_kernelENS_6ParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN4ptv221forward_simple_kernelENS_6ParamsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers
"""
    rows = static_report.parse_nvcc_log(log)
    assert [r["registers"] for r in rows] == [140, 40]
    assert rows[0]["spill_stores"] == 4 and rows[0]["spill_loads"] == 12 and rows[0]["static_shared"] == 512
    assert rows[1]["spill_stores"] == 0 and rows[1]["static_shared"] == 0
    assert static_report._short_cuda_name("void ptv2::forward_tiled_kernel<__nv_bfloat16, 64>(ptv2::Params)") == \
        "forward_tiled_kernel<bf16, 64>"
    assert static_report.mma_family("wgmma.mma_async.sync.aligned ... cp.async.bulk.tensor") == "wgmma+TMA"
    assert static_report.mma_family("mma.sync.aligned.m16n8k16") == "mma.sync"


def _row(kernel, config, kept, spill=0, shared=1000, estimate=2000, fits=True):
    return dict(kind="triton", arch="sm_90", target="P3", kernel=kernel, config=config, kept=kept, registers=200,
                stack=spill, spill_stores=spill, spill_loads=spill, warps=4, shared=shared, fits=fits,
                shared_estimate=estimate, blocks_per_sm=1, mma="wgmma", seconds=1.0)


def test_check_targets_on_made_up_rows():
    good = [_row("forward", "a", True), _row("forward", "b", False, spill=300),
            _row("backward_keys", "c", True), _row("backward_queries", "d", True),
            dict(kind="cuda", arch="sm_90", source="x.cu", kernel="k", registers=10, stack=0, spill_stores=0,
                 spill_loads=0, static_shared=0, seconds=1.0)]
    assert all(ok for ok, _ in static_report.check_targets(good))  # a spilling config is fine if it is pruned
    bad = good + [_row("backward_keys", "e", True, spill=60)]
    failed = [text for ok, text in static_report.check_targets(bad) if not ok]
    assert len(failed) == 1 and "backward_keys e (spills 60 B)" in failed[0]
    none_left = [r for r in good if r["kernel"] != "backward_queries"] + [_row("backward_queries", "f", True,
                                                                            fits=False, shared=300000)]
    failed = [text for ok, text in static_report.check_targets(none_left) if not ok]
    assert any("backward_queries: 0 spill-free" in t for t in failed)
    under = good + [_row("forward", "g", False, shared=5000, estimate=4000)]
    assert any("estimate" in t for ok, t in static_report.check_targets(under) if not ok)
    assert "| sm_90 | P3 | forward | 2 | 1 (b: 300 B) |" in "\n".join(static_report.summary_table(good))


@needs_triton
def test_list_covers_every_kernel_at_every_target():
    done = _run("--list", "--no-cuda", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for arch in ("sm_80", "sm_90"):
        for target, kernels in (("P1", ("forward", "backward_keys", "backward_queries", "backward_preprocess",
                                        "prefix_grad_finalize")),
                                ("P3", ("forward", "backward_keys", "backward_queries")), ("P4", ("forward (decode)",))):
            for kernel in kernels:
                chosen = [l for l in lines if l.startswith(f"{arch} {target} {kernel} ") and "(pruned)" not in l]
                assert chosen, f"{arch} {target} {kernel}: no configuration the autotuner may choose"
    assert any("(pruned)" in l for l in lines)


@needs_triton
@pytest.mark.skipif(static_report.find_nvcc() is None, reason="no nvcc: the CUDA kernels cannot be compiled")
def test_s1_holds_for_what_the_autotuner_may_choose(tmp_path):
    """The CI's subset: the configurations the autotuner may choose, sm_80 and sm_90, and the CUDA kernels."""
    start = time.monotonic()
    done = _run("--kept", "--out", str(tmp_path), timeout=1200)
    took = time.monotonic() - start
    report = json.loads((tmp_path / "report.json").read_text()) if (tmp_path / "report.json").exists() else {}
    failed = [v["what"] for v in report.get("verdicts", []) if not v["holds"]]
    assert done.returncode == 0, "\n".join(failed) or (done.stdout + done.stderr)[-4000:]
    rows = report["rows"]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["target"] for r in rows if r["kind"] == "triton"} == {"P1", "P3", "P4"}
    assert all(r["kept"] for r in rows if r["kind"] == "triton")
    assert sum(r["kind"] == "cuda" for r in rows if r["arch"] == "sm_90") >= 30  # every entry point
    assert any(r["mma"].startswith("wgmma") for r in rows if r["arch"] == "sm_90" and r["kind"] == "triton")
    assert "compiled resource use, not timings" in (tmp_path / "report.md").read_text()
    print(f"static report (--kept) took {took:.0f} s")
