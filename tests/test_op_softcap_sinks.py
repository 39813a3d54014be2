"""The op's score options: ``softcap`` (Gemma2's attention-logit softcapping) and ``sinks`` (GPT-OSS's attention
sinks), docs/design.md §4.

(a) the oracle: its formulas against the two models' eager attention written out (softcap after the scale and
    before the mask; a sink column concatenated to the scores, soft-maxed with them and dropped), its hand-written
    backward against autograd, a sink of -inf as no sink, and lse merges staying exact with the sink counted once;
(b) the op on each backend that serves the options (Triton in its CPU interpreter without a GPU, the reference)
    against the float64 oracle, with the bounds of tests/kernel_cases.py: both options alone and together, with
    causality, padding, dense masks, a bias, GQA (also packed decode rows and split keys), banks, fp16 and fp32;
    deterministic mode bitwise reproducible; the packed variable-length op;
(c) the errors and the backends that refuse (naming the argument and why), opcheck of the custom ops;
(d) Gemma2 and GPT-OSS tiny models patched against the unpatched model with the prefix in its cache as PEFT
    puts it (PEFT itself, and a cache filled by hand that needs no PEFT): logits, prefix and sink gradients,
    ``generate``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ptv2_kernels
from ptv2_kernels import backends, prefix_attention, prefix_attention_varlen
from ptv2_kernels.reference import attention_ref, attention_ref_backward, attention_ref_varlen

from .conftest import DEVICE
from .kernel_cases import (  # noqa: F401 - poison_uninitialized_memory is an autouse fixture
    SCORE_OPTION_BACKENDS as BACKENDS, TRITON_REASON, Case, assert_close_to_reference, check_against_reference,
    force_kv_splits, make_inputs, needs_triton, poison_uninitialized_memory, run_backend, small_float64_problem,
)

F64 = dict(rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# (a) the oracle
# ----------------------------------------------------------------------------------------------------------------

def _small(seed=0, B=2, Hq=4, Nq=5, Nk=6, P=3):
    tensors, gen = small_float64_problem(seed, B=B, Hq=Hq, Nq=Nq, Nk=Nk, P=P)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    padding = torch.rand(B, Nk, generator=gen) > 0.3
    padding[0] = False  # sample 0 sees its prefix alone
    options = dict(prefix_index=torch.tensor([1, 0])[:B], prefix_lengths=torch.tensor([P, 0]),
                   key_padding_mask=padding, causal=True, attn_bias=randn(B, 1, Nq, Nk))
    return tensors, options, randn(Hq)


def _eager_models_attention(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                            attn_bias, softcap, sinks):
    """The two models' eager attention over [prefix ; sequence] as PEFT's cache gives it: scores scaled, capped
    (Gemma2), the mask added (prefix columns 0, hidden keys -inf, the bias on the sequence columns), a sink column
    concatenated, soft-maxed, dropped (GPT-OSS)."""
    batch, q_heads, q_len, dim = q.shape
    group = q_heads // k.shape[1]
    keys = torch.cat([prefix_k[prefix_index], k], 2).repeat_interleave(group, 1)
    values = torch.cat([prefix_v[prefix_index], v], 2).repeat_interleave(group, 1)
    scores = q @ keys.transpose(-1, -2) / dim ** 0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    prefix_len, k_len = prefix_k.shape[2], k.shape[2]
    prefix_visible = torch.arange(prefix_len)[None, :] < prefix_lengths[prefix_index][:, None]
    causal_visible = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
    visible = torch.cat([prefix_visible[:, None, None, :].expand(batch, 1, q_len, prefix_len),
                         (key_padding_mask[:, None, None, :] & causal_visible)], -1)
    additive = torch.cat([torch.zeros(batch, 1, q_len, prefix_len, dtype=q.dtype), attn_bias], -1)
    scores = (scores + additive).masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks[None, :, None, None].expand(batch, q_heads, q_len, 1)], -1)
    probs = torch.softmax(scores, -1)
    return probs[..., :keys.shape[2]] @ values


@pytest.mark.parametrize("softcap, with_sinks", [(0.8, False), (None, True), (0.8, True)])
def test_reference_is_the_models_eager_attention(softcap, with_sinks):
    tensors, options, sinks = _small()
    sinks = sinks if with_sinks else None
    out, lse = attention_ref(*tensors, **options, softcap=softcap, sinks=sinks)
    want = _eager_models_attention(*tensors, **options, softcap=softcap, sinks=sinks)
    # Sample 0 sees no key at all (its sequence is all padding, its bank entry has length 0): without a sink the
    # eager softmax gives NaN there and the oracle 0; with one, both give 0.
    seen = torch.isfinite(lse)
    torch.testing.assert_close(out[seen], want[seen], **F64)
    assert with_sinks == bool(seen.all())  # with a sink every row has a finite lse
    if with_sinks:
        assert (out[0] == 0).all() and torch.allclose(lse[0], sinks[:, None].expand(-1, lse.shape[2]), **F64)


@pytest.mark.parametrize("with_grad_lse", [False, True])
@pytest.mark.parametrize("softcap, with_sinks", [(0.8, False), (None, True), (1.5, True)])
def test_reference_backward_matches_autograd(softcap, with_sinks, with_grad_lse):
    tensors, options, sinks = _small(seed=3)
    leaves = [t.requires_grad_() for t in tensors] + [options["attn_bias"].requires_grad_()]
    if with_sinks:
        leaves.append(sinks.requires_grad_())
    kwargs = dict(options, softcap=softcap, sinks=sinks if with_sinks else None)
    keep = torch.rand(2, 4, 5, 3 + 6, generator=torch.Generator().manual_seed(5)) > 0.2  # dropout too
    out, lse = attention_ref(*leaves[:5], **kwargs, dropout_p=0.2, dropout_keep=keep)
    gen = torch.Generator().manual_seed(4)
    grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grad_lse = torch.randn(lse.shape, generator=gen, dtype=lse.dtype) if with_grad_lse else None
    want = torch.autograd.grad([out, lse] if with_grad_lse else [out], leaves,
                               [grad_out, grad_lse] if with_grad_lse else [grad_out])
    detached = {name: (value.detach() if isinstance(value, torch.Tensor) else value) for name, value in kwargs.items()}
    got = attention_ref_backward(grad_out, grad_lse, *(t.detach() for t in leaves[:5]), **detached, dropout_p=0.2,
                                 dropout_keep=keep)
    assert len(got) == len(want)
    for name, g, w in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v", "dbias", "dsinks"], got, want):
        torch.testing.assert_close(g, w, **F64, msg=name)


def test_a_sink_of_minus_inf_is_no_sink():
    tensors, options, sinks = _small()
    with_inf = attention_ref(*tensors, **options, sinks=torch.full_like(sinks, float("-inf")))
    without = attention_ref(*tensors, **options)
    for a, b in zip(with_inf, without):
        torch.testing.assert_close(a, b, **F64, equal_nan=True)
    grads = attention_ref_backward(torch.ones_like(without[0]), torch.ones_like(without[1]), *tensors, **options,
                                   sinks=torch.full_like(sinks, float("-inf")))
    assert torch.equal(grads[-1], torch.zeros_like(sinks))


def test_lse_merges_stay_exact_with_the_sink_counted_once():
    """Attention over [prefix ; sequence] with sinks is the lse merge of attention over the prefix alone (no sink)
    and over the sequence with the sinks: the lse the op returns includes the sink exactly once."""
    tensors, options, sinks = _small(seed=2)
    q, k, v, prefix_k, prefix_v = tensors
    options = dict(options, prefix_lengths=None)
    out, lse = attention_ref(*tensors, **options, sinks=sinks)
    empty = prefix_k[:, :, :0]
    seq_out, seq_lse = attention_ref(q, k, v, empty, empty, **options, sinks=sinks)
    no_keys = k[:, :, :0]
    pre_out, pre_lse = attention_ref(q, no_keys, no_keys, prefix_k, prefix_v, prefix_index=options["prefix_index"],
                                     sinks=None)
    merged = torch.logaddexp(seq_lse, pre_lse)
    torch.testing.assert_close(lse, merged, **F64)
    weights = torch.exp(torch.stack([seq_lse, pre_lse]) - merged)[..., None]
    torch.testing.assert_close(out, weights[0] * seq_out + weights[1] * pre_out, **F64)


# ----------------------------------------------------------------------------------------------------------------
# (b) the op against the float64 oracle
# ----------------------------------------------------------------------------------------------------------------

GRID = [
    pytest.param(Case(softcap=1.5, mask="padding", causal=True, num_prefixes=3, lengths=True), torch.float16,
                 id="softcap-padding-causal-bank-gqa-fp16"),
    pytest.param(Case(softcap=2.0, mask="dense_heads", q_heads=4, kv_heads=4, layout="bnhd"), torch.float32,
                 id="softcap-dense-bnhd-fp32"),
    pytest.param(Case(sinks=True, mask="padding", causal=True, num_prefixes=3, lengths=True), torch.float32,
                 id="sinks-padding-causal-bank-gqa-fp32"),
    pytest.param(Case(sinks=True, q_len=37, k_len=19, causal=True, q_heads=4, kv_heads=1, prefix_len=0),
                 torch.float16, id="sinks-causal-rows-that-see-nothing-mqa-fp16"),
    pytest.param(Case(softcap=1.0, sinks=True, bias="heads", mask="padding", num_prefixes=2, lengths=True),
                 torch.float16, id="both-bias-padding-bank-fp16"),
    pytest.param(Case(softcap=1.0, sinks=True, bias="shared", causal=True, q_len=24, k_len=24, head_dim=80),
                 torch.float32, id="both-shared-inf-bias-causal-d80-fp32"),
    pytest.param(Case(softcap=3.0, sinks=True, q_len=1, k_len=33, q_heads=8, kv_heads=2, num_prefixes=3,
                      lengths=True, mask="padding"), torch.float16, id="both-decode-packed-gqa-fp16"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, dtype", GRID)
def test_op_matches_the_oracle(case, dtype, backend):
    check_against_reference(case, dtype, deterministic=case.causal, backend=backend)


@needs_triton
@pytest.mark.parametrize("case", [
    Case(softcap=1.0, sinks=True, q_len=1, k_len=57, q_heads=8, kv_heads=2, num_prefixes=3, lengths=True,
         mask="padding", causal=True),
    Case(sinks=True, q_len=2, k_len=9, q_heads=4, kv_heads=1, prefix_len=40, num_prefixes=2, lengths=True),
], ids=["decode-gqa-bank", "prefix-longer-than-cache"])
def test_triton_split_kv_forward_adds_the_sink_once(case, monkeypatch):
    """Split keys: each split's partial lse has no sink, the merge adds it once."""
    force_kv_splits(monkeypatch, case)
    check_against_reference(case, torch.float32)


