"""The native backend (torch's fused CPU attention over the prefix and the sequence, merged by log-sum-exp) against
the float64 reference: the shared grid of the kernel backends, dropout and the bias gradient (by torch's math
composition per part), what it declines, and patched models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptv2_kernels import backends, native, prefix_attention
from ptv2_kernels.call import Call

from . import kernel_cases
from .hf_models import (ShapeRecorder, decoder_model, encoder_model, logits_of, loss_of, patch_with_random_bank,
                        random_batch)
from .kernel_cases import (  # noqa: F401 - poison_uninitialized_memory is an autouse fixture
    GRID, Case, assert_close_to_reference, backend_mask, check_against_reference, make_inputs,
    poison_uninitialized_memory, reference_results,
)

@pytest.fixture(autouse=True)
def cpu_inputs(monkeypatch):
    """The grid's inputs, made on the CPU whatever device the kernel tests use (the helpers read
    kernel_cases.DEVICE when they run)."""
    monkeypatch.setattr(kernel_cases, "DEVICE", "cpu")


@pytest.mark.parametrize("case, dtype", GRID)
def test_matches_reference(case, dtype):
    """The kernel backends' grid: masks, causal with Nq != Nk, GQA, banks with indices and lengths (strided and
    stride-0 index layouts), layouts, head dims, P = 0; lse and its gradient included."""
    check_against_reference(case, dtype, backend="native")


needs_compiled_path = pytest.mark.skipif(native._compiled is None, reason=native.host_path())

# The common call (no dropout, no bias or lse gradient) with its compiled forward and backward: a model's training
# step, where only out carries a gradient. The grid's cases, edge cases and the other dtypes.
WITHOUT_LSE_GRAD = GRID + [
    pytest.param(Case(q_len=11, k_len=5, causal=True, num_prefixes=2, lengths=True), torch.float32,
                 id="causal-more-queries"),
    pytest.param(Case(prefix_len=4, mask="padding", causal=True, q_len=6, k_len=6, num_prefixes=3, lengths=True,
                      prefix_dtype=torch.float32), torch.float16, id="float32-bank-float16-q"),
    pytest.param(Case(num_prefixes=3, lengths=True, mask="padding", causal=True), torch.float64, id="float64"),
    pytest.param(Case(num_prefixes=3, lengths=True, mask="dense", q_len=1), torch.bfloat16, id="bfloat16-decode"),
    pytest.param(Case(mask="sdpa_float", causal=True, q_len=9, k_len=13), torch.float32, id="float-mask"),
    # a shared prefix over queries laid out as a model's projections ([B, N, H, D]): the batch's rows in one call
    pytest.param(Case(batch=3, layout="bnhd", mask="padding", q_len=24, k_len=24, head_dim=16, prefix_len=8),
                 torch.float32, id="shared-prefix-batch-rows"),
    pytest.param(Case(batch=3, q_heads=8, kv_heads=2, layout="bnhd", causal=True, q_len=1, k_len=30,
                      prefix_layout="shared3d"), torch.float64, id="shared-prefix-batch-rows-decode-gqa"),
    pytest.param(Case(layout="packed", prefix_layout="strided", num_prefixes=2, index_layout="expanded", q_len=24,
                      k_len=24),
                 torch.float32, id="packed-strided"),
]


@pytest.fixture(params=["direct", "fused"])
def compiled_pass(request):
    """The compiled forward's two ways: one direct pass over both key sets (small problems, the grid's), or the
    two fused calls merged (forced here, as for larger problems)."""
    yield from _compiled_forward_pass(request.param)


def _compiled_forward_pass(which):
    if native._compiled is None:
        pytest.skip(native.host_path())
    module = native._compiled  # (the test may switch native's use of it off)
    limit = module.direct_work_limit()
    module.set_direct_work_limit(2**62 if which == "direct" else 0)
    yield which
    module.set_direct_work_limit(limit)


@pytest.fixture(params=["installed", "fused"])
def forward_pass(request):
    """The forward as installed (the compiled direct pass for the grid's small problems, or the Python path where
    the extension is not built), or the compiled fused calls (forced)."""
    if request.param == "installed":
        yield request.param
        return
    yield from _compiled_forward_pass(request.param)


def _out_grad_run(inputs, kwargs, seed=1):
    """(out, grads of q, k, v, prefix_k, prefix_v) with a loss on out alone, through the native backend."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = prefix_attention(*leaves, **kwargs, backend="native")
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    return out, torch.autograd.grad(out, leaves, grad_out), grad_out


