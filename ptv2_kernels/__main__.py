"""``python -m ptv2_kernels``: versions, the device, which backends can run here, and a self-check of each.

The self-check runs every available backend through :func:`ptv2_kernels.prefix_attention` (forward and backward)
on small random cases that exercise the op's contract, and compares the output, the log-sum-exp and the five
gradients with the float64 reference. The bound, in the style of FlashAttention's tests, is twice the error of the
same computation done by PyTorch in the inputs' precision (``attention_ref(..., compute_dtype=q.dtype)``) plus a
floor: twice the error of rounding the reference to the result's dtype, plus a small absolute amount per dtype. Without a CUDA device the Triton backend runs in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set here before the Triton kernels are imported). Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

import ptv2_kernels
from ptv2_kernels import backends
from ptv2_kernels.reference import attention_ref, attention_ref_backward

QUANTITIES = ("out", "lse", "grad q", "grad k", "grad v", "grad prefix_k", "grad prefix_v")

# The bound's floor: twice the error of merely rounding the reference to the result's dtype, plus this absolute
# amount for the precision of the run (the lower of q's and the result's).
ABS_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@dataclass
class Case:
    """One self-check input: a name saying what it exercises and a function making its tensors and options."""

    name: str
    make: Callable[[torch.dtype, str, torch.Generator], dict]
    quick: bool = False


@dataclass
class Outcome:
    failures: int = 0
    checks: int = 0
    lines: list = field(default_factory=list)


def _randn(generator, *shape, dtype, device, layout=None):
    """Standard normal values; ``layout`` is a permutation: the tensor is made in that order, then viewed back."""
    if layout is None:
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)
    made = torch.randn(*[shape[i] for i in layout], generator=generator).to(dtype=dtype, device=device)
    inverse = sorted(range(len(layout)), key=lambda i: layout[i])
    return made.permute(*inverse)


def _key_padding(lengths, k_len, device):
    return torch.arange(k_len)[None, :].lt(torch.tensor(lengths)[:, None]).to(device)


def _contiguous_inputs(generator, batch, q_heads, kv_heads, q_len, k_len, bank, prefix_len, dim, dtype, device):
    """q, k, v and a bank of ``bank`` prefixes, contiguous, in one dtype."""
    return dict(
        q=_randn(generator, batch, q_heads, q_len, dim, dtype=dtype, device=device),
        k=_randn(generator, batch, kv_heads, k_len, dim, dtype=dtype, device=device),
        v=_randn(generator, batch, kv_heads, k_len, dim, dtype=dtype, device=device),
        prefix_k=_randn(generator, bank, kv_heads, prefix_len, dim, dtype=dtype, device=device),
        prefix_v=_randn(generator, bank, kv_heads, prefix_len, dim, dtype=dtype, device=device),
    )


def _case_bank(dtype, device, generator):
    batch, q_heads, kv_heads, q_len, k_len, prefix_len, dim = 3, 4, 2, 7, 11, 5, 24
    return dict(
        **_contiguous_inputs(generator, batch, q_heads, kv_heads, q_len, k_len, 3, prefix_len, dim, dtype, device),
        # Index tensors as views with strides 2 and 3, as slicing a larger tensor of task ids gives.
        prefix_index=torch.tensor([2, 1, 0, 1, 2], device=device)[::2],
        prefix_lengths=torch.tensor([[5, 0, 0], [1, 0, 0], [3, 0, 0]], dtype=torch.int32, device=device)[:, 0],
        key_padding_mask=_key_padding([11, 6, 2], k_len, device),
    )


def _case_causal_dense(dtype, device, generator):
    # q/k/v laid out as [B, N, H, D] (as a model's projections are) and viewed as [B, H, N, D].
    batch, heads, q_len, k_len, prefix_len, dim = 2, 3, 9, 13, 4, 16
    mask = torch.rand(batch, 1, q_len, k_len, generator=generator) < 0.8
    return dict(
        q=_randn(generator, batch, heads, q_len, dim, dtype=dtype, device=device, layout=(0, 2, 1, 3)),
        k=_randn(generator, batch, heads, k_len, dim, dtype=dtype, device=device, layout=(0, 2, 1, 3)),
        v=_randn(generator, batch, heads, k_len, dim, dtype=dtype, device=device, layout=(0, 2, 1, 3)),
        prefix_k=_randn(generator, heads, prefix_len, dim, dtype=dtype, device=device),
        prefix_v=_randn(generator, heads, prefix_len, dim, dtype=dtype, device=device),
        attn_mask=mask.to(device),
        causal=True,
    )


def _case_mqa_prefix_dtype(dtype, device, generator):
    # A prefix kept in another dtype than q/k/v (a float32 parameter under half-precision autocast).
    prefix_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float16
    batch, q_heads, q_len, k_len, prefix_len, dim = 2, 4, 10, 6, 3, 40
    return dict(
        q=_randn(generator, batch, q_heads, q_len, dim, dtype=dtype, device=device),
        k=_randn(generator, batch, 1, k_len, dim, dtype=dtype, device=device),
        v=_randn(generator, batch, 1, k_len, dim, dtype=dtype, device=device),
        prefix_k=_randn(generator, 1, 1, prefix_len, dim, dtype=prefix_dtype, device=device),
        prefix_v=_randn(generator, 1, 1, prefix_len, dim, dtype=prefix_dtype, device=device),
        causal=True,
        scale=0.3,
    )


def _case_nothing_visible(dtype, device, generator):
    batch, heads, q_len, k_len, prefix_len, dim = 2, 2, 5, 7, 4, 8
    return dict(
        **_contiguous_inputs(generator, batch, heads, heads, q_len, k_len, 2, prefix_len, dim, dtype, device),
        prefix_index=torch.tensor([0, 1], device=device),
        prefix_lengths=torch.tensor([0, 4], device=device),
        key_padding_mask=_key_padding([0, 5], k_len, device),
    )


def _case_t5_bias(dtype, device, generator):
    # T5-style: a relative position bias broadcast over the batch, no score scaling, -inf entries among it.
    batch, heads, q_len, k_len, prefix_len, dim = 2, 2, 6, 8, 3, 16
    bias = torch.randn(1, heads, q_len, k_len, generator=generator)
    bias = bias.masked_fill(torch.rand(1, heads, q_len, k_len, generator=generator) < 0.15, float("-inf"))
    bias[..., 0] = 0.0
    return dict(
        **_contiguous_inputs(generator, batch, heads, heads, q_len, k_len, 2, prefix_len, dim, dtype, device),
        attn_bias=bias.to(device),
        prefix_index=torch.tensor([1, 0], device=device),
        key_padding_mask=_key_padding([8, 5], k_len, device),
        scale=1.0,
    )


def _case_sdpa_float_mask(dtype, device, generator):
    # scaled_dot_product_attention's mask convention: a 2-D additive float mask [Nq, Nk] with -inf entries; every
    # sample uses bank entry 1 through an expanded (stride-0) index.
    batch, heads, q_len, k_len, prefix_len, dim = 3, 2, 5, 9, 4, 16
    mask = torch.randn(q_len, k_len, generator=generator)
    mask = mask.masked_fill(torch.rand(q_len, k_len, generator=generator) < 0.3, float("-inf"))
    return dict(
        **_contiguous_inputs(generator, batch, heads, heads, q_len, k_len, 2, prefix_len, dim, dtype, device),
        prefix_index=torch.tensor([1], device=device).expand(batch),
        attn_mask=mask.to(device),
    )


CASES = (
    Case("bank of T=3 with prefix_index and prefix_lengths, GQA Hq=4/Hkv=2, key padding, Nq=7 Nk=11 P=5 D=24",
         _case_bank, quick=True),
    Case("causal with Nq=9 < Nk=13, shared 3-D prefix P=4, dense [B,1,Nq,Nk] mask, q/k/v strided as [B,N,H,D], "
         "D=16", _case_causal_dense),
    Case("causal with Nq=10 > Nk=6, MQA Hq=4/Hkv=1, prefix in another dtype, scale=0.3, P=3 D=40",
         _case_mqa_prefix_dtype, quick=True),
    Case("sample 0 sees no key (zero-length prefix entry, all keys padded): out 0, lse -inf", _case_nothing_visible),
    Case("T5-style attn_bias [1,H,Nq,Nk] with -inf entries on the sequence keys (prefix unbiased), scale=1, key "
         "padding, bank of T=2", _case_t5_bias),
    Case("SDPA-style additive float attn_mask [Nq,Nk] with -inf entries, stride-0 (expanded) prefix_index",
         _case_sdpa_float_mask, quick=True),
)

_TENSORS = ("q", "k", "v", "prefix_k", "prefix_v")
_OPTIONAL_TENSORS = ("attn_bias",)  # differentiable inputs some cases have


def _max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |x - ref|; infinite where either is NaN or where they are not the same infinity."""
    x, ref = x.detach().double(), ref.detach().double()
    same = x == ref  # covers matching infinities
    if bool(torch.isnan(x).any()) or bool(torch.isnan(ref).any()) or bool((torch.isinf(x) & ~same).any()) or bool(
            (torch.isinf(ref) & ~same).any()):
        return float("inf")
    diff = torch.where(same, torch.zeros_like(x), x - ref).abs()
    return float(diff.max()) if diff.numel() else 0.0


