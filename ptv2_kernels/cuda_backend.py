"""The CUDA C++ backend: the ahead-of-time kernels of ``csrc/``, compiled into the extension ``ptv2_kernels._C``.

Importing the extension registers its ops as ``torch.ops.ptv2_kernels_cuda.*`` (``fwd``, ``decode``, ``bwd``,
``dropout_keep_mask``); this module implements the backend interface of :mod:`ptv2_kernels.backends` on top of
them, and says whether the extension is built, for which GPU architectures, and which calls it can serve.

* ``forward`` runs the tiled forward kernel, or for Nq <= 16 in float16/bfloat16 the split-KV decode kernel (the
  extension decides; ``algo`` forces one).
* ``backward`` runs Δ, dK/dV per key block (prefix gradients reduced over the batch in the kernel, with fp32
  atomics or, deterministic, per-sample partials summed in order), dQ per query block, and the prefix gradients'
  cast to their dtype.
* Dropout draws the same Philox numbers as the Triton backend: for the same seed both drop the same probabilities.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from .call import Call

__all__ = ["forward", "backward", "dropout_keep_mask", "unavailable_reason", "unsupported_reason",
           "unsupported_reasons", "limits", "compiled_archs",
           "extension_status"]

# q/k/v and prefix dtypes the kernels are instantiated for, and whether they take an additive bias; the size
# limits come from the extension (limits()).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TAKES_BIAS = False
ALGO_AUTO, ALGO_TILED, ALGO_DECODE = 0, 1, 2


@functools.lru_cache(maxsize=None)
def _extension():
    """(module, None) when ``ptv2_kernels._C`` imports, else (None, why not)."""
    try:
        if importlib.util.find_spec("ptv2_kernels._C") is None:
            return None, "the CUDA extension ptv2_kernels._C is not built"
    except (ImportError, ValueError) as error:
        return None, f"the CUDA extension ptv2_kernels._C cannot be found ({error})"
    try:
        module = importlib.import_module("ptv2_kernels._C")
    except Exception as error:  # noqa: BLE001 - an ABI or loader error: report it, do not crash the import
        return None, f"the CUDA extension ptv2_kernels._C does not load ({type(error).__name__}: {error})"
    if not hasattr(module, "limits"):
        return None, ("the CUDA extension ptv2_kernels._C was built from an older checkout (it reports no limits); "
                      "rebuild it: pip install --no-build-isolation -e .")
    return module, None


def compiled_archs() -> list[tuple[int, int]]:
    """The compute capabilities the extension was compiled for, e.g. [(8, 0), (9, 0)]; [] when it is not built."""
    module, _ = _extension()
    if module is None:
        return []
    archs = []
    for item in module.arch_list().split(","):
        item = item.strip()
        if item.isdigit():
            value = int(item)
            archs.append((value // 100, value % 100 // 10))
    return archs


def extension_status() -> str:
    """One line for reports: built for which architectures, or why not."""
    module, reason = _extension()
    if module is None:
        return reason
    archs = compiled_archs()
    names = ", ".join(f"sm_{major}{minor}" for major, minor in archs) or module.arch_list()
    return f"built for {names}"


def _arch_reason(device: torch.device) -> Optional[str]:
    """Why the compiled kernels cannot run on ``device`` (a cubin runs on its major version at an equal or higher
    minor version), or None."""
    archs = compiled_archs()
    if not archs:
        return None  # the list is unknown: let the launch report a missing kernel image
    major, minor = torch.cuda.get_device_capability(device)
    if any(a_major == major and a_minor <= minor for a_major, a_minor in archs):
        return None
    built = ", ".join(f"sm_{a}{b}" for a, b in archs)
    return (f"the extension was compiled for {built}, not for this GPU (sm_{major}{minor}); rebuild with "
            f"TORCH_CUDA_ARCH_LIST including {major}.{minor}")


def unavailable_reason() -> Optional[str]:
    """None if the CUDA backend can run on this machine at all, else why not."""
    module, reason = _extension()
    if module is None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


@functools.lru_cache(maxsize=None)
def _shared_memory_limit(index: int) -> Optional[int]:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", None)


@functools.lru_cache(maxsize=None)
def limits():
    """The kernels' limits as the extension states them (csrc/ptv2_api.h), as a :class:`KernelLimits`."""
    from .backends import KernelLimits

    module, reason = _extension()
    if module is None:
        raise RuntimeError(reason)
    reported = module.limits()
    return KernelLimits(dtypes=DTYPES, max_head_dim=int(reported["max_head_dim"]),
                        max_grid_dim=int(reported["max_grid_dim"]), dropout_bits=int(reported["size_bits"]),
                        size_bits=int(reported["size_bits"]), takes_bias=TAKES_BIAS)


