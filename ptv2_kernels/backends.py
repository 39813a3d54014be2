"""The backends behind :func:`ptv2_kernels.prefix_attention`: which exist here, which can serve a call, and why not.

The op describes a checked call once as a :class:`Problem`; each backend is a :class:`Backend` subclass that states
what it serves (score options, values of another head dim, packed sequences) and its limits once, and lists every
reason it cannot serve a problem (:meth:`Backend.unsupported_reasons`); :func:`choose_for` picks by those reasons,
and an explicit backend that cannot serve raises with all of them.

Every backend implements the same two functions on one :class:`~ptv2_kernels.call.Call`, the call's arguments
that :func:`ptv2_kernels.prefix_attention` checked and normalized once (a 4-D prefix bank; contiguous index tensors;
one bool mask, either a 2-D key-padding mask or a dense mask viewed as ``[B, Hq, Nq, Nk]``; every additive term
folded into one bias expanded, as a view, to the scores' shape; the score options; the dropout seed):

* ``forward(call) -> (out, lse)``
* ``backward(grad_out, grad_lse, call, out, lse, *, grad_bias=None, grad_sinks=None, grad_prefix_bias=None)
  -> (dq, dk, dv, dprefix_k, dprefix_v)``, writing the bias gradient into ``grad_bias`` (float32
  ``[B, Hq, Nq, Nk]`` zeros) when it is a non-empty tensor, the sinks' gradient summed over the rows it was given
  into ``grad_sinks`` (float32 ``[Hq]`` zeros) and the prefix columns' score gradients into ``grad_prefix_bias``
  (float32 ``[B, Hq, Nq, P]`` zeros) when they are given

A backend with variable-length kernels (:data:`VARLEN_KERNELS`) also implements ``forward_varlen(packed)`` and
``backward_varlen(grad_out, grad_lse, packed, out, lse, *, grad_sinks=None)`` on one
:class:`~ptv2_kernels.call.PackedCall`; the others serve packed sequences one at a time through their padded
functions (``varlen.SequenceLoop``).

A backend computes only the score options (:data:`SCORE_OPTIONS`) it states it serves, and raises for the others
(:meth:`~ptv2_kernels.call.Call.require_only`): the choice never sends it such a call.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import native, reference
from ._memo import Memo
from .call import SCORE_OPTIONS, Call

NAMES = ("triton", "cuda", "native", "reference")

# Head dims the fused kernels serve; Triton pads other sizes to the next power of two internally.
MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# CUDA grids allow 65535 programs along their second and third dims (query heads and samples).
MAX_GRID_DIM = 65535


@dataclasses.dataclass(frozen=True)
class KernelLimits:
    """What a family of fused kernels serves, stated once (:func:`limit_reasons` says which limits a call
    exceeds). The Triton backend's are below; the CUDA backend's come from the extension itself."""

    dtypes: tuple = KERNEL_DTYPES
    max_head_dim: int = MAX_HEAD_DIM
    max_grid_dim: int = MAX_GRID_DIM
    # Dropout numbers each (query, key) pair of a (sample, head) with one counter of this many bits.
    dropout_bits: int = 31
    # When set, every length and B * Hq * Nq must also fit in this many bits (32-bit index arithmetic).
    size_bits: Optional[int] = None
    takes_bias: bool = True


TRITON_LIMITS = KernelLimits()
NO_BIAS_REASON = "its kernels take no additive score bias (attn_bias or a float attn_mask); the triton backend does"
# What each score option (call.SCORE_OPTIONS, docs/design.md §4) is in a reason.
_SCORE_OPTION_WHAT = {"softcap": "score softcapping (softcap)", "sinks": "attention sinks (sinks)",
                      "prefix_bias": "a bias on the prefix keys' scores (prefix_bias)",
                      "window_size": "sliding-window attention (window_size)"}


class Problem(NamedTuple):
    """What the choice of a backend reads of a call, made once from its checked, normalized arguments.

    The tensors are read for their ``device``, ``dtype`` and ``shape`` only. ``bias_grad``: the additive bias
    requires a gradient; ``softcap``, ``sinks``, ``prefix_bias`` and ``window_size``: the call's score options;
    ``value_dim``: v's head dim (None: k's); ``packed``: (S, max_seqlen_q, max_seqlen_k) of a variable-length call,
    whose q and k are ``[total, H, D]`` (None: a padded call, q and k ``[B, H, N, D]``)."""

    q: Tensor
    k: Tensor
    prefix_k: Tensor
    dropout_p: float = 0.0
    attn_bias: Optional[Tensor] = None
    bias_grad: bool = False
    softcap: Optional[float] = None
    sinks: Optional[Tensor] = None
    prefix_bias: Optional[Tensor] = None
    value_dim: Optional[int] = None
    window_size: Optional[tuple[int, int]] = None
    packed: Optional[tuple[int, int, int]] = None

    def score_options_used(self) -> list[str]:
        """The score options the call uses, in the order of :data:`SCORE_OPTIONS`."""
        values = (self.softcap, self.sinks, self.prefix_bias, self.window_size)
        return [option for option, value in zip(SCORE_OPTIONS, values) if value is not None]


def _dtype_names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def limit_reasons(limits: KernelLimits, q: Tensor, k: Tensor, prefix_k: Tensor, dropout_p: float = 0.0,
                  attn_bias: Optional[Tensor] = None, packed: Optional[tuple[int, int, int]] = None) -> list[str]:
    """Every limit of ``limits`` that a call with these (checked, normalized) inputs exceeds, as reasons.
    ``packed``: (S, max_seqlen_q, max_seqlen_k) of a variable-length call, whose q and k are ``[total, H, D]``
    (its sequences share the grid's first dim with their blocks, so S has no grid limit of its own)."""
    reasons = []
    if packed is None:
        batch, q_heads, q_len, head_dim = q.shape
        k_len = k.shape[2]
    else:
        (batch, q_len, k_len), (q_heads, head_dim) = packed, q.shape[1:]
    prefix_len = prefix_k.shape[-2]
    allowed = _dtype_names(limits.dtypes)
    if q.dtype not in limits.dtypes:
        reasons.append(f"it supports q/k/v of dtype {allowed}, got {q.dtype}")
    if prefix_k.dtype not in limits.dtypes:
        reasons.append(f"it supports prefix_k/prefix_v of dtype {allowed}, got {prefix_k.dtype}")
    if attn_bias is not None:
        if not limits.takes_bias:
            reasons.append(NO_BIAS_REASON)
        elif attn_bias.dtype not in limits.dtypes:
            reasons.append(f"it supports attn_bias of dtype {allowed}, got {attn_bias.dtype}")
    if head_dim > limits.max_head_dim:
        reasons.append(f"it supports head dims up to {limits.max_head_dim}, got {head_dim}")
    if packed is None and max(batch, q_heads) > limits.max_grid_dim:
        reasons.append(f"it launches a grid row per sample and head, at most {limits.max_grid_dim} each, got "
                       f"B={batch}, Hq={q_heads}")
    if packed is not None and q_heads > limits.max_grid_dim:
        reasons.append(f"it launches a grid row per query head, at most {limits.max_grid_dim}, got Hq={q_heads}")
    if limits.size_bits is not None and (batch * q_heads * q_len >= 2**limits.size_bits
                                         or max(q_len, k_len, prefix_len) >= 2**limits.size_bits):
        reasons.append(f"it needs B * Hq * Nq and every length below 2**{limits.size_bits}")
    if dropout_p > 0.0 and q_len * (prefix_len + k_len) >= 2**limits.dropout_bits:
        reasons.append(f"with dropout it needs Nq * (P + Nk) < 2**{limits.dropout_bits}, got Nq={q_len}, "
                       f"P={prefix_len}, Nk={k_len}")
    return reasons


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


# ----------------------------------------------------------------------------------------------------------------
# The backends, declared: what each serves, stated once, and every reason it cannot serve a problem
# ----------------------------------------------------------------------------------------------------------------

class Backend:
    """A backend as the choice sees it. A subclass states what it serves as class attributes; the reasons it
    cannot serve a problem are derived from them (:meth:`feature_reasons`) and from its own limits
    (:meth:`limit_reasons`), all of them listed, the machine first."""

    name: str = ""
    # The score options it serves; for each other one, why not.
    score_options: tuple = ()
    score_option_why: dict = {}
    # None: it serves values of another head dim than the keys' (Dv != Dk, multi-head latent attention); else why
    # it does not.
    value_head_dim_why: Optional[str] = None
    # None: it serves packed sequences (the variable-length op); else why it does not. With kernels of their own
    # (packed_kernels), or one sequence at a time.
    packed_why: Optional[str] = None
    packed_kernels: bool = False

    def machine_reason(self) -> Optional[str]:
        """None if the backend can run on this machine at all, else a sentence saying why it cannot."""
        return None

    def implementation(self):
        """The object (a module or a class) whose ``forward`` and ``backward`` implement the backend."""
        raise NotImplementedError

    def unsupported_reasons(self, problem: Problem) -> list[str]:
        """Every reason the backend cannot serve ``problem`` (empty: it can), the machine first."""
        reason = unavailable_reason(self.name)  # through the module's function: one place says what runs here
        if reason is not None:
            return [reason]
        if problem.packed is not None and self.packed_why is not None:
            return [self.packed_why] + self.feature_reasons(problem)
        return self.limit_reasons(problem) + self.feature_reasons(problem)

    def feature_reasons(self, problem: Problem) -> list[str]:
        """Why it cannot serve the score options and the value head dim the problem uses."""
        reasons = self.score_option_reasons(problem)
        if problem.value_dim is not None:
            reasons += self.value_dim_reasons(problem.q.shape[-1], problem.value_dim)
        return reasons

    def score_option_reasons(self, problem: Problem) -> list[str]:
        reasons = []
        for option in problem.score_options_used():
            if option not in self.score_options:
                reasons.append(f"it does not serve {_SCORE_OPTION_WHAT[option]}: {self.score_option_why[option]} "
                               f"(the {' and '.join(SERVES_SCORE_OPTION[option])} backends do)")
        return reasons

    def value_dim_reasons(self, head_dim: int, value_dim: Optional[int]) -> list[str]:
        if value_dim is None or value_dim == head_dim or self.value_head_dim_why is None:
            return []
        return [f"it does not serve values of another head dim than the keys' (Dv = {value_dim}, Dk = {head_dim}): "
                f"{self.value_head_dim_why} (the {' and '.join(SERVES_VALUE_HEAD_DIM)} backends do)"]

    def limit_reasons(self, problem: Problem) -> list[str]:
        """Why its kernels' limits (dtypes, sizes, devices) rule the problem out."""
        return []


class TritonBackend(Backend):
    name = "triton"
    score_options = SCORE_OPTIONS
    packed_kernels = True
    limits = TRITON_LIMITS

    def machine_reason(self) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed"
        if not (torch.cuda.is_available() or triton_interpreting()):
            return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run its CPU interpreter)"
        if not torch.cuda.is_available():
            return _interpreter_problem()
        return None

    def implementation(self):
        from .triton import prefix_attention as triton_backend

        return triton_backend

    def value_dim_reasons(self, head_dim: int, value_dim: Optional[int]) -> list[str]:
        if value_dim is not None and value_dim != head_dim and value_dim > self.limits.max_head_dim:
            return [f"it supports value head dims up to {self.limits.max_head_dim}, got {value_dim}"]
        return []

    def limit_reasons(self, problem: Problem) -> list[str]:
        q, prefix_k, prefix_bias = problem.q, problem.prefix_k, problem.prefix_bias
        reasons = limit_reasons(self.limits, q, problem.k, prefix_k, problem.dropout_p, problem.attn_bias,
                                packed=problem.packed)
        if prefix_bias is not None and prefix_bias.dtype not in self.limits.dtypes:
            reasons.append(f"it supports prefix_bias of dtype {_dtype_names(self.limits.dtypes)}, got "
                           f"{prefix_bias.dtype}")
        if q.device.type != "cuda":
            if not triton_interpreting():
                reasons.insert(0, f"it runs on CUDA tensors, got tensors on {q.device}")
            elif torch.bfloat16 in (q.dtype, prefix_k.dtype):
                reasons.append("Triton's CPU interpreter computes tl.dot on bfloat16 wrongly; use float16/float32 "
                               "or a GPU")
        return reasons


