"""The Triton backend against the float64 reference: forward, lse and all five gradients.

The cases, their grid and the bounds (FlashAttention-style: a small multiple of the same-precision PyTorch error
plus a floor) are those of tests/kernel_cases.py, which every backend's tests share. Without a GPU the kernels run
in Triton's CPU interpreter (tests/conftest.py), where bfloat16 is not tested (see docs/design.md §5).

Every run happens with ``torch.use_deterministic_algorithms`` on, which fills memory from ``torch.empty`` with NaN:
an element a kernel forgets to write shows up as NaN. The backward's reduction mode is chosen explicitly per test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptv2_kernels
from ptv2_kernels import backends
from ptv2_kernels.call import Call

from .kernel_cases import (  # noqa: F401 - poison_uninitialized_memory is an autouse fixture
    DEVICE, GRID, MASKS, ON_GPU, PREFIX_LENS, Case, RecordOps, assert_close_to_reference, backend_mask,
    check_against_reference, force_kv_splits, make_inputs, poison_uninitialized_memory, reference_results,
    run_backend,
)

pytestmark = pytest.mark.skipif(backends.unavailable_reason("triton") is not None,
                                reason=f"Triton backend unavailable: {backends.unavailable_reason('triton')}")


@pytest.mark.parametrize("case, dtype", GRID)
def test_matches_reference(case, dtype):
    check_against_reference(case, dtype, deterministic=bool(len(case.mask) % 2))


@pytest.mark.parametrize("prefix_len", PREFIX_LENS)
@pytest.mark.parametrize("num_prefixes", [1, 3])
def test_prefix_lengths(prefix_len, num_prefixes):
    case = Case(num_prefixes=num_prefixes, prefix_len=prefix_len, lengths=num_prefixes > 1, causal=True,
                mask="padding", q_len=21, k_len=30)
    check_against_reference(case, torch.float16 if num_prefixes > 1 else torch.float32)


@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 256, 8])
def test_head_dims(head_dim):
    case = Case(head_dim=head_dim, q_len=17, k_len=20, prefix_len=5, batch=1, q_heads=2, kv_heads=1)
    check_against_reference(case, torch.float16)


@pytest.mark.parametrize("layout", ["packed", "bnhd"])
@pytest.mark.parametrize("prefix_layout", ["strided", "bank"])
def test_strided_inputs(layout, prefix_layout):
    case = Case(q_len=23, k_len=23, num_prefixes=2, lengths=True, layout=layout, prefix_layout=prefix_layout,
                causal=True)
    check_against_reference(case, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("index_layout", ["strided", "expanded"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_index_tensor_layouts(backend, index_layout, deterministic):
    """prefix_index and prefix_lengths as views with stride 2 (every other element of a larger tensor, whose
    other elements are out of range) or stride 0 (one entry expanded to the batch): each sample gets its own entry."""
    case = Case(batch=3, num_prefixes=3, lengths=True, index_layout=index_layout, mask="padding", q_len=9, k_len=14)
    check_against_reference(case, torch.float32, deterministic=deterministic, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("mask", ["sdpa_bool", "sdpa_float", "padding_dense"])
def test_sdpa_mask_conventions(backend, mask):
    """attn_mask read as scaled_dot_product_attention reads it (a 2-D mask is [Nq, Nk]; a float one is added to
    the scores, -inf hiding keys), and a key-padding mask together with a dense bool mask."""
    case = Case(mask=mask, num_prefixes=2, causal=mask == "sdpa_float", q_len=9, k_len=13)
    check_against_reference(case, torch.float16 if backend == "triton" else torch.float32, backend=backend)


@pytest.mark.parametrize("q_dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []))
def test_float32_prefix_with_half_inputs(q_dtype):
    """A float32 prefix parameter under half-precision activations: converted on load, gradient in float32."""
    case = Case(num_prefixes=3, lengths=True, prefix_dtype=torch.float32, mask="padding")
    check_against_reference(case, q_dtype)


@pytest.mark.parametrize("q_len, q_heads, kv_heads", [(1, 8, 2), (7, 6, 2), (16, 4, 1)])
@pytest.mark.parametrize("mask", ["dense_heads", "padding"])
def test_packed_query_heads(q_len, q_heads, kv_heads, mask):
    """Few queries under GQA: the forward packs a group's query heads into one block of rows. With 7 queries × 3
    heads a query's heads straddle two blocks, and causal key ranges are those of the block's span of queries."""
    from ptv2_kernels.triton import prefix_attention as triton_backend

    case = Case(q_len=q_len, k_len=29, q_heads=q_heads, kv_heads=kv_heads, num_prefixes=3, lengths=True, mask=mask,
                causal=True)
    assert triton_backend.packs_query_heads(case.q_len, case.q_heads, case.kv_heads)
    check_against_reference(case, torch.float16)


@pytest.mark.parametrize("case", [
    Case(q_len=1, k_len=57, q_heads=8, kv_heads=2, num_prefixes=3, lengths=True, mask="padding", causal=True),
    Case(q_len=3, k_len=70, q_heads=2, kv_heads=2, prefix_len=20, mask="dense_heads", causal=True),
    Case(q_len=2, k_len=9, q_heads=4, kv_heads=1, prefix_len=40, num_prefixes=2, lengths=True),
], ids=["decode-gqa-bank", "few-queries-dense", "prefix-longer-than-cache"])
def test_split_kv_forward(case, monkeypatch):
    """Decode with too few programs for the GPU splits the keys of [prefix ; sequence] across programs and merges
    their partial outputs by lse. Forced here by pretending to have multiprocessors to fill; the splits then cut
    through the prefix, the sequence and the boundary between them, and some get no key at all."""
    force_kv_splits(monkeypatch, case)
    check_against_reference(case, torch.float32)


@pytest.mark.parametrize("case, dtype, multiprocessors", [
    (Case(bias="heads", num_prefixes=3, lengths=True, mask="padding", causal=True), torch.float16, 0),
    (Case(bias="shared", q_len=24, k_len=24, mask="dense", layout="bnhd"), torch.float32, 0),
    (Case(bias="shared", q_len=7, k_len=30, q_heads=6, kv_heads=2, causal=True), torch.float32, 0),
    (Case(bias="heads", q_len=1, k_len=70, q_heads=4, kv_heads=1, prefix_len=0), torch.float32, 8),
], ids=["per-head-fp16-bank-padding-causal", "shared-inf-dense", "shared-inf-packed-gqa", "decode-split-no-prefix"])
def test_additive_bias(case, dtype, multiprocessors, monkeypatch):
    """An additive score bias on the sequence keys (T5's position bias): forward, lse, the five gradients and the
    bias's own (summed over broadcast dims), also with -inf entries, packed GQA rows and split keys."""
    from ptv2_kernels.triton import prefix_attention as triton_backend

    monkeypatch.setattr(triton_backend, "_multiprocessors", lambda device: multiprocessors)
    monkeypatch.setattr(triton_backend, "MIN_KEYS_PER_SPLIT", 16)
    check_against_reference(case, dtype)


def test_launch_plans_are_made_once_per_problem(monkeypatch):
    """The launchers plan a padded problem once (constants, flags, GQA packing, splits, grids) and every later call
    of the same problem (every layer, every decode step) reuses the plan; other strides of the same shapes share
    it (strides are passed at each launch) and still match the reference; another flag, dtype or split rule makes a
    plan of its own."""
    from ptv2_kernels._memo import Memo
    from ptv2_kernels.triton import prefix_attention as triton_backend

    plans = Memo(capacity=128)
    monkeypatch.setattr(triton_backend, "_PLANS", plans)
    case = Case(q_len=1, k_len=40, q_heads=4, kv_heads=2, prefix_len=24, mask="padding", causal=True)
    check_against_reference(case, torch.float32)
    assert len(plans) == 2  # one forward plan, one backward plan
    check_against_reference(dataclasses.replace(case, layout="bnhd"), torch.float32)
    assert len(plans) == 2
    check_against_reference(dataclasses.replace(case, causal=False), torch.float32)
    assert len(plans) == 4
    (forward_plan,) = [plan for key, plan in plans._entries.items() if key[0] == "forward" and plan.flags["CAUSAL"]]
    assert forward_plan.splits == 1 and forward_plan.pack  # no multiprocessors to fill here; GQA rows packed
    force_kv_splits(monkeypatch, case)  # the split rule's inputs change: the case plans again, and splits
    check_against_reference(case, torch.float32)
    assert len(plans) == 6
    assert any(key[0] == "forward" and plan.splits > 1 for key, plan in plans._entries.items())


def test_kv_split_heuristic():
    kv_splits = __import__("ptv2_kernels.triton.prefix_attention", fromlist=["kv_splits"]).kv_splits
    assert kv_splits(q_len=1, programs=64 * 8, keys=2176, multiprocessors=132) == 1  # P4: enough programs
    assert kv_splits(q_len=1, programs=8, keys=8192 + 128, multiprocessors=132) == 32  # one long sequence
    assert kv_splits(q_len=1, programs=8, keys=600, multiprocessors=132) == 2  # at least 256 keys a split
    assert kv_splits(q_len=64, programs=8, keys=8192, multiprocessors=132) == 1  # many queries: no split
    assert kv_splits(q_len=1, programs=8, keys=8192, multiprocessors=0) == 1  # no GPU


def test_custom_scale_and_single_query_heads():
    check_against_reference(Case(scale=0.3, q_heads=3, kv_heads=1, q_len=9, k_len=40, prefix_len=16), torch.float32)


@pytest.mark.parametrize("q_len, k_len, prefix_len", [(0, 5, 3), (4, 0, 3), (4, 0, 0), (3, 5, 0)])
def test_empty_dimensions(q_len, k_len, prefix_len):
    """No queries, no sequence keys, no prefix, or nothing to see at all (out 0, lse -inf, zero gradients)."""
    case = Case(q_len=q_len, k_len=k_len, prefix_len=prefix_len, causal=k_len > 0)
    check_against_reference(case, torch.float32)


def test_empty_batch():
    inputs, kwargs = make_inputs(Case(batch=0), torch.float32)
    out, lse, grads, _ = run_backend(inputs, kwargs)
    assert out.shape == (0, 4, 19, 32) and lse.shape == (0, 4, 19)
    assert all(g.shape == t.shape for g, t in zip(grads, inputs))
    assert (grads[3] == 0).all() and (grads[4] == 0).all()


def test_unused_bank_entries_get_zero_gradient():
    inputs, kwargs = make_inputs(Case(num_prefixes=4, batch=3), torch.float32)
    kwargs["prefix_index"] = torch.tensor([2, 0, 2], device=DEVICE)
    _, _, grads, _ = run_backend(inputs, kwargs)
    for grad in grads[3:]:
        assert (grad[[1, 3]] == 0).all() and (grad[[0, 2]] != 0).any()


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 3]),
    q_len=st.integers(1, 40), k_len=st.integers(0, 40), head_dim=st.sampled_from([16, 24, 32, 48, 64]),
    num_prefixes=st.integers(1, 3), prefix_len=st.integers(0, 20), lengths=st.booleans(),
    mask=st.sampled_from(MASKS), causal=st.booleans(), seed=st.integers(0, 2**16),
    multiprocessors=st.sampled_from([0, 4, 16]),
)
def test_fuzz_shapes(batch, kv_heads, group, q_len, k_len, head_dim, num_prefixes, prefix_len, lengths, mask,
                     causal, seed, multiprocessors):
    """Random valid shapes; ``multiprocessors`` > 0 lets decode-like calls (Nq <= 16) split their keys as a GPU
    with that many multiprocessors would, at 16 keys a split at least."""
    from ptv2_kernels.triton import prefix_attention as triton_backend

    case = Case(batch=batch, q_heads=kv_heads * group, kv_heads=kv_heads, q_len=q_len, k_len=k_len,
                head_dim=head_dim, num_prefixes=num_prefixes, prefix_len=prefix_len, lengths=lengths,
                mask=mask if k_len else "none", causal=causal,
                prefix_layout="shared3d" if num_prefixes == 1 else "bank")
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(triton_backend, "_multiprocessors", lambda device: multiprocessors)
        patcher.setattr(triton_backend, "MIN_KEYS_PER_SPLIT", 16)
        check_against_reference(case, torch.float32, deterministic=bool(seed % 2), seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# Deterministic mode
# ---------------------------------------------------------------------------------------------------------------

def test_deterministic_mode_is_bitwise_reproducible():
    case = Case(batch=4, num_prefixes=2, lengths=True, prefix_len=40, mask="padding", causal=True)
    inputs, kwargs = make_inputs(case, torch.float32)
    first = run_backend(inputs, kwargs, deterministic=True)[2]
    second = run_backend(inputs, kwargs, deterministic=True)[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    atomic = run_backend(inputs, kwargs, deterministic=False)[2]
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_deterministic_default_follows_torch_setting():
    """With torch's deterministic algorithms on (as in this module), deterministic=None picks the ordered sum."""
    case = Case(batch=3, prefix_len=20)
    inputs, kwargs = make_inputs(case, torch.float32)
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    runs = []
    for _ in range(2):
        out = ptv2_kernels.prefix_attention(*leaves, **kwargs, backend="triton")
        runs.append(torch.autograd.grad(out.sum(), leaves[3:]))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---------------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------------

def _dropout_run(case, dropout_p, seed_value, dtype=torch.float32):
    from ptv2_kernels.triton import prefix_attention as triton_backend

    inputs, kwargs = make_inputs(case, dtype)
    seed = torch.tensor(seed_value, dtype=torch.int64, device=DEVICE)
    args = [t.detach() for t in inputs]
    if args[3].dim() == 3:
        args[3], args[4] = args[3].unsqueeze(0), args[4].unsqueeze(0)
    mask = backend_mask(kwargs)
    scale = 1.0 / math.sqrt(case.head_dim)
    out, lse = triton_backend.forward(Call(*args, kwargs.get("prefix_index"), kwargs.get("prefix_lengths"), mask,
                                           None, seed, case.causal, scale, dropout_p))
    keep = triton_backend.dropout_keep_mask(seed, case.batch, case.q_heads, case.q_len, case.prefix_len,
                                            case.k_len, dropout_p)
    return inputs, kwargs, args, seed, (out, lse), keep, scale


@pytest.mark.parametrize("case", [Case(num_prefixes=3, lengths=True, mask="padding", causal=True),
                                  Case(q_len=1, k_len=30, prefix_len=16, q_heads=4, kv_heads=1),
                                  Case(q_len=7, k_len=20, q_heads=6, kv_heads=2, mask="dense_heads", causal=True),
                                  Case(q_len=1, k_len=50, q_heads=4, kv_heads=2, prefix_len=16)],
                         ids=["bank-padding-causal", "decode-mqa", "packed-gqa-dense-causal", "split-kv-decode"])
def test_dropout_matches_reference_given_the_kernel_mask(case, monkeypatch):
    """Forward and all gradients equal the reference run with the keep mask the kernels drew."""
    from ptv2_kernels.triton import prefix_attention as triton_backend

    if case.k_len == 50:  # split the keys as a decode step on a GPU with room to fill would
        monkeypatch.setattr(triton_backend, "_multiprocessors", lambda device: 8)
        monkeypatch.setattr(triton_backend, "MIN_KEYS_PER_SPLIT", 16)

    dropout_p = 0.25
    inputs, kwargs, args, seed, (out, lse), keep, scale = _dropout_run(case, dropout_p, 1234)
    gen = torch.Generator(device="cpu").manual_seed(7)
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE)
    call = Call(*args, kwargs.get("prefix_index"), kwargs.get("prefix_lengths"), backend_mask(kwargs), None, seed,
                case.causal, scale, dropout_p)
    grads = triton_backend.backward(grad_out, None, call, out, lse)
    upstream = (grad_out, None)
    oracle = reference_results(args, kwargs, upstream, torch.float64, keep, dropout_p)
    same_precision = reference_results(args, kwargs, upstream, torch.float32, keep, dropout_p)
    assert_close_to_reference("out", out, oracle[0], same_precision[0], torch.float32)
    for name, grad, want, pt in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, oracle[2],
                                    same_precision[2]):
        assert_close_to_reference(name, grad, want, pt, torch.float32)