def unsupported_reasons(q: Tensor, k: Tensor, prefix_k: Tensor, dropout_p: float = 0.0) -> list[str]:
    """Every reason the CUDA kernels cannot serve a call with these (checked, normalized) inputs, a bias aside
    (empty: they can), the machine first."""
    from .backends import limit_reasons

    reason = unavailable_reason()
    if reason is not None:
        return [reason]
    if q.device.type != "cuda":
        return [f"it runs on CUDA tensors, got tensors on {q.device}"]
    reason = _arch_reason(q.device)
    if reason is not None:
        return [reason]
    reasons = limit_reasons(limits(), q, k, prefix_k, dropout_p)
    head_dim = q.shape[-1]
    if q.dtype in DTYPES and head_dim <= limits().max_head_dim:
        module, _ = _extension()
        needed = module.shared_memory_bytes(str(q.dtype).replace("torch.", ""), head_dim)
        limit = _shared_memory_limit(q.device.index if q.device.index is not None else torch.cuda.current_device())
        if limit is not None and needed > limit:
            reasons.append(f"its kernels for head dim {head_dim} in {q.dtype} need {needed} bytes of shared memory "
                           f"per block, this GPU allows {limit}")
    return reasons


def unsupported_reason(q: Tensor, k: Tensor, prefix_k: Tensor, dropout_p: float = 0.0) -> Optional[str]:
    """None if the CUDA kernels can serve the call, else every reason why not, in one sentence."""
    return "; ".join(unsupported_reasons(q, k, prefix_k, dropout_p)) or None


def _ops():
    module, reason = _extension()
    if module is None:
        raise RuntimeError(reason)
    return torch.ops.ptv2_kernels_cuda


def forward(call: Call, algo: int = ALGO_AUTO):
    reject_unserved(call)
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, _, seed, causal, scale, dropout_p = call[:13]
    return _ops().fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed, bool(causal),
                      float(scale), float(dropout_p), int(algo))


def backward(grad_out, grad_lse, call: Call, out, lse, *, grad_bias=None):
    reject_unserved(call)
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, _, seed, causal, scale, dropout_p = call[:13]
    return _ops().bwd(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed,
                      out, lse, bool(causal), float(scale), float(dropout_p), bool(call.deterministic))


def reject_unserved(call: Call):
    # backends.choose never sends a bias, a score option or values of another head dim here (see
    # backends.unsupported_reasons); a direct caller learns why.
    call.require_only("cuda", bias=False)
    reject_value_head_dim(call.q, call.v)


def reject_value_head_dim(q, v):
    # backends.choose never sends values of another head dim here (backends.value_head_dim_reasons); a direct
    # caller learns why instead of reaching kernels that would read v with q's head dim.
    from .backends import value_head_dim_reasons

    reasons = value_head_dim_reasons("cuda", q.shape[-1], v.shape[-1])
    if reasons:
        raise ValueError(f"the cuda backend cannot serve this call: {reasons[0]}")


def dropout_keep_mask(seed: Tensor, batch: int, q_heads: int, q_len: int, prefix_len: int, k_len: int,
                      dropout_p: float) -> Tensor:
    """The bool keep mask ``[B, Hq, Nq, P + Nk]`` the kernels draw from ``seed`` (on the seed's device; a CPU
    seed gives the host computation of the same numbers). Equal to the Triton backend's for the same seed."""
    return _ops().dropout_keep_mask(seed, batch, q_heads, q_len, prefix_len + k_len, float(dropout_p))
