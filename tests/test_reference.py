"""The oracle itself, and the op served by it.

(a) ``attention_ref_backward`` (written by hand) equals autograd through ``attention_ref``;
(b) ``attention_ref`` equals a deliberately naive per-(sample, head, query) loop written from docs/design.md §4;
(c) ``prefix_attention(..., backend="reference")``: output layout and dtypes, gradients to all five inputs, bank
    gradients, the lse gradient, and dropout (reproducibility, keep rate, gradient).

Float64 comparisons use a tolerance of 1e-12: every value here is a short sum (at most a few dozen terms) of
products of O(1) numbers, so float64 rounding stays around 1e-15; 1e-12 leaves three orders of margin and still
catches any real mistake (which shows at O(1e-2) or more).
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from ptv2_kernels import prefix_attention
from ptv2_kernels.reference import attention_ref, attention_ref_backward

F64 = dict(rtol=1e-12, atol=1e-12)


@dataclass
class Case:
    """The shapes and options of one call; ``make`` draws fresh random tensors for it."""

    B: int = 2
    Hq: int = 2
    Hkv: int = 2
    Nq: int = 4
    Nk: int = 5
    D: int = 8
    P: int = 3
    T: Optional[int] = None  # None: a 3-D prefix (one shared prefix)
    index: Optional[list] = None
    lengths: Optional[list] = None
    mask: Optional[str] = None  # None | "pad" [B, Nk] | "dense1" [B, 1, Nq, Nk] | "denseH" [B, Hq, Nq, Nk]
    pad: Optional[list] = None  # per sample: number of visible leading keys for "pad" (default random)
    causal: bool = False
    scale: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def make(self, dtype=torch.float64, prefix_dtype=None, seed=0, requires_grad=False):
        gen = torch.Generator().manual_seed(seed)
        prefix_dtype = dtype if prefix_dtype is None else prefix_dtype

        def randn(*shape, dt=dtype):
            return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt).requires_grad_(requires_grad)

        bank = (self.Hkv, self.P, self.D) if self.T is None else (self.T, self.Hkv, self.P, self.D)
        tensors = dict(q=randn(self.B, self.Hq, self.Nq, self.D), k=randn(self.B, self.Hkv, self.Nk, self.D),
                       v=randn(self.B, self.Hkv, self.Nk, self.D), prefix_k=randn(*bank, dt=prefix_dtype),
                       prefix_v=randn(*bank, dt=prefix_dtype))
        options = dict(causal=self.causal, scale=self.scale,
                       prefix_index=None if self.index is None else torch.tensor(self.index),
                       prefix_lengths=None if self.lengths is None else torch.tensor(self.lengths))
        if self.mask == "pad":
            visible = self.pad or torch.randint(0, self.Nk + 1, (self.B,), generator=gen).tolist()
            options["key_padding_mask"] = torch.arange(self.Nk)[None, :] < torch.tensor(visible)[:, None]
            options["attn_mask"] = None
        elif self.mask is not None:
            heads = 1 if self.mask == "dense1" else self.Hq
            options["attn_mask"] = torch.rand(self.B, heads, self.Nq, self.Nk, generator=gen) < 0.6
        else:
            options["attn_mask"] = None
        return tensors, options


CASES = {
    "plain": Case(),
    "bank4d_of_one": Case(T=1),
    "gqa_causal": Case(Hq=4, Hkv=2, Nq=3, Nk=6, causal=True),
    "causal_square": Case(Nq=5, Nk=5, causal=True, scale=0.3),
    "causal_more_queries_no_prefix": Case(Nq=6, Nk=3, P=0, causal=True),
    "bank": Case(B=4, T=3, index=[2, 0, 2, 1], lengths=[3, 0, 1], Hq=4, Hkv=1),
    "bank_empty_rows": Case(B=3, T=2, index=[1, 0, 1], lengths=[2, 0], Nq=5, Nk=2, causal=True),
    "pad": Case(B=3, mask="pad", pad=[5, 0, 2]),
    "pad_empty_rows": Case(B=3, T=2, index=[0, 1, 1], lengths=[3, 0], mask="pad", pad=[4, 0, 5]),
    "dense1": Case(Hq=4, Hkv=2, mask="dense1"),
    "denseH_causal_bank": Case(B=3, Hq=4, Hkv=2, T=2, index=[1, 1, 0], lengths=[1, 3], mask="denseH",
                               causal=True, Nq=4, Nk=6),
    "nk0": Case(Nk=0),
    "nk0_p0": Case(Nk=0, P=0),
    "p0_pad": Case(P=0, mask="pad", pad=[5, 3]),
}


# ----------------------------------------------------------------------------------------------------------------
# (a) the hand-written backward against autograd
# ----------------------------------------------------------------------------------------------------------------

def _autograd_grads(tensors, options, grad_out, grad_lse, **extra):
    leaves = [t.detach().requires_grad_() for t in tensors.values()]
    out, lse = attention_ref(*leaves, **options, **extra)
    outputs, grads = [out], [grad_out]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse)
    return torch.autograd.grad(outputs, leaves, grads, allow_unused=True)


@pytest.mark.parametrize("with_grad_lse", [False, True], ids=["no_grad_lse", "grad_lse"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_matches_autograd(name, with_grad_lse):
    case = CASES[name]
    tensors, options = case.make()
    out, lse = attention_ref(*tensors.values(), **options)
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse) if with_grad_lse else None
    expected = _autograd_grads(tensors, options, grad_out, grad_lse)
    got = attention_ref_backward(grad_out, grad_lse, *tensors.values(), **options)
    for name_, g, e, x in zip(tensors, got, expected, tensors.values()):
        e = torch.zeros_like(x) if e is None else e
        assert g.shape == x.shape and g.dtype == x.dtype, name_
        assert torch.isfinite(g).all(), name_
        torch.testing.assert_close(g, e, **F64, msg=lambda m: f"{name_}: {m}")


@pytest.mark.parametrize("shape", ["per_head", "broadcast"])
@pytest.mark.parametrize("name", ["gqa_causal", "bank_empty_rows", "pad_empty_rows"])
def test_bias_backward_matches_autograd(name, shape):
    """An additive bias on the sequence scores: the hand-written gradients, the bias's own summed over its
    broadcast dims, equal autograd's, with -inf entries among them. (Key 0 keeps a finite bias: a row whose every
    visible key had a -inf bias would see nothing, and autograd through logsumexp gives NaN there where the
    op's gradient is 0.)"""
    case = CASES[name]
    tensors, options = case.make()
    gen = torch.Generator().manual_seed(9)
    bias_shape = (case.B, case.Hq, case.Nq, case.Nk) if shape == "per_head" else (1, 1, case.Nq, case.Nk)
    bias = torch.randn(bias_shape, generator=gen, dtype=torch.float64)
    hidden = torch.rand(bias_shape, generator=gen) < 0.3
    hidden[..., 0] = False
    bias = bias.masked_fill(hidden, float("-inf"))
    out, lse = attention_ref(*tensors.values(), **options, attn_bias=bias)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    leaves = [t.detach().requires_grad_() for t in (*tensors.values(), bias)]
    ref_out, ref_lse = attention_ref(*leaves[:5], **options, attn_bias=leaves[5])
    expected = torch.autograd.grad([ref_out, ref_lse], leaves, [grad_out, grad_lse], allow_unused=True)
    got = attention_ref_backward(grad_out, grad_lse, *tensors.values(), **options, attn_bias=bias)
    assert len(got) == 6 and got[5].shape == bias.shape
    for g, e, x in zip(got, expected, leaves):
        e = torch.zeros_like(x) if e is None else e
        torch.testing.assert_close(g, e, **F64)


