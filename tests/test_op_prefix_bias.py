"""``prefix_bias``: an additive bias on the prefix keys' scores (docs/design.md §4.3).

What a prefix held in a model's cache gets from a position-dependent bias (T5's relative position bias, BLOOM's and
Falcon's ALiBi), given to the op without a cache: column j is bank slot j, broadcastable to ``[B, Hq, Nq, P]``.

(a) the oracle: attention over ``[prefix ; sequence]`` with the bias concatenated in front of the sequence's,
    written out; its hand-written backward against autograd;
(b) the op on each backend that serves it (Triton in its CPU interpreter without a GPU, the reference) against
    the float64 oracle with the bounds of tests/kernel_cases.py: with and without ``attn_bias``, masks, causality,
    banks with lengths (slots past an entry's length stay hidden whatever their bias), GQA (also packed decode
    rows and split keys), softcap and sinks, fp16 and fp32; the batch-chunked bias gradient; deterministic mode;
    the eager path against the custom op; a bias of -inf on every slot as no prefix;
(c) errors naming the argument, the backends that refuse it, opcheck and torch.compile.
"""

from __future__ import annotations

import pytest
import torch

from ptv2_kernels import backends, ops, prefix_attention
from ptv2_kernels.reference import attention_ref, attention_ref_backward

from .conftest import DEVICE
from .kernel_cases import (  # noqa: F401 - poison_uninitialized_memory is an autouse fixture
    SCORE_OPTION_BACKENDS as BACKENDS, Case, check_against_reference, force_kv_splits, make_inputs, needs_triton,
    poison_uninitialized_memory, run_backend, small_float64_problem,
)

