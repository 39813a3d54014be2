"""Test setup: without a GPU, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is imported (its jit decorator reads it), so it is set here, before
any test module imports ptv2_kernels' Triton backend.
"""

import os

import pytest
import torch

# The shared kernel helpers assert like the test modules that call them: with pytest's detailed failure messages.
pytest.register_assert_rewrite("tests.kernel_cases")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE
