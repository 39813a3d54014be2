"""The native backend (torch's fused CPU attention over the prefix and the sequence, merged by log-sum-exp) against
the float64 reference: the shared grid of the kernel backends, the cases it must decline, and patched models."""

from __future__ import annotations

import pytest
import torch

from ptv2_kernels import backends, prefix_attention

from .hf_models import decoder_model, encoder_model, logits_of, loss_of, patch_with_random_bank, random_batch
from .test_triton_prefix_attention import (  # noqa: F401 - poison_uninitialized_memory is an autouse fixture
    GRID, Case, assert_close_to_reference, check_against_reference, make_inputs, poison_uninitialized_memory,
    reference_results,
)

@pytest.fixture(autouse=True)
def cpu_inputs(monkeypatch):
    """The grid's inputs, made on the CPU whatever device the kernel tests use."""
    from . import test_triton_prefix_attention as kernel_tests

    monkeypatch.setattr(kernel_tests, "DEVICE", "cpu")


@pytest.mark.parametrize("case, dtype", GRID)
def test_matches_reference(case, dtype):
    """The kernel backends' grid: masks, causal with Nq != Nk, GQA, banks with indices and lengths (strided and
    stride-0 index layouts), layouts, head dims, P = 0; lse and its gradient included."""
    check_against_reference(case, dtype, backend="native")


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


@pytest.mark.parametrize("call, reason", [
    (dict(dropout_p=0.1), "no dropout"),
    (dict(attn_bias=torch.zeros(1, 1, 3, 5, requires_grad=True)), "no gradient for an additive score bias"),
    (dict(attn_mask=torch.zeros(3, 5, requires_grad=True)), "no gradient for an additive score bias"),
], ids=["dropout", "bias-grad", "float-mask-grad"])
def test_declines_what_the_fused_kernel_cannot_do_and_auto_falls_back(call, reason):
    tensors = _small()
    with pytest.raises(ValueError, match=f"backend='native' cannot serve this call: .*{reason}"):
        prefix_attention(*tensors, **call, backend="native")
    q, k, _, prefix_k, _ = tensors
    bias = call.get("attn_bias", call.get("attn_mask"))
    assert backends.choose("auto", q, k, prefix_k[None], call.get("dropout_p", 0.0), bias,
                           bias_grad=bias is not None) == "reference"
    prefix_attention(*tensors, **call)  # auto serves it (with the reference)


def test_auto_takes_native_on_cpu():
    q, k, _, prefix_k, _ = _small()
    assert backends.choose("auto", q, k, prefix_k[None]) == "native"
    with torch.no_grad():  # a bias that requires grad needs none without autograd
        bias = torch.zeros(1, 1, 3, 5, requires_grad=True)
        out = prefix_attention(*_small(), attn_bias=bias)
    torch.testing.assert_close(out, prefix_attention(*_small(), backend="reference"))


def test_writes_nothing_of_the_concatenated_size():
    """No tensor of [B, H, P + Nk, D] (a concatenation of prefix and sequence keys) is made, fwd or bwd."""
    from torch.utils._python_dispatch import TorchDispatchMode

    B, H, N, D, P = 2, 4, 24, 8, 6

    class Shapes(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor):
                    Shapes.seen.append(tuple(t.shape))
            return result

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen).requires_grad_() for _ in range(3))
    prefix_k, prefix_v = (torch.randn(H, P, D, generator=gen).requires_grad_() for _ in range(2))
    with Shapes():
        out = prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, backend="native")
        out.sum().backward()
    assert all(shape[-2:] != (P + N, D) for shape in Shapes.seen)


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