@pytest.mark.parametrize("name", ["plain", "gqa_causal", "bank", "pad_empty_rows", "denseH_causal_bank"])
def test_backward_with_dropout_matches_autograd(name):
    case = CASES[name]
    tensors, options = case.make()
    p = 0.3
    # A given mask...
    total = case.P + case.Nk
    keep = torch.rand(case.B, case.Hq, case.Nq, total, generator=torch.Generator().manual_seed(5)) >= p
    out, lse = attention_ref(*tensors.values(), **options, dropout_p=p, dropout_keep=keep)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    expected = _autograd_grads(tensors, options, grad_out, grad_lse, dropout_p=p, dropout_keep=keep)
    got = attention_ref_backward(grad_out, grad_lse, *tensors.values(), **options, dropout_p=p, dropout_keep=keep)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **F64)
    # ...and one drawn from a generator left in the same state in both passes.
    expected = _autograd_grads(tensors, options, grad_out, grad_lse, dropout_p=p,
                               generator=torch.Generator().manual_seed(9))
    got = attention_ref_backward(grad_out, grad_lse, *tensors.values(), **options, dropout_p=p,
                                 generator=torch.Generator().manual_seed(9))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **F64)
    # The generator's mask is the one the forward used (a different state gives different gradients).
    other = attention_ref_backward(grad_out, grad_lse, *tensors.values(), **options, dropout_p=p,
                                   generator=torch.Generator().manual_seed(10))
    assert not torch.allclose(other[0], expected[0])


