"""The CUDA backend (csrc/) against the float64 reference: the Triton backend's cases, plus decode.

Every test runs in one of two modes (the ``impl`` fixture):

* ``gpu`` — the compiled extension ``ptv2_kernels._C`` on a CUDA device; skipped, with the reason, without one.
* ``sim`` — without a GPU: the same kernel sources compiled with g++ for the host simulation of tests/cuda_sim,
  run on CPU tensors. It executes the kernels' code (tiles, mma/ldmatrix fragments, masks, online softmax,
  split-KV merging, atomics, deterministic sums) with emulated warp instructions; it cannot show timing, races
  between blocks, or the real tensor cores' rounding. Skipped where a GPU is present (the real thing is tested).
  Barrier placement inside a block is exercised by thread schedules that let one warp run ahead and by copies
  landing early or late (PTV2_SIM_SCHEDULE, PTV2_SIM_CP_ASYNC; see tests/cuda_sim/ptv2_sim.h): the whole module
  passes under each, and test_barriers_under_adversarial_schedules keeps two of them in every run.

Bounds and helpers are those of tests/kernel_cases.py (FlashAttention-style: a small multiple of the same-precision
PyTorch error plus a floor), shared with the other backends' tests.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptv2_kernels
from ptv2_kernels import backends
from ptv2_kernels.call import Call
from ptv2_kernels.reference import attention_ref

from . import cuda_sim
from .kernel_cases import (  # noqa: F401 - poison_uninitialized_memory is an autouse fixture
    BANKS, DEVICE, GQA, HEAD_DIMS, LAYOUTS, MASKS, ON_GPU, PREFIX_LENS, SHAPES, Case, RecordOps,
    assert_close_to_reference, backend_mask, check_against_reference, make_inputs, poison_uninitialized_memory,
    reference_results, run_backend,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(params=["gpu", "sim"])
def impl(request, monkeypatch):
    """The object whose forward/backward/dropout_keep_mask run the CUDA kernels, wired in as backend "cuda"."""
    if request.param == "gpu":
        reason = backends.unavailable_reason("cuda")
        if reason is not None:
            pytest.skip(f"CUDA backend unavailable: {reason}")
        from ptv2_kernels import cuda_backend

        return cuda_backend
    if ON_GPU:
        pytest.skip("a GPU is present: the compiled kernels are tested instead of their host simulation")
    reason = cuda_sim.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CUDA host simulation unavailable: {reason}")
    original_impl = backends.implementation
    monkeypatch.setattr(backends.CudaBackend, "unsupported_reasons", lambda self, problem: [])
    monkeypatch.setattr(backends, "implementation",
                        lambda name: cuda_sim.SimBackend if name == "cuda" else original_impl(name))
    monkeypatch.setattr(cuda_sim.SimBackend, "algo", 0)
    monkeypatch.setattr(cuda_sim.SimBackend, "num_sms", 4)
    return cuda_sim.SimBackend


def check(case, dtype, deterministic=False, seed=0):
    check_against_reference(case, dtype, deterministic=deterministic, seed=seed, backend="cuda")


def check_forward(case, dtype, seed=0):
    """Forward only (out and lse) against the oracle, with the bounds of check_against_reference."""
    inputs, kwargs = make_inputs(case, dtype, seed)
    out, lse = ptv2_kernels.prefix_attention(*inputs, **kwargs, return_lse=True, backend="cuda")
    oracle_out, oracle_lse = attention_ref(*[t.double() for t in inputs], **kwargs)
    pt_out, pt_lse = attention_ref(*inputs, **kwargs, compute_dtype=dtype)
    seen = torch.isfinite(oracle_lse)
    assert torch.equal(torch.isfinite(lse), seen), "lse must be -inf exactly where a query sees no key"
    assert (out[~seen] == 0).all(), "a query that sees no key outputs 0"
    assert_close_to_reference("out", out, oracle_out, pt_out, dtype)
    assert_close_to_reference("lse", lse[seen], oracle_lse[seen], pt_lse[seen].float(), torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# The Triton tests' grid (every mask x causal x bank combination, the other axes cycling), in all three dtypes
# ---------------------------------------------------------------------------------------------------------------

GRID = []
for i, (mask, causal, bank) in enumerate(itertools.product(MASKS, [False, True], BANKS)):
    (q_len, k_len) = SHAPES[i % len(SHAPES)]
    q_heads, kv_heads = GQA[i % len(GQA)]
    dtype = DTYPES[i % len(DTYPES)]
    case = Case(q_len=q_len, k_len=k_len, q_heads=q_heads, kv_heads=kv_heads, head_dim=HEAD_DIMS[i % len(HEAD_DIMS)],
                prefix_len=PREFIX_LENS[(i // 2) % len(PREFIX_LENS)], mask=mask, causal=causal,
                layout=LAYOUTS[(i // 3) % len(LAYOUTS)], **bank)
    GRID.append(pytest.param(case, dtype, id=f"{mask}-{'causal' if causal else 'full'}-T{case.num_prefixes}-"
                             f"P{case.prefix_len}-{q_len}x{k_len}-h{q_heads}/{kv_heads}-d{case.head_dim}-"
                             f"{str(dtype)[6:]}"))


@pytest.mark.parametrize("case, dtype", GRID)
def test_matches_reference(impl, case, dtype):
    check(case, dtype, deterministic=bool(len(case.mask) % 2))


@pytest.mark.parametrize("prefix_len", PREFIX_LENS)
@pytest.mark.parametrize("num_prefixes", [1, 3])
def test_prefix_lengths(impl, prefix_len, num_prefixes):
    case = Case(num_prefixes=num_prefixes, prefix_len=prefix_len, lengths=num_prefixes > 1, causal=True,
                mask="padding", q_len=21, k_len=30)
    check(case, torch.bfloat16 if num_prefixes > 1 else torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 256, 8, 12])
def test_head_dims(impl, head_dim, dtype):
    """Each head-dim bucket (64, 128, 256) with its runtime masking, and sizes that are no multiple of 8."""
    case = Case(head_dim=head_dim, q_len=17, k_len=20, prefix_len=5, batch=1, q_heads=2, kv_heads=1, causal=True)
    check(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("head_dim, causal, mask", [(128, True, "padding"), (64, False, "dense"), (256, True, "none")])
def test_long_sequences(impl, head_dim, causal, mask, dtype):
    """Several tiles of every kind: the forward's K/V prefetch, several query blocks per key block in dK/dV, several
    key tiles per query block in dQ, and a causal diagonal crossing tiles."""
    case = Case(batch=2, q_heads=4, kv_heads=2, q_len=150, k_len=203, head_dim=head_dim, num_prefixes=2,
                lengths=True, prefix_len=130, causal=causal, mask=mask)
    check(case, dtype, deterministic=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["packed", "bnhd"])
@pytest.mark.parametrize("prefix_layout", ["strided", "bank"])
def test_strided_inputs(impl, layout, prefix_layout, dtype):
    case = Case(q_len=23, k_len=23, num_prefixes=2, lengths=True, layout=layout, prefix_layout=prefix_layout,
                causal=True)
    check(case, dtype)


@pytest.mark.parametrize("q_len", [70, 3])
def test_unaligned_rows(impl, q_len):
    """Rows that are not 16-byte aligned (an odd element offset) take the element-wise load path."""
    case = Case(q_len=q_len, k_len=45, num_prefixes=2, lengths=True, mask="padding", head_dim=40)
    inputs, kwargs = make_inputs(case, torch.float16)
    shifted = []
    for t in inputs:
        buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buffer[1:].view(t.shape)
        view.copy_(t)
        shifted.append(view)
    assert all(t.data_ptr() % 16 != 0 for t in shifted)
    out, lse, grads, upstream = run_backend(shifted, kwargs, backend="cuda")
    oracle = reference_results(shifted, kwargs, upstream, torch.float64)
    same_precision = reference_results(shifted, kwargs, upstream, torch.float16)
    assert_close_to_reference("out", out, oracle[0], same_precision[0], torch.float16)
    for name, grad, want, pt in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, oracle[2],
                                    same_precision[2]):
        assert_close_to_reference(name, grad, want, pt, torch.float16)


@pytest.mark.parametrize("q_dtype, prefix_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                                   (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)],
                         ids=["f16-f32", "bf16-f32", "f32-bf16", "bf16-f16"])
@pytest.mark.parametrize("q_len", [19, 2])
def test_mixed_prefix_dtype(impl, q_dtype, prefix_dtype, q_len):
    """The prefix is converted on load and its gradient comes back in its own dtype (tiled and decode kernels)."""
    case = Case(num_prefixes=3, lengths=True, prefix_dtype=prefix_dtype, mask="padding", q_len=q_len)
    check(case, q_dtype)


def test_custom_scale_and_single_query_heads(impl):
    check(Case(scale=0.3, q_heads=3, kv_heads=1, q_len=9, k_len=40, prefix_len=16), torch.float32)
    check(Case(scale=0.3, q_heads=3, kv_heads=1, q_len=29, k_len=40, prefix_len=16), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("q_len, k_len, prefix_len", [(0, 5, 3), (4, 0, 3), (4, 0, 0), (3, 5, 0), (20, 0, 0)])
def test_empty_dimensions(impl, q_len, k_len, prefix_len, dtype):
    """No queries, no sequence keys, no prefix, or nothing to see at all (out 0, lse -inf, zero gradients)."""
    case = Case(q_len=q_len, k_len=k_len, prefix_len=prefix_len, causal=k_len > 0)
    check(case, dtype)


def test_empty_batch(impl):
    inputs, kwargs = make_inputs(Case(batch=0), torch.float16)
    out, lse, grads, _ = run_backend(inputs, kwargs, backend="cuda")
    assert out.shape == (0, 4, 19, 32) and lse.shape == (0, 4, 19)
    assert all(g.shape == t.shape for g, t in zip(grads, inputs))
    assert (grads[3] == 0).all() and (grads[4] == 0).all()


@pytest.mark.parametrize("deterministic", [False, True])
def test_unused_bank_entries_get_zero_gradient(impl, deterministic):
    inputs, kwargs = make_inputs(Case(num_prefixes=4, batch=3), torch.float16)
    kwargs["prefix_index"] = torch.tensor([2, 0, 2], device=DEVICE)
    _, _, grads, _ = run_backend(inputs, kwargs, deterministic=deterministic, backend="cuda")
    for grad in grads[3:]:
        assert (grad[[1, 3]] == 0).all() and (grad[[0, 2]] != 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_deterministic_mode_is_bitwise_reproducible(impl, dtype):
    case = Case(batch=4, num_prefixes=2, lengths=True, prefix_len=70, mask="padding", causal=True)
    inputs, kwargs = make_inputs(case, dtype)
    first = run_backend(inputs, kwargs, deterministic=True, backend="cuda")[2]
    second = run_backend(inputs, kwargs, deterministic=True, backend="cuda")[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    atomic = run_backend(inputs, kwargs, deterministic=False, backend="cuda")[2]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 3]),
    q_len=st.integers(1, 90), k_len=st.integers(0, 140), head_dim=st.sampled_from([16, 24, 32, 48, 64, 72, 128]),
    num_prefixes=st.integers(1, 3), prefix_len=st.integers(0, 80), lengths=st.booleans(),
    mask=st.sampled_from(MASKS), causal=st.booleans(), seed=st.integers(0, 2**16),
    dtype=st.sampled_from(DTYPES),
)
def test_fuzz_shapes(impl, batch, kv_heads, group, q_len, k_len, head_dim, num_prefixes, prefix_len, lengths, mask,
                     causal, seed, dtype):
    case = Case(batch=batch, q_heads=kv_heads * group, kv_heads=kv_heads, q_len=q_len, k_len=k_len,
                head_dim=head_dim, num_prefixes=num_prefixes, prefix_len=prefix_len, lengths=lengths,
                mask=mask if k_len else "none", causal=causal,
                prefix_layout="shared3d" if num_prefixes == 1 else "bank")
    check(case, dtype, deterministic=bool(seed % 2), seed=seed)


@pytest.mark.parametrize("cp_async, schedule", [("early", "serial"), ("late", "reverse-serial")])
@pytest.mark.parametrize("head_dim, q_len", [(128, 150), (64, 3)], ids=["tiled-d128", "decode-d64"])
def test_barriers_under_adversarial_schedules(impl, monkeypatch, cp_async, schedule, head_dim, q_len):
    """Simulation only: one warp runs ahead to its next __syncthreads while the others wait, and asynchronous
    copies land at issue (a missing barrier before a tile is reloaded corrupts other warps' reads) or only at their
    wait (a missing wait reads stale data). Removing any such barrier or wait makes these cases fail."""
    if impl is not cuda_sim.SimBackend:
        pytest.skip("thread schedules are a property of the host simulation")
    monkeypatch.setenv("PTV2_SIM_CP_ASYNC", cp_async)
    monkeypatch.setenv("PTV2_SIM_SCHEDULE", schedule)
    case = Case(batch=2, q_heads=4, kv_heads=2, q_len=q_len, k_len=140, head_dim=head_dim, num_prefixes=2,
                lengths=True, prefix_len=70, causal=True, mask="padding")
    check(case, torch.bfloat16, deterministic=schedule == "serial")


# ---------------------------------------------------------------------------------------------------------------
# Decode: Nq <= 16 in float16/bfloat16 takes the split-KV kernel
# ---------------------------------------------------------------------------------------------------------------

DECODE_CASES = []
for q_len, k_len, bank, mask, dtype in itertools.product(
        [1, 4], [1, 7, 33, 301], ["shared", "mixed"], ["none", "padding"], [torch.float16, torch.bfloat16]):
    if (k_len in (1, 7)) and (bank, mask, dtype) != ("mixed", "padding", torch.float16):
        continue  # short caches: one combination each
    bank_args = dict(num_prefixes=1, prefix_layout="shared3d") if bank == "shared" else dict(num_prefixes=3,
                                                                                            lengths=True)
    case = Case(batch=5, q_heads=8, kv_heads=2, q_len=q_len, k_len=k_len, head_dim=64, prefix_len=40, mask=mask,
                causal=q_len > 1, layout="bnhd", **bank_args)
    DECODE_CASES.append(pytest.param(case, dtype, id=f"q{q_len}-cache{k_len}-{bank}-{mask}-{str(dtype)[6:]}"))


@pytest.mark.parametrize("case, dtype", DECODE_CASES)
def test_decode_matches_reference(impl, case, dtype):
    check_forward(case, dtype)


@pytest.mark.parametrize("bank", ["shared", "mixed"])
def test_decode_forward_and_backward(impl, bank):
    """The backward after a decode forward (the general backward kernels, on the decode kernel's lse)."""
    bank_args = dict(num_prefixes=1, prefix_layout="shared3d") if bank == "shared" else dict(num_prefixes=3,
                                                                                            lengths=True)
    case = Case(batch=3, q_heads=4, kv_heads=2, q_len=2, k_len=70, head_dim=64, prefix_len=20, mask="padding",
                causal=True, **bank_args)
    check(case, torch.bfloat16, deterministic=bank == "mixed")


@pytest.mark.parametrize("head_dim", [32, 96, 128, 256])
def test_decode_head_dims(impl, head_dim):
    case = Case(batch=3, q_heads=4, kv_heads=1, q_len=1, k_len=150, head_dim=head_dim, num_prefixes=2, lengths=True,
                prefix_len=150, mask="dense")
    check_forward(case, torch.float16)


def test_decode_many_samples_share_an_entry(impl):
    """More samples on one bank entry than the kernel gathers at once (128): its rows come in several rounds."""
    case = Case(batch=131, q_heads=2, kv_heads=1, q_len=1, k_len=9, head_dim=32, num_prefixes=2, prefix_len=20,
                lengths=True)
    inputs, kwargs = make_inputs(case, torch.float16)
    kwargs["prefix_index"] = (torch.arange(131, device=DEVICE) % 7 == 3).long()  # mostly entry 0, some 1
    out, lse = ptv2_kernels.prefix_attention(*inputs, **kwargs, return_lse=True, backend="cuda")
    oracle_out, oracle_lse = attention_ref(*[t.double() for t in inputs], **kwargs)
    pt_out, pt_lse = attention_ref(*inputs, **kwargs, compute_dtype=torch.float16)
    assert_close_to_reference("out", out, oracle_out, pt_out, torch.float16)
    assert_close_to_reference("lse", lse, oracle_lse, pt_lse.float(), torch.float32)


def test_decode_and_tiled_kernels_agree(impl):
    """Both forward kernels on one decode problem (several key splits), against each other and the oracle."""
    case = Case(batch=2, q_heads=6, kv_heads=2, q_len=3, k_len=517, head_dim=64, num_prefixes=2, lengths=True,
                prefix_len=90, mask="padding", causal=True)
    inputs, kwargs = make_inputs(case, torch.float16)
    args = [t.detach() for t in inputs]
    scale = 1.0 / math.sqrt(case.head_dim)
    call = Call(*args, kwargs["prefix_index"], kwargs["prefix_lengths"], backend_mask(kwargs), causal=True,
                scale=scale)
    outs = []
    for algo in (1, 2):
        if impl is cuda_sim.SimBackend:
            impl.algo, impl.num_sms = algo, 64  # many splits
            out, lse = impl.forward(call)
        else:
            out, lse = impl.forward(call, algo=algo)
        outs.append((out, lse))
    oracle_out, oracle_lse = attention_ref(*[t.double() for t in args], **kwargs)
    pt_out, _ = attention_ref(*args, **kwargs, compute_dtype=torch.float16)
    for out, lse in outs:
        assert_close_to_reference("out", out, oracle_out, pt_out, torch.float16)
        torch.testing.assert_close(lse, oracle_lse.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------------------------
# Dropout: the Triton backend's Philox stream, regenerated in backward
# ---------------------------------------------------------------------------------------------------------------

def test_dropout_mask_equals_triton(impl):
    seed = torch.tensor(1234, dtype=torch.int64, device=DEVICE)
    keep = impl.dropout_keep_mask(seed, 2, 3, 5, 4, 7, 0.25)
    if backends.unavailable_reason("triton") is None:
        from ptv2_kernels.triton import prefix_attention as triton_backend

        assert torch.equal(keep.cpu(), triton_backend.dropout_keep_mask(seed, 2, 3, 5, 4, 7, 0.25).cpu())
    assert 0.6 < keep.float().mean().item() < 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", [Case(num_prefixes=3, lengths=True, mask="padding", causal=True),
                                  Case(q_len=1, k_len=30, prefix_len=16, q_heads=4, kv_heads=1),
                                  Case(q_len=70, k_len=90, prefix_len=70, q_heads=2, kv_heads=1, mask="dense")],
                         ids=["bank-padding-causal", "decode-mqa", "multi-tile-dense"])
def test_dropout_matches_reference_given_the_kernel_mask(impl, case, dtype):
    """Forward and all gradients equal the reference run with the keep mask the kernels drew."""
    dropout_p = 0.25
    inputs, kwargs = make_inputs(case, dtype)
    seed = torch.tensor(1234, dtype=torch.int64, device=DEVICE)
    args = [t.detach() for t in inputs]
    if args[3].dim() == 3:
        args[3], args[4] = args[3].unsqueeze(0), args[4].unsqueeze(0)
    mask = backend_mask(kwargs)
    if mask is not None and mask.dim() == 4:
        mask = mask.expand(case.batch, case.q_heads, case.q_len, case.k_len)
    scale = 1.0 / math.sqrt(case.head_dim)
    call = Call(*args, kwargs.get("prefix_index"), kwargs.get("prefix_lengths"), mask, None, seed, case.causal, scale,
                dropout_p)
    out, lse = impl.forward(call)
    keep = impl.dropout_keep_mask(seed, case.batch, case.q_heads, case.q_len, case.prefix_len, case.k_len, dropout_p)
    gen = torch.Generator(device="cpu").manual_seed(7)
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    grads = impl.backward(grad_out, None, call, out, lse)
    upstream = (grad_out, None)
    oracle = reference_results(args, kwargs, upstream, torch.float64, keep, dropout_p)
    same_precision = reference_results(args, kwargs, upstream, dtype, keep, dropout_p)
    assert_close_to_reference("out", out, oracle[0], same_precision[0], dtype)
    for name, grad, want, pt in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, oracle[2],
                                    same_precision[2]):
        assert_close_to_reference(name, grad, want, pt, dtype)


