"""The kernel backends' shared test cases: the grid of cases and the comparison with the float64 oracle.

The Triton, CUDA and native backends' tests (tests/test_triton_prefix_attention.py, test_cuda_backend.py,
test_native_backend.py) run the same cases against the same oracle under the same bounds; they all import them from
here, so that no test module imports another.

Bounds follow FlashAttention's tests: a kernel's error against the float64 oracle must stay within a small multiple
of the error the same-precision PyTorch computation makes (``attention_ref(..., compute_dtype=q.dtype)``), plus an
absolute floor of a few units in the last place of the dtype scaled by the values' magnitude.

Inputs are made on ``DEVICE``, read when a helper runs: a test module may patch ``kernel_cases.DEVICE`` (the native
backend's tests make the grid's inputs on the CPU). ``poison_uninitialized_memory`` is an autouse fixture: a module
imports it to turn it on.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ptv2_kernels
from ptv2_kernels import backends
from ptv2_kernels.reference import attention_ref, attention_ref_backward

from .conftest import DEVICE

ON_GPU = DEVICE == "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32] if ON_GPU else [torch.float16, torch.float32]
# Error multiple of the same-precision PyTorch computation, and the absolute floor in units of the dtype's epsilon.
# The kernel rounds probabilities to the input dtype before the P·V product exactly like the PyTorch computation
# does, but sums in a different order (blocked online softmax): a factor of a few covers that.
ERROR_MULTIPLE = 3.0
FLOOR_ULPS = 8.0


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """torch.empty returns NaN-filled memory while deterministic algorithms are on: unwritten outputs show."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous)


TRITON_REASON = backends.unavailable_reason("triton")
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton unavailable: {TRITON_REASON}")
# The backends that serve every score option (softcap, sinks, prefix_bias)
SCORE_OPTION_BACKENDS = [pytest.param("triton", marks=needs_triton), "reference"]


