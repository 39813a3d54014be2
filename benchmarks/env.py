"""Where the suite runs: the device, Triton's CPU interpreter when there is no GPU, versions and the commit.

Importing this module before anything imports triton is what makes a machine without a GPU work: Triton's jit
decorator reads ``TRITON_INTERPRET`` when kernels are defined, so it is set here, first.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from .results import slug  # noqa: F401  (re-exported: file names of devices)

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if ON_GPU else "cpu"
REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
GPU_RESULTS = BENCH_DIR / "results"
CPU_RESULTS = BENCH_DIR / "results-cpu"
FUNCTIONAL_LABEL = "functional run (CPU), timings meaningless"


def default_results_dir() -> Path:
    """GPU measurements go to ``benchmarks/results`` (committed); CPU runs to ``benchmarks/results-cpu`` (not)."""
    return GPU_RESULTS if ON_GPU else CPU_RESULTS


@functools.lru_cache(maxsize=None)
def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name(torch.cuda.current_device())
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({model}, {os.cpu_count()} cores)"


def device_kind() -> str:
    return "cuda" if ON_GPU else "cpu"


def version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=None)
def commit() -> str:
    """The short commit of the checkout, with ``-dirty`` when tracked code the suite measures has local changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short=10", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("diff", "--quiet", "HEAD", "--", "ptv2_kernels", "csrc", "benchmarks").returncode != 0
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=None)
def environment() -> dict:
    """The columns every result row carries: where and with what it was measured."""
    return {
        "device": device_name(),
        "device_kind": device_kind(),
        "torch": torch.__version__,
        "triton": version_of("triton"),
        "cuda": torch.version.cuda or "none",
        "transformers": version_of("transformers"),
        "peft": version_of("peft"),
        "commit": commit(),
    }


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
