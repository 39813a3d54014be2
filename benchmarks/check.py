"""The correctness check every provider passes before it is timed: a wrong provider is reported, never timed.

The oracle is :func:`ptv2_kernels.attention_ref` (and its hand-written backward) in float64 where it fits, else
float32 — both far more precise than the half-precision providers they judge. The bounds on each compared quantity
follow FlashAttention's tests and this project's: a provider's largest error against the oracle may be at most
``ERROR_MULTIPLE`` times the error of the same computation done by PyTorch in the inputs' precision
(``attention_ref(..., compute_dtype=dtype)``), plus a floor of ``FLOOR_ULPS`` units of the dtype's epsilon scaled
by the quantity's magnitude; and its relative L2 error may be at most ``ERROR_MULTIPLE`` times the same
computation's plus two epsilons. That scales with the dtype and the shape (longer sums round more) without a
hand-picked tolerance per case. The L2 bound matters for long sums: in bf16 a decode step over 2048 keys that
ignores a 128-key prefix stays within the elementwise bound (every output is small) but is 10x over the L2 one.

Long GPU shapes would make the oracle's ``[B, Hq, Nq, P + N]`` score matrices too large, so the oracle runs over
chunks of samples and key/value heads (outputs are independent across them; prefix gradients are summed).

A packed batch's oracle is the padded batch's (the same sequences padded to the longest, a key-padding mask, dO zero
in the padding), its per-token results taken back to the packed rows: the padded op's rule applied to each sequence
as a batch of one is what docs/design.md §4.1 promises.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ptv2_kernels.reference import attention_ref, attention_ref_backward

from .workloads import KernelInputs, VarlenInputs

ERROR_MULTIPLE = 3.0
FLOOR_ULPS = 8.0
# Elements of a [b, h, Nq, P + N] score-shaped temporary the oracle may hold per chunk (it holds a few).
CHUNK_ELEMENTS = {"cuda": 2**28, "cpu": 2**24}


@dataclasses.dataclass
class Comparison:
    quantity: str
    error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound  # NaN compares False: non-finite results fail


@dataclasses.dataclass
class CheckResult:
    comparisons: list
    problem: Optional[str] = None  # a shape/dtype/finiteness problem found before any error was measured

    @property
    def ok(self) -> bool:
        return self.problem is None and all(c.ok for c in self.comparisons)

    @property
    def worst_ratio(self) -> float:
        """The largest error/bound over the quantities (<= 1 passes); inf when a problem was found."""
        if self.problem is not None:
            return float("inf")
        ratios = [c.error / c.bound if c.bound > 0 else (0.0 if c.error == 0 else float("inf"))
                  for c in self.comparisons]
        ratios = [float("inf") if r != r else r for r in ratios]
        return max(ratios, default=0.0)

    def summary(self) -> str:
        if self.problem is not None:
            return self.problem
        worst = max(self.comparisons, key=lambda c: (not c.ok, c.error / c.bound if c.bound else 0.0))
        verdict = "within" if self.ok else "exceeds"
        return (f"{worst.quantity}: error {worst.error:.3g} {verdict} bound {worst.bound:.3g} "
                f"(worst of {len(self.comparisons)} comparisons)")


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return float((x.detach().double() - ref.detach().double()).abs().max())


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x − ref‖₂ / ‖ref‖₂``: rounding noise averages out of it, a systematic error (a prefix ignored) does not."""
    if x.numel() == 0:
        return 0.0
    ref = ref.detach().double()
    return float((x.detach().double() - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float64).tiny))


def bound_for(oracle: torch.Tensor, same_precision: torch.Tensor, dtype: torch.dtype) -> float:
    """The max-error bound: ERROR_MULTIPLE × the same-precision error + FLOOR_ULPS ulps of the largest value."""
    magnitude = float(oracle.detach().double().abs().max()) if oracle.numel() else 0.0
    eps = torch.finfo(dtype).eps
    return ERROR_MULTIPLE * max_error(same_precision, oracle) + FLOOR_ULPS * eps * max(magnitude, eps)


def relative_bound_for(oracle: torch.Tensor, same_precision: torch.Tensor, dtype: torch.dtype) -> float:
    return ERROR_MULTIPLE * relative_error(same_precision, oracle) + 2 * torch.finfo(dtype).eps


def compare(got: dict, oracle: dict, same_precision: dict, dtype: torch.dtype) -> CheckResult:
    """Compare every quantity of ``got`` with the oracle; ``dtype`` is the precision the work was done in.

    Each quantity must pass two bounds: its largest elementwise error, and its relative L2 error (which catches a
    small systematic error that hides under the elementwise bound, e.g. a prefix ignored over thousands of keys)."""
    comparisons = []
    for name, want in oracle.items():
        if name not in got:
            return CheckResult(comparisons, f"{name}: the provider returned no such quantity")
        x = got[name]
        if tuple(x.shape) != tuple(want.shape):
            return CheckResult(comparisons, f"{name}: shape {tuple(x.shape)}, expected {tuple(want.shape)}")
        if not bool(torch.isfinite(x).all()):
            return CheckResult(comparisons, f"{name}: non-finite values")
        same = same_precision[name]
        comparisons.append(Comparison(name, max_error(x, want), bound_for(want, same, dtype)))
        comparisons.append(Comparison(f"{name} (relative L2)", relative_error(x, want),
                                      relative_bound_for(want, same, dtype)))
    return CheckResult(comparisons)