if TRITON_REASON is None:  # a kernel that applies the kernels' tanh helper (jit functions resolve module globals)
    import triton
    import triton.language as tl

    from ptv2_kernels.triton.kernels import _tanh

    @triton.jit
    def _apply_tanh(X, Y, N: tl.constexpr):
        offsets = tl.arange(0, N)
        tl.store(Y + offsets, _tanh(tl.load(X + offsets)))


@needs_triton
def test_triton_tanh_is_accurate_to_float32_everywhere():
    """The kernels' tanh (no libdevice in the interpreter) within a few float32 ulps of the true value, relative,
    also near 0 where the exponential form alone would lose the digits (Gemma2's cap of 50 puts scores there)."""
    magnitudes = torch.cat([torch.logspace(-6, 1.3, 2000, dtype=torch.float64), torch.tensor([0.2499, 0.25, 0.2501])])
    x = torch.cat([magnitudes, -magnitudes, torch.zeros(1, dtype=torch.float64)])
    x = torch.cat([x, torch.zeros(4096 - x.numel(), dtype=torch.float64)]).float().to(DEVICE)
    y = torch.empty_like(x)
    _apply_tanh[(1,)](x, y, N=4096)
    want = torch.tanh(x.double())
    relative = ((y.double() - want).abs() / want.abs().clamp(min=1e-30)).max().item()
    assert relative < 4 * torch.finfo(torch.float32).eps, relative


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_gradients_are_bitwise_reproducible(backend):
    case = Case(softcap=1.0, sinks=True, batch=4, num_prefixes=2, lengths=True, mask="padding", causal=True)
    inputs, kwargs = make_inputs(case, torch.float32)
    first, second = (run_backend(inputs, kwargs, deterministic=True, backend=backend) for _ in range(2))
    assert len(first[2]) == 6
    for a, b in zip((first[0], first[1], *first[2]), (second[0], second[1], *second[2])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sink_of_minus_inf_through_the_op(backend):
    """Rows that see no key keep out 0 and lse -inf, and the sinks get no gradient."""
    case = Case(q_len=37, k_len=19, causal=True, prefix_len=0)
    inputs, kwargs = make_inputs(case, torch.float32)
    sinks = torch.full((case.q_heads,), float("-inf"), device=DEVICE, requires_grad=True)
    out, lse = prefix_attention(*inputs, **kwargs, sinks=sinks, return_lse=True, backend=backend)
    want_out, want_lse = prefix_attention(*inputs, **kwargs, return_lse=True, backend=backend)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse)) and torch.isneginf(lse).any()
    torch.testing.assert_close(out, want_out)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert torch.equal(sinks.grad, torch.zeros_like(sinks))


