"""``window_size=(left, right)``: sliding-window attention without a dense mask (docs/design.md §4.4).

Sequence key j is visible to query i iff ``i + Nk - Nq - left <= j <= i + Nk - Nq + right`` (-1: unbounded on that
side); the prefix keys are not subject to it.

(a) the oracle: the window as a hand-built bool mask; its hand-written backward against autograd;
(b) the op on each backend that serves it (Triton in its CPU interpreter without a GPU, native, the reference)
    against the float64 oracle with the bounds of tests/kernel_cases.py, over windows (3, 0), (5, 2), (0, 0),
    (-1, 4), (7, -1), (-1, -1), causal or not, Nq < Nk, Nq > Nk, decode, square, masks, biases, GQA (packed decode
    rows, split keys), banks, P = 0, rows that see no key, fp16/fp32; equality with the same call given the window
    as a dense bool attn_mask; bitwise-reproducible deterministic gradients; packed sequences
    (``prefix_attention_varlen``, the window aligned per sequence);
(c) errors naming the argument, the cuda backend's refusal, opcheck and torch.compile.
"""

from __future__ import annotations

import pytest
import torch

from ptv2_kernels import backends, prefix_attention, prefix_attention_varlen
from ptv2_kernels.reference import attention_ref, attention_ref_backward, attention_ref_varlen

from .conftest import DEVICE
from .kernel_cases import (  # noqa: F401 - poison_uninitialized_memory is an autouse fixture
    Case, check_against_reference, force_kv_splits, make_inputs, needs_triton, poison_uninitialized_memory,
    run_backend, small_float64_problem,
)

WINDOWS = [(3, 0), (5, 2), (0, 0), (-1, 4), (7, -1), (-1, -1)]
BACKENDS = [pytest.param("triton", marks=needs_triton), "native", "reference"]


def window_mask(q_len, k_len, window, causal=False):
    """The window (and causality) as a bool ``[Nq, Nk]`` mask, True = attend, written out by the rule."""
    left, right = window
    position = torch.arange(q_len)[:, None] + (k_len - q_len)
    cols = torch.arange(k_len)[None, :]
    visible = torch.ones(q_len, k_len, dtype=torch.bool)
    if left >= 0:
        visible &= cols >= position - left
    if right >= 0:
        visible &= cols <= position + right
    if causal:
        visible &= cols <= position
    return visible.to(DEVICE)


# ----------------------------------------------------------------------------------------------------------------
# (a) the oracle
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_window_is_the_mask_written_out(window, causal):
    (q, k, v, prefix_k, prefix_v), gen = small_float64_problem(Nq=5, Nk=9)
    options = dict(prefix_index=torch.tensor([1, 0]), prefix_lengths=torch.tensor([3, 1]), causal=causal)
    got = attention_ref(q, k, v, prefix_k, prefix_v, **options, window_size=window)
    want = attention_ref(q, k, v, prefix_k, prefix_v, **options, attn_mask=window_mask(5, 9, window).cpu())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_backward_matches_autograd():
    (q, k, v, prefix_k, prefix_v), gen = small_float64_problem(Nq=6, Nk=8)
    options = dict(prefix_index=torch.tensor([1, 0]), prefix_lengths=torch.tensor([3, 0]),
                   key_padding_mask=torch.rand(2, 8, generator=gen) > 0.3, window_size=(2, 1))
    leaves = [t.requires_grad_() for t in (q, k, v, prefix_k, prefix_v)]
    out, lse = attention_ref(*leaves, **options)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse).masked_fill(torch.isinf(lse), 0.0)
    want = torch.autograd.grad([out, lse.masked_fill(torch.isinf(lse), 0.0)], leaves, [grad_out, grad_lse])
    got = attention_ref_backward(grad_out, grad_lse, *[t.detach() for t in leaves], **options)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# (b) the op against the float64 oracle
# ----------------------------------------------------------------------------------------------------------------