# ----------------------------------------------------------------------------------------------------------------
# (b) against a naive loop written from the contract
# ----------------------------------------------------------------------------------------------------------------

def naive_attention(q, k, v, prefix_k, prefix_v, prefix_index=None, prefix_lengths=None, key_padding_mask=None,
                    attn_mask=None, causal=False, scale=None):
    """docs/design.md §4 one query at a time, in Python floats accumulated in float64."""
    q, k, v = q.double(), k.double(), v.double()
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k[None], prefix_v[None]
    prefix_k, prefix_v = prefix_k.double(), prefix_v.double()
    batch, q_heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    prefix_len = prefix_k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    out = torch.zeros(batch, q_heads, q_len, dim, dtype=torch.float64)
    lse = torch.full((batch, q_heads, q_len), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        t = 0 if prefix_index is None else int(prefix_index[b])
        length = prefix_len if prefix_lengths is None else int(prefix_lengths[t])
        for h in range(q_heads):
            g = h // (q_heads // kv_heads)
            for i in range(q_len):
                keys = [(prefix_k[t, g, j], prefix_v[t, g, j]) for j in range(length)]
                for j in range(k_len):
                    if key_padding_mask is not None and not bool(key_padding_mask[b, j]):
                        continue
                    if attn_mask is not None:
                        at = [x if n > 1 else 0 for x, n in zip((b, h, i, j), attn_mask.shape)]
                        if not bool(attn_mask[tuple(at)]):
                            continue
                    if causal and j > i + (k_len - q_len):
                        continue
                    keys.append((k[b, g, j], v[b, g, j]))
                if not keys:
                    continue  # sees nothing: out stays 0, lse stays -inf
                scores = [scale * sum(float(a) * float(c) for a, c in zip(q[b, h, i], key)) for key, _ in keys]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                out[b, h, i] = sum((w / total) * value for w, (_, value) in zip(weights, keys))
                lse[b, h, i] = top + math.log(total)
    return out, lse


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_naive_loop(name):
    tensors, options = CASES[name].make(seed=1)
    out, lse = attention_ref(*tensors.values(), **options)
    want_out, want_lse = naive_attention(*tensors.values(), **options)
    assert out.dtype == lse.dtype == torch.float64
    torch.testing.assert_close(out, want_out, **F64)
    torch.testing.assert_close(lse, want_lse, **F64)  # -inf entries must match exactly


@pytest.mark.parametrize("name", ["causal_more_queries_no_prefix", "bank_empty_rows", "pad_empty_rows", "nk0_p0"])
def test_rows_that_see_nothing_are_zero_with_lse_minus_inf(name):
    tensors, options = CASES[name].make(seed=2)
    out, lse = attention_ref(*tensors.values(), **options)
    _, want_lse = naive_attention(*tensors.values(), **options)
    empty = want_lse == float("-inf")
    assert empty.any()
    assert (lse[empty] == float("-inf")).all()
    assert (out[empty] == 0).all()  # exactly zero, not NaN
    assert torch.isfinite(out).all() and torch.isfinite(lse[~empty]).all()


def test_masks_never_hide_the_prefix():
    """With every sequence key hidden (by the mask, and by causality), a query attends to its prefix alone."""
    case = Case(B=2, T=2, index=[1, 0], lengths=[3, 2], Nq=4, Nk=2, causal=True, mask="pad", pad=[0, 0])
    tensors, options = case.make(seed=3)
    out, lse = attention_ref(*tensors.values(), **options)
    for b, t in enumerate(case.index):
        length = case.lengths[t]
        keys = tensors["prefix_k"][t, :, :length].repeat_interleave(case.Hq // case.Hkv, 0)
        values = tensors["prefix_v"][t, :, :length].repeat_interleave(case.Hq // case.Hkv, 0)
        scores = tensors["q"][b] @ keys.transpose(-1, -2) / math.sqrt(case.D)
        torch.testing.assert_close(out[b], scores.softmax(-1) @ values, **F64)
        torch.testing.assert_close(lse[b], scores.logsumexp(-1), **F64)


def test_causal_is_aligned_bottom_right():
    """Without a prefix, query i sees exactly the sequence keys j <= i + Nk - Nq (the last query sees them all)."""
    q_len, k_len = 3, 6
    case = Case(B=1, Hq=1, Hkv=1, Nq=q_len, Nk=k_len, D=k_len, P=0, causal=True)
    tensors, options = case.make()
    tensors["q"] = torch.zeros_like(tensors["q"])  # uniform attention over the visible keys
    tensors["v"] = torch.eye(k_len, dtype=torch.float64)[None, None]  # out[i, j] = weight of key j
    out, _ = attention_ref(*tensors.values(), **options)
    for i in range(q_len):
        visible = i + k_len - q_len + 1
        want = torch.zeros(k_len, dtype=torch.float64)
        want[:visible] = 1.0 / visible
        torch.testing.assert_close(out[0, 0, i], want, **F64)


def test_three_d_prefix_is_a_bank_of_one():
    tensors, options = CASES["pad"].make(seed=4)
    out3, lse3 = attention_ref(*tensors.values(), **options)
    bank = dict(tensors, prefix_k=tensors["prefix_k"][None], prefix_v=tensors["prefix_v"][None])
    for index in (None, torch.zeros(CASES["pad"].B, dtype=torch.long)):
        out4, lse4 = attention_ref(*bank.values(), **dict(options, prefix_index=index))
        torch.testing.assert_close(out4, out3, rtol=0, atol=0)
        torch.testing.assert_close(lse4, lse3, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["plain", "bank", "denseH_causal_bank"])
def test_float32_prefix_with_float16_queries(name):
    """The prefix is converted on load; the computation runs in float32 (the default for half inputs)."""
    tensors, options = CASES[name].make(dtype=torch.float16, prefix_dtype=torch.float32, seed=5)
    out, lse = attention_ref(*tensors.values(), **options)
    assert out.dtype == lse.dtype == torch.float32
    want_out, want_lse = naive_attention(*tensors.values(), **options)
    # Exact float16 inputs, float32 arithmetic on O(1) values over <= 8 keys and D = 8: errors ~1e-6.
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# (c) the op with backend="reference"
# ----------------------------------------------------------------------------------------------------------------

def _op(tensors, options, **extra):
    return prefix_attention(*tensors.values(), **options, backend="reference", **extra)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["plain", "bank", "denseH_causal_bank", "pad_empty_rows"])
def test_op_output_layout_and_dtypes(name, dtype):
    tensors, options = CASES[name].make(dtype=dtype, seed=6)
    out, lse = _op(tensors, options, return_lse=True)
    case = CASES[name]
    assert out.shape == (case.B, case.Hq, case.Nq, case.D) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()
    assert lse.shape == (case.B, case.Hq, case.Nq) and lse.dtype == torch.float32
    want_out, want_lse = attention_ref(*tensors.values(), **options)
    torch.testing.assert_close(out, want_out.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse.float(), rtol=0, atol=0)


def test_op_accepts_any_strides():
    case = CASES["denseH_causal_bank"]
    tensors, options = case.make(seed=7)
    strided = dict(
        q=tensors["q"].transpose(1, 2).contiguous().transpose(1, 2),
        k=torch.cat([tensors["k"], tensors["k"]], dim=-1)[..., :case.D],
        v=tensors["v"].permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3),
        prefix_k=tensors["prefix_k"].transpose(0, 2).contiguous().transpose(0, 2),
        prefix_v=tensors["prefix_v"].transpose(1, 2).contiguous().transpose(1, 2),
    )
    assert all(torch.equal(strided[n], tensors[n]) for n in tensors)
    assert not any(t.is_contiguous() for t in strided.values())
    torch.testing.assert_close(_op(strided, options), _op(tensors, options), rtol=0, atol=0)


@pytest.mark.parametrize("prefix_rank", [3, 4])
def test_op_gradients_reach_all_inputs_in_their_dtypes(prefix_rank):
    case = Case(Hq=4, Hkv=2, T=None if prefix_rank == 3 else 2, index=None if prefix_rank == 3 else [1, 0],
                mask="pad", pad=[5, 2], causal=True)
    tensors, options = case.make(dtype=torch.float16, prefix_dtype=torch.float32, seed=8, requires_grad=True)
    out = _op(tensors, options)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, list(tensors.values()), grad_out)
    expected = _autograd_grads(tensors, options, grad_out, None)
    for name, g, e, x in zip(tensors, got, expected, tensors.values()):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert g.abs().sum() > 0, name
        # Both compute in float32 and round once to the input's dtype: allow one float16 rounding (2**-10
        # relative) for q/k/v, float32 rounding for the float32 prefix.
        tol = dict(rtol=2e-3, atol=2e-3) if x.dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, e, **tol, msg=lambda m: f"{name}: {m}")
    assert got[3].dim() == prefix_rank and got[4].dim() == prefix_rank