def _floor(ref: torch.Tensor, result_dtype: torch.dtype, run_dtype: torch.dtype) -> float:
    ref = ref.detach()
    finite = ref[torch.isfinite(ref)]
    rounding = float((finite.to(result_dtype).double() - finite).abs().max()) if finite.numel() else 0.0
    return 2.0 * rounding + ABS_FLOOR[_lower_precision(run_dtype, result_dtype)]


def _lower_precision(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return max(a, b, key=lambda d: ABS_FLOOR[d])


def _run_backend(name, inputs, options, grad_out, grad_lse, deterministic=None):
    leaves = {key: t.detach().requires_grad_() for key, t in inputs.items()}
    optional = {key: leaves[key] for key in _OPTIONAL_TENSORS if key in leaves}
    out, lse = ptv2_kernels.prefix_attention(*(leaves[key] for key in _TENSORS), **options, **optional,
                                             return_lse=True, backend=name, deterministic=deterministic)
    grads = torch.autograd.grad((out, lse), list(leaves.values()), (grad_out, grad_lse))
    return (out, lse) + tuple(grads)


def _run_torch(inputs, options, grad_out, grad_lse, compute_dtype):
    tensors = [inputs[key] for key in _TENSORS]
    options = dict(options, **{key: inputs[key] for key in _OPTIONAL_TENSORS if key in inputs})
    out, lse = attention_ref(*tensors, **options, compute_dtype=compute_dtype)
    grads = attention_ref_backward(grad_out, grad_lse, *tensors, **options, compute_dtype=compute_dtype)
    return (out, lse) + tuple(grads)


def check_case(name: str, case: Case, dtype: torch.dtype, device: str, seed: int, outcome: Outcome,
               print_line=print) -> None:
    """Compare backend ``name`` with the float64 reference on one case; record and print a line per quantity."""
    generator = torch.Generator().manual_seed(seed)
    made = case.make(dtype, device, generator)
    inputs = {key: made.pop(key) for key in _TENSORS + _OPTIONAL_TENSORS if key in made}
    options = made
    q = inputs["q"]
    batch, heads, q_len, dim = q.shape
    grad_out = torch.randn(batch, heads, q_len, dim, generator=generator).to(dtype=dtype, device=device)
    grad_lse = torch.randn(batch, heads, q_len, generator=generator).to(device)

    print_line(f"  [{name} {str(dtype).replace('torch.', '')}] {case.name}")
    additive = inputs.get("attn_bias")
    if additive is None and options.get("attn_mask") is not None and options["attn_mask"].is_floating_point():
        additive = options["attn_mask"]
    if additive is not None:
        reason = backends.unsupported_reason(name, q, inputs["k"], inputs["prefix_k"], attn_bias=additive,
                                             bias_grad=True)  # every input is differentiated below
        if reason is not None and "additive score bias" in reason:  # by design, not a failure
            print_line(f"      skipped: {reason}")
            return
    try:
        got = _run_backend(name, inputs, options, grad_out, grad_lse)
    except Exception as error:  # noqa: BLE001 - any failure of the backend is a failed check, reported
        outcome.checks += 1
        outcome.failures += 1
        print_line(f"      FAIL: the backend raised {type(error).__name__}: {error}")
        return
    oracle = _run_torch({key: t.double() for key, t in inputs.items()}, options, grad_out.double(),
                        grad_lse.double(), torch.float64)
    same_precision = _run_torch(inputs, options, grad_out, grad_lse, dtype)
    expected_dtypes = (dtype, torch.float32) + tuple(t.dtype for t in inputs.values())
    quantities = QUANTITIES + tuple(f"grad {key}" for key in _OPTIONAL_TENSORS if key in inputs)
    for quantity, x, ref, pt, want_dtype in zip(quantities, got, oracle, same_precision, expected_dtypes):
        outcome.checks += 1
        problem = None
        if x.shape != ref.shape:
            problem = f"shape {tuple(x.shape)}, expected {tuple(ref.shape)}"
        elif x.dtype != want_dtype:
            problem = f"dtype {x.dtype}, expected {want_dtype}"
        if problem is not None:
            outcome.failures += 1
            print_line(f"      {quantity:<14} FAIL: {problem}")
            continue
        error = _max_error(x, ref)
        bound = 2.0 * _max_error(pt, ref) + _floor(ref, x.dtype, dtype)
        ok = error <= bound
        outcome.failures += not ok
        print_line(f"      {quantity:<14} max error {error:9.2e}  bound {bound:9.2e}  {'PASS' if ok else 'FAIL'}")

    if name != "reference" and "prefix_index" in options:
        # Deterministic mode: the batch reduction of the prefix gradients must repeat bit for bit.
        outcome.checks += 1
        try:
            first = _run_backend(name, inputs, options, grad_out, grad_lse, deterministic=True)[5:]
            again = _run_backend(name, inputs, options, grad_out, grad_lse, deterministic=True)[5:]
        except Exception as error:  # noqa: BLE001 - reported as a failed check
            outcome.failures += 1
            print_line(f"      {'deterministic':<14} FAIL: the backend raised {type(error).__name__}: {error}")
            return
        ok = all(torch.equal(a, b) for a, b in zip(first, again))
        outcome.failures += not ok
        print_line(f"      {'deterministic':<14} prefix gradients repeat bit for bit: {'PASS' if ok else 'FAIL'}")


def self_check(name: str, dtypes: Sequence[torch.dtype], device: str, quick: bool = False, seed: int = 0,
               print_line=print) -> Outcome:
    """Run every case (only the quick ones with ``quick``) for backend ``name`` in each dtype."""
    outcome = Outcome()
    for dtype in dtypes:
        for number, case in enumerate(CASES):
            if quick and not case.quick:
                continue
            check_case(name, case, dtype, device, seed + number, outcome, print_line)
    return outcome


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------

def _use_triton_interpreter() -> Optional[str]:
    """Without a CUDA device, switch Triton to its CPU interpreter before the Triton kernels are imported.

    Returns a note for the report, or None when nothing was changed.
    """
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return None
    if backends.triton_interpreting():
        return "TRITON_INTERPRET is set: Triton kernels run in its CPU interpreter"
    note = "no CUDA device: set TRITON_INTERPRET=1 so the Triton kernels run in its CPU interpreter"
    if "triton" in sys.modules:
        note += " (triton was already imported; its jit decorator still reads the variable when kernels are defined)"
    os.environ["TRITON_INTERPRET"] = "1"
    return note


def availability(name: str) -> Optional[str]:
    """None if backend ``name`` can run here, else why not (also: its code is not part of this installation)."""
    reason = backends.unavailable_reason(name)
    if reason is None and name == "triton":
        try:
            present = importlib.util.find_spec("ptv2_kernels.triton.prefix_attention") is not None
        except ModuleNotFoundError:
            present = False
        if not present:
            reason = "its kernels (ptv2_kernels/triton/prefix_attention.py) are not part of this installation"
    return reason


def _version_of(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed, or installed without metadata
        return "not installed" if importlib.util.find_spec(module) is None else "installed (version unknown)"


def _device_line() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}), {torch.cuda.device_count()} " \
           "visible"