class CudaBackend(Backend):
    name = "cuda"
    score_option_why = {"softcap": "its kernels have no score cap", "sinks": "its kernels have no sink term",
                        "prefix_bias": "its kernels add no bias to the prefix keys",
                        "window_size": "its kernels have no sliding-window rule (pass the window as a bool "
                                       "attn_mask)"}
    value_head_dim_why = "its kernels read keys and values of one head dim"
    packed_why = ("its kernels have no variable-length form (packed sequences); the triton backend has one, and "
                  "'reference' and 'native' run one sequence at a time")

    def machine_reason(self) -> Optional[str]:
        from . import cuda_backend

        return cuda_backend.unavailable_reason()

    def implementation(self):
        from . import cuda_backend

        return cuda_backend

    def limit_reasons(self, problem: Problem) -> list[str]:
        # the limits the extension reports, what the GPU allows; the bias is a feature the kernels lack, whatever
        # the machine
        from . import cuda_backend

        reasons = [] if problem.attn_bias is None or cuda_backend.TAKES_BIAS else [NO_BIAS_REASON]
        return reasons + cuda_backend.unsupported_reasons(problem.q, problem.k, problem.prefix_k, problem.dropout_p)


class NativeBackend(Backend):
    name = "native"
    score_options = native.SCORE_OPTIONS
    score_option_why = {"softcap": "torch's fused CPU attention cannot cap the scores inside its softmax",
                        "sinks": "the merge of torch's fused CPU attention parts has no sink term",
                        "prefix_bias": "its prefix part runs torch's fused CPU attention without a mask"}
    value_head_dim_why = "torch's fused CPU attention requires q, k and v to share one head dim"

    def implementation(self):
        return native

    def limit_reasons(self, problem: Problem) -> list[str]:
        return native.unsupported_reasons(problem.q, problem.prefix_k, problem.dropout_p, problem.attn_bias,
                                          problem.bias_grad)