def test_op_bank_gradient_is_the_sum_over_the_samples_that_used_it():
    index = [2, 0, 2, 2, 0]
    case = Case(B=5, Hq=4, Hkv=2, T=4, index=index, lengths=[3, 1, 2, 3], mask="pad", causal=True, Nq=3, Nk=5)
    tensors, options = case.make(seed=9, requires_grad=True)
    out = _op(tensors, options)
    grad_out = torch.randn_like(out)
    _, _, _, grad_pk, grad_pv = torch.autograd.grad(out, list(tensors.values()), grad_out)
    want_pk, want_pv = torch.zeros_like(grad_pk), torch.zeros_like(grad_pv)
    for b, t in enumerate(index):
        one = dict(q=tensors["q"][b:b + 1], k=tensors["k"][b:b + 1], v=tensors["v"][b:b + 1],
                   prefix_k=tensors["prefix_k"][t], prefix_v=tensors["prefix_v"][t])
        one_options = dict(options, prefix_index=None, prefix_lengths=None,
                           **{name: options[name][b:b + 1] for name in ("key_padding_mask", "attn_mask")
                              if options.get(name) is not None})
        length = case.lengths[t]
        one["prefix_k"], one["prefix_v"] = one["prefix_k"][:, :length], one["prefix_v"][:, :length]
        out_b = _op(one, one_options)
        torch.testing.assert_close(out_b, out[b:b + 1], **F64)
        g_pk, g_pv = torch.autograd.grad(out_b, [one["prefix_k"], one["prefix_v"]], grad_out[b:b + 1])
        want_pk[t, :, :length] += g_pk
        want_pv[t, :, :length] += g_pv
    torch.testing.assert_close(grad_pk, want_pk, **F64)
    torch.testing.assert_close(grad_pv, want_pv, **F64)
    for t in (1, 3):  # entries nobody used
        assert (grad_pk[t] == 0).all() and (grad_pv[t] == 0).all()
    assert (grad_pk[2] != 0).any() and (grad_pk[0] != 0).any()


