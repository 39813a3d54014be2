"""The CUDA extension as built, without a GPU: it imports, its ops are registered, and its dropout numbers are
Triton's.

* The host Philox of csrc/philox.h, compiled here with g++ into a tiny program, must reproduce the Triton backend's
  keep mask bit for bit (Triton runs in its CPU interpreter). This needs no extension.
* When ``ptv2_kernels._C`` is built (CI builds it: ``pip install`` with PTV2_REQUIRE_CUDA_BUILD=1), it must import,
  say which architectures it holds (those of TORCH_CUDA_ARCH_LIST when set), register
  ``torch.ops.ptv2_kernels_cuda.{fwd, decode, bwd, dropout_keep_mask}`` with their Meta shapes, and its CPU
  dropout op must give the same mask. Without the extension these tests skip, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from ptv2_kernels import backends, cuda_backend

from .conftest import DEVICE

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
MASK_CASES = [(1234, 2, 3, 5, 4, 7, 0.25), (2**62 - 5, 1, 2, 9, 0, 13, 0.5), (99, 2, 1, 3, 3, 3, 0.9),
              (0, 1, 1, 40, 24, 40, 0.1)]

_EXTENSION_REASON = cuda_backend._extension()[1]
needs_extension = pytest.mark.skipif(_EXTENSION_REASON is not None, reason=f"{_EXTENSION_REASON}")


def _triton_mask(seed, batch, heads, q_len, prefix_len, k_len, p):
    if backends.unavailable_reason("triton") is not None:
        pytest.skip(f"Triton unavailable: {backends.unavailable_reason('triton')}")
    from ptv2_kernels.triton.prefix_attention import dropout_keep_mask

    return dropout_keep_mask(torch.tensor(seed, dtype=torch.int64, device=DEVICE), batch, heads, q_len, prefix_len,
                             k_len, p).cpu()


_PHILOX_PROGRAM = r"""
#include "philox.h"
#include <cstdio>
#include <cstdlib>
int main(int argc, char** argv) {
  const unsigned long long seed = std::strtoull(argv[1], nullptr, 10);
  const int streams = std::atoi(argv[2]), rows = std::atoi(argv[3]), cols = std::atoi(argv[4]);
  const float p = static_cast<float>(std::strtod(argv[5], nullptr));
  for (int s = 0; s < streams; ++s)
    for (int i = 0; i < rows; ++i)
      for (int c = 0; c < cols; ++c) std::putchar(ptv2::dropout_keep(seed, s, i, c, cols, p) ? '1' : '0');
  return 0;
}
"""


@pytest.fixture(scope="module")
def philox_program(tmp_path_factory):
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build the host Philox program")
    folder = tmp_path_factory.mktemp("philox")
    source = folder / "philox_main.cpp"
    source.write_text(_PHILOX_PROGRAM)
    program = folder / "philox_main"
    subprocess.run([compiler, "-std=c++17", "-O2", f"-I{CSRC}", str(source), "-o", str(program)], check=True,
                   capture_output=True, text=True)
    return str(program)


@pytest.mark.parametrize("seed, batch, heads, q_len, prefix_len, k_len, p", MASK_CASES)
def test_host_philox_equals_triton_mask(philox_program, seed, batch, heads, q_len, prefix_len, k_len, p):
    cols = prefix_len + k_len
    output = subprocess.run([philox_program, str(seed), str(batch * heads), str(q_len), str(cols), repr(p)],
                            capture_output=True, text=True, check=True).stdout
    host = torch.tensor([c == "1" for c in output]).view(batch, heads, q_len, cols)
    assert torch.equal(host, _triton_mask(seed, batch, heads, q_len, prefix_len, k_len, p))


@needs_extension
def test_extension_imports_and_reports_its_architectures():
    import ptv2_kernels._C as extension

    archs = cuda_backend.compiled_archs()
    assert archs, f"no architecture in {extension.arch_list()!r}"
    assert cuda_backend.extension_status().startswith("built for sm_")
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if wanted:
        expected = {tuple(int(x) for x in item.replace("+PTX", "").split(".")[:2])
                    for item in wanted.replace(",", ";").replace(" ", ";").split(";") if item.strip()}
        assert set(archs) == expected
    assert extension.shared_memory_bytes("float16", 256) > extension.shared_memory_bytes("float16", 64) > 0


@needs_extension
def test_ops_are_registered():
    import ptv2_kernels._C  # noqa: F401 - registers the ops

    ops = torch.ops.ptv2_kernels_cuda
    expected = {
        "fwd": ["q", "k", "v", "prefix_k", "prefix_v", "prefix_index", "prefix_lengths", "attn_mask", "seed",
                "causal", "scale", "dropout_p", "algo"],
        "decode": ["q", "k", "v", "prefix_k", "prefix_v", "prefix_index", "prefix_lengths", "attn_mask", "seed",
                   "causal", "scale", "dropout_p"],
        "bwd": ["grad_out", "grad_lse", "q", "k", "v", "prefix_k", "prefix_v", "prefix_index", "prefix_lengths",
                "attn_mask", "seed", "out", "lse", "causal", "scale", "dropout_p", "deterministic"],
        "dropout_keep_mask": ["seed", "batch", "q_heads", "q_len", "cols", "dropout_p"],
    }
    for name, arguments in expected.items():
        schema = getattr(ops, name).default._schema
        assert [a.name for a in schema.arguments] == arguments, name
    assert len(ops.fwd.default._schema.returns) == 2 and len(ops.bwd.default._schema.returns) == 5


@needs_extension
def test_meta_shapes():
    import ptv2_kernels._C  # noqa: F401

    meta = dict(device="meta", dtype=torch.bfloat16)
    q, k = torch.empty(2, 8, 5, 96, **meta), torch.empty(2, 2, 11, 96, **meta)
    bank = torch.empty(3, 2, 7, 96, device="meta", dtype=torch.float32)
    index = torch.empty(2, device="meta", dtype=torch.int64)
    for op in (torch.ops.ptv2_kernels_cuda.fwd, torch.ops.ptv2_kernels_cuda.decode):
        out, lse = op(q, k, k, bank, bank, index, None, None, None, True, 0.1, 0.0)
        assert out.shape == q.shape and out.transpose(1, 2).is_contiguous() and out.dtype == q.dtype
        assert lse.shape == (2, 8, 5) and lse.dtype == torch.float32
    grads = torch.ops.ptv2_kernels_cuda.bwd(out, lse, q, k, k, bank, bank, index, None, None, None, out, lse, True,
                                            0.1, 0.0, False)
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape, bank.shape, bank.shape]
    assert grads[3].dtype == torch.float32


@needs_extension
@pytest.mark.parametrize("seed, batch, heads, q_len, prefix_len, k_len, p", MASK_CASES)
def test_extension_cpu_dropout_mask_equals_triton(seed, batch, heads, q_len, prefix_len, k_len, p):
    keep = cuda_backend.dropout_keep_mask(torch.tensor(seed, dtype=torch.int64), batch, heads, q_len, prefix_len,
                                          k_len, p)
    assert keep.dtype == torch.bool and keep.shape == (batch, heads, q_len, prefix_len + k_len)
    assert torch.equal(keep, _triton_mask(seed, batch, heads, q_len, prefix_len, k_len, p))


@needs_extension
def test_backend_reports_without_gpu():
    """Built but without a GPU: "cuda" is unavailable for that reason, and auto never picks it."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert backends.unavailable_reason("cuda") == "no CUDA device"
    x = torch.empty(1, 1, 1, 16)
    assert backends.choose("auto", x, x, x) in ("native", "reference")
    with pytest.raises(ValueError, match="no CUDA device"):
        backends.choose("cuda", x, x, x)
