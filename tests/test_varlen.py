"""``prefix_attention_varlen``: packed variable-length sequences against the float64 oracle, on every backend that
serves them (Triton in its CPU interpreter without a GPU, native and reference one sequence at a time).

The oracle is :func:`attention_ref_varlen` (the padded oracle on each sequence alone) in float64, differentiated
by autograd; the bounds are those of the padded op's tests (tests/kernel_cases.py): a small multiple of the
same-precision PyTorch computation's error plus a floor of a few ulps.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import ptv2_kernels
from ptv2_kernels import backends, prefix_attention, prefix_attention_varlen
from ptv2_kernels.reference import attention_ref_varlen

from .conftest import DEVICE
from .kernel_cases import DTYPES, assert_close_to_reference

TRITON_REASON = backends.unavailable_reason("triton")
BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(TRITON_REASON is not None, reason=str(TRITON_REASON))),
    pytest.param("native", marks=pytest.mark.skipif(DEVICE != "cpu", reason="native runs on the CPU")),
    "reference",
]


@dataclasses.dataclass
class VarlenCase:
    lens_q: tuple = (5, 0, 17, 3)
    lens_k: tuple = (5, 0, 17, 3)
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    num_prefixes: int = 3
    prefix_len: int = 7
    lengths: bool = True
    causal: bool = False
    layout: str = "contiguous"  # "contiguous" [total, H, D], "qkv" (slices of one packed projection), "strided"
    index_layout: str = "contiguous"  # of prefix_index: "contiguous", "strided", "expanded"
    cu_dtype: torch.dtype = torch.int32

    @property
    def cu_seqlens(self):
        def cumulative(lens):
            return torch.tensor([0, *itertools.accumulate(lens)], dtype=self.cu_dtype, device=DEVICE)

        return cumulative(self.lens_q), cumulative(self.lens_k)


def make_inputs(case: VarlenCase, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(case.lens_q), sum(case.lens_k)
    Hq, Hkv, D, T, P = case.q_heads, case.kv_heads, case.head_dim, case.num_prefixes, case.prefix_len

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    if case.layout == "qkv":
        assert case.lens_q == case.lens_k
        packed = rand(total_q, Hq + 2 * Hkv, D)
        q, k, v = packed[:, :Hq], packed[:, Hq:Hq + Hkv], packed[:, Hq + Hkv:]
    elif case.layout == "strided":  # heads-major memory, token stride != heads * D
        q = rand(Hq, total_q, D).transpose(0, 1)
        k, v = rand(Hkv, total_k, D).transpose(0, 1), rand(Hkv, total_k, D).transpose(0, 1)
    else:
        q, k, v = rand(total_q, Hq, D), rand(total_k, Hkv, D), rand(total_k, Hkv, D)
    bank = (T, Hkv, P, D) if T > 1 else (Hkv, P, D)
    prefix_k, prefix_v = rand(*bank), rand(*bank)
    S = len(case.lens_q)
    kwargs = dict(causal=case.causal)
    if T > 1:
        index = torch.randint(0, T, (S,), generator=gen)
        if case.index_layout == "strided":
            index = torch.stack([index, index + 100]).t().reshape(-1)[::2]
        elif case.index_layout == "expanded":
            index = index[:1].expand(S)
        kwargs["prefix_index"] = index.to(DEVICE)
    if case.lengths:
        kwargs["prefix_lengths"] = torch.randint(0, P + 1, (T,), generator=gen).to(DEVICE)
    return [q, k, v, prefix_k, prefix_v], kwargs


def run_varlen(case, inputs, kwargs, backend, deterministic=False):
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    cu_q, cu_k = case.cu_seqlens
    out, lse = prefix_attention_varlen(*leaves, cu_q, cu_k, max(case.lens_q, default=0),
                                       max(case.lens_k, default=0), **kwargs, return_lse=True, backend=backend,
                                       deterministic=deterministic)
    gen = torch.Generator().manual_seed(1)
    upstream = (torch.randn(out.shape, generator=gen).to(DEVICE, out.dtype),
                torch.randn(lse.shape, generator=gen).to(DEVICE))
    grads = torch.autograd.grad([out, lse], leaves, upstream, allow_unused=True)
    return out, lse, grads, upstream


def oracle(case, inputs, kwargs, upstream, compute_dtype):
    leaves = [(t.double() if compute_dtype == torch.float64 else t).detach().requires_grad_(True) for t in inputs]
    out, lse = attention_ref_varlen(*leaves, *case.cu_seqlens, **kwargs, compute_dtype=compute_dtype)
    seen = torch.isfinite(lse)
    loss = (out * upstream[0].to(out.dtype)).sum() + (lse[seen] * upstream[1][seen].to(lse.dtype)).sum()
    return out, lse, torch.autograd.grad(loss, leaves, allow_unused=True)


def check_case(case, dtype, backend, deterministic=False):
    inputs, kwargs = make_inputs(case, dtype)
    out, lse, grads, upstream = run_varlen(case, inputs, kwargs, backend, deterministic)
    total_q = sum(case.lens_q)
    assert out.shape == (total_q, case.q_heads, case.head_dim) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (case.q_heads, total_q) and lse.dtype == torch.float32
    want = oracle(case, inputs, kwargs, upstream, torch.float64)
    same_precision = oracle(case, inputs, kwargs, upstream, dtype)
    seen = torch.isfinite(want[1])
    assert torch.equal(torch.isfinite(lse), seen), "lse must be -inf exactly where a query sees no key"
    assert (out.transpose(0, 1)[~seen] == 0).all(), "a query that sees no key outputs 0"
    assert_close_to_reference("out", out, want[0], same_precision[0], dtype)
    assert_close_to_reference("lse", lse[seen], want[1][seen], same_precision[1][seen].float(), torch.float32)
    for name, grad, leaf, expected, pt in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, inputs, want[2],
                                              same_precision[2]):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype, name
        expected = torch.zeros_like(leaf, dtype=torch.float64) if expected is None else expected
        pt = torch.zeros_like(leaf) if pt is None else pt
        assert_close_to_reference(name, grad, expected, pt, dtype)


# The grid: sequence-length patterns x causal x bank, the other axes cycling.
LENGTHS = [
    ((5, 0, 17, 3), (5, 0, 17, 3)),     # self-attention, with an empty sequence and one past a block
    ((3, 1, 0, 7), (9, 4, 6, 7)),       # fewer queries than keys (chunked prefill, decode); a sequence of keys only
    ((7, 4, 20), (3, 0, 33)),           # more queries than keys: causal rows that see only their prefix
    ((40,), (40,)),                     # one sequence: the padded op's case
]
BANKS = [dict(num_prefixes=1, lengths=False), dict(num_prefixes=3, lengths=True)]
GQA = [(4, 4), (4, 2), (4, 1)]
HEAD_DIMS = [32, 16, 80]
PREFIX_LENS = [7, 0, 20, 1]
LAYOUTS = ["contiguous", "strided", "qkv"]
INDEX_LAYOUTS = ["contiguous", "strided", "expanded"]

GRID = []
for i, ((lens_q, lens_k), causal, bank) in enumerate(itertools.product(LENGTHS, [False, True], BANKS)):
    layout = LAYOUTS[i % 3] if lens_q == lens_k or LAYOUTS[i % 3] != "qkv" else "contiguous"
    q_heads, kv_heads = GQA[i % len(GQA)]
    case = VarlenCase(lens_q=lens_q, lens_k=lens_k, causal=causal, q_heads=q_heads, kv_heads=kv_heads,
                      head_dim=HEAD_DIMS[i % len(HEAD_DIMS)], prefix_len=PREFIX_LENS[(i // 2) % len(PREFIX_LENS)],
                      layout=layout, index_layout=INDEX_LAYOUTS[(i // 2) % 3] if bank["num_prefixes"] > 1 else
                      "contiguous", cu_dtype=torch.int64 if i % 5 == 4 else torch.int32, **bank)
    dtype = DTYPES[i % len(DTYPES)]
    GRID.append(pytest.param(case, dtype, id=f"{'x'.join(map(str, lens_q))}-{'causal' if causal else 'full'}-"
                             f"T{case.num_prefixes}-P{case.prefix_len}-h{q_heads}/{kv_heads}-d{case.head_dim}-"
                             f"{layout}-{str(dtype)[6:]}"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, dtype", GRID)
def test_varlen_matches_oracle(case, dtype, backend):
    check_case(case, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_deterministic_prefix_gradients(backend):
    """Deterministic mode: the prefix gradients are bitwise equal run to run, and still the oracle's."""
    case = VarlenCase(lens_q=(9, 3, 12, 0, 5), lens_k=(9, 3, 12, 0, 5), num_prefixes=2, prefix_len=20)
    check_case(case, torch.float32, backend, deterministic=True)
    inputs, kwargs = make_inputs(case, torch.float32)
    first = run_varlen(case, inputs, kwargs, backend, deterministic=True)[2]
    second = run_varlen(case, inputs, kwargs, backend, deterministic=True)[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_equals_padded_batch(backend):
    """The packed sequences give what the padded op gives on the same sequences right-padded with a key-padding
    mask (non-causal): outputs of the real queries, and every gradient."""
    case = VarlenCase(lens_q=(6, 11, 2), lens_k=(6, 11, 2), num_prefixes=3, prefix_len=5)
    inputs, kwargs = make_inputs(case, torch.float32)
    out, lse, grads, upstream = run_varlen(case, inputs, kwargs, backend)
    padded, key_padding, rows = _padded(case, inputs)
    leaves = [t.detach().requires_grad_(True) for t in padded] + [t.detach().requires_grad_(True) for t in inputs[3:]]
    p_out, p_lse = prefix_attention(*leaves, **kwargs, key_padding_mask=key_padding, return_lse=True,
                                    backend=backend)
    p_upstream = (torch.zeros_like(p_out), torch.zeros_like(p_lse))
    p_upstream[0].transpose(1, 2)[rows] = upstream[0]
    p_upstream[1].transpose(1, 2)[rows] = upstream[1].t()
    p_grads = torch.autograd.grad([p_out, p_lse], leaves, p_upstream)
    torch.testing.assert_close(out, p_out.transpose(1, 2)[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, p_lse.transpose(1, 2)[rows].t(), rtol=1e-5, atol=1e-5)
    for grad, p_grad in zip(grads[:3], p_grads[:3]):
        torch.testing.assert_close(grad, p_grad.transpose(1, 2)[rows], rtol=1e-5, atol=1e-5)
    for grad, p_grad in zip(grads[3:], p_grads[3:]):
        torch.testing.assert_close(grad, p_grad, rtol=1e-5, atol=1e-5)


def _padded(case, inputs):
    """q, k, v right-padded to [S, H, max_len, D], the key-padding mask, and the (sample, position) of each packed
    token (for indexing [S, N, ...] views)."""
    S, longest = len(case.lens_q), max(case.lens_q)
    sample = torch.cat([torch.full((n,), s) for s, n in enumerate(case.lens_q)])
    position = torch.cat([torch.arange(n) for n in case.lens_q])
    rows = (sample.to(DEVICE), position.to(DEVICE))
    padded = []
    for t in inputs[:3]:
        full = t.new_zeros(S, longest, *t.shape[1:])
        full[rows] = t
        padded.append(full.transpose(1, 2))
    key_padding = torch.arange(longest, device=DEVICE)[None] < torch.tensor(case.lens_k, device=DEVICE)[:, None]
    return padded, key_padding, rows


@pytest.mark.skipif(TRITON_REASON is not None, reason=str(TRITON_REASON))
def test_triton_varlen_dropout_equals_padded_dropout():
    """Dropout numbers its random stream as the padded batch of max_seqlen would: with the same seed, the packed
    call drops exactly what the padded call with key padding drops, in forward and backward."""
    case = VarlenCase(lens_q=(6, 11, 2), lens_k=(6, 11, 2), num_prefixes=3, prefix_len=5)
    inputs, kwargs = make_inputs(case, torch.float32)
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    torch.manual_seed(11)
    out = prefix_attention_varlen(*leaves, *case.cu_seqlens, 11, 11, **kwargs, dropout_p=0.3, backend="triton")
    grads = torch.autograd.grad(out.square().sum(), leaves)
    padded, key_padding, rows = _padded(case, inputs)
    p_leaves = [t.detach().requires_grad_(True) for t in padded] + leaves[3:]
    torch.manual_seed(11)
    p_out = prefix_attention(*p_leaves, **kwargs, key_padding_mask=key_padding, dropout_p=0.3, backend="triton")
    p_grads = torch.autograd.grad(p_out.transpose(1, 2)[rows].square().sum(), p_leaves)
    torch.testing.assert_close(out, p_out.transpose(1, 2)[rows], rtol=1e-5, atol=1e-5)
    for grad, p_grad in zip(grads[:3], p_grads[:3]):
        torch.testing.assert_close(grad, p_grad.transpose(1, 2)[rows], rtol=1e-5, atol=1e-5)
    for grad, p_grad in zip(grads[3:], p_grads[3:]):
        torch.testing.assert_close(grad, p_grad, rtol=1e-5, atol=1e-5)
    torch.manual_seed(11)
    assert not torch.allclose(out, prefix_attention_varlen(*leaves, *case.cu_seqlens, 11, 11, **kwargs,
                                                           backend="triton"))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if getattr(b, "values", [b])[0] != "triton"])