@pytest.mark.parametrize("name", ["plain", "gqa_causal", "bank_empty_rows", "denseH_causal_bank"])
def test_op_lse_gradient(name):
    tensors, options = CASES[name].make(seed=10, requires_grad=True)
    out, lse = _op(tensors, options, return_lse=True)
    assert lse.requires_grad
    # lse is float32: draw its gradient in float32 so that autograd hands both sides the same values.
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad([out, lse], list(tensors.values()), [grad_out, grad_lse], retain_graph=True)
    expected = _autograd_grads(tensors, options, grad_out, grad_lse.double())
    for n, g, e in zip(tensors, got, expected):
        torch.testing.assert_close(g, e, **F64, msg=lambda m: f"{n}: {m}")
    # The lse alone (out unused) is differentiable too.
    got = torch.autograd.grad(lse, list(tensors.values()), grad_lse)
    expected = _autograd_grads(tensors, options, torch.zeros_like(out), grad_lse.double())
    for n, g, e in zip(tensors, got, expected):
        torch.testing.assert_close(g, e, **F64, msg=lambda m: f"{n}: {m}")


def _dropout_run(tensors, options, seed, p):
    torch.manual_seed(seed)
    return _op(tensors, options, dropout_p=p)


def test_op_dropout_follows_torch_manual_seed():
    tensors, options = CASES["denseH_causal_bank"].make(seed=11)
    first = _dropout_run(tensors, options, 0, 0.4)
    assert torch.equal(_dropout_run(tensors, options, 0, 0.4), first)
    assert not torch.equal(_dropout_run(tensors, options, 1, 0.4), first)
    assert not torch.allclose(first, _op(tensors, options))
    # Dropout draws from torch's RNG: it advances the global state (two calls in a row differ).
    torch.manual_seed(0)
    a, b = _op(tensors, options, dropout_p=0.4), _op(tensors, options, dropout_p=0.4)
    assert not torch.equal(a, b)