def test_auto_serves_the_options_on_the_cpu_with_the_reference():
    inputs, kwargs = make_inputs(Case(softcap=1.0, sinks=True), torch.float32)
    q, k, _, prefix_k, _ = inputs
    with_options = dict(softcap=kwargs["softcap"], sinks=kwargs["sinks"])
    assert backends.choose("auto", q.cpu(), k.cpu(), prefix_k.cpu()) == "native"
    assert backends.choose("auto", q.cpu(), k.cpu(), prefix_k.cpu(), **with_options) == "reference"
    if DEVICE == "cuda":
        assert backends.choose("auto", q, k, prefix_k, **with_options) == "triton"


# The packed variable-length op: same kernels, same options.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_varlen_op_matches_the_oracle(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    lens_q, lens_k, Hq, Hkv, D, P = (5, 0, 17, 1), (7, 3, 17, 12), 4, 2, 32, 6
    cu_q = torch.tensor([0, 5, 5, 22, 23], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 7, 10, 27, 39], dtype=torch.int32, device=DEVICE)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    inputs = [rand(sum(lens_q), Hq, D).to(dtype), rand(sum(lens_k), Hkv, D).to(dtype),
              rand(sum(lens_k), Hkv, D).to(dtype), rand(3, Hkv, P, D).to(dtype), rand(3, Hkv, P, D).to(dtype)]
    sinks = rand(Hq) + 1.0
    options = dict(prefix_index=torch.tensor([2, 0, 1, 0], device=DEVICE),
                   prefix_lengths=torch.tensor([6, 0, 3], device=DEVICE), causal=True, softcap=1.5)
    leaves = [t.detach().requires_grad_() for t in inputs + [sinks]]
    out, lse = prefix_attention_varlen(*leaves[:5], cu_q, cu_k, 17, 17, **options, sinks=leaves[5],
                                       return_lse=True, backend=backend, deterministic=True)
    upstream = [torch.randn(out.shape, generator=gen).to(DEVICE, dtype), torch.randn(lse.shape, generator=gen)]
    grads = torch.autograd.grad([out, lse], leaves, upstream)

    def oracle(compute_dtype):
        cast = [t.detach().to(compute_dtype if compute_dtype == torch.float64 else t.dtype).requires_grad_()
                for t in inputs + [sinks]]
        want_out, want_lse = attention_ref_varlen(*cast[:5], cu_q, cu_k, **options, sinks=cast[5],
                                                  compute_dtype=compute_dtype)
        return want_out, want_lse, torch.autograd.grad([want_out, want_lse], cast, upstream)

    want, same_precision = oracle(torch.float64), oracle(dtype)
    assert_close_to_reference("out", out, want[0], same_precision[0], dtype)
    assert_close_to_reference("lse", lse, want[1], same_precision[1].float(), torch.float32)
    for name, grad, w, pt in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v", "dsinks"], grads, want[2],
                                 same_precision[2]):
        assert_close_to_reference(name, grad, w, pt, dtype)