@pytest.mark.parametrize("case, dtype", WITHOUT_LSE_GRAD)
def test_gradient_of_out_alone_matches_reference(case, dtype, forward_pass):
    """The call a model makes, forward and backward, against the float64 oracle (the compiled path where it is
    built: the grid's other tests give lse a gradient too, which the Python path serves)."""
    inputs, kwargs = make_inputs(case, dtype)
    out, grads, grad_out = _out_grad_run(inputs, kwargs)
    assert out.transpose(1, 2).is_contiguous() and out.dtype == dtype
    upstream = (grad_out, torch.zeros(out.shape[:3]))
    oracle = reference_results(inputs, kwargs, upstream, torch.float64)
    same_precision = reference_results(inputs, kwargs, upstream, dtype)
    assert_close_to_reference("out", out, oracle[0], same_precision[0], dtype)
    for name, grad, leaf, want, pt in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v"], grads, inputs, oracle[2],
                                          same_precision[2]):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
        assert_close_to_reference(name, grad, want, pt, min(dtype, grad.dtype, key=lambda d: torch.finfo(d).bits))


@pytest.mark.parametrize("case, dtype", WITHOUT_LSE_GRAD)
def test_compiled_path_equals_the_python_path(case, dtype, compiled_pass, monkeypatch):
    """The C++ path computes the Python path's formulas: on small problems in one direct pass over both key sets
    (scores, softmax and output in float32, float64 for float64), else by the same fused calls and the same merge
    formula; the backward by the same fused backwards. The two differ by the rounding of the scores and of the
    merge's last operations: a few ulps of q's dtype (for float16/bfloat16 the fused kernel's scores are less
    exact than float32's, by about 3e-5 of a bfloat16 lse, which bounds lse by q's dtype too), once more in the
    gradients (through the saved out)."""
    inputs, kwargs = make_inputs(case, dtype)
    compiled = _out_grad_run(inputs, kwargs)
    compiled_lse = prefix_attention(*inputs, **kwargs, backend="native", return_lse=True)[1]
    monkeypatch.setattr(native, "_compiled", None)
    python = _out_grad_run(inputs, kwargs)
    python_lse = prefix_attention(*inputs, **kwargs, backend="native", return_lse=True)[1]
    ulps = 4 * torch.finfo(dtype).eps
    assert torch.equal(torch.isneginf(compiled_lse), torch.isneginf(python_lse))
    seen = torch.isfinite(python_lse)
    lse_scale = max(1.0, python_lse[seen].abs().max().item()) if seen.any() else 1.0
    torch.testing.assert_close(compiled_lse, python_lse, rtol=ulps, atol=ulps * lse_scale)
    for name, got, want in zip(["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"], [compiled[0], *compiled[1]],
                               [python[0], *python[1]]):
        scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        torch.testing.assert_close(got, want, rtol=ulps, atol=ulps * scale, msg=name)


@needs_compiled_path
def test_compiled_path_is_what_the_common_call_runs(monkeypatch):
    """A model's call (no dropout, out's gradient alone) runs the C++ forward and backward; dropout and an lse
    gradient run the Python path."""
    calls = []
    monkeypatch.setattr(native, "_compiled", _Recording(native._compiled, calls))
    inputs, kwargs = make_inputs(Case(num_prefixes=2, lengths=True, mask="padding"), torch.float32)
    out, _, _ = _out_grad_run(inputs, kwargs)
    assert calls == ["forward", "backward"]
    calls.clear()
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out, lse = prefix_attention(*leaves, **kwargs, backend="native", return_lse=True)
    (out.sum() + lse.sum()).backward()
    assert calls == ["forward"]  # the lse's gradient: the Python backward
    calls.clear()
    prefix_attention(*leaves, **kwargs, backend="native", dropout_p=0.3).sum().backward()
    assert calls == []
    monkeypatch.undo()
    assert native.host_path() == "C++ (ptv2_kernels._native)"


class _Recording:
    """The compiled module, recording which of its functions run."""

    def __init__(self, module, calls):
        self._module, self._calls = module, calls

    def __getattr__(self, name):
        function = getattr(self._module, name)

        def recorded(*args):
            self._calls.append(name)
            return function(*args)
        return recorded


