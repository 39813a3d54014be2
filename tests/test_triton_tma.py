"""The Triton forward's TMA variant (``USE_TMA``): the sequence's key/value tiles read through tensor descriptors.

On Hopper and later the autotuner is offered it beside the pointer-load configurations, where the descriptors'
alignment holds; it stays only if GPU timing shows it faster (benchmarks/gpu_check.py). Here:

* in Triton's CPU interpreter (which runs tensor descriptors), the variant forced on against the float64 oracle
  with the bounds of tests/kernel_cases.py: padding, causal with Nq > Nk (rows that see only the prefix), a padded
  head dim, GQA decode rows packed and split, banks, both biases, softcap and sinks, no sequence keys;
* which configurations prune_configs offers: TMA ones on sm_90 with aligned operands only, never on sm_80, nor for
  packed sequences, misaligned strides or head dims under 16 bytes;
* on a Hopper GPU, the variant forced on in the autotuner against the reference.

(The sm_90 compile of the variant is in tests/test_triton_compile.py and the static report.)
"""

from __future__ import annotations

import pytest
import torch

from ptv2_kernels import backends, prefix_attention

from .conftest import DEVICE
from .kernel_cases import (  # noqa: F401 - poison_uninitialized_memory is an autouse fixture
    Case, check_against_reference, force_kv_splits, poison_uninitialized_memory,
)

TRITON_REASON = backends.unavailable_reason("triton")
pytestmark = pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton unavailable: {TRITON_REASON}")


def _triton_backend():
    from ptv2_kernels.triton import prefix_attention as triton_backend

    return triton_backend


@pytest.fixture
def forward_with_tma(monkeypatch):
    """The forward's TMA variant forced on: the interpreter's launch flags, or on a GPU the autotuner offered
    only TMA configurations (its cache of chosen configurations emptied, and again after the test)."""
    triton_backend = _triton_backend()
    launcher = triton_backend._forward
    if backends.triton_interpreting():
        monkeypatch.setitem(launcher._meta, "USE_TMA", True)
        yield
        return
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need Hopper or later")
    original = triton_backend.prune_configs

    def only_tma(configs, args, kernel_name, capability, shared):
        kept = [c for c in original(configs, args, kernel_name, capability, shared) if c.kwargs.get("USE_TMA")]
        assert kept, "no TMA configuration was kept for an aligned launch on Hopper"
        return kept

    monkeypatch.setattr(triton_backend, "prune_configs", only_tma)
    launcher._kernel.cache.clear()
    yield
    launcher._kernel.cache.clear()


CASES = [
    pytest.param(Case(mask="padding", layout="bnhd"), torch.float32, id="padding-bnhd-fp32"),
    pytest.param(Case(q_len=37, k_len=19, causal=True, head_dim=80, num_prefixes=3, lengths=True), torch.float16,
                 id="causal-rows-see-prefix-only-d80-bank-fp16"),
    pytest.param(Case(bias="heads", prefix_bias="shared", softcap=1.5, sinks=True, mask="dense"), torch.float32,
                 id="biases-softcap-sinks-dense-fp32"),
    pytest.param(Case(q_len=1, k_len=45, q_heads=8, kv_heads=2, mask="padding", num_prefixes=2, lengths=True),
                 torch.float16, id="decode-packed-gqa-fp16"),
    pytest.param(Case(k_len=0, q_len=5, prefix_len=9), torch.float32, id="no-sequence-keys-fp32"),
    pytest.param(Case(head_dim=48, value_dim=32, causal=True, mask="padding", layout="bnhd"), torch.float16,
                 id="values-of-another-head-dim-fp16"),
]


@pytest.mark.parametrize("case, dtype", CASES)
def test_forward_with_tma_matches_the_oracle(case, dtype, forward_with_tma):
    check_against_reference(case, dtype, deterministic=True)


def test_split_kv_forward_with_tma_matches_the_oracle(forward_with_tma, monkeypatch):
    case = Case(q_len=2, k_len=70, q_heads=4, kv_heads=1, prefix_len=20, num_prefixes=2, lengths=True,
                mask="padding")
    force_kv_splits(monkeypatch, case)
    check_against_reference(case, torch.float32)


def _launch_args(k, v, varlen=False):
    return {"K": k, "V": v, "VARLEN": varlen, "D_PAD": 64, "q_len_class": 128, "Q": k, "PK": k}


def _projection(batch, length, heads, dim, dtype=torch.float16, extra=0):
    """Keys as transformers lays them out: a view [B, H, N, D] of [B, N, H * D (+ extra)] memory."""
    memory = torch.empty(batch, length, heads * dim + extra, dtype=dtype, device="meta")
    return memory[..., :heads * dim].view(batch, length, heads, dim).transpose(1, 2)


def test_prune_offers_tma_configurations_on_hopper_with_aligned_operands_only():
    triton_backend = _triton_backend()
    configs = triton_backend._FORWARD_CONFIGS
    assert any(c.kwargs["USE_TMA"] for c in configs) and any(not c.kwargs["USE_TMA"] for c in configs)
    aligned = _projection(2, 128, 4, 64)
    hopper, ampere = (9, 0), (8, 0)

    def offered(args, capability):
        kept = triton_backend.prune_configs(configs, args, "_forward_kernel", capability, 232448)
        return {bool(c.kwargs["USE_TMA"]) for c in kept}

    assert triton_backend.tma_descriptors_serve(_launch_args(aligned, aligned))
    assert offered(_launch_args(aligned, aligned), hopper) == {True, False}
    assert offered(_launch_args(aligned, aligned), ampere) == {False}
    assert offered(_launch_args(aligned, aligned, varlen=True), hopper) == {False}
    odd_rows = _projection(2, 128, 4, 64, extra=1)  # a row stride of 257 halves: not 16-byte aligned
    tiny_heads = _projection(2, 128, 4, 4)  # 8-byte rows: under TMA's 16-byte minimum
    for keys in (odd_rows, tiny_heads):
        assert not triton_backend.tma_descriptors_serve(_launch_args(keys, aligned))
        assert offered(_launch_args(keys, aligned), hopper) == {False}
    # the backward kernels have no TMA variant
    kept = triton_backend.prune_configs(triton_backend._QUERY_GRAD_CONFIGS, _launch_args(aligned, aligned),
                                        "_backward_query_kernel", hopper, 232448)
    assert all("USE_TMA" not in c.kwargs for c in kept)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_tma_allocator_is_set_once_and_respects_a_program_allocator():
    import triton
    from triton.runtime import _allocation

    triton_backend = _triton_backend()
    previous = _allocation._allocator.get()
    try:
        own = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda")  # noqa: E731
        triton.set_allocator(own)
        triton_backend._ensure_tma_allocator()
        assert _allocation._allocator.get() is own
    finally:
        triton.set_allocator(previous)
    q = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.float16)
    out = prefix_attention(q, q, q, q[0, :, :4], q[0, :, :4], backend="triton")
    assert torch.isfinite(out).all()
