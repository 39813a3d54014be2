"""Values of another head dim than the keys' (multi-head latent attention: DeepSeek-V2/V3's Dv != Dk).

q, k and prefix_k have head dim Dk, v and prefix_v Dv, the output Dv, and the default scale is 1 / sqrt(Dk). The
Triton and reference backends serve it and are checked against the float64 oracle with the bounds of
tests/kernel_cases.py (forward, lse and all five gradients, plus the bias gradient), on Dv < Dk, Dv > Dk and
dims that are not powers of two, across masks, causal with Nq != Nk, biases, GQA, banks, P = 0, strided inputs,
the decode forms (GQA packing, split keys) and both prefix-gradient reductions. The native and cuda backends
state why they cannot serve it; the argument checks name the argument and the expected shape; the packed
(variable-length) op serves it too; the custom ops pass opcheck and trace under torch.compile with it.
"""

from __future__ import annotations

import math

import pytest
import torch

import ptv2_kernels
from ptv2_kernels import backends, prefix_attention, prefix_attention_varlen
from ptv2_kernels.call import Call
from ptv2_kernels.reference import attention_ref, attention_ref_backward, attention_ref_varlen

from .kernel_cases import (  # noqa: F401 - poison_uninitialized_memory is an autouse fixture
    DEVICE, Case, assert_close_to_reference, check_against_reference, force_kv_splits, make_inputs,
    poison_uninitialized_memory,
)

BACKENDS = [name for name in ("triton", "reference") if backends.unavailable_reason(name) is None]

# (Dk, Dv) pairs: values narrower, wider, and neither a power of two (both padded, to different widths).
CASES = [
    pytest.param(Case(head_dim=32, value_dim=16, q_len=9, k_len=14, causal=True, mask="padding", num_prefixes=3,
                      lengths=True, prefix_len=7), torch.float16, False, id="32-16-causal-padding-bank"),
    pytest.param(Case(head_dim=16, value_dim=32, q_len=14, k_len=9, causal=True, mask="dense_heads", q_heads=4,
                      kv_heads=1, prefix_layout="shared3d", prefix_len=5, layout="bnhd"), torch.float32, True,
                 id="16-32-causal-longer-queries-dense-mqa-bnhd"),
    pytest.param(Case(head_dim=24, value_dim=40, q_len=8, k_len=11, bias="heads", q_heads=4, kv_heads=4,
                      num_prefixes=2, lengths=True, index_layout="strided", prefix_len=0), torch.float16, False,
                 id="24-40-bias-P0"),
    pytest.param(Case(head_dim=40, value_dim=24, q_len=10, k_len=12, causal=True, mask="sdpa_float", bias="shared",
                      prefix_len=3), torch.float32, True, id="40-24-float-mask-shared-bias"),
    pytest.param(Case(head_dim=24, value_dim=40, q_len=11, k_len=11, causal=True, layout="packed",
                      prefix_layout="strided", num_prefixes=2, lengths=True, prefix_len=6), torch.float32, False,
                 id="24-40-strided-qkv-and-bank"),
    pytest.param(Case(head_dim=32, value_dim=16, q_len=1, k_len=33, q_heads=4, kv_heads=1, num_prefixes=2,
                      prefix_len=7, mask="padding"), torch.float16, True, id="32-16-decode-packed-gqa"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, dtype, deterministic", CASES)
def test_matches_oracle(case, dtype, deterministic, backend):
    check_against_reference(case, dtype, deterministic=deterministic, backend=backend)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton backend unavailable")
@pytest.mark.parametrize("value_dim", [16, 40])
def test_triton_split_keys(monkeypatch, value_dim):
    """The split-KV forward: float32 partial outputs of the values' head dim, merged by their lse."""
    case = Case(head_dim=24, value_dim=value_dim, q_len=1, k_len=40, q_heads=2, kv_heads=2, batch=1,
                prefix_len=9, num_prefixes=2, lengths=True)
    force_kv_splits(monkeypatch, case)
    check_against_reference(case, torch.float32)


def test_default_scale_is_one_over_sqrt_key_dim():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, 24, generator=gen), torch.randn(1, 2, 5, 24, generator=gen)
    v = torch.randn(1, 2, 5, 8, generator=gen)
    prefix_k, prefix_v = torch.randn(2, 4, 24, generator=gen), torch.randn(2, 4, 8, generator=gen)
    out = prefix_attention(q, k, v, prefix_k, prefix_v, backend="reference")
    keys, values = torch.cat([prefix_k[None], k], 2), torch.cat([prefix_v[None], v], 2)
    expected = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(24), -1) @ values
    assert out.shape == (1, 2, 3, 8) and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, expected)