# ----------------------------------------------------------------------------------------------------------------
# (c) errors, refusals, opcheck
# ----------------------------------------------------------------------------------------------------------------

def _error_inputs():
    inputs, _ = make_inputs(Case(batch=1, q_len=3, k_len=4, prefix_len=2), torch.float32)
    return inputs


@pytest.mark.parametrize("options, error, match", [
    (dict(softcap=0.0), ValueError, "softcap must be None or a positive finite number"),
    (dict(softcap=-1.0), ValueError, "softcap must be None or a positive finite number"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap=True), ValueError, "softcap"),
    (dict(softcap="1"), ValueError, "softcap"),
    (dict(sinks=[0.0] * 4), TypeError, "sinks must be a torch.Tensor"),
    (dict(sinks=torch.zeros(4, dtype=torch.long)), TypeError, "sinks must have a floating-point dtype"),
    (dict(sinks=torch.zeros(2)), ValueError, r"sinks must have shape \[Hq\] = \[4\]"),
    (dict(sinks=torch.zeros(1, 4)), ValueError, "sinks must have shape"),
], ids=lambda x: str(x)[:40] if isinstance(x, str) else None)
def test_bad_options_raise_naming_the_argument(options, error, match):
    options = {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for name, value in options.items()}
    with pytest.raises(error, match=match):
        prefix_attention(*_error_inputs(), **options, backend="reference")