class ReferenceOracle(Backend):
    """The reference serves every problem: it is the oracle the others are tested against."""

    name = "reference"
    score_options = SCORE_OPTIONS

    def implementation(self):
        return ReferenceBackend

    def unsupported_reasons(self, problem: Problem) -> list[str]:
        return []


# The backends by name, in the order of NAMES.
REGISTRY = {backend.name: backend for backend in (TritonBackend(), CudaBackend(), NativeBackend(),
                                                  ReferenceOracle())}
# Which backends serve each score option, values of another head dim than the keys', and packed sequences with
# kernels of their own (the others serve packed sequences one at a time, or not).
SERVES_SCORE_OPTION = {option: tuple(b.name for b in REGISTRY.values() if option in b.score_options)
                       for option in SCORE_OPTIONS}
SERVES_VALUE_HEAD_DIM = tuple(b.name for b in REGISTRY.values() if b.value_head_dim_why is None)
VARLEN_KERNELS = tuple(b.name for b in REGISTRY.values() if b.packed_kernels)


def _backend(name: str) -> Backend:
    backend = REGISTRY.get(name)
    if backend is None:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {name!r}")
    return backend


def unavailable_reason(name: str) -> Optional[str]:
    """None if backend ``name`` can run on this machine at all, else a sentence saying why it cannot."""
    return _backend(name).machine_reason()