def test_reference_backward_matches_autograd():
    case = Case(head_dim=24, value_dim=40, q_len=7, k_len=9, causal=True, num_prefixes=2, lengths=True,
                bias="heads", sinks=True)
    inputs, kwargs = make_inputs(case, torch.float64)
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    bias = kwargs["attn_bias"].double().requires_grad_(True)
    sinks = kwargs["sinks"].double().requires_grad_(True)
    kwargs = dict(kwargs, attn_bias=bias, sinks=sinks)
    out, lse = attention_ref(*leaves, **kwargs)
    gen = torch.Generator().manual_seed(3)
    grad_out, grad_lse = torch.randn(out.shape, generator=gen).double(), torch.randn(lse.shape, generator=gen).double()
    want = torch.autograd.grad([out, lse], [*leaves, bias, sinks], [grad_out, grad_lse])
    got = attention_ref_backward(grad_out, grad_lse, *leaves, **kwargs)
    assert len(got) == len(want) == 7
    for name, g, w in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v", "dbias", "dsinks"], got, want):
        torch.testing.assert_close(g, w, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Backends that cannot serve it say why
# ----------------------------------------------------------------------------------------------------------------

def _small_inputs(value_dim=16, head_dim=32):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, head_dim, generator=gen), torch.randn(1, 2, 5, head_dim, generator=gen)
    v = torch.randn(1, 2, 5, value_dim, generator=gen)
    return [q, k, v, torch.randn(2, 4, head_dim, generator=gen), torch.randn(2, 4, value_dim, generator=gen)]


def test_native_refuses_with_reason_and_auto_falls_back():
    inputs = _small_inputs()
    with pytest.raises(ValueError, match=r"backend='native' cannot serve this call: .*another head dim than the "
                                         r"keys' \(Dv = 16, Dk = 32\): torch's fused CPU attention"):
        prefix_attention(*inputs, backend="native")
    q, k, _, prefix_k, _ = inputs
    assert backends.choose("auto", q, k, prefix_k, value_dim=16) == "reference"
    assert backends.choose("auto", q, k, prefix_k, value_dim=32) == "native"
    torch.testing.assert_close(prefix_attention(*inputs), prefix_attention(*inputs, backend="reference"))


def test_cuda_states_it_cannot_serve():
    reasons = backends.value_head_dim_reasons("cuda", 192, 128)
    assert len(reasons) == 1 and "Dv = 128, Dk = 192" in reasons[0] and "triton and reference" in reasons[0]
    assert backends.value_head_dim_reasons("cuda", 128, 128) == []
    assert backends.value_head_dim_reasons("cuda", 128, None) == []
    assert backends.value_head_dim_reasons("triton", 192, 128) == []
    assert backends.value_head_dim_reasons("reference", 192, 128) == []
    assert "value head dims up to 256" in backends.value_head_dim_reasons("triton", 64, 512)[0]
    from ptv2_kernels import cuda_backend

    q, k, v, prefix_k, prefix_v = _small_inputs()
    with pytest.raises(ValueError, match="the cuda backend cannot serve this call: it does not serve values"):
        cuda_backend.forward(Call(q, k, v, prefix_k[None], prefix_v[None]))
    with pytest.raises(ValueError, match="backend='cuda' cannot serve this call"):
        prefix_attention(q, k, v, prefix_k, prefix_v, backend="cuda")


# ----------------------------------------------------------------------------------------------------------------
# Argument checks: each names the argument and the expected shape
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position, shape, match", [
    (4, (2, 4, 24), r"prefix_v must have v's head dim: expected \[Hkv, P, Dv\] = \[2, 4, 16\], got shape "
                    r"\(2, 4, 24\)"),
    (4, (2, 5, 16), r"prefix_v must have prefix_k's sizes but for its head dim \(v's, Dv = 16\): expected "
                    r"\[2, 4, 16\], got shape \(2, 5, 16\)"),
    (4, (1, 2, 4, 16), r"prefix_v must have prefix_k's sizes"),
    (3, (2, 4, 16), r"prefix_k must have k's head count and head dim: expected \[Hkv, P, Dk\] = "
                    r"\[2, 4, 32\], got shape \(2, 4, 16\)"),
    (2, (1, 2, 6, 16), r"v must be \[B, H, N, D\] with k's sizes but for its head dim, \[1, 2, 5, 'Dv'\], got "
                       r"shape \(1, 2, 6, 16\)"),
    (2, (1, 2, 5, 0), r"v must have a head dim of at least 1, got 0"),
    (1, (1, 2, 5, 16), r"k must have q's head dim Dk = 32, got 16"),
])
def test_shape_errors_name_the_argument(position, shape, match):
    inputs = _small_inputs()
    inputs[position] = torch.randn(shape)
    with pytest.raises(ValueError, match=match):
        prefix_attention(*inputs, backend="reference")