@pytest.mark.parametrize("mask", ["sdpa_bool", "sdpa_float", "padding_dense", "dense_heads"])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_masks(mask, causal):
    check_against_reference(Case(mask=mask, num_prefixes=2, causal=causal, q_len=9, k_len=13), torch.float32,
                            backend="native")


@pytest.mark.parametrize("case", [
    Case(q_len=11, k_len=5, causal=True, num_prefixes=2, lengths=True),  # causal rows before the keys see none
    Case(prefix_len=0, mask="padding", causal=True, q_len=6, k_len=6),  # sample 0 sees no key at all
    Case(k_len=0, q_len=4, num_prefixes=3, lengths=True),  # the prefix alone
    Case(batch=0),
    Case(q_len=0),
], ids=["causal-more-queries", "no-key-at-all", "prefix-only", "empty-batch", "no-queries"])
def test_edge_cases(case):
    check_against_reference(case, torch.float32, backend="native")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(dtype):
    """float64 (the reference's own precision) and bfloat16, which the fused CPU kernel computes right."""
    check_against_reference(Case(num_prefixes=3, lengths=True, mask="padding", causal=True), dtype,
                            backend="native")


@pytest.mark.parametrize("bias", ["heads", "shared"])
def test_bias_without_gradient(bias):
    """An additive bias that needs no gradient (T5's position bias in a frozen model) is served."""
    case = Case(bias=bias, num_prefixes=2, lengths=True, mask="padding", causal=True)
    inputs, kwargs = make_inputs(case, torch.float32)
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out, lse = prefix_attention(*leaves, **kwargs, return_lse=True, backend="native")
    gen = torch.Generator().manual_seed(1)
    upstream = (torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen))
    grads = torch.autograd.grad([out, lse], leaves, upstream)
    oracle = reference_results(inputs, kwargs, upstream, torch.float64)
    same_precision = reference_results(inputs, kwargs, upstream, torch.float32)
    assert_close_to_reference("out", out, oracle[0], same_precision[0], torch.float32)
    for name, grad, want, pt in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, oracle[2],
                                    same_precision[2]):
        assert_close_to_reference(name, grad, want, pt, torch.float32)


def _small():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, generator=gen)
    k = torch.randn(2, 2, 5, 8, generator=gen)
    return q, k, k.clone(), torch.randn(2, 4, 8, generator=gen), torch.randn(2, 4, 8, generator=gen)


def _native_dropout_run(case, dropout_p, seed_value, grad_lse=False):
    """The backend's forward and backward with dropout called directly, and the keep mask the reference draws from
    the same seed (``[B, Hq, Nq, P + Nk]``, prefix columns first)."""
    import math

    from ptv2_kernels import native

    inputs, kwargs = make_inputs(case, torch.float32)
    args = [t.detach() for t in inputs]
    if args[3].dim() == 3:
        args[3], args[4] = args[3].unsqueeze(0), args[4].unsqueeze(0)
    seed = torch.tensor(seed_value, dtype=torch.int64)
    mask, scale = backend_mask(kwargs), 1.0 / math.sqrt(case.head_dim)
    call = Call(*args, kwargs.get("prefix_index"), kwargs.get("prefix_lengths"), mask, None, seed, case.causal, scale,
                dropout_p)
    out, lse = native.forward(call)
    gen = torch.Generator().manual_seed(7)
    upstream = (torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen) if grad_lse else None)
    grads = native.backward(*upstream, call, out, lse)
    drawn = torch.Generator().manual_seed(seed_value)
    keep = torch.rand(case.batch, case.q_heads, case.q_len, case.prefix_len + case.k_len, generator=drawn) >= dropout_p
    return args, kwargs, upstream, (out, lse), grads, keep


@pytest.mark.parametrize("case", [Case(num_prefixes=3, lengths=True, mask="padding", causal=True),
                                  Case(q_len=1, k_len=30, prefix_len=16, q_heads=4, kv_heads=1),
                                  Case(q_len=7, k_len=20, q_heads=6, kv_heads=2, mask="dense_heads", causal=True),
                                  Case(q_len=6, k_len=6, causal=True, num_prefixes=2, index_layout="expanded"),
                                  Case(k_len=0, q_len=4, num_prefixes=2, lengths=True)],
                         ids=["bank-padding-causal", "decode-mqa", "gqa-dense-causal", "square-causal",
                              "prefix-only"])