def value_head_dim_reasons(name: str, head_dim: int, value_dim: Optional[int]) -> list[str]:
    """Why backend ``name`` cannot serve values of head dim ``value_dim`` with keys of ``head_dim`` (empty: it
    serves them; ``value_dim`` None means the keys' head dim)."""
    return _backend(name).value_dim_reasons(head_dim, value_dim)


def score_option_reasons(name: str, softcap: Optional[float] = None, sinks: Optional[Tensor] = None,
                         prefix_bias: Optional[Tensor] = None,
                         window_size: Optional[tuple[int, int]] = None) -> list[str]:
    """Why backend ``name`` cannot serve the score options a call uses (empty: it serves them)."""
    problem = Problem(None, None, None, softcap=softcap, sinks=sinks, prefix_bias=prefix_bias,
                      window_size=window_size)
    return _backend(name).score_option_reasons(problem)


def unsupported_reasons(name: str, q: Tensor, k: Tensor, prefix_k: Tensor, dropout_p: float = 0.0,
                        attn_bias: Optional[Tensor] = None, bias_grad: bool = False, *,
                        softcap: Optional[float] = None, sinks: Optional[Tensor] = None,
                        prefix_bias: Optional[Tensor] = None, value_dim: Optional[int] = None,
                        window_size: Optional[tuple[int, int]] = None) -> list[str]:
    """Every reason backend ``name`` cannot serve a call with these inputs (empty: it can), the machine first
    (the arguments are :class:`Problem`'s)."""
    return _backend(name).unsupported_reasons(Problem(q, k, prefix_k, dropout_p, attn_bias, bias_grad, softcap,
                                                      sinks, prefix_bias, value_dim, window_size))