@pytest.mark.parametrize("backend", ["native", "cuda"])
@pytest.mark.parametrize("option", ["softcap", "sinks"])
def test_backends_without_the_option_refuse_naming_it(backend, option):
    inputs = _error_inputs()
    q, k, _, prefix_k, _ = inputs
    value = 1.0 if option == "softcap" else torch.zeros(4, device=DEVICE)
    if backend == "native" and q.device.type == "cpu" or backend == "cuda" and \
            backends.unavailable_reason("cuda") is None:
        with pytest.raises(ValueError, match=rf"backend='{backend}' cannot serve this call: .*\({option}\)"):
            prefix_attention(*inputs, **{option: value}, backend=backend)
    # whatever this machine has, the backend states the reason
    reasons = backends.score_option_reasons(backend, **{option: value})
    assert len(reasons) == 1 and f"({option})" in reasons[0] and "triton" in reasons[0]
    assert backends.score_option_reasons("triton", softcap=1.0, sinks=value) == []


def test_varlen_refuses_the_options_on_native():
    q, k = torch.zeros(3, 4, 8), torch.zeros(3, 2, 8)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    bank = torch.zeros(2, 2, 8)
    with pytest.raises(ValueError, match=r"cannot serve this variable-length call: .*\(softcap\)"):
        prefix_attention_varlen(q, k, k, bank, bank, cu, cu, 3, 3, softcap=1.0, backend="native")
    with pytest.raises(ValueError, match=r"sinks must have shape \[Hq\]"):
        prefix_attention_varlen(q, k, k, bank, bank, cu, cu, 3, 3, sinks=torch.zeros(2), backend="reference")


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _op_args(requires_grad):
    inputs, kwargs = make_inputs(Case(batch=2, q_len=3, k_len=4, prefix_len=2, num_prefixes=2, mask="padding",
                                      causal=True), torch.float64)
    q, k, v, prefix_k, prefix_v = (t.detach().requires_grad_(requires_grad) for t in inputs)
    sinks = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return (q, k, v, prefix_k, prefix_v, kwargs["prefix_index"], None, kwargs["key_padding_mask"], None, None, True,
            0.4, 0.0, "reference", False, sinks.requires_grad_(requires_grad), 0.9)


def test_opcheck_forward():
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention.default, _op_args(True),
                          test_utils=OPCHECK_UTILS)


def test_opcheck_backward():
    args = _op_args(False)
    out, lse = torch.ops.ptv2_kernels.prefix_attention(*args)
    gen = torch.Generator().manual_seed(2)
    upstream = (torch.randn(out.shape, generator=gen, dtype=out.dtype),
                torch.randn(lse.shape, generator=gen, dtype=lse.dtype))
    backward_args = (*upstream, *args[:10], out, lse, *args[10:15], False, *args[15:])
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention_backward.default, backward_args,
                          test_utils=OPCHECK_UTILS)


