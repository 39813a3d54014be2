"""The backends behind :func:`ptv2_kernels.prefix_attention`: which exist here, which can serve a call, and why not.

Every backend implements the same two functions on arguments that :func:`ptv2_kernels.prefix_attention` checked
and normalized (a 4-D prefix bank; contiguous index tensors; one bool mask, either a 2-D key-padding mask or a dense
mask expanded, as a view, to ``[B, Hq, Nq, Nk]``; every additive term folded into one bias):

* ``forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed, causal, scale,
  dropout_p, *, attn_bias=None) -> (out, lse)``
* ``backward(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed,
  out, lse, causal, scale, dropout_p, deterministic, *, attn_bias=None, grad_bias=None)
  -> (dq, dk, dv, dprefix_k, dprefix_v)``, writing the bias gradient into ``grad_bias`` (float32
  ``[B, Hq, Nq, Nk]`` zeros) when it is a non-empty tensor

``attn_bias``, when given, is a float view expanded to ``[B, Hq, Nq, Nk]``.

``seed`` is a 0-d int64 tensor on the inputs' device when ``dropout_p > 0`` (else None): both passes regenerate
the same dropout mask from it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import reference

NAMES = ("triton", "cuda", "native", "reference")

# Head dims the fused kernels serve; Triton pads other sizes to the next power of two internally.
MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# CUDA grids allow 65535 programs along their second and third dims (query heads and samples).
MAX_GRID_DIM = 65535


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1, read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _interpreter_problem() -> Optional[str]:
    """Why Triton's CPU interpreter cannot run the kernels with the installed packages, or None.

    Before Triton 3.7 the interpreter turns a loop bound into an int by ``int()`` of a one-element array, which
    numpy 2.4 and later refuse ("only 0-dimensional arrays can be converted to Python scalars")."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton_version, numpy_version = version("triton"), version("numpy")
    except PackageNotFoundError:
        return None
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter fails with numpy {numpy_version} (numpy >= 2.4 refuses "
                "its int() of one-element arrays); install numpy<2.4 or triton>=3.7")
    return None


def _release(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def unavailable_reason(name: str) -> Optional[str]:
    """None if backend ``name`` can run on this machine at all, else a sentence saying why it cannot."""
    if name in ("reference", "native"):
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed"
        if not (torch.cuda.is_available() or triton_interpreting()):
            return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run its CPU interpreter)"
        if not torch.cuda.is_available():
            return _interpreter_problem()
        return None
    if name == "cuda":
        from . import cuda_backend

        return cuda_backend.unavailable_reason()
    raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {name!r}")


def unsupported_reason(name: str, q: Tensor, k: Tensor, prefix_k: Tensor, dropout_p: float = 0.0,
                       attn_bias: Optional[Tensor] = None, bias_grad: bool = False) -> Optional[str]:
    """None if backend ``name`` can serve a call with these inputs, else why not (machine first, then the case).
    ``bias_grad``: the additive bias requires a gradient."""
    reason = unavailable_reason(name)
    if reason is not None or name == "reference":
        return reason
    if name == "native":
        from . import native

        return "; ".join(native.unsupported_reasons(q, prefix_k, dropout_p, attn_bias, bias_grad)) or None
    if name == "cuda":
        if attn_bias is not None:
            return ("its kernels take no additive score bias (attn_bias or a float attn_mask); the triton "
                    "backend does")
        from . import cuda_backend

        return cuda_backend.unsupported_reason(q, k, prefix_k, dropout_p)
    batch, q_heads, q_len, head_dim = q.shape
    if q.dtype not in KERNEL_DTYPES:
        return f"it supports q/k/v of dtype float16, bfloat16 or float32, got {q.dtype}"
    if prefix_k.dtype not in KERNEL_DTYPES:
        return f"it supports prefix_k/prefix_v of dtype float16, bfloat16 or float32, got {prefix_k.dtype}"
    if attn_bias is not None and attn_bias.dtype not in KERNEL_DTYPES:
        return f"it supports attn_bias of dtype float16, bfloat16 or float32, got {attn_bias.dtype}"
    if head_dim > MAX_HEAD_DIM:
        return f"it supports head dims up to {MAX_HEAD_DIM}, got {head_dim}"
    if max(batch, q_heads) > MAX_GRID_DIM:
        return f"it launches a grid row per sample and head, at most {MAX_GRID_DIM} each, got B={batch}, Hq={q_heads}"
    if dropout_p > 0.0 and q_len * (prefix_k.shape[-2] + k.shape[2]) >= 2**31:
        # Dropout numbers each (query, key) pair of a (sample, head) with one 32-bit counter.
        return f"with dropout it needs Nq * (P + Nk) < 2**31, got Nq={q_len}, P={prefix_k.shape[-2]}, Nk={k.shape[2]}"
    if q.device.type == "cuda":
        return None
    if not triton_interpreting():
        return f"it runs on CUDA tensors, got tensors on {q.device}"
    if torch.bfloat16 in (q.dtype, prefix_k.dtype):
        return "Triton's CPU interpreter computes tl.dot on bfloat16 wrongly; use float16/float32 or a GPU"
    return None