def test_varlen_shape_errors_name_the_argument():
    q, k, v = torch.randn(5, 2, 32), torch.randn(6, 2, 32), torch.randn(6, 2, 16)
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 4, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"prefix_v must have v's head dim: expected \[Hkv, P, Dv\] = \[2, 3, 16\]"):
        prefix_attention_varlen(q, k, v, torch.randn(2, 3, 32), torch.randn(2, 3, 32), cu_q, cu_k, 3, 4)
    with pytest.raises(ValueError, match=r"v must be \[total, H, D\] .* with k's sizes but for its head dim"):
        prefix_attention_varlen(q, k, torch.randn(5, 2, 16), torch.randn(2, 3, 32), torch.randn(2, 3, 16), cu_q,
                                cu_k, 3, 4)


# ----------------------------------------------------------------------------------------------------------------
# The packed (variable-length) op
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("head_dim, value_dim", [(24, 40), (32, 16)])
def test_varlen_matches_oracle(backend, head_dim, value_dim):
    gen = torch.Generator().manual_seed(0)
    lens_q, lens_k = (3, 0, 6), (5, 2, 6)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lens_q), 4, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(sum(lens_k), 2, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(sum(lens_k), 2, value_dim, generator=gen).to(DEVICE)
    prefix_k = torch.randn(2, 2, 5, head_dim, generator=gen).to(DEVICE)
    prefix_v = torch.randn(2, 2, 5, value_dim, generator=gen).to(DEVICE)
    kwargs = dict(prefix_index=torch.tensor([1, 0, 1], device=DEVICE),
                  prefix_lengths=torch.tensor([5, 2], device=DEVICE), causal=True)
    inputs = [q, k, v, prefix_k, prefix_v]
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out, lse = prefix_attention_varlen(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), **kwargs, return_lse=True,
                                       backend=backend)
    assert out.shape == (sum(lens_q), 4, value_dim) and out.is_contiguous()
    upstream = torch.randn(out.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad(out, leaves, upstream)

    def oracle(compute_dtype):
        xs = [(t.double() if compute_dtype == torch.float64 else t).detach().requires_grad_(True) for t in inputs]
        want, want_lse = attention_ref_varlen(*xs, cu_q, cu_k, **kwargs, compute_dtype=compute_dtype)
        return want, want_lse, torch.autograd.grad(want, xs, upstream.to(want.dtype))

    want, same_precision = oracle(torch.float64), oracle(torch.float32)
    assert_close_to_reference("out", out, want[0], same_precision[0], torch.float32)
    assert_close_to_reference("lse", lse, want[1], same_precision[1], torch.float32)
    for name, grad, leaf, w, pt in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, inputs, want[2],
                                       same_precision[2]):
        assert grad.shape == leaf.shape, name
        assert_close_to_reference(name, grad, w, pt, torch.float32)


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _op_args(requires_grad):
    """Arguments of the custom op ptv2_kernels::prefix_attention as prefix_attention normalizes them: a bank with
    an index and lengths, keys of 24 and values of 40."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)
               for shape in ((2, 4, 5, 24), (2, 2, 7, 24), (2, 2, 7, 40), (2, 2, 3, 24), (2, 2, 3, 40))]
    return (*tensors, torch.tensor([1, 0]), torch.tensor([3, 2]), None, None, None, True, 0.3, 0.0, "reference",
            False)


def test_opcheck_forward_and_backward():
    """The custom ops' schemas, autograd registration and fake implementations (the output and the gradients of
    the values' head dim) agree with what they compute."""
    forward_args = _op_args(requires_grad=True)
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention.default, forward_args, test_utils=OPCHECK_UTILS)
    args = _op_args(requires_grad=False)
    out, lse = torch.ops.ptv2_kernels.prefix_attention(*args)
    assert out.shape == (2, 4, 5, 40)
    gen = torch.Generator().manual_seed(2)
    upstream = (torch.randn(out.shape, generator=gen, dtype=out.dtype), torch.randn(lse.shape, generator=gen))
    q, k, v, prefix_k, prefix_v, index, lengths, mask, bias, seed, causal, scale, dropout_p, backend, det = args
    backward_args = (*upstream, q, k, v, prefix_k, prefix_v, index, lengths, mask, bias, seed, out, lse, causal,
                     scale, dropout_p, backend, det, False)
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention_backward.default, backward_args,
                          test_utils=OPCHECK_UTILS)


def test_compiled_forward_and_backward_equal_eager():
    """torch.compile traces the op with keys and values of different head dims without a graph break."""
    inputs = [t.detach().double() for t in _small_inputs(value_dim=40, head_dim=24)]

    def run(*tensors):
        return prefix_attention(*tensors, causal=True, backend="reference")

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (run, compiled):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        results.append((out, torch.autograd.grad(out.sum(), leaves)))
    (out, grads), (compiled_out, compiled_grads) = results
    assert compiled_out.shape == (1, 2, 3, 40)
    torch.testing.assert_close(compiled_out, out, rtol=0, atol=0)
    for got, want in zip(compiled_grads, grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