def _native_host_line() -> str:
    from . import native

    return native.host_path()


def _extension_line() -> str:
    try:
        from ptv2_kernels import cuda_backend

        return cuda_backend.extension_status()
    except Exception:  # noqa: BLE001 - a report line must not crash the report
        try:
            present = importlib.util.find_spec("ptv2_kernels._C") is not None
        except (ImportError, ValueError):
            present = False
        return "built" if present else "not built"


def check_dtypes(name: str, device: str) -> tuple:
    if device == "cuda":
        return (torch.float16, torch.bfloat16)
    if name == "triton":  # bf16 is not checked in the interpreter: its tl.dot on bfloat16 is wrong
        return (torch.float32, torch.float16)
    return (torch.float32,)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ptv2_kernels",
        description="Report versions, the device and the backends, and check every available backend against the "
                    "float64 reference.")
    parser.add_argument("--backend", action="append", choices=backends.NAMES, metavar="NAME",
                        help=f"check only this backend (one of {', '.join(backends.NAMES)}; repeatable)")
    parser.add_argument("--quick", action="store_true", help="fewer cases and one dtype per backend")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    args = parser.parse_args(argv)
    requested = list(dict.fromkeys(args.backend)) if args.backend else list(backends.NAMES)

    interpreter_note = _use_triton_interpreter() if "triton" in requested else None
    cuda_build = torch.version.cuda or "none (CPU build of torch)"
    print(f"ptv2_kernels {ptv2_kernels.__version__}")
    print(f"  torch   {torch.__version__} (CUDA {cuda_build})")
    print(f"  triton  {_version_of('triton')}")
    print(f"  Python  {platform.python_version()} ({sys.executable})")
    print(f"  device  {_device_line()}")
    print(f"  _C      {_extension_line()}")
    print(f"  _native the native backend's common calls run in {_native_host_line()}")
    if interpreter_note:
        print(f"  note    {interpreter_note}")

    print("backends:")
    reasons = {name: availability(name) for name in backends.NAMES}
    for name in backends.NAMES:
        print(f"  {name:<10} {'available' if reasons[name] is None else 'not available: ' + reasons[name]}")

    failed = []
    missing = [name for name in requested if reasons[name] is not None]
    if args.backend and missing:
        print(f"requested backend(s) not available here: {', '.join(missing)}")
        failed.extend(missing)
    checked = [name for name in requested if reasons[name] is None]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"self-check on {device}{' (quick)' if args.quick else ''}: error vs the float64 reference must be at most "
          "2 x the same-precision PyTorch error + a floor (2 x rounding to the dtype + a small constant)")
    for name in checked:
        started = time.perf_counter()
        outcome = self_check(name, check_dtypes(name, device), device, quick=args.quick, seed=args.seed)
        verdict = "PASS" if outcome.failures == 0 else f"FAIL ({outcome.failures} of {outcome.checks} checks)"
        print(f"  {name}: {verdict} in {time.perf_counter() - started:.1f} s")
        if outcome.failures:
            failed.append(name)
    if not checked:
        print("  no backend to check")
    print("result: " + ("FAIL: " + ", ".join(failed) if failed else f"PASS ({', '.join(checked)})"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