def test_op_dropout_keep_rate():
    """With one-hot values, out[..., c] is the dropped probability of key c: 0 or probs[c] / (1 - p)."""
    batch, heads, q_len, prefix_len, k_len = 4, 4, 64, 8, 24
    dim, p = prefix_len + k_len, 0.3
    gen = torch.Generator().manual_seed(12)
    eye = torch.eye(dim, dtype=torch.float64)
    tensors = dict(q=torch.randn(batch, heads, q_len, dim, generator=gen, dtype=torch.float64) * 0.3,
                   k=torch.randn(batch, heads, k_len, dim, generator=gen, dtype=torch.float64),
                   v=eye[prefix_len:].expand(batch, heads, k_len, dim),
                   prefix_k=torch.randn(heads, prefix_len, dim, generator=gen, dtype=torch.float64),
                   prefix_v=eye[:prefix_len].expand(heads, prefix_len, dim))
    options = dict(prefix_index=None, prefix_lengths=None, attn_mask=None, causal=False, scale=None)
    probs = _op(tensors, options)
    assert (probs > 0).all()
    ratio = _dropout_run(tensors, options, 13, p) / probs
    kept = ratio > 0.5
    torch.testing.assert_close(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - p)), **F64)
    assert (ratio[~kept] == 0).all()
    for part in (kept[..., :prefix_len], kept[..., prefix_len:]):  # the prefix and the sequence alike
        n = part.numel()
        rate = part.double().mean().item()
        bound = 5 * math.sqrt(p * (1 - p) / n)  # five binomial standard deviations
        assert abs(rate - (1 - p)) < bound, (rate, 1 - p, n)
    # Masks differ between heads, queries and samples.
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0], kept[1])


def test_op_dropout_gradient_by_finite_differences():
    case = Case(B=2, Hq=2, Hkv=1, Nq=3, Nk=4, D=4, P=2, T=2, index=[1, 1], lengths=[2, 1], mask="denseH",
                causal=True)
    tensors, options = case.make(seed=14, requires_grad=True)

    def run(*inputs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(15)
            return prefix_attention(*inputs, **options, dropout_p=0.35, backend="reference")

    with torch.no_grad():
        assert not torch.allclose(run(*tensors.values()), _op(tensors, options))
    assert torch.autograd.gradcheck(run, tuple(tensors.values()), eps=1e-6, atol=1e-8, rtol=1e-6)