def choose(requested: str, q: Tensor, k: Tensor, prefix_k: Tensor, dropout_p: float = 0.0,
           attn_bias: Optional[Tensor] = None, bias_grad: bool = False) -> str:
    """The backend that serves this call: ``requested`` if it can (else ValueError saying why), or for "auto" the
    fastest one that supports the case. Off CUDA that is torch's fused attention (``native``) where it can serve,
    else the reference (Triton's interpreter is for tests)."""
    if requested == "auto":
        if q.device.type != "cuda":
            if unsupported_reason("native", q, k, prefix_k, dropout_p, attn_bias, bias_grad) is None:
                return "native"
            return "reference"
        # Triton first until a GPU benchmark shows the CUDA kernels faster; CUDA where Triton cannot serve.
        reasons = {}
        for name in ("triton", "cuda"):
            reasons[name] = unsupported_reason(name, q, k, prefix_k, dropout_p, attn_bias)
            if reasons[name] is None:
                return name
        # Correct but slow (materialized scores): say so rather than fall back in silence.
        warnings.warn("ptv2_kernels: backend='auto' runs the PyTorch reference for this call on "
                      f"{q.device}, no fused kernel can serve it (triton: {reasons['triton']}; cuda: "
                      f"{reasons['cuda']})", RuntimeWarning, stacklevel=3)
        return "reference"
    reason = unsupported_reason(requested, q, k, prefix_k, dropout_p, attn_bias, bias_grad)
    if reason is not None:
        raise ValueError(f"backend={requested!r} cannot serve this call: {reason}")
    return requested


def implementation(name: str):
    """The object (a module or a class) whose ``forward`` and ``backward`` implement backend ``name``."""
    if name == "triton":
        from .triton import prefix_attention as triton_backend

        return triton_backend
    if name == "cuda":
        from . import cuda_backend

        return cuda_backend
    if name == "native":
        from . import native

        return native
    if name == "reference":
        return ReferenceBackend
    raise ValueError(f"no implementation of backend {name!r}")


class ReferenceBackend:
    """The oracle as a backend: forward through :func:`attention_ref`, backward by autograd through a recompute."""

    @staticmethod
    def forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed, causal, scale,
                dropout_p, *, attn_bias=None):
        out, lse = reference.attention_ref(
            q, k, v, prefix_k, prefix_v, prefix_index=prefix_index, prefix_lengths=prefix_lengths,
            **_reference_masks(attn_mask), attn_bias=attn_bias, causal=causal, scale=scale, dropout_p=dropout_p,
            generator=_generator(seed, q))
        return _in_output_layout(out.to(q.dtype)), lse.float()

    @staticmethod
    def backward(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed,
                 out, lse, causal, scale, dropout_p, deterministic, *, attn_bias=None, grad_bias=None):
        grads = reference.attention_ref_backward(
            grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index=prefix_index,
            prefix_lengths=prefix_lengths, **_reference_masks(attn_mask), attn_bias=attn_bias, causal=causal,
            scale=scale, dropout_p=dropout_p, generator=_generator(seed, q))
        if grad_bias is not None and grad_bias.numel():
            grad_bias.copy_(grads[5])
        return grads[:5]


def _reference_masks(attn_mask) -> dict:
    """The backend form of the mask (2-D: key padding; 4-D: dense) as attention_ref's keyword arguments."""
    if attn_mask is not None and attn_mask.dim() == 2:
        return dict(key_padding_mask=attn_mask)
    return dict(attn_mask=attn_mask)


def _generator(seed, q):
    """The generator the reference backend draws its dropout mask from, made again from the seed in backward."""
    if seed is None:
        return None
    generator = torch.Generator(device=q.device)
    generator.manual_seed(int(seed))
    return generator


def _in_output_layout(out: Tensor) -> Tensor:
    """``out`` [B, Hq, Nq, D] moved into [B, Nq, Hq, D] memory, the layout every backend returns."""
    batch, heads, length, dim = out.shape
    laid_out = out.new_empty(batch, length, heads, dim)
    laid_out.copy_(out.transpose(1, 2))
    return laid_out.transpose(1, 2)