def small_float64_problem(seed=0, B=2, Hq=4, Hkv=2, Nq=5, Nk=6, D=8, P=3, T=2):
    """Small float64 ``[q, k, v, prefix_k, prefix_v]`` (a bank of T) for the oracle's own tests, and the generator
    that drew them (for the test's other draws)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    tensors = [randn(B, Hq, Nq, D) * 2, randn(B, Hkv, Nk, D), randn(B, Hkv, Nk, D), randn(T, Hkv, P, D),
               randn(T, Hkv, P, D)]
    return tensors, gen


@dataclasses.dataclass
class Case:
    batch: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    q_len: int = 19
    k_len: int = 37
    head_dim: int = 32
    value_dim: Optional[int] = None  # v's and prefix_v's head dim (multi-head latent attention); None: head_dim
    num_prefixes: int = 1
    prefix_len: int = 7
    lengths: bool = False  # per-entry prefix lengths
    # "none" | "padding" (key_padding_mask) | "dense" | "dense_heads" (bool attn_mask [B, 1|Hq, Nq, Nk]) |
    # "padding_dense" (both) | "sdpa_bool" (bool attn_mask [Nq, Nk]) | "sdpa_float" (additive [Nq, Nk], -inf entries)
    mask: str = "none"
    index_layout: str = "contiguous"  # of prefix_index/prefix_lengths: "contiguous", "strided", "expanded" (stride 0)
    causal: bool = False
    layout: str = "bhnd"  # memory layout of q/k/v: "bhnd", "bnhd" (transformers), "packed" (slices of one buffer)
    prefix_layout: str = "bank"  # "bank" [T, Hkv, P, D] contiguous, "shared3d" [Hkv, P, D], "strided" permuted
    prefix_dtype: Optional[torch.dtype] = None  # None: q's dtype
    scale: Optional[float] = None
    bias: str = "none"  # additive attn_bias: "none", "heads" [B, Hq, Nq, Nk], "shared" [1, 1, Nq, Nk] with -inf
    softcap: Optional[float] = None  # the op's score cap
    sinks: bool = False  # float32 attention sinks [Hq], as a float32 parameter of a half model would be
    # additive prefix_bias on the prefix columns: "none", "heads" [B, Hq, Nq, P] float32, "shared" [1, Hq, Nq, P] in
    # q's dtype with -inf entries (a position bias shared by the batch, as T5's)
    prefix_bias: str = "none"
    window: Optional[tuple[int, int]] = None  # the op's window_size (left, right)


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    """Random inputs with the requested memory layouts, and the op's keyword arguments."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, Hq, Hkv, Nq, Nk, D = case.batch, case.q_heads, case.kv_heads, case.q_len, case.k_len, case.head_dim
    Dv = D if case.value_dim is None else case.value_dim
    wide = max(D, Dv)  # the width of a buffer that q, k and v are sliced from

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    if case.layout == "bhnd":
        q, k, v = rand(B, Hq, Nq, D), rand(B, Hkv, Nk, D), rand(B, Hkv, Nk, Dv)
    elif case.layout == "bnhd":
        q = rand(B, Nq, Hq, D).transpose(1, 2)
        k, v = rand(B, Nk, Hkv, D).transpose(1, 2), rand(B, Nk, Hkv, Dv).transpose(1, 2)
    else:  # one fused projection output [B, N, Hq + 2 Hkv, D] with Nq == Nk, sliced without copies
        assert Nq == Nk
        packed = rand(B, Nq, Hq + 2 * Hkv, wide)
        q, k, v = packed[:, :, :Hq, :D].transpose(1, 2), packed[:, :, Hq:Hq + Hkv, :D].transpose(1, 2), \
            packed[:, :, Hq + Hkv:, :Dv].transpose(1, 2)
    q, k, v = (t.to(dtype) for t in (q, k, v))

    T, P = case.num_prefixes, case.prefix_len
    prefix_dtype = case.prefix_dtype or dtype
    if case.prefix_layout == "strided":  # e.g. per-layer views of a [P, T, 2, Hkv, D] encoder output
        store = rand(P, T, 2, Hkv, wide).to(prefix_dtype)
        prefix_k, prefix_v = store[:, :, 0, :, :D].permute(1, 2, 0, 3), store[:, :, 1, :, :Dv].permute(1, 2, 0, 3)
    else:
        prefix_k, prefix_v = rand(T, Hkv, P, D).to(prefix_dtype), rand(T, Hkv, P, Dv).to(prefix_dtype)
        if case.prefix_layout == "shared3d":
            assert T == 1
            prefix_k, prefix_v = prefix_k[0], prefix_v[0]

    kwargs = dict(causal=case.causal, scale=case.scale)
    if T > 1:
        kwargs["prefix_index"] = _index_in_layout(torch.randint(0, T, (B,), generator=gen), case.index_layout)
    if case.lengths:
        kwargs["prefix_lengths"] = _index_in_layout(torch.randint(0, P + 1, (T,), generator=gen), case.index_layout)
    if case.mask in ("padding", "padding_dense"):
        keep = torch.rand(B, Nk, generator=gen) > 0.3
        keep[0] = False  # a sample whose sequence keys are all padding: it sees only its prefix
        kwargs["key_padding_mask"] = keep.to(DEVICE)
    if case.mask in ("dense", "dense_heads", "padding_dense"):
        heads = Hq if case.mask == "dense_heads" else 1
        kwargs["attn_mask"] = (torch.rand(B, heads, Nq, Nk, generator=gen) > 0.3).to(DEVICE)
    elif case.mask == "sdpa_bool":
        kwargs["attn_mask"] = (torch.rand(Nq, Nk, generator=gen) > 0.3).to(DEVICE)
    elif case.mask == "sdpa_float":
        additive = torch.randn(Nq, Nk, generator=gen)
        kwargs["attn_mask"] = additive.masked_fill(torch.rand(Nq, Nk, generator=gen) < 0.3, float("-inf")).to(DEVICE)
    if case.bias == "heads":  # a float32 bias with half inputs, as a float32 position-bias table would give
        kwargs["attn_bias"] = (torch.randn(B, Hq, Nq, Nk, generator=gen) * 2).to(DEVICE)
    elif case.bias == "shared":  # broadcast over samples and heads; -inf entries hide keys like a mask
        bias = torch.randn(1, 1, Nq, Nk, generator=gen).to(dtype)
        kwargs["attn_bias"] = bias.masked_fill(torch.rand(1, 1, Nq, Nk, generator=gen) < 0.2, float("-inf")).to(DEVICE)
    if case.prefix_bias == "heads":
        kwargs["prefix_bias"] = (torch.randn(B, Hq, Nq, P, generator=gen) * 2).to(DEVICE)
    elif case.prefix_bias == "shared":
        bias = torch.randn(1, Hq, Nq, P, generator=gen).to(dtype)
        kwargs["prefix_bias"] = bias.masked_fill(torch.rand(1, Hq, Nq, P, generator=gen) < 0.2,
                                                 float("-inf")).to(DEVICE)
    if case.softcap is not None:
        kwargs["softcap"] = case.softcap
    if case.sinks:  # about the scores' size, so that a sink takes a fair share of its rows
        kwargs["sinks"] = (torch.randn(Hq, generator=gen) + 1.0).to(DEVICE)
    if case.window is not None:
        kwargs["window_size"] = case.window
    return [q, k, v, prefix_k, prefix_v], kwargs