# ----------------------------------------------------------------------------------------------------------------
# The oracle of a kernel workload, chunked
# ----------------------------------------------------------------------------------------------------------------

def _chunks(x: KernelInputs, compute_dtype: torch.dtype):
    """(sample slice, kv-head slice) pairs whose score-shaped temporaries stay under the chunk budget."""
    batch, q_heads, q_len, _ = x.q.shape
    kv_heads, k_len = x.k.shape[1], x.k.shape[2]
    keys = x.prefix_k.shape[-2] + k_len
    budget = CHUNK_ELEMENTS["cuda" if x.q.is_cuda else "cpu"] * 32 // torch.finfo(compute_dtype).bits
    group = q_heads // kv_heads
    per_head = group * q_len * keys
    heads = max(1, min(kv_heads, budget // max(1, per_head)))
    samples = max(1, min(batch, budget // max(1, per_head * kv_heads))) if heads == kv_heads else 1
    for b0 in range(0, batch, samples):
        for h0 in range(0, kv_heads, heads):
            yield slice(b0, min(batch, b0 + samples)), slice(h0, min(kv_heads, h0 + heads))


def oracle_dtype(x) -> torch.dtype:
    """float64 where a single-head chunk fits the budget in it (always on the CPU shapes), else float32."""
    if isinstance(x, VarlenInputs):
        x = x.padded
    _, q_heads, q_len, _ = x.q.shape
    group = q_heads // x.k.shape[1]
    per_head = group * q_len * (x.prefix_k.shape[-2] + x.k.shape[2])
    budget = CHUNK_ELEMENTS["cuda" if x.q.is_cuda else "cpu"] * 32 // 64
    return torch.float64 if per_head <= budget else torch.float32


# The per-token quantities of a kernel check (the rest, the prefix gradients, are per bank entry).
TOKEN_QUANTITIES = ("out", "q", "k", "v")


def kernel_reference(x, backward: bool, compute_dtype: torch.dtype) -> dict:
    """``out`` (and the five gradients for ``backward``) of the reference on ``x``, computed in ``compute_dtype``
    (which also sets the dtype of the inputs it sees: float64 upcasts, the inputs' dtype keeps them), chunked. For
    packed inputs (:class:`VarlenInputs`), the padded batch's, in the packed layout."""
    if isinstance(x, VarlenInputs):
        padded = kernel_reference(x.padded, backward, compute_dtype)
        return {name: x.unpad(t) if name in TOKEN_QUANTITIES else t for name, t in padded.items()}
    q_heads, kv_heads = x.q.shape[1], x.k.shape[1]
    group = q_heads // kv_heads
    cast = (lambda t: t.to(compute_dtype)) if torch.finfo(compute_dtype).bits > torch.finfo(x.q.dtype).bits \
        else (lambda t: t)
    shared = x.prefix_k.dim() == 3
    results = {"out": torch.empty(x.q.shape, dtype=compute_dtype, device=x.q.device)}
    if backward:
        for name, t in (("q", x.q), ("k", x.k), ("v", x.v)):
            results[name] = torch.empty(t.shape, dtype=compute_dtype, device=t.device)
        for name, t in (("prefix_k", x.prefix_k), ("prefix_v", x.prefix_v)):
            results[name] = torch.zeros(t.shape, dtype=torch.float64 if compute_dtype == torch.float64
                                        else torch.float32, device=t.device)
    for samples, heads in _chunks(x, compute_dtype):
        q_heads_slice = slice(heads.start * group, heads.stop * group)
        head_axis = 0 if shared else 1
        pk = x.prefix_k.narrow(head_axis, heads.start, heads.stop - heads.start)
        pv = x.prefix_v.narrow(head_axis, heads.start, heads.stop - heads.start)
        args = [cast(x.q[samples, q_heads_slice]), cast(x.k[samples, heads]), cast(x.v[samples, heads]), cast(pk),
                cast(pv)]
        kwargs = dict(prefix_index=None if x.prefix_index is None else x.prefix_index[samples],
                      key_padding_mask=None if x.key_padding_mask is None else x.key_padding_mask[samples],
                      causal=x.causal,
                      compute_dtype=compute_dtype)
        out, _ = attention_ref(*args, **kwargs)
        results["out"][samples, q_heads_slice] = out
        if backward:
            grads = attention_ref_backward(x.grad_out[samples, q_heads_slice].to(compute_dtype), None, *args,
                                           **kwargs)
            for name, grad in zip(("q", "k", "v"), grads[:3]):
                results[name][samples, q_heads_slice if name == "q" else heads] = grad
            for name, grad in zip(("prefix_k", "prefix_v"), grads[3:]):
                results[name].narrow(head_axis, heads.start, heads.stop - heads.start).add_(grad)
        del out
    return results


def check_kernel(got: dict, x: KernelInputs, oracle: dict, same_precision: dict) -> CheckResult:
    """Compare a provider's ``finish``-ed results with the oracle (and the same-precision computation)."""
    return compare(got, oracle, same_precision, x.q.dtype)