@pytest.mark.parametrize("grad_lse", [False, True], ids=["out", "out+lse"])
def test_dropout_matches_reference_with_the_same_mask(case, grad_lse):
    """Forward and every gradient equal the reference run with the keep mask drawn from the call's seed."""
    dropout_p = 0.25
    args, kwargs, upstream, (out, lse), grads, keep = _native_dropout_run(case, dropout_p, 1234, grad_lse)
    oracle = reference_results(args, kwargs, upstream, torch.float64, keep, dropout_p)
    same_precision = reference_results(args, kwargs, upstream, torch.float32, keep, dropout_p)
    assert_close_to_reference("out", out, oracle[0], same_precision[0], torch.float32)
    assert_close_to_reference("lse", lse, oracle[1], same_precision[1], torch.float32)
    for name, grad, want, pt in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, oracle[2],
                                    same_precision[2]):
        assert_close_to_reference(name, grad, want, pt, torch.float32)


def test_dropout_through_the_op_equals_the_reference_backend_and_follows_torch_seed():
    case = Case(num_prefixes=2, lengths=True, mask="padding", q_heads=4, kv_heads=2)
    inputs, kwargs = make_inputs(case, torch.float32)

    def run(backend, seed):
        leaves = [t.detach().requires_grad_() for t in inputs]
        torch.manual_seed(seed)
        out = prefix_attention(*leaves, **kwargs, dropout_p=0.3, backend=backend)
        return (out, *torch.autograd.grad(out.square().sum(), leaves))

    native, again, other = run("native", 5), run("native", 5), run("native", 6)
    assert all(torch.equal(a, b) for a, b in zip(native, again))
    assert not torch.equal(native[0], other[0])
    for got, want in zip(native, run("reference", 5)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)  # one float32 computation against another