def _index_in_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` as a contiguous tensor, as a strided view (every other element of a larger tensor), or (for
    "expanded") its first value expanded with stride 0."""
    if layout == "strided":
        return torch.stack([values, values.flip(0) + 100]).t().reshape(-1).to(DEVICE)[::2]
    if layout == "expanded":
        return values[:1].to(DEVICE).expand(values.shape[0])
    return values.to(DEVICE)


def backend_mask(kwargs):
    """The one bool mask the backends take (as the op normalizes it): key padding [B, Nk] or a dense mask."""
    padding, dense = kwargs.get("key_padding_mask"), kwargs.get("attn_mask")
    if dense is None:
        return padding
    dense = dense if padding is None else dense & padding[:, None, None, :]
    return dense


def run_backend(inputs, kwargs, deterministic=False, seed=1, backend="triton"):
    """Forward with lse, then backward with random dO and dlse. Returns (out, lse, grads, (dO, dlse)); the grads
    of q, k, v, prefix_k, prefix_v, then of attn_bias, prefix_bias and sinks when there are (the reference
    backward's order)."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    for name in ("attn_bias", "prefix_bias", "sinks"):
        if kwargs.get(name) is not None:
            kwargs = dict(kwargs, **{name: kwargs[name].detach().requires_grad_(True)})
            leaves.append(kwargs[name])
    out, lse = ptv2_kernels.prefix_attention(*leaves[:5], **kwargs, return_lse=True, backend=backend,
                                             deterministic=deterministic)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE, out.dtype)
    grad_lse = torch.randn(lse.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad([out, lse], leaves, [grad_out, grad_lse])
    return out, lse, grads, (grad_out, grad_lse)


def reference_results(inputs, kwargs, upstream, compute_dtype, dropout_keep=None, dropout_p=0.0):
    """(out, lse, grads) of the reference, on inputs cast to float64 for the oracle or as-is for the same-precision
    PyTorch computation."""
    if compute_dtype == torch.float64:
        inputs = [t.double() for t in inputs]
    extra = dict(kwargs, dropout_keep=dropout_keep, dropout_p=dropout_p, compute_dtype=compute_dtype)
    out, lse = attention_ref(*inputs, **extra)
    grads = attention_ref_backward(upstream[0], upstream[1], *inputs, **extra)
    return out, lse, grads


def assert_close_to_reference(name, got, oracle, same_precision, dtype):
    assert got.shape == oracle.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten element?)"
    got, oracle, same_precision = got.double(), oracle.double(), same_precision.double()
    error = (got - oracle).abs().max().item() if got.numel() else 0.0
    pt_error = (same_precision - oracle).abs().max().item() if got.numel() else 0.0
    magnitude = max(1.0, oracle.abs().max().item() if got.numel() else 0.0)
    bound = ERROR_MULTIPLE * pt_error + FLOOR_ULPS * torch.finfo(dtype).eps * magnitude
    assert error <= bound, f"{name}: max error {error:.3e} > bound {bound:.3e} (PyTorch {dtype}: {pt_error:.3e})"


def force_kv_splits(monkeypatch, case: Case, multiprocessors: int = 8):
    """Make the Triton forward split the keys of a decode-sized case (asserted) by pretending to have
    ``multiprocessors`` to fill, with splits of at least 16 keys."""
    from ptv2_kernels.triton import prefix_attention as triton_backend

    monkeypatch.setattr(triton_backend, "_multiprocessors", lambda device: multiprocessors)
    monkeypatch.setattr(triton_backend, "MIN_KEYS_PER_SPLIT", 16)
    programs = case.batch * (case.kv_heads if triton_backend.packs_query_heads(
        case.q_len, case.q_heads, case.kv_heads) else case.q_heads)
    assert triton_backend.kv_splits(case.q_len, programs, case.prefix_len + case.k_len, multiprocessors) > 1


def check_against_reference(case: Case, dtype: torch.dtype, deterministic=False, seed=0, backend="triton"):
    inputs, kwargs = make_inputs(case, dtype, seed)
    out, lse, grads, upstream = run_backend(inputs, kwargs, deterministic=deterministic, backend=backend)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.transpose(1, 2).is_contiguous(), "out must be laid out as [B, Nq, Hq, D]"
    for grad, leaf in zip(grads, inputs):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    oracle = reference_results(inputs, kwargs, upstream, torch.float64)
    same_precision = reference_results(inputs, kwargs, upstream, dtype)

    seen = torch.isfinite(oracle[1])
    assert torch.equal(torch.isfinite(lse), seen), "lse must be -inf exactly where a query sees no key"
    assert (lse[~seen] == float("-inf")).all()
    assert (out[~seen] == 0).all(), "a query that sees no key outputs 0"
    assert_close_to_reference("out", out, oracle[0], same_precision[0], dtype)
    assert_close_to_reference("lse", lse[seen], oracle[1][seen], same_precision[1][seen].float(), torch.float32)
    names = (["dq", "dk", "dv", "dprefix_k", "dprefix_v"] + ["dbias"] * (case.bias != "none")
             + ["dprefix_bias"] * (case.prefix_bias != "none") + ["dsinks"] * case.sinks)
    assert len(grads) == len(oracle[2]) == len(names)
    for name, grad, want, pt in zip(names, grads, oracle[2], same_precision[2]):
        assert_close_to_reference(name, grad, want, pt, min(dtype, grad.dtype, key=lambda d: torch.finfo(d).bits))


# ---------------------------------------------------------------------------------------------------------------
# The grid: every (mask, causal, bank) combination, with the other axes cycling so that each value of each axis
# meets several combinations. A full product would take hours in the interpreter.
# ---------------------------------------------------------------------------------------------------------------

MASKS = ["none", "padding", "dense", "dense_heads"]
BANKS = [dict(num_prefixes=1, prefix_layout="shared3d"), dict(num_prefixes=3, lengths=True)]
SHAPES = [(19, 37), (37, 19), (1, 33), (24, 24)]  # (Nq, Nk): longer keys, longer queries (causal: some see none),
#                                                    decode, square
PREFIX_LENS = [0, 1, 7, 64]
GQA = [(4, 4), (4, 2), (4, 1)]
HEAD_DIMS = [32, 64, 80, 16]
LAYOUTS = ["bhnd", "bnhd"]
INDEX_LAYOUTS = ["contiguous", "strided", "expanded"]  # of a bank's prefix_index and prefix_lengths

GRID = []
for i, (mask, causal, bank) in enumerate(itertools.product(MASKS, [False, True], BANKS)):
    (q_len, k_len) = SHAPES[i % len(SHAPES)]
    q_heads, kv_heads = GQA[i % len(GQA)]
    index_layout = INDEX_LAYOUTS[(i // 2) % len(INDEX_LAYOUTS)] if bank["num_prefixes"] > 1 else "contiguous"
    case = Case(q_len=q_len, k_len=k_len, q_heads=q_heads, kv_heads=kv_heads, head_dim=HEAD_DIMS[i % len(HEAD_DIMS)],
                prefix_len=PREFIX_LENS[(i // 2) % len(PREFIX_LENS)], mask=mask, causal=causal,
                layout=LAYOUTS[(i // 3) % len(LAYOUTS)], index_layout=index_layout, **bank)
    GRID.append(pytest.param(case, DTYPES[i % len(DTYPES)], id=f"{mask}-{'causal' if causal else 'full'}-"
                             f"T{case.num_prefixes}-{index_layout[:6]}-P{case.prefix_len}-{q_len}x{k_len}-"
                             f"h{q_heads}/{kv_heads}-d{case.head_dim}-{str(DTYPES[i % len(DTYPES)])[6:]}"))


# ---------------------------------------------------------------------------------------------------------------
# No copies: the ops a dispatch mode must not see
# ---------------------------------------------------------------------------------------------------------------

# Ops that would materialize K/V or the prefix: concatenation, copies, expansion to the batch, GQA repetition,
# gathering bank entries.
MATERIALIZING_OPS = {
    "cat", "stack", "clone", "contiguous", "_to_copy", "copy_", "expand_copy", "repeat", "repeat_interleave",
    "index_select", "index", "gather", "take", "masked_select", "_unsafe_index",
}


class RecordOps(TorchDispatchMode):
    """Records aten ops. A copy of a buffer onto itself moves no data and is not counted: the Triton interpreter
    does that to write kernel results "back" to CPU tensors it ran on in place."""

    def __init__(self):
        super().__init__()
        self.materializing = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATERIALIZING_OPS:
            self_copy = (name == "copy_" and all(isinstance(a, torch.Tensor) for a in args[:2])
                         and args[0].data_ptr() == args[1].data_ptr())
            if not self_copy:
                self.materializing.append(f"{func} on {[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]}")
        return func(*args, **(kwargs or {}))