def test_sequence_loop_dropout_gradients_match_forward(backend):
    """With dropout, the backward replays the forward's masks (each sequence's from the call's seed): gradcheck
    in float64 with the seed fixed."""
    case = VarlenCase(lens_q=(3, 0, 4), lens_k=(3, 2, 4), q_heads=2, kv_heads=1, head_dim=4, prefix_len=2)
    inputs, kwargs = make_inputs(case, torch.float64)
    cu_q, cu_k = case.cu_seqlens

    def fn(*tensors):
        torch.manual_seed(5)
        return prefix_attention_varlen(*tensors, cu_q, cu_k, 4, 4, **kwargs, dropout_p=0.4, backend=backend)

    leaves = [t.detach().requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)


def test_auto_backend_choice():
    case = VarlenCase()
    inputs, kwargs = make_inputs(case, torch.float32)
    packed = (len(case.lens_q), max(case.lens_q), max(case.lens_k))
    chosen = backends.choose_varlen("auto", inputs[0], inputs[1], inputs[3], packed)
    assert chosen == ("triton" if DEVICE == "cuda" else "native")
    reasons = backends.varlen_unsupported_reasons("cuda", inputs[0], inputs[1], inputs[3], packed)
    assert reasons and ("variable-length" in reasons[-1] or DEVICE == "cpu")