@pytest.mark.parametrize("bias", ["heads", "shared"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_bias_gradient(bias, dropout_p):
    """An additive bias that requires its gradient (T5's trained position bias, a float attn_mask with grad):
    the gradient of the sequence part's scores, summed over what the bias broadcasts along, as the reference's."""
    case = Case(bias=bias, num_prefixes=2, lengths=True, mask="padding", causal=True, q_heads=4, kv_heads=2)
    inputs, kwargs = make_inputs(case, torch.float32)
    leaves = [t.detach().requires_grad_() for t in inputs]
    bias_leaf = kwargs["attn_bias"].detach().requires_grad_()

    def run(backend):
        torch.manual_seed(3)
        options = dict(kwargs, attn_bias=bias_leaf)
        out, lse = prefix_attention(*leaves, **options, return_lse=True, backend=backend, dropout_p=dropout_p)
        gen = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=gen)).sum() + (lse * torch.randn(lse.shape, generator=gen)).sum()
        return (out, lse, *torch.autograd.grad(loss, [*leaves, bias_leaf]))

    assert backends.choose("auto", leaves[0], leaves[1], leaves[3], dropout_p, bias_leaf, bias_grad=True) == "native"
    got, want = run("native"), run("reference")
    assert got[-1].shape == bias_leaf.shape
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)  # both float32 computations of the same math


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 3]),
    q_len=st.integers(1, 24), k_len=st.integers(0, 24), head_dim=st.sampled_from([8, 16, 40]),
    num_prefixes=st.integers(1, 3), prefix_len=st.integers(0, 9), lengths=st.booleans(),
    mask=st.sampled_from(["none", "padding", "dense", "dense_heads", "padding_dense", "sdpa_float"]),
    causal=st.booleans(), bias=st.sampled_from(["none", "heads", "shared"]), dropout_p=st.sampled_from([0.0, 0.2]),
    window=st.sampled_from([None, (2, 0), (3, 1)]), layout=st.sampled_from(["bhnd", "bnhd"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_the_reference_backend(batch, kv_heads, group, q_len, k_len, head_dim, num_prefixes,
                                            prefix_len, lengths, mask, causal, bias, dropout_p, window, layout,
                                            seed):
    """Random valid calls through the op, fwd and every gradient (lse's and a bias's included), native against
    the reference backend with the same seed (so the same dropout mask): both float32 computations of the same
    math. Rows that see no key, prefix-only and sequence-only calls occur among them."""
    case = Case(batch=batch, q_heads=kv_heads * group, kv_heads=kv_heads, q_len=q_len, k_len=k_len,
                head_dim=head_dim, num_prefixes=num_prefixes, prefix_len=prefix_len, lengths=lengths,
                mask=mask if k_len else "none", causal=causal, bias=bias if k_len else "none",
                window=window if k_len else None, layout=layout,
                prefix_layout="shared3d" if num_prefixes == 1 else "bank")
    inputs, kwargs = make_inputs(case, torch.float32, seed)
    leaves = [t.detach().requires_grad_() for t in inputs]
    if kwargs.get("attn_bias") is not None:
        kwargs["attn_bias"] = kwargs["attn_bias"].detach().requires_grad_()
        leaves.append(kwargs["attn_bias"])

    def run(backend):
        torch.manual_seed(seed)
        out, lse = prefix_attention(*leaves[:5], **kwargs, return_lse=True, backend=backend, dropout_p=dropout_p)
        gen = torch.Generator().manual_seed(seed + 1)
        seen = torch.isfinite(lse)
        loss = (out * torch.randn(out.shape, generator=gen)).sum() + (lse[seen] * 0.5).sum()
        return (out, lse, *torch.autograd.grad(loss, leaves, allow_unused=True))

    got, want = run("native"), run("reference")
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v", "dbias"], got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=3e-5, rtol=3e-5, msg=lambda m: f"{name}: {m}")


def test_float_mask_gradient_and_auto():
    tensors = _small()
    mask = torch.randn(3, 5).requires_grad_()
    out = prefix_attention(*tensors, attn_mask=mask, backend="native")
    (grad,) = torch.autograd.grad(out.sum(), mask)
    mask_again = mask.detach().requires_grad_()
    (want,) = torch.autograd.grad(prefix_attention(*tensors, attn_mask=mask_again, backend="reference").sum(),
                                  mask_again)
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)


def test_declines_other_devices_and_dtypes():
    q, k, _, prefix_k, _ = _small()
    assert "got tensors on meta" in backends.unsupported_reason("native", q.to("meta"), k.to("meta"),
                                                               prefix_k.to("meta"))
    assert "dtype" in backends.unsupported_reason("native", q.to(torch.int32), k, prefix_k)


def test_auto_takes_native_on_cpu():
    q, k, _, prefix_k, _ = _small()
    assert backends.choose("auto", q, k, prefix_k[None]) == "native"
    with torch.no_grad():  # a bias that requires grad needs none without autograd
        bias = torch.zeros(1, 1, 3, 5, requires_grad=True)
        out = prefix_attention(*_small(), attn_bias=bias)
    torch.testing.assert_close(out, prefix_attention(*_small(), backend="reference"))


def test_writes_nothing_of_the_concatenated_size():
    """No tensor of [B, H, P + Nk, D] (a concatenation of prefix and sequence keys) is made, fwd or bwd."""
    B, H, N, D, P = 2, 4, 24, 8, 6

    from ptv2_kernels import native

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    prefix_k, prefix_v = (torch.randn(1, H, P, D, generator=gen) for _ in range(2))
    grad_out, grad_lse = torch.randn(B, H, N, D, generator=gen), torch.randn(B, H, N, generator=gen)
    scale = D ** -0.5
    # The backend's own functions, so that the mode sees every op inside them (it would see the op as one call).
    for dropout_p, seed in ((0.0, None), (0.1, torch.tensor(3))):
        with ShapeRecorder() as shapes:
            call = Call(q, k, v, prefix_k, prefix_v, seed=seed, causal=True, scale=scale, dropout_p=dropout_p)
            out, lse = native.forward(call)
            native.backward(grad_out, grad_lse, call, out, lse)
        assert len(shapes.seen) > 10  # the backend's ops were seen
        assert all(shape[-2:] != (P + N, D) for shape in shapes.seen)


def test_masks_derived_once_follow_in_place_writes():
    """What the parts derive from a key-padding mask and from prefix_lengths is remembered across calls (every
    layer gets the same tensors); an in-place write to either is seen, and an all-visible mask equals none."""
    gen = torch.Generator().manual_seed(0)
    B, H, N, D, P = 3, 2, 7, 8, 5
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    prefix_k, prefix_v = (torch.randn(2, H, P, D, generator=gen) for _ in range(2))
    index, lengths = torch.tensor([0, 1, 1]), torch.tensor([5, 2])
    mask = torch.ones(B, N, dtype=torch.bool)

    def both():
        kwargs = dict(prefix_index=index, prefix_lengths=lengths, key_padding_mask=mask)
        return (prefix_attention(q, k, v, prefix_k, prefix_v, backend="native", **kwargs),
                prefix_attention(q, k, v, prefix_k, prefix_v, backend="reference", **kwargs))

    for change in (None, lambda: mask[1, 2:].fill_(False), lambda: lengths.fill_(0), lambda: mask.fill_(True),
                   lambda: lengths.copy_(torch.tensor([1, 4]))):
        if change is not None:
            change()
        for _ in range(2):  # derived, then remembered
            got, want = both()
            torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    unmasked = prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index=index, prefix_lengths=lengths,
                                backend="native")
    torch.testing.assert_close(both()[0], unmasked, atol=0, rtol=0)
    # a view made afresh for each call, as a model's attention takes mask[:, 0] of its [B, 1, Nk] mask
    base = torch.ones(B, 2, N, dtype=torch.bool)
    for change in (None, lambda: base[:, 0, 3:].fill_(False), lambda: base[:, 1].fill_(False)):
        if change is not None:
            change()
        for row in (0, 0, 1):
            got = prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index=index, key_padding_mask=base[:, row],
                                   backend="native")
            want = prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index=index, key_padding_mask=base[:, row],
                                    backend="reference")
            torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