def test_dropout_follows_torch_seed(impl):
    case = Case(num_prefixes=2, lengths=True)
    inputs, kwargs = make_inputs(case, torch.float16)

    def run(seed):
        torch.manual_seed(seed)
        return ptv2_kernels.prefix_attention(*inputs, **kwargs, dropout_p=0.2, backend="cuda")

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


# ---------------------------------------------------------------------------------------------------------------
# Bounds, copies, dispatch
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("q_len", [3, 40], ids=["decode", "tiled"])
def test_out_of_range_index_never_reads_out_of_bounds(impl, q_len):
    """Should a bad index reach the kernels, they read no prefix for that sample and write NaN rows for it (in the
    simulation every tensor ends at an inaccessible page: a read past a bank would crash)."""
    case = Case(num_prefixes=2, batch=3, lengths=True, q_len=q_len)
    inputs, kwargs = make_inputs(case, torch.float16)
    bad_index = torch.tensor([0, 1 << 30, -7], device=DEVICE)
    out, _ = impl.forward(Call(*inputs, bad_index, kwargs["prefix_lengths"], scale=1.0 / math.sqrt(case.head_dim)))
    assert torch.isnan(out[1:]).all()
    good = dict(kwargs, prefix_index=torch.tensor([0, 0, 0], device=DEVICE))
    want = ptv2_kernels.prefix_attention(*inputs, **good, backend="reference")
    torch.testing.assert_close(out[0], want[0], rtol=2e-3, atol=2e-3)


def test_op_layer_makes_no_copies(impl):
    """The op layer around the CUDA ops materializes nothing (the ops themselves are opaque to a dispatch mode)."""
    if impl is cuda_sim.SimBackend:
        pytest.skip("the simulation passes tensors through files: only the compiled backend can be recorded")
    case = Case(num_prefixes=3, lengths=True, mask="dense", causal=True, layout="bnhd", prefix_layout="strided",
                prefix_dtype=torch.float32)
    inputs, kwargs = make_inputs(case, torch.float16)
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    with RecordOps() as recorded:
        out, lse = ptv2_kernels.prefix_attention(*leaves, **kwargs, dropout_p=0.1, return_lse=True, backend="cuda")
        torch.autograd.grad([out, lse], leaves, [torch.ones_like(out), torch.ones_like(lse)])
    assert recorded.materializing == []