F64 = dict(rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# (a) the oracle
# ----------------------------------------------------------------------------------------------------------------

def _small(seed=0, B=2, Hq=4, Nq=5, Nk=6, P=3):
    tensors, gen = small_float64_problem(seed, B=B, Hq=Hq, Nq=Nq, Nk=Nk, P=P)
    padding = torch.rand(B, Nk, generator=gen) > 0.3
    options = dict(prefix_index=torch.tensor([1, 0])[:B], prefix_lengths=torch.tensor([P, P - 1]),
                   key_padding_mask=padding, causal=True,
                   attn_bias=torch.randn(B, 1, Nq, Nk, generator=gen, dtype=torch.float64))
    prefix_bias = torch.randn(1, Hq, Nq, P, generator=gen, dtype=torch.float64)
    prefix_bias[0, 1, 2, 0] = float("-inf")  # a slot hidden from one query of one head
    return tensors, options, prefix_bias


def _concatenated_attention(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                            attn_bias, prefix_bias):
    """Attention over [prefix ; sequence] with [prefix_bias ; attn_bias] added to the scores, as a model whose
    cache holds the prefix computes it."""
    batch, q_heads, q_len, dim = q.shape
    group = q_heads // k.shape[1]
    keys = torch.cat([prefix_k[prefix_index], k], 2).repeat_interleave(group, 1)
    values = torch.cat([prefix_v[prefix_index], v], 2).repeat_interleave(group, 1)
    prefix_len, k_len = prefix_k.shape[2], k.shape[2]
    scores = q @ keys.transpose(-1, -2) / dim ** 0.5
    scores = scores + torch.cat([prefix_bias.expand(batch, q_heads, q_len, prefix_len),
                                 attn_bias.expand(batch, q_heads, q_len, k_len)], -1)
    prefix_visible = torch.arange(prefix_len)[None, :] < prefix_lengths[prefix_index][:, None]
    causal_visible = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
    visible = torch.cat([prefix_visible[:, None, None, :].expand(batch, 1, q_len, prefix_len),
                         key_padding_mask[:, None, None, :] & causal_visible], -1)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ values


def test_reference_is_attention_over_the_concatenation_with_both_biases():
    tensors, options, prefix_bias = _small()
    out, _ = attention_ref(*tensors, **options, prefix_bias=prefix_bias)
    torch.testing.assert_close(out, _concatenated_attention(*tensors, **options, prefix_bias=prefix_bias), **F64)


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_reference_backward_matches_autograd(softcap):
    tensors, options, prefix_bias = _small(seed=3)
    sinks = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    leaves = [t.requires_grad_() for t in tensors] + [options["attn_bias"].requires_grad_(),
                                                      prefix_bias.requires_grad_(), sinks.requires_grad_()]
    kwargs = dict(options, attn_bias=leaves[5], prefix_bias=leaves[6], sinks=leaves[7], softcap=softcap)
    out, lse = attention_ref(*leaves[:5], **kwargs)
    gen = torch.Generator().manual_seed(4)
    upstream = [torch.randn(out.shape, generator=gen, dtype=out.dtype),
                torch.randn(lse.shape, generator=gen, dtype=lse.dtype)]
    want = torch.autograd.grad([out, lse], leaves, upstream)
    detached = {name: (value.detach() if isinstance(value, torch.Tensor) else value) for name, value in kwargs.items()}
    got = attention_ref_backward(*upstream, *(t.detach() for t in leaves[:5]), **detached)
    assert len(got) == len(want) == 8
    for name, g, w in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v", "dbias", "dprefix_bias", "dsinks"], got,
                          want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, **F64, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# (b) the op against the float64 oracle
# ----------------------------------------------------------------------------------------------------------------

GRID = [
    pytest.param(Case(prefix_bias="heads"), torch.float32, id="alone-fp32"),
    pytest.param(Case(prefix_bias="shared", bias="heads", mask="padding", causal=True, num_prefixes=3,
                      lengths=True), torch.float16, id="both-biases-padding-causal-bank-fp16"),
    pytest.param(Case(prefix_bias="heads", mask="dense_heads", q_heads=4, kv_heads=4, layout="bnhd",
                      prefix_layout="strided", num_prefixes=2, index_layout="strided"), torch.float32,
                 id="dense-bnhd-strided-bank-fp32"),
    pytest.param(Case(prefix_bias="shared", q_len=37, k_len=19, causal=True, q_heads=4, kv_heads=1, prefix_len=40,
                      head_dim=80), torch.float16, id="causal-rows-see-prefix-only-mqa-p40-d80-fp16"),
    pytest.param(Case(prefix_bias="heads", softcap=1.0, sinks=True, bias="shared", mask="padding", num_prefixes=2,
                      lengths=True), torch.float32, id="softcap-sinks-bias-bank-fp32"),
    pytest.param(Case(prefix_bias="shared", q_len=1, k_len=33, q_heads=8, kv_heads=2, num_prefixes=3, lengths=True,
                      mask="padding", prefix_dtype=torch.float32), torch.float16, id="decode-packed-gqa-fp16"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, dtype", GRID)
def test_op_matches_the_oracle(case, dtype, backend):
    check_against_reference(case, dtype, deterministic=case.causal, backend=backend)


@needs_triton
def test_triton_split_kv_forward_applies_the_prefix_bias_in_each_split(monkeypatch):
    case = Case(prefix_bias="heads", q_len=2, k_len=9, q_heads=4, kv_heads=1, prefix_len=40, num_prefixes=2,
                lengths=True)
    force_kv_splits(monkeypatch, case)
    check_against_reference(case, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_bias_gradients_equal_the_one_pass_ones(backend, monkeypatch):
    """Both compact biases broadcast over the batch: their dense gradient buffers are filled a few samples at a
    time, each chunk summed into the compact gradients in order."""
    case = Case(batch=5, prefix_bias="shared", bias="shared", mask="padding", num_prefixes=2, lengths=True)
    inputs, kwargs = make_inputs(case, torch.float32)
    whole = run_backend(inputs, kwargs, deterministic=True, backend=backend)
    per_sample = case.q_heads * case.q_len * (case.k_len + case.prefix_len) * 4
    monkeypatch.setattr(ops, "BIAS_GRAD_CHUNK_BYTES", 2 * per_sample)  # two samples a chunk, the last one alone
    chunked = run_backend(inputs, kwargs, deterministic=True, backend=backend)
    assert len(whole[2]) == 7
    for name, a, b in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v", "dbias", "dprefix_bias"], whole[2],
                          chunked[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_gradients_are_bitwise_reproducible(backend):
    case = Case(prefix_bias="heads", batch=4, num_prefixes=2, lengths=True, mask="padding", causal=True)
    inputs, kwargs = make_inputs(case, torch.float32)
    first, second = (run_backend(inputs, kwargs, deterministic=True, backend=backend) for _ in range(2))
    for a, b in zip((first[0], first[1], *first[2]), (second[0], second[1], *second[2])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_eager_path_equals_the_custom_op(backend, monkeypatch):
    case = Case(prefix_bias="shared", bias="heads", num_prefixes=2, lengths=True)
    inputs, kwargs = make_inputs(case, torch.float32)
    eager = run_backend(inputs, kwargs, deterministic=True, backend=backend)
    monkeypatch.setattr(ops, "EAGER_PATH", False)
    custom = run_backend(inputs, kwargs, deterministic=True, backend=backend)
    for a, b in zip((eager[0], eager[1], *eager[2]), (custom[0], custom[1], *custom[2])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bias_of_minus_inf_on_every_slot_hides_the_prefix(backend):
    """-inf on every prefix column: the prefix is gone (as with entry lengths of 0) and gets no gradient."""
    case = Case(q_len=6, k_len=9, causal=True, mask="padding", num_prefixes=2)
    inputs, kwargs = make_inputs(case, torch.float32)
    hidden = torch.full((1, 1, 1, case.prefix_len), float("-inf"), device=DEVICE)
    out, lse, grads, _ = run_backend(inputs, dict(kwargs, prefix_bias=hidden), backend=backend)
    zero_lengths = torch.zeros(case.num_prefixes, dtype=torch.long, device=DEVICE)
    want = run_backend(inputs, dict(kwargs, prefix_lengths=zero_lengths), backend=backend)
    torch.testing.assert_close(out, want[0])
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want[1]))
    for name, got, expected in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v"], grads, want[2]):
        torch.testing.assert_close(got, expected, msg=name)
    assert torch.equal(grads[3], torch.zeros_like(grads[3])) and torch.equal(grads[5], torch.zeros_like(hidden))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_prefix_columns_take_an_empty_bias(backend):
    case = Case(prefix_len=0, causal=True)
    inputs, kwargs = make_inputs(case, torch.float32)
    empty = torch.zeros(1, case.q_heads, 1, 0, device=DEVICE)
    with_bias = prefix_attention(*inputs, **kwargs, prefix_bias=empty, backend=backend)
    torch.testing.assert_close(with_bias, prefix_attention(*inputs, **kwargs, backend=backend))


# ----------------------------------------------------------------------------------------------------------------
# (c) errors, refusals, opcheck, compile
# ----------------------------------------------------------------------------------------------------------------

def _error_inputs():
    inputs, _ = make_inputs(Case(batch=2, q_heads=4, kv_heads=2, q_len=3, k_len=4, prefix_len=2), torch.float32)
    return inputs


@pytest.mark.parametrize("prefix_bias, error, match", [
    ([0.0, 0.0], TypeError, "prefix_bias must be a torch.Tensor"),
    (torch.zeros(3, 2, dtype=torch.long), TypeError, "prefix_bias must have a floating-point dtype"),
    (torch.zeros(3, 4), ValueError, r"prefix_bias must be broadcastable to \[B, Hq, Nq, P\] = \[2, 4, 3, 2\]"),
    (torch.zeros(2, 4, 3, 6), ValueError, r"a 2-D prefix_bias is \[Nq, P\]"),
    (torch.zeros(3, 2, 4, 3, 2), ValueError, "prefix_bias must be broadcastable"),
], ids=["list", "int", "wrong-columns", "sequence-columns", "5-D"])
def test_bad_prefix_bias_raises_naming_the_argument(prefix_bias, error, match):
    if isinstance(prefix_bias, torch.Tensor):
        prefix_bias = prefix_bias.to(DEVICE)
    with pytest.raises(error, match=match):
        prefix_attention(*_error_inputs(), prefix_bias=prefix_bias, backend="reference")


def test_accepted_shapes_broadcast_as_in_sdpa():
    inputs = _error_inputs()
    for shape in [(2,), (3, 2), (1, 2), (4, 1, 2), (2, 1, 1, 1), (2, 4, 3, 2)]:
        bias = torch.randn(shape, device=DEVICE)
        got = prefix_attention(*inputs, prefix_bias=bias, backend="reference")
        want = prefix_attention(*inputs, prefix_bias=bias.expand(2, 4, 3, 2).contiguous(), backend="reference")
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["native", "cuda"])
def test_backends_without_it_refuse_naming_it(backend):
    inputs = _error_inputs()
    q, k, _, prefix_k, _ = inputs
    bias = torch.zeros(1, 1, 1, 2, device=DEVICE)
    if backend == "native" and q.device.type == "cpu" or backend == "cuda" and \
            backends.unavailable_reason("cuda") is None:
        with pytest.raises(ValueError, match=rf"backend='{backend}' cannot serve this call: .*\(prefix_bias\)"):
            prefix_attention(*inputs, prefix_bias=bias, backend=backend)
    reasons = backends.score_option_reasons(backend, prefix_bias=bias)
    assert len(reasons) == 1 and "(prefix_bias)" in reasons[0] and "triton" in reasons[0]
    assert backends.score_option_reasons("triton", prefix_bias=bias) == []
    assert backends.choose("auto", q.cpu(), k.cpu(), prefix_k.cpu(), prefix_bias=bias.cpu()) == "reference"
    if DEVICE == "cuda":
        assert backends.choose("auto", q, k, prefix_k, prefix_bias=bias) == "triton"


def _op_args(requires_grad):
    case = Case(batch=2, q_len=3, k_len=5, prefix_len=2, prefix_bias="heads", bias="heads")
    inputs, kwargs = make_inputs(case, torch.float32)
    q, k, v, prefix_k, prefix_v = (t.requires_grad_(requires_grad) for t in inputs)
    return (q, k, v, prefix_k, prefix_v, None, None, None, kwargs["attn_bias"].requires_grad_(requires_grad), None,
            False, 0.5, 0.0, "reference", False, None, None, kwargs["prefix_bias"].requires_grad_(requires_grad))


def test_opcheck_of_the_custom_ops():
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention.default, _op_args(True))
    args = _op_args(False)
    out, lse = torch.ops.ptv2_kernels.prefix_attention(*args)
    backward_args = (torch.randn_like(out), None, *args[:10], out, lse, False, 0.5, 0.0, "reference", False, True,
                     None, None, args[17], True)
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention_backward.default, backward_args)


def test_compiles_without_graph_breaks():
    case = Case(batch=2, q_len=3, k_len=5, prefix_len=2, prefix_bias="heads")
    inputs, kwargs = make_inputs(case, torch.float32)
    leaves = [t.detach().requires_grad_() for t in inputs]
    prefix_bias = kwargs.pop("prefix_bias").requires_grad_()

    def attend(q, k, v, prefix_k, prefix_v, prefix_bias):
        return prefix_attention(q, k, v, prefix_k, prefix_v, prefix_bias=prefix_bias, **kwargs,
                                backend="reference")

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves, prefix_bias)
    want = attend(*leaves, prefix_bias)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.sum(), [*leaves, prefix_bias])
    expected = torch.autograd.grad(want.sum(), [*leaves, prefix_bias])
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)