# ----------------------------------------------------------------------------------------------------------------
# Patched models: native against the reference backend
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, kind", [("bert", "encoder"), ("llama", "decoder"), ("gpt2", "decoder")])
def test_patched_model_matches_the_reference_backend(family, kind):
    results = {}
    for backend in ("native", "reference"):
        model = encoder_model(family, "seq_cls") if kind == "encoder" else decoder_model(family)
        model.eval()
        patch_with_random_bank(model, [3, 2], std=1.0, backend=backend)
        input_ids, mask = random_batch(3, 7, padding="right" if kind == "encoder" else "left", seed=3)
        out = model(input_ids=input_ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 1]))
        loss_of(out).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and "ptv2_prefix" in n}
        assert grads, "the prefix gets gradients"
        results[backend] = (logits_of(out).detach(), grads)
    torch.testing.assert_close(results["native"][0], results["reference"][0], rtol=1e-4, atol=1e-5)
    for name, grad in results["reference"][1].items():
        torch.testing.assert_close(results["native"][1][name], grad, rtol=1e-4, atol=1e-5)


def test_patched_decoder_generates_the_reference_backends_tokens():
    tokens = {}
    for backend in ("native", "reference"):
        model = decoder_model("llama")
        patch_with_random_bank(model, [2, 4], std=1.0, backend=backend)
        input_ids, mask = random_batch(2, 5, padding="left", seed=6)
        tokens[backend] = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=torch.tensor([1, 0]),
                                         max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert torch.equal(tokens["native"], tokens["reference"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_that_see_no_key_of_either_part(dtype, forward_pass):
    """Sample 1's entry has no prefix key and its padding hides every sequence key: out 0, lse -inf, gradients
    finite and zero for it; sample 0 sees both parts (the compiled direct pass and fused calls alike)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 3, 16, generator=gen).to(dtype) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    bank_k, bank_v = (torch.randn(2, 2, 5, 16, generator=gen).to(dtype) for _ in range(2))
    index, lengths = torch.tensor([0, 1]), torch.tensor([5, 0])
    padding = torch.tensor([[True, False, True], [False, False, False]])
    leaves = [t.requires_grad_(True) for t in (q, k, v, bank_k, bank_v)]
    out, lse = prefix_attention(*leaves, prefix_index=index, prefix_lengths=lengths, key_padding_mask=padding,
                                backend="native", return_lse=True)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][1] == 0).all()
    oracle = prefix_attention(*(t.detach().double() for t in leaves), prefix_index=index, prefix_lengths=lengths,
                              key_padding_mask=padding, backend="reference")
    torch.testing.assert_close(out.double(), oracle, rtol=0, atol=8 * torch.finfo(dtype).eps)