def test_eager_path_and_custom_op_agree(monkeypatch):
    args = _op_args(True)
    leaves = [args[i] for i in (0, 1, 2, 3, 4, 15)]
    results = []
    for eager in (True, False):
        monkeypatch.setattr(ptv2_kernels.ops, "EAGER_PATH", eager)
        out, lse = prefix_attention(*args[:5], prefix_index=args[5], key_padding_mask=args[7], causal=True,
                                    scale=0.4, softcap=0.9, sinks=args[15], return_lse=True, backend="reference")
        results.append((out, lse, torch.autograd.grad([out, lse], leaves, [torch.ones_like(out),
                                                                           torch.ones_like(lse)])))
    (out_a, lse_a, grads_a), (out_b, lse_b, grads_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(lse_a, lse_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def test_compiled_forward_and_backward_equal_eager():
    """torch.compile(fullgraph=True) traces the op with both options: one graph, the eager results."""
    args = _op_args(True)
    leaves = [args[i] for i in (0, 1, 2, 3, 4, 15)]

    def run(q, k, v, prefix_k, prefix_v, sinks):
        out, lse = prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index=args[5], key_padding_mask=args[7],
                                    causal=True, scale=0.4, softcap=0.9, sinks=sinks, return_lse=True,
                                    backend="reference")
        return out.sum() + lse.sum()

    eager = torch.autograd.grad(run(*leaves), leaves)
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, **F64)


# ----------------------------------------------------------------------------------------------------------------
# (d) Gemma2 and GPT-OSS
# ----------------------------------------------------------------------------------------------------------------

FAMILIES = ["gemma2", "gpt_oss"]
REFERENCE_REL = 1e-5
TRITON_REL = 1e-4
GENERATE = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=1)


def family_model(family: str, seed: int = 0):
    """A tiny Gemma2 (scores capped at 1, which bites: the logits move by O(1) without it) or GPT-OSS (a random
    sink per head, about the scores' size) in float32, sliding windows longer than the tests' sequences."""
    transformers = pytest.importorskip("transformers")
    from .hf_models import VOCAB

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, max_position_embeddings=64, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                  attention_dropout=0.0, sliding_window=32, initializer_range=0.2)
    if family == "gemma2":
        config = transformers.Gemma2Config(intermediate_size=64, attn_logit_softcapping=1.0,
                                           final_logit_softcapping=None, query_pre_attn_scalar=8, **common)
        # eager: older transformers (5.17) default Gemma2 to SDPA, which drops the cap the oracle needs
        config._attn_implementation = "eager"
        return transformers.Gemma2ForCausalLM(config).eval()
    config = transformers.GptOssConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                       rope_parameters=dict(rope_type="default", rope_theta=10000.0), **common)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
    return model