def test_cuda_backend_refuses_with_reason():
    case = VarlenCase()
    inputs, kwargs = make_inputs(case, torch.float32)
    with pytest.raises(ValueError, match="backend='cuda' cannot serve this variable-length call"):
        prefix_attention_varlen(*inputs, *case.cu_seqlens, 17, 17, **kwargs, backend="cuda")


# ----------------------------------------------------------------------------------------------------------------
# Argument checks: each names the argument
# ----------------------------------------------------------------------------------------------------------------

def _error_call(**changes):
    case = VarlenCase(num_prefixes=3)
    inputs, kwargs = make_inputs(case, torch.float32)
    cu_q, cu_k = case.cu_seqlens
    args = dict(q=inputs[0], k=inputs[1], v=inputs[2], prefix_k=inputs[3], prefix_v=inputs[4], cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k, max_seqlen_q=17, max_seqlen_k=17, **kwargs, backend="reference")
    for key, change in changes.items():
        args[key] = change(args[key]) if callable(change) else change
    return prefix_attention_varlen(**args)


@pytest.mark.parametrize("changes, error, match", [
    (dict(q=lambda q: q[None]), ValueError, "q must be 3-D"),
    (dict(k=lambda k: k[:-1]), ValueError, r"v must be \[total, H, D\] .* with k's sizes but for its head dim"),
    (dict(cu_seqlens_q=lambda c: c.float()), TypeError, "cu_seqlens_q must be an int32"),
    (dict(cu_seqlens_k=lambda c: c[None]), ValueError, "cu_seqlens_k must be 1-D"),
    (dict(cu_seqlens_k=lambda c: c[:-1]), ValueError, "the same number of sequences"),
    (dict(cu_seqlens_q=lambda c: c + 1), ValueError, "cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_q=lambda c: torch.tensor([0, 5, 3, 22, 25], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must be non-decreasing"),
    (dict(cu_seqlens_k=lambda c: torch.tensor([0, 5, 5, 22, 24], dtype=torch.int32)), ValueError,
     r"cu_seqlens_k must end at the packed token count of k \(25\)"),
    (dict(max_seqlen_q=16), ValueError, "max_seqlen_q .16. must be at least the longest"),
    (dict(max_seqlen_k=-1), TypeError, "max_seqlen_k must be a non-negative int"),
    (dict(max_seqlen_k=17.0), TypeError, "max_seqlen_k must be a non-negative int"),
    (dict(max_seqlen_q=torch.tensor([17])), TypeError, "max_seqlen_q must be a non-negative int"),
    (dict(prefix_index=lambda i: i[:2]), ValueError, r"prefix_index must have shape \[4\]"),
    (dict(prefix_index=None), ValueError, "prefix_index is required"),
    (dict(prefix_index=lambda i: i + 3), IndexError, r"prefix_index entries must be in \[0, 3\)"),
    (dict(prefix_lengths=lambda n: n + 8), ValueError, r"prefix_lengths entries must be in \[0, P\]"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be a number in"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(causal=1), TypeError, "causal must be a bool"),
])
def test_argument_errors(changes, error, match):
    with pytest.raises(error, match=match):
        _error_call(**changes)


@pytest.mark.parametrize("longest", [torch.tensor(17), 17, __import__("numpy").int64(17)])
def test_max_seqlen_as_int_like(longest):
    case = VarlenCase(num_prefixes=3)
    inputs, kwargs = make_inputs(case, torch.float32)
    want = prefix_attention_varlen(*inputs, *case.cu_seqlens, 17, 17, **kwargs, backend="reference")
    got = prefix_attention_varlen(*inputs, *case.cu_seqlens, longest, longest, **kwargs, backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_empty_batch():
    case = VarlenCase(lens_q=(), lens_k=())
    inputs, kwargs = make_inputs(case, torch.float32)
    out, lse = prefix_attention_varlen(*inputs, *case.cu_seqlens, 0, 0, **kwargs, return_lse=True)
    assert out.shape == (0, 4, 32) and lse.shape == (4, 0)


# ----------------------------------------------------------------------------------------------------------------
# torch.compile and opcheck
# ----------------------------------------------------------------------------------------------------------------

def _compile_inputs():
    case = VarlenCase(lens_q=(3, 0, 5), lens_k=(3, 2, 5), head_dim=8, prefix_len=3)
    inputs, kwargs = make_inputs(case, torch.float64)
    return case, [t.requires_grad_(True) for t in inputs], kwargs


def test_compiled_forward_and_backward_equal_eager():
    import torch._dynamo

    case, inputs, kwargs = _compile_inputs()
    cu_q, cu_k = case.cu_seqlens

    def call(q, k, v, prefix_k, prefix_v):
        out, lse = prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_q, cu_k, 5, 5, **kwargs,
                                           return_lse=True, backend="reference")
        return out * 2.0, lse + 1.0

    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(call)(*inputs)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
        got = compiled(*inputs)
        want = call(*inputs)
        grads = torch.autograd.grad([got[0].sum(), got[1].sum()], inputs)
        want_grads = torch.autograd.grad([want[0].sum(), want[1].sum()], inputs)
        for a, b in zip((*got, *grads), (*want, *want_grads)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_opcheck():
    case, inputs, kwargs = _compile_inputs()
    q, k, v, prefix_k, prefix_v = inputs
    args = (q, k, v, prefix_k, prefix_v, *case.cu_seqlens, kwargs["prefix_index"], kwargs["prefix_lengths"], None,
            5, 5, True, 0.5, 0.0, "reference", False)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention_varlen.default, args, test_utils=utils)
    out, lse = torch.ops.ptv2_kernels.prefix_attention_varlen(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                                for a in args])
    backward_args = (torch.randn_like(out), torch.randn_like(lse), *[t.detach() for t in args[:9]], None, out, lse,
                     5, 5, True, 0.5, 0.0, "reference", False)
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention_varlen_backward.default, backward_args,
                          test_utils=utils)


def test_exported_at_top_level():
    assert ptv2_kernels.prefix_attention_varlen is prefix_attention_varlen
