"""``prefix_attention`` under ``torch.compile``, and ``torch.library.opcheck`` of its two custom ops.

The op is a pair of opaque custom ops with fake implementations, so dynamo must trace a call without a graph
break and AOT autograd must differentiate through it. Everything runs on the reference backend on CPU; the compiled
results are compared with eager ones in float64 (both sides run the same reference code in the same order, so they
agree exactly, and the tests say so).
"""

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from ptv2_kernels import prefix_attention

B, HQ, HKV, NQ, NK, D, P, T = 2, 4, 2, 3, 5, 8, 3, 3


def _inputs(case, seed=0, dtype=torch.float64, requires_grad=True):
    """(tensors, options) for a case: "plain" (shared 3-D prefix), "bank" (index, lengths, key padding, causal),
    "dense" (a dense per-head mask over a bank)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)

    bank = (HKV, P, D) if case == "plain" else (T, HKV, P, D)
    tensors = (randn(B, HQ, NQ, D), randn(B, HKV, NK, D), randn(B, HKV, NK, D), randn(*bank), randn(*bank))
    options = {}
    if case == "bank":
        options = dict(prefix_index=torch.tensor([2, 0]), prefix_lengths=torch.tensor([3, 1, 0]),
                       key_padding_mask=torch.tensor([[True] * NK, [True, True, False, False, False]]), causal=True)
    elif case == "dense":
        options = dict(prefix_index=torch.tensor([1, 1]),
                       attn_mask=torch.rand(B, HQ, NQ, NK, generator=gen) < 0.5)
    return tensors, options


def _call(q, k, v, prefix_k, prefix_v, options, dropout_p=0.0):
    out, lse = prefix_attention(q, k, v, prefix_k, prefix_v, **options, dropout_p=dropout_p, return_lse=True,
                                backend="reference")
    return out * 2.0, lse + 1.0  # some traced work around the op


def _loss_and_grads(fn, tensors, options, dropout_p=0.0, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    out, lse = fn(*tensors, options, dropout_p)
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grad_lse = torch.randn(lse.shape, generator=gen, dtype=lse.dtype)
    grads = torch.autograd.grad([out, lse], tensors, [grad_out, grad_lse])
    return out.detach(), lse.detach(), grads


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _exactly_equal(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("case", ["plain", "bank", "dense"])
def test_no_graph_break(case, dropout_p):
    tensors, options = _inputs(case)
    explanation = torch._dynamo.explain(_call)(*tensors, options, dropout_p)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    targets = [node.target for graph in explanation.graphs for node in graph.graph.nodes]
    assert targets.count(torch.ops.ptv2_kernels.prefix_attention) == 1  # one opaque op in the graph
    assert (torch.randint in targets) == (dropout_p > 0)  # the dropout seed is drawn inside the graph


@pytest.mark.parametrize("case", ["plain", "bank", "dense"])
def test_compiled_forward_and_backward_equal_eager(case):
    """fullgraph=True raises on any graph break; aot_eager runs the traced forward and backward graphs."""
    tensors, options = _inputs(case)
    compiled = torch.compile(_call, fullgraph=True, backend="aot_eager")
    out, lse, grads = _loss_and_grads(compiled, tensors, options)
    want_out, want_lse, want_grads = _loss_and_grads(_call, tensors, options)
    _exactly_equal((out, lse, *grads), (want_out, want_lse, *want_grads))
    assert out.dtype == torch.float64 and lse.dtype == torch.float32
    assert out.shape == (B, HQ, NQ, D) and grads[3].shape == tensors[3].shape


def _bare_call(q, k, v, prefix_k, prefix_v, options, dropout_p=0.0):
    """The op alone: no pointwise work around it for inductor to generate (and compile) C++ kernels for."""
    return prefix_attention(q, k, v, prefix_k, prefix_v, **options, dropout_p=dropout_p, return_lse=True,
                            backend="reference")


def test_inductor_forward_equals_eager():
    tensors, options = _inputs("bank", requires_grad=False)
    out, lse = torch.compile(_bare_call, fullgraph=True)(*tensors, options)
    _exactly_equal((out, lse), _bare_call(*tensors, options))
    # The op's output keeps its [B, Nq, Hq, D] memory layout inside a compiled graph.
    assert out.transpose(1, 2).is_contiguous()


def test_inductor_backward_equals_eager():
    tensors, options = _inputs("bank")
    compiled = torch.compile(_bare_call, fullgraph=True)
    out, lse, grads = _loss_and_grads(compiled, tensors, options)
    want_out, want_lse, want_grads = _loss_and_grads(_bare_call, tensors, options)
    _exactly_equal((out, lse, *grads), (want_out, want_lse, *want_grads))


def test_compiled_dropout_aot_eager_equals_eager():
    """Without inductor the traced graph draws the dropout seed from torch's generator as eager does."""
    tensors, options = _inputs("bank")
    compiled = torch.compile(_call, fullgraph=True, backend="aot_eager")
    got = _loss_and_grads(compiled, tensors, options, dropout_p=0.3, seed=7)
    want = _loss_and_grads(_call, tensors, options, dropout_p=0.3, seed=7)
    _exactly_equal((got[0], got[1], *got[2]), (want[0], want[1], *want[2]))
    no_dropout = _call(*tensors, options)[0]
    assert not torch.allclose(got[0], no_dropout)


