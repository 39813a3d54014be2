"""The op's eager path (a plain ``autograd.Function``) against the registered custom ops it stands in for.

In eager mode ``prefix_attention`` skips the dispatcher: the same forward and backward bodies run through an
``autograd.Function``. Both paths must give bit-identical outputs and gradients (same bodies, same order), and the
custom ops must still serve what needs the dispatcher: dispatch modes, fake tensors, ``torch.compile``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ptv2_kernels import backends, ops, prefix_attention

B, HQ, HKV, NQ, NK, D, P, T = 2, 4, 2, 5, 7, 8, 3, 3


def _inputs(case, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    bank = (HKV, P, D) if case == "plain" else (T, HKV, P, D)
    tensors = [randn(B, HQ, NQ, D), randn(B, HKV, NK, D), randn(B, HKV, NK, D), randn(*bank), randn(*bank)]
    options = {}
    if case == "bank":
        options = dict(prefix_index=torch.tensor([2, 0]), prefix_lengths=torch.tensor([3, 1, 0]),
                       key_padding_mask=torch.tensor([[True] * NK, [True, True, False, False, False, True, True]]),
                       causal=True)
    elif case == "bias":
        options = dict(prefix_index=torch.tensor([1, 1]), attn_bias=randn(1, HQ, NQ, NK))
    elif case == "dropout":
        options = dict(prefix_index=torch.tensor([0, 2]), dropout_p=0.3)
    return tensors, options


def _run(tensors, options, backend):
    torch.manual_seed(11)  # the dropout seed
    out, lse = prefix_attention(*tensors, **options, return_lse=True, backend=backend)
    gen = torch.Generator().manual_seed(1)
    leaves = list(tensors) + [t for t in options.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad((out, lse), leaves, (torch.randn(out.shape, generator=gen),
                                                    torch.randn(lse.shape, generator=gen)))
    return out, lse, grads


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("case", ["plain", "bank", "bias", "dropout"])
def test_eager_path_equals_the_custom_op(monkeypatch, case, backend):
    tensors, options = _inputs(case)
    eager = _run(tensors, options, backend)
    monkeypatch.setattr(ops, "EAGER_PATH", False)
    custom = _run(tensors, options, backend)
    # native's math composition (dropout, a bias gradient) is recorded by autograd in eager mode: the same formulas
    # and dropout mask, summed in autograd's order, and for a bias without dropout in place of the op's fused
    # forward (float32 rounding apart)
    recorded = backend == "native" and case in ("bias", "dropout")
    for a, b in zip(eager[:2], custom[:2]):
        if recorded:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)
    assert len(eager[2]) == len(custom[2])
    for a, b, x in zip(eager[2], custom[2], tensors):
        # the custom op lays each gradient out as empty_like(input) (its fake implementation's promise); the eager
        # path returns the backend's layout, as autograd takes any other op's
        assert a.shape == b.shape
        if recorded:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)
        assert b.stride() == torch.empty_like(x).stride()


@pytest.mark.parametrize("case", ["bias", "dropout"])
def test_native_composition_is_recorded_by_autograd_in_eager_mode(case):
    """With dropout or a bias gradient, native's math composition runs under autograd in eager mode (no op node,
    no recomputation in its backward); without them the op's own node serves."""
    tensors, options = _inputs(case)
    out = prefix_attention(*tensors, **options, backend="native")
    assert out.grad_fn is not None and "EagerPrefixAttention" not in type(out.grad_fn).__name__
    assert out.transpose(1, 2).is_contiguous()  # the op's output layout
    plain, _ = _inputs("plain")
    assert type(prefix_attention(*plain, backend="native").grad_fn).__name__ == "_EagerPrefixAttentionBackward"


def test_eager_calls_take_the_light_path_and_the_others_the_custom_op():
    tensors, options = _inputs("plain")
    out = prefix_attention(*tensors)
    assert type(out.grad_fn).__name__ == "_EagerPrefixAttentionBackward"

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():  # a dispatch mode must see the op itself
        prefix_attention(*tensors).sum().backward()
    assert "ptv2_kernels.prefix_attention.default" in seen
    assert "ptv2_kernels.prefix_attention_backward.default" in seen