SHAPES = [(19, 37), (37, 19), (1, 33), (24, 24)]  # Nq < Nk, Nq > Nk (causal: rows that see no key), decode, square
MASKS = ["none", "padding", "padding_dense", "dense_heads"]
GRID = []
for number, (window, causal) in enumerate((w, c) for w in WINDOWS for c in (False, True)):
    q_len, k_len = SHAPES[number % len(SHAPES)]
    case = Case(q_len=q_len, k_len=k_len, window=window, causal=causal, mask=MASKS[(number // 2) % len(MASKS)],
                q_heads=4, kv_heads=(2, 1, 4)[number % 3], prefix_len=(0, 7, 3)[number % 3],
                num_prefixes=(1, 3)[number % 2], lengths=number % 2 == 1, head_dim=16)
    dtype = (torch.float32, torch.float16)[number % 2]
    GRID.append(pytest.param(case, dtype, id=f"{window[0]}_{window[1]}-{'causal' if causal else 'full'}-"
                             f"{q_len}x{k_len}-{case.mask}-P{case.prefix_len}-{str(dtype)[6:]}"))
GRID += [
    pytest.param(Case(window=(4, 3), bias="heads", prefix_bias="shared", mask="padding", num_prefixes=2,
                      lengths=True, head_dim=16), torch.float32, id="both-biases-bank"),
    pytest.param(Case(window=(2, 0), causal=True, q_len=37, k_len=19, prefix_len=0, head_dim=16), torch.float32,
                 id="no-prefix-rows-that-see-no-key"),
    pytest.param(Case(window=(5, 1), q_len=3, k_len=40, q_heads=8, kv_heads=2, num_prefixes=3, lengths=True,
                      mask="padding", head_dim=16), torch.float16, id="decode-packed-gqa"),
    pytest.param(Case(window=(9, 2), softcap=2.0, sinks=True, causal=True, head_dim=16), torch.float32,
                 id="softcap-sinks"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, dtype", GRID)
def test_op_matches_the_oracle(case, dtype, backend):
    if backend == "native" and (case.prefix_bias != "none" or case.softcap is not None or case.sinks):
        pytest.skip("native serves no prefix_bias, softcap or sinks")
    check_against_reference(case, dtype, deterministic=case.causal, backend=backend)


@needs_triton
@pytest.mark.parametrize("window", [(6, 0), (-1, 3)])
def test_triton_split_kv_forward_keeps_the_window_in_each_split(window, monkeypatch):
    case = Case(window=window, q_len=2, k_len=70, q_heads=4, kv_heads=1, prefix_len=9, num_prefixes=2,
                lengths=True, head_dim=16)
    force_kv_splits(monkeypatch, case)
    check_against_reference(case, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_window_given_as_a_dense_mask(backend, causal):
    case = Case(q_len=21, k_len=45, window=(6, 3), causal=causal, mask="padding", num_prefixes=2, lengths=True,
                head_dim=16)
    inputs, kwargs = make_inputs(case, torch.float32)
    windowed = run_backend(inputs, kwargs, deterministic=True, backend=backend)
    dense = dict(kwargs, attn_mask=window_mask(case.q_len, case.k_len, case.window))
    del dense["window_size"]
    masked = run_backend(inputs, dense, deterministic=True, backend=backend)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v"],
                          (windowed[0], windowed[1], *windowed[2]), (masked[0], masked[1], *masked[2])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_window_is_unbounded_on_both_sides(backend):
    case = Case(q_len=9, k_len=20, mask="padding", head_dim=16)
    inputs, kwargs = make_inputs(case, torch.float32)
    unbounded = run_backend(inputs, dict(kwargs, window_size=(-1, -1)), deterministic=True, backend=backend)
    plain = run_backend(inputs, kwargs, deterministic=True, backend=backend)
    for a, b in zip((unbounded[0], unbounded[1], *unbounded[2]), (plain[0], plain[1], *plain[2])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_gradients_are_bitwise_reproducible(backend):
    case = Case(window=(4, 1), batch=3, num_prefixes=2, lengths=True, mask="padding", causal=True, head_dim=16)
    inputs, kwargs = make_inputs(case, torch.float32)
    first, second = (run_backend(inputs, kwargs, deterministic=True, backend=backend) for _ in range(2))
    for a, b in zip((first[0], first[1], *first[2]), (second[0], second[1], *second[2])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window, causal", [((3, 0), True), ((2, 5), False), ((-1, 1), False)])
def test_varlen_window_is_aligned_per_sequence(backend, window, causal):
    """Sequences of 5, 0, 23 and 3 queries over 9, 4, 23 and 3 keys (one of keys only, one longer than a block)."""
    gen = torch.Generator().manual_seed(0)
    lens_q, lens_k = (5, 0, 23, 3), (9, 4, 23, 3)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
                  for lens in (lens_q, lens_k))
    inputs = [torch.randn(*shape, generator=gen).to(DEVICE) for shape in
              ((sum(lens_q), 4, 16), (sum(lens_k), 2, 16), (sum(lens_k), 2, 16), (2, 2, 5, 16), (2, 2, 5, 16))]
    options = dict(prefix_index=torch.tensor([1, 0, 1, 0], device=DEVICE),
                   prefix_lengths=torch.tensor([5, 0], device=DEVICE), causal=causal, window_size=window)
    leaves = [t.clone().requires_grad_() for t in inputs]
    out, lse = prefix_attention_varlen(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), **options, return_lse=True,
                                       backend=backend)
    upstream = torch.randn(out.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad(out, leaves, upstream)
    oracle_leaves = [t.double().requires_grad_() for t in inputs]
    want, want_lse = attention_ref_varlen(*oracle_leaves, cu_q, cu_k, **options)
    want_grads = torch.autograd.grad(want, oracle_leaves, upstream.double())
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    for name, got, expected in zip(["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"], (out, *grads),
                                   (want, *want_grads)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# (c) errors, refusals, opcheck, compile
# ----------------------------------------------------------------------------------------------------------------

def _small_inputs():
    inputs, _ = make_inputs(Case(batch=2, q_heads=4, kv_heads=2, q_len=3, k_len=5, prefix_len=2, head_dim=8),
                            torch.float32)
    return inputs


@pytest.mark.parametrize("window_size", [(3,), (1, 2, 3), 4, "ab", (1.5, 0), (-2, 0), (0, -3), (True, 0),
                                         (torch.tensor(1), 0)])
def test_bad_window_size_raises_naming_the_argument(window_size):
    with pytest.raises(ValueError, match=r"window_size must be None or a pair \(left, right\) of ints >= -1"):
        prefix_attention(*_small_inputs(), window_size=window_size, backend="reference")


def test_a_list_is_a_pair():
    inputs = _small_inputs()
    torch.testing.assert_close(prefix_attention(*inputs, window_size=[1, 0], backend="reference"),
                               prefix_attention(*inputs, window_size=(1, 0), backend="reference"))


def test_the_cuda_backend_refuses_it_and_auto_falls_back():
    q, k, _, prefix_k, _ = _small_inputs()
    reasons = backends.score_option_reasons("cuda", window_size=(2, 0))
    assert len(reasons) == 1 and "(window_size)" in reasons[0] and "triton" in reasons[0]
    for name in ("triton", "native", "reference"):
        assert backends.score_option_reasons(name, window_size=(2, 0)) == []
    assert backends.choose("auto", q.cpu(), k.cpu(), prefix_k.cpu(), window_size=(2, 0)) == "native"
    if DEVICE == "cuda":
        assert backends.choose("auto", q, k, prefix_k, window_size=(2, 0)) == "triton"
        if backends.unavailable_reason("cuda") is None:
            with pytest.raises(ValueError, match=r"backend='cuda' cannot serve this call: .*\(window_size\)"):
                prefix_attention(q, k, k, prefix_k, prefix_k, window_size=(2, 0), backend="cuda")


def _op_args(requires_grad):
    inputs = [t.requires_grad_(requires_grad) for t in _small_inputs()]
    return (*inputs, None, None, None, None, None, False, 0.5, 0.0, "reference", False, None, None, None, 2, 1)


def test_opcheck_of_the_custom_ops():
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention.default, _op_args(True))
    args = _op_args(False)
    out, lse = torch.ops.ptv2_kernels.prefix_attention(*args)
    backward_args = (torch.randn_like(out), torch.randn_like(lse), *args[:10], out, lse, False, 0.5, 0.0,
                     "reference", False, False, None, None, None, False, 2, 1)
    torch.library.opcheck(torch.ops.ptv2_kernels.prefix_attention_backward.default, backward_args)


def test_compiles_without_graph_breaks():
    leaves = [t.detach().requires_grad_() for t in _small_inputs()]

    def attend(q, k, v, prefix_k, prefix_v):
        return prefix_attention(q, k, v, prefix_k, prefix_v, window_size=(1, 1), backend="reference")

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    got, want = compiled(*leaves), attend(*leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), leaves)):
        torch.testing.assert_close(a, b)