def unsupported_reason(name: str, q: Tensor, k: Tensor, prefix_k: Tensor, dropout_p: float = 0.0,
                       attn_bias: Optional[Tensor] = None, bias_grad: bool = False, **score_options) -> Optional[str]:
    """None if backend ``name`` can serve a call with these inputs, else every reason why not, in one sentence."""
    return "; ".join(unsupported_reasons(name, q, k, prefix_k, dropout_p, attn_bias, bias_grad,
                                         **score_options)) or None


def varlen_unsupported_reasons(name: str, q: Tensor, k: Tensor, prefix_k: Tensor, packed: tuple[int, int, int],
                               dropout_p: float = 0.0, *, softcap: Optional[float] = None,
                               sinks: Optional[Tensor] = None, value_dim: Optional[int] = None,
                               window_size: Optional[tuple[int, int]] = None) -> list[str]:
    """Every reason backend ``name`` cannot serve a variable-length call (q, k ``[total, H, Dk]``; ``packed`` =
    (S, max_seqlen_q, max_seqlen_k); ``value_dim``: v's head dim, None for k's), the machine first."""
    return _backend(name).unsupported_reasons(Problem(q, k, prefix_k, dropout_p, softcap=softcap, sinks=sinks,
                                                      value_dim=value_dim, window_size=window_size, packed=packed))


def choose(requested: str, q: Tensor, k: Tensor, prefix_k: Tensor, dropout_p: float = 0.0,
           attn_bias: Optional[Tensor] = None, bias_grad: bool = False, **score_options) -> str:
    """:func:`choose_for` a call with these inputs (the arguments are :class:`Problem`'s)."""
    return choose_for(requested, Problem(q, k, prefix_k, dropout_p, attn_bias, bias_grad, **score_options))


def choose_varlen(requested: str, q: Tensor, k: Tensor, prefix_k: Tensor, packed: tuple[int, int, int],
                  dropout_p: float = 0.0, **score_options) -> str:
    """:func:`choose_for` a variable-length call with these inputs (see :func:`varlen_unsupported_reasons`)."""
    return choose_for(requested, Problem(q, k, prefix_k, dropout_p, packed=packed, **score_options))


def choose_for(requested: str, problem: Problem) -> str:
    """The backend that serves ``problem``: ``requested`` if it can (else ValueError listing every reason why
    not), or for "auto" the fastest one that can. Off CUDA that is torch's fused attention (``native``) where it
    can serve, else the reference (Triton's interpreter is for tests). On CUDA, Triton first until a GPU
    benchmark shows the CUDA kernels faster, CUDA where Triton cannot serve, and the reference, with a warning
    that says why, where neither can."""
    if requested != "auto":
        reason = "; ".join(_backend(requested).unsupported_reasons(problem))
        if reason:
            what = "call" if problem.packed is None else "variable-length call"
            raise ValueError(f"backend={requested!r} cannot serve this {what}: {reason}")
        return requested
    if torch.compiler.is_compiling():
        # traced once per graph; a global memo that changes between steps would make torch.compile recompile
        return _choose_auto(problem)[0]
    key = _choice_key(problem)
    name = _AUTO_CHOICES.get(key)
    if name is None:
        name, warned = _choose_auto(problem)
        if not warned:  # a fallback that warns is chosen afresh, and warns, each time
            _AUTO_CHOICES.put(key, name)
    return name


# What auto chose for each problem key (see _choice_key): made once per key and reused by every layer of a forward
# and every decode step, where the reasons would otherwise be derived again per call.
_AUTO_CHOICES = Memo(capacity=256)