def _weighted(logits, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return (logits * torch.randn(logits.shape, generator=gen)).sum()


def _sink_grads(model):
    return [p.grad for name, p in model.named_parameters() if name.endswith("self_attn.sinks")]


def _prefix_cache(model, bank, batch: int):
    """The unpatched model's cache holding the bank's prefix as PEFT places it: P tokens of every layer."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, (key, value) in enumerate(bank()):
        cache.update(key.expand(batch, *key.shape[1:]), value.expand(batch, *value.shape[1:]), layer)
    return cache


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_family_equals_the_prefix_in_its_cache(family, backend):
    """Logits, prefix gradients and (GPT-OSS) sink gradients of the patched model equal those of the unpatched
    model fed the prefix as its cache (left padding; the attention mask gets P ones in front)."""
    from ptv2_kernels.integrations.hf_transformers import cache_keyword

    from .hf_models import assert_close_scaled, random_batch

    model = family_model(family)
    ours = copy.deepcopy(model)
    bank = ptv2_kernels.PrefixBank.for_model(ours, prefix_len=4)
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, 1.0)
    ptv2_kernels.patch(ours, bank, backend=backend)
    prefix_len = bank.prefix_len
    input_ids, mask = random_batch(3, 7, padding="left", seed=1)
    real = mask.bool()
    actual = ours(input_ids=input_ids, attention_mask=mask).logits

    twin = copy.deepcopy(bank)
    full_mask = torch.cat([torch.ones(3, prefix_len, dtype=mask.dtype), mask], 1)
    expected = model(input_ids=input_ids, attention_mask=full_mask,
                     **{cache_keyword(): _prefix_cache(model, twin, 3)}).logits
    rel = REFERENCE_REL if backend == "reference" else TRITON_REL
    assert_close_scaled(actual[real], expected[real], rel, "logits")

    _weighted(actual[real]).backward()
    _weighted(expected[real]).backward()
    assert_close_scaled(bank.encoder.embedding.weight.grad, twin.encoder.embedding.weight.grad, rel,
                        "prefix gradient")
    if family == "gpt_oss":
        for got, want in zip(_sink_grads(ours), _sink_grads(model)):
            assert_close_scaled(got, want, rel, "sink gradient")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_batches_are_refused_with_the_options(family):
    """A packed (padding-free) batch would run the variable-length op, to which the patched model does not hand
    the options yet: it raises instead of leaving them out (sliding windows off, so that this is what refuses)."""
    model = family_model(family)
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    ptv2_kernels.patch(model, ptv2_kernels.PrefixBank.for_model(model, prefix_len=3), backend="reference")
    input_ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(0))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])  # two sequences packed in one row
    with pytest.raises(NotImplementedError, match="caps its scores or has attention sinks.*packed sequences"):
        model(input_ids=input_ids, position_ids=position_ids)


def test_the_options_bite_in_these_models():
    """Without the cap (Gemma2) or the sinks (GPT-OSS) the logits differ by far more than the tolerances."""
    from .hf_models import random_batch

    input_ids, mask = random_batch(3, 7, padding="left", seed=1)
    for family in FAMILIES:
        model = family_model(family)
        with torch.no_grad():
            base = model(input_ids=input_ids, attention_mask=mask).logits
            if family == "gemma2":
                for layer in model.model.layers:
                    layer.self_attn.attn_logit_softcapping = None
            else:
                for layer in model.model.layers:
                    layer.self_attn.sinks.fill_(-1e4)
            changed = model(input_ids=input_ids, attention_mask=mask).logits
        assert (changed - base)[mask.bool()].abs().max() > 1e3 * REFERENCE_REL * base.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_family_matches_peft(family):
    """Against PEFT's prefix tuning itself: logits and prefix gradients with left padding, and ``generate``."""
    pytest.importorskip("peft")
    from .hf_models import assert_close_scaled, bank_grads, patched_twin, peft_grads, peft_twin, random_batch

    model = family_model(family)
    peft_model = peft_twin(model, "CAUSAL_LM", num_virtual_tokens=4)
    ours, bank = patched_twin(model, peft_model)
    input_ids, mask = random_batch(3, 7, padding="left", seed=2)
    real = mask.bool()
    expected = peft_model(input_ids=input_ids, attention_mask=mask).logits
    actual = ours(input_ids=input_ids, attention_mask=mask).logits
    assert_close_scaled(actual[real], expected[real], REFERENCE_REL, "logits")
    _weighted(expected[real]).backward()
    _weighted(actual[real]).backward()
    assert_close_scaled(bank_grads(bank)["embedding.weight"], peft_grads(peft_model)["embedding.weight"],
                        REFERENCE_REL, "prefix gradient")

    input_ids, mask = random_batch(3, 5, padding="left", seed=3)
    want = peft_model.generate(input_ids=input_ids, attention_mask=mask, **GENERATE)
    got = ours.generate(input_ids=input_ids, attention_mask=mask, **GENERATE)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(want.scores) == GENERATE["max_new_tokens"]
    for a, b in zip(got.scores, want.scores):
        assert_close_scaled(a, b, REFERENCE_REL, "scores")
    assert len(set(got.sequences[:, -GENERATE["max_new_tokens"]:].flatten().tolist())) > 1