def test_dropout_keep_rate():
    """The kept fraction is within 5 standard deviations of 1 - p, and masks of different seeds differ."""
    dropout_p = 0.3
    seed = torch.tensor(99, dtype=torch.int64, device=DEVICE)
    from ptv2_kernels.triton import prefix_attention as triton_backend

    keep = triton_backend.dropout_keep_mask(seed, 2, 3, 40, 24, 40, dropout_p)
    n = keep.numel()
    sigma = math.sqrt(n * dropout_p * (1 - dropout_p))
    assert abs(keep.sum().item() - n * (1 - dropout_p)) < 5 * sigma
    other = triton_backend.dropout_keep_mask(seed + 1, 2, 3, 40, 24, 40, dropout_p)
    assert not torch.equal(keep, other)
    # streams of different (sample, head) pairs are not copies of each other
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


def test_dropout_follows_torch_seed():
    case = Case(num_prefixes=2, lengths=True)
    inputs, kwargs = make_inputs(case, torch.float32)

    def run(seed):
        torch.manual_seed(seed)
        return ptv2_kernels.prefix_attention(*inputs, **kwargs, dropout_p=0.2, backend="triton")

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


# ---------------------------------------------------------------------------------------------------------------
# No copies, and no out-of-bounds reads
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_path_makes_no_copies(dropout_p, deterministic):
    """The op layer (checks, normalization, autograd glue) and the Triton backend's forward and backward together
    call no op that materializes K/V or the prefix. The backend is recorded by calling it directly, since a
    dispatch mode sees the custom op as one call."""
    from ptv2_kernels.triton import prefix_attention as triton_backend

    case = Case(num_prefixes=3, lengths=True, mask="dense", causal=True, q_heads=4, kv_heads=2, layout="bnhd",
                prefix_layout="strided", prefix_dtype=torch.float32)
    inputs, kwargs = make_inputs(case, torch.float16)
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    with RecordOps() as outer:
        out, lse = ptv2_kernels.prefix_attention(*leaves, **kwargs, dropout_p=dropout_p, return_lse=True,
                                                 backend="triton", deterministic=deterministic)
        torch.autograd.grad([out, lse], leaves, [torch.ones_like(out), torch.ones_like(lse)])
    assert outer.materializing == []

    mask = kwargs["attn_mask"].expand(case.batch, case.q_heads, case.q_len, case.k_len)
    seed = torch.tensor(3, dtype=torch.int64, device=DEVICE) if dropout_p else None
    scale = 1.0 / math.sqrt(case.head_dim)
    with RecordOps() as inner:
        call = Call(*inputs, kwargs["prefix_index"], kwargs["prefix_lengths"], mask, None, seed, True, scale,
                    dropout_p, deterministic)
        out, lse = triton_backend.forward(call)
        triton_backend.backward(torch.ones_like(out), torch.ones_like(lse), call, out, lse)
    assert inner.materializing == []