def _choice_key(problem: Problem) -> tuple:
    """Everything the backends' reasons read of a problem: the device, the dtypes, the sizes, which options it uses
    (dropout, a bias and whether it needs a gradient, the score options) and its packing. Two problems of one key
    get the same reasons from every backend.

    The sequence length grows by one each decode step; without dropout the reasons read it only against a power
    of two (every length below 2**size_bits), so its bit length stands for it and one key serves every step."""
    q, prefix_k, attn_bias, prefix_bias = problem.q, problem.prefix_k, problem.attn_bias, problem.prefix_bias
    if problem.packed is None:
        sizes, k_len = q.shape, problem.k.shape[2]
        keys = k_len if problem.dropout_p > 0.0 else k_len.bit_length()
    else:  # [total, H, D]: the packing's longest lengths stand for the sizes
        sizes, keys = q.shape[1:], None
    return (q.device, q.dtype, prefix_k.dtype, tuple(sizes), keys, tuple(prefix_k.shape), problem.value_dim,
            problem.dropout_p > 0.0, None if attn_bias is None else attn_bias.dtype, problem.bias_grad,
            problem.softcap is None, problem.sinks is None, None if prefix_bias is None else prefix_bias.dtype,
            problem.window_size is None, problem.packed)


def _choose_auto(problem: Problem) -> tuple[str, bool]:
    """(auto's backend for ``problem``, whether choosing it warned)."""
    if problem.q.device.type != "cuda":
        return ("native" if not REGISTRY["native"].unsupported_reasons(problem) else "reference"), False
    reasons = {}
    for name in ("triton", "cuda") if problem.packed is None else ("triton",):
        reasons[name] = "; ".join(REGISTRY[name].unsupported_reasons(problem))
        if not reasons[name]:
            return name, False
    # Correct but slow (materialized scores): say so rather than fall back in silence.
    what = "call" if problem.packed is None else "variable-length call"
    declined = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
    warnings.warn(f"ptv2_kernels: backend='auto' runs the PyTorch reference for this {what} on {problem.q.device}, "
                  f"no fused kernel can serve it ({declined})", RuntimeWarning, stacklevel=4)
    return "reference", True


def implementation(name: str):
    """The object (a module or a class) whose ``forward`` and ``backward`` implement backend ``name``."""
    backend = REGISTRY.get(name)
    if backend is None:
        raise ValueError(f"no implementation of backend {name!r}")
    return backend.implementation()


class ReferenceBackend:
    """The oracle as a backend: forward through :func:`attention_ref`, backward by autograd through a recompute."""

    @staticmethod
    def forward(call: Call):
        out, lse = reference.attention_ref(*call[:5], **_reference_arguments(call))
        return _in_output_layout(out.to(call.q.dtype)), lse.float()

    @staticmethod
    def backward(grad_out, grad_lse, call: Call, out, lse, *, grad_bias=None, grad_sinks=None,
                 grad_prefix_bias=None):
        grads = reference.attention_ref_backward(grad_out, grad_lse, *call[:5], **_reference_arguments(call))
        if grad_bias is not None and grad_bias.numel():
            grad_bias.copy_(grads[5])
        if grad_prefix_bias is not None and grad_prefix_bias.numel():
            grad_prefix_bias.copy_(grads[5 + (call.attn_bias is not None)])
        if grad_sinks is not None:
            grad_sinks.copy_(grads[-1])
        return grads[:5]


def _reference_arguments(call: Call) -> dict:
    """attention_ref's keyword arguments for ``call`` (the dropout generator made again from the seed)."""
    return dict(prefix_index=call.prefix_index, prefix_lengths=call.prefix_lengths,
                **_reference_masks(call.attn_mask), attn_bias=call.attn_bias, causal=call.causal, scale=call.scale,
                softcap=call.softcap, sinks=call.sinks, prefix_bias=call.prefix_bias, window_size=call.window_size,
                dropout_p=call.dropout_p, generator=_generator(call.seed, call.q))


def _reference_masks(attn_mask) -> dict:
    """The backend form of the mask (2-D: key padding; 4-D: dense) as attention_ref's keyword arguments."""
    if attn_mask is not None and attn_mask.dim() == 2:
        return dict(key_padding_mask=attn_mask)
    return dict(attn_mask=attn_mask)


def _generator(seed, q):
    """The generator the reference backend draws its dropout mask from, made again from the seed in backward."""
    return None if seed is None else reference.seeded_generator(seed, q.device)


def _in_output_layout(out: Tensor) -> Tensor:
    """``out`` [B, Hq, Nq, D] moved into [B, Nq, Hq, D] memory, the layout every backend returns."""
    batch, heads, length, dim = out.shape
    laid_out = out.new_empty(batch, length, heads, dim)
    laid_out.copy_(out.transpose(1, 2))
    return laid_out.transpose(1, 2)

