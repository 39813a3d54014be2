"""The Triton kernels lower all the way to GPU code for Ampere (sm_80) and Hopper (sm_90), without a GPU.

The interpreter-based tests check what the kernels compute; this checks that the compiler accepts them, which the
interpreter never asks. It runs tests/compile_triton_kernels.py in a subprocess because the interpreter, once
switched on for this test session, has already replaced the kernels.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptv2_kernels import backends

pytestmark = pytest.mark.skipif(backends.unavailable_reason("triton") == "the triton package is not installed",
                                reason="the triton package is not installed")

SCRIPT = Path(__file__).with_name("compile_triton_kernels.py")


@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_compile_for_gpu_targets(capability):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[1])] + [p for p in [env.get("PYTHONPATH")] if p])
    result = subprocess.run([sys.executable, str(SCRIPT), str(capability)], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    # 21 kernels, and on Hopper the forward's TMA variant in each of the three feature sets
    assert result.stdout.count("compiled in") == (24 if capability >= 90 else 21), result.stdout