def test_out_of_range_index_never_reads_out_of_bounds():
    """The host check raises; should a bad index reach the kernels anyway, they read no prefix for that sample and
    write NaN rows for it, leaving the other samples right."""
    from ptv2_kernels.triton import prefix_attention as triton_backend

    case = Case(num_prefixes=2, batch=3, lengths=True)
    inputs, kwargs = make_inputs(case, torch.float32)
    with pytest.raises(IndexError, match="prefix_index"):
        ptv2_kernels.prefix_attention(*inputs, **dict(kwargs, prefix_index=torch.tensor([0, 5, 1], device=DEVICE)),
                                      backend="triton")
    bad_index = torch.tensor([0, 1 << 30, -7], device=DEVICE)
    out, _ = triton_backend.forward(Call(*inputs, bad_index, kwargs["prefix_lengths"],
                                         scale=1.0 / math.sqrt(case.head_dim)))
    assert torch.isnan(out[1:]).all()
    good = dict(kwargs, prefix_index=torch.tensor([0, 0, 0], device=DEVICE))
    want = ptv2_kernels.prefix_attention(*inputs, **good, backend="reference")
    torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=1e-5)


def test_auto_backend_choice():
    inputs, kwargs = make_inputs(Case(), torch.float32)
    assert backends.choose("auto", inputs[0], inputs[1], inputs[3]) == ("triton" if ON_GPU else "native")
    if not ON_GPU:
        with pytest.raises(ValueError, match="bfloat16"):
            backends.choose("triton", inputs[0].bfloat16(), inputs[1].bfloat16(), inputs[3])


def test_cases_beyond_the_kernels_fall_back_under_auto_and_raise_when_named():
    """Dropout counters are 32-bit per (sample, head): a longer attention goes to the reference under "auto" on a
    GPU (to the native backend on a CPU, which draws its mask from a torch generator)."""
    q = torch.empty(1, 1, 2**16, 16, device=DEVICE)
    k = torch.empty(1, 1, 2**15, 16, device=DEVICE)
    prefix = torch.empty(1, 8, 16, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="2\\*\\*31") if ON_GPU else contextlib.nullcontext():
        assert backends.choose("auto", q, k, prefix, dropout_p=0.1) == ("reference" if ON_GPU else "native")
    with pytest.raises(ValueError, match="2\\*\\*31"):
        backends.choose("triton", q, k, prefix, dropout_p=0.1)
    assert backends.choose("triton", q, k, prefix, dropout_p=0.0) == "triton"