def test_fake_and_meta_tensors_go_through_the_custom_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, prefix = torch.empty(B, HQ, NQ, D), torch.empty(B, HKV, NK, D), torch.empty(HKV, P, D)
        out = prefix_attention(q, k, k, prefix, prefix, backend="reference")
        assert out.shape == q.shape
    meta = [t.to("meta") for t in (torch.empty(B, HQ, NQ, D), torch.empty(B, HKV, NK, D), torch.empty(HKV, P, D))]
    assert not ops._eager_path_serves(meta)


def test_no_unused_lse_gradient_is_materialized(monkeypatch):
    """Through either path, a loss on the output alone gives the backend no lse gradient (it would cost native an
    extra fused forward and backward per part)."""
    seen = []
    impl = backends.implementation("native")
    original = impl.backward

    def spy(grad_out, grad_lse, *args, **kwargs):
        seen.append(grad_lse)
        return original(grad_out, grad_lse, *args, **kwargs)

    monkeypatch.setattr(impl, "backward", spy)
    tensors, _ = _inputs("plain")
    for eager in (True, False):
        monkeypatch.setattr(ops, "EAGER_PATH", eager)
        prefix_attention(*tensors, backend="native").sum().backward()
    assert seen == [None, None]


@pytest.mark.parametrize("eager", [True, False])
def test_double_backward_is_refused(monkeypatch, eager):
    """The backward is not differentiable: a second derivative raises, through either path, never a wrong value."""
    monkeypatch.setattr(ops, "EAGER_PATH", eager)
    tensors, _ = _inputs("plain", dtype=torch.float64)
    out = prefix_attention(*tensors, backend="reference")
    (grad_q,) = torch.autograd.grad(out.square().sum(), tensors[0], create_graph=True)
    with pytest.raises(RuntimeError):
        grad_q.sum().backward()


@pytest.mark.parametrize("case", ["plain", "bank", "bias"])
def test_calls_without_gradients_equal_the_custom_op(monkeypatch, case):
    """Under no_grad (and for inputs that need no gradient) the eager path builds no autograd node at all."""
    tensors, options = _inputs(case)
    with torch.no_grad():
        eager = prefix_attention(*tensors, **options, return_lse=True, backend="native")
        monkeypatch.setattr(ops, "EAGER_PATH", False)
        custom = prefix_attention(*tensors, **options, return_lse=True, backend="native")
    assert eager[0].grad_fn is None and not eager[0].requires_grad
    assert all(torch.equal(a, b) for a, b in zip(eager, custom))


@pytest.mark.parametrize("eager", [True, False])
def test_deterministic_default_follows_torch_and_the_environment(monkeypatch, eager):
    """deterministic=None reaches the backward as torch's deterministic mode or PTV2_DETERMINISTIC=1 says, through
    either path; an explicit value wins. (The environment is read only where a gradient can be asked for.)"""
    seen = []
    impl = backends.implementation("native")
    original = impl.backward

    def spy(*args, **kwargs):
        seen.append(args[2].deterministic)  # backward(grad_out, grad_lse, call, out, lse, ...)
        return original(*args, **kwargs)

    monkeypatch.setattr(impl, "backward", spy)
    monkeypatch.setattr(ops, "EAGER_PATH", eager)
    tensors, _ = _inputs("plain")

    def backward_with(**options):
        prefix_attention(*tensors, backend="native", **options).sum().backward()
        return seen.pop()

    monkeypatch.delenv("PTV2_DETERMINISTIC", raising=False)
    assert backward_with() is False
    assert backward_with(deterministic=True) is True
    for value, expected in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("PTV2_DETERMINISTIC", value)
        assert backward_with() is expected
    assert backward_with(deterministic=False) is False
    monkeypatch.delenv("PTV2_DETERMINISTIC")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert backward_with() is True
    finally:
        torch.use_deterministic_algorithms(was)