def test_compiled_dropout_inductor():
    """The dropout seed is drawn inside the compiled graph on every call, not baked in when tracing.

    With ``fallback_random`` inductor calls torch's own RNG ops, so a compiled run equals the eager one with the
    same seed. (Without it inductor generates its own random numbers: the dropout masks then differ from eager
    ones, and generating that C++ kernel alone costs ~20 s on a cold cache, so it is not run here.)
    """
    tensors, options = _inputs("plain", requires_grad=False)

    def run(fn, seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        return fn(*tensors, options, 0.3)[0]

    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(_bare_call, fullgraph=True)
        first = run(compiled, 3)
        torch.testing.assert_close(first, run(_bare_call, 3), rtol=0, atol=0)
        assert torch.equal(run(compiled, 3), first)
        assert not torch.equal(run(compiled, 4), first)
        assert not torch.equal(run(compiled), run(compiled))
    assert not torch.allclose(first, _bare_call(*tensors, options)[0])


def test_compiled_bias_gradient_equals_eager():
    """A bias [B, 1, Nq, Nk] broadcast over the heads: traced without a graph break, and its gradient (summed over
    the heads by autograd's expand) is the eager one."""
    tensors, options = _inputs("bank")
    bias = torch.randn(B, 1, NQ, NK, generator=torch.Generator().manual_seed(5), dtype=torch.float64,
                       requires_grad=True)

    def biased(q, k, v, prefix_k, prefix_v, bias):
        out, lse = prefix_attention(q, k, v, prefix_k, prefix_v, **options, attn_bias=bias, return_lse=True,
                                    backend="reference")
        return out * 2.0, lse + 1.0

    def run(fn):
        out, lse = fn(*tensors, bias)
        return (out, lse, *torch.autograd.grad([out.sum(), (lse * lse).sum()], (*tensors, bias)))

    got = run(torch.compile(biased, fullgraph=True, backend="aot_eager"))
    want = run(biased)
    _exactly_equal(got, want)
    assert got[-1].shape == bias.shape and got[-1].abs().sum() > 0


def test_argument_checks_still_raise_under_compile():
    """Without fullgraph, a failing check breaks the graph and raises the eager exception."""
    tensors, options = _inputs("bank", requires_grad=False)
    compiled = torch.compile(_call, backend="aot_eager")
    with pytest.raises(ValueError, match="prefix_index"):
        compiled(*tensors, dict(options, prefix_index=None))
    with pytest.raises(TypeError, match="key_padding_mask"):
        compiled(*tensors, dict(options, key_padding_mask=options["key_padding_mask"].float()))


# ----------------------------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------------------------

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _op_args(case, dropout=False, layout="contiguous", prefix_dtype=None, prefix_len=P, requires_grad=True,
             bias=False):
    """Arguments of torch.ops.ptv2_kernels.prefix_attention as prefix_attention passes them (normalized)."""
    tensors, options = _inputs(case, requires_grad=requires_grad)
    q, k, v, prefix_k, prefix_v = (t.detach() for t in tensors)
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k[None], prefix_v[None]
    prefix_k, prefix_v = prefix_k[:, :, :prefix_len], prefix_v[:, :, :prefix_len]
    if prefix_dtype is not None:
        prefix_k, prefix_v = prefix_k.to(prefix_dtype), prefix_v.to(prefix_dtype)
    if layout == "strided":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        prefix_k = prefix_k.transpose(0, 2).contiguous().transpose(0, 2)
    q, k, v, prefix_k, prefix_v = (t.requires_grad_(requires_grad) for t in (q, k, v, prefix_k, prefix_v))
    mask = options.get("attn_mask", options.get("key_padding_mask"))
    if mask is not None and mask.dim() == 4:
        mask = mask.expand(B, HQ, NQ, NK)
    lengths = options.get("prefix_lengths")
    if lengths is not None:
        lengths = lengths.clamp(max=prefix_len)
    seed = torch.tensor(1234, dtype=torch.int64) if dropout else None
    attn_bias = None
    if bias:  # broadcast over the heads, as T5's position bias often is
        attn_bias = torch.randn(B, 1, NQ, NK, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        attn_bias = attn_bias.requires_grad_(requires_grad)  # compact: the op expands it for the backends
    return (q, k, v, prefix_k, prefix_v, options.get("prefix_index"), lengths, mask, attn_bias, seed,
            options.get("causal", False), 0.4, 0.3 if dropout else 0.0, "reference", False)


FORWARD_SAMPLES = {
    "plain": dict(case="plain"),
    "bank": dict(case="bank"),
    "dense_dropout": dict(case="dense", dropout=True),
    "strided_mixed_dtype": dict(case="bank", layout="strided", prefix_dtype=torch.float32),
    "bias": dict(case="bank", bias=True),
}


@pytest.mark.parametrize("sample", sorted(FORWARD_SAMPLES))
def test_opcheck_forward(sample):
    args = _op_args(**FORWARD_SAMPLES[sample])
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention.default, args, test_utils=OPCHECK_UTILS)


def _backward_args(**sample):
    args = _op_args(**sample, requires_grad=False)
    q, k, v, prefix_k, prefix_v, index, lengths, mask, bias, seed, causal, scale, dropout_p, backend, det = args
    out, lse = torch.ops.ptv2_kernels.prefix_attention(*args)
    gen = torch.Generator().manual_seed(2)
    grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grad_lse = torch.randn(lse.shape, generator=gen, dtype=lse.dtype)
    return (grad_out, grad_lse, q, k, v, prefix_k, prefix_v, index, lengths, mask, bias, seed, out, lse, causal,
            scale, dropout_p, backend, det, bias is not None)


def test_opcheck_backward_without_prefix_keys():
    """P = 0 and contiguous inputs: the real gradients happen to have the strides of the fake ones."""
    args = _backward_args(case="bank", dropout=True, prefix_len=0)
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention_backward.default, args,
                          test_utils=OPCHECK_UTILS)


def test_opcheck_backward_with_prefix_keys():
    args = _backward_args(case="bank")
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention_backward.default, args,
                          test_utils=OPCHECK_UTILS)


def test_opcheck_backward_with_bias_gradient():
    args = _backward_args(case="bank", bias=True, prefix_len=0)
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention_backward.default, args,
                          test_utils=OPCHECK_UTILS)


def test_opcheck_backward_strided_q():
    args = _backward_args(case="bank", layout="strided", prefix_len=0)
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention_backward.default, args,
                          test_utils=OPCHECK_UTILS)
