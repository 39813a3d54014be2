"""The Triton backend: launch configurations (with their pruning by registers and shared memory), the autotuned
launchers, and ``forward`` / ``backward`` on checked, normalized arguments (see :mod:`ptv2_kernels.backends`).

The kernels themselves are in :mod:`ptv2_kernels.triton.kernels`; this module decides their grids, block shapes
and compile-time flags: GQA packing and split-KV for decode, the float32 partials of the prefix gradients (atomics,
or per sample in deterministic mode), and :func:`dropout_keep_mask`, the dropout mask the kernels draw from a seed.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from .._memo import Memo
from ..call import Call, PackedCall
from ..backends import triton_interpreting
from .kernels import (  # noqa: F401 - the kernels are also reached as attributes of this module (static report)
    LOG2E, _backward_key_kernel, _backward_preprocess_kernel, _backward_query_kernel, _combine_splits_kernel,
    _dropout_mask_kernel, _forward_kernel, _prefix_grad_finalize_kernel,
)


# Host-side integer helpers. Triton's own (triton.cdiv, triton.next_power_of_2) are constexpr functions now, which
# cost microseconds a call on the host; the launch path calls them a dozen times per forward and backward.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0, as Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def dropout_keep_mask(seed: torch.Tensor, batch: int, q_heads: int, q_len: int, prefix_len: int, k_len: int,
                      dropout_p: float) -> torch.Tensor:
    """The bool keep mask ``[B, Hq, Nq, P + Nk]`` the kernels draw from ``seed`` (a debugging and testing aid:
    pass it to :func:`ptv2_kernels.attention_ref` as ``dropout_keep`` to compare a dropout run exactly)."""
    cols = prefix_len + k_len
    keep = torch.empty(batch, q_heads, q_len, cols, dtype=torch.int8, device=seed.device)
    if keep.numel():
        grid = (q_heads * batch, _cdiv(q_len, 16))
        _dropout_mask_kernel[grid](keep, seed, q_len, cols, dropout_p, BLOCK_M=16,
                                   BLOCK_N=_next_power_of_2(cols))
    return keep.bool()


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------------

def _configs(shapes, **flags):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, **flags}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# (BLOCK_M, BLOCK_N, warps, stages). Large query blocks with 3-stage pipelines suit Ampere and Hopper alike at long
# sequences; the small-BLOCK_M ones serve decode and short queries. prune_configs keeps, per call, those that fit
# the GPU's registers and shared memory at the call's head dim. The 8-warp backward tiles 32x64 (keys) and 64x64
# (queries) exist for head dim 128, where the 4-warp ones spill (benchmarks/static_report.py; 64x64 keys with 8
# warps spill there too).
# The forward's TMA variant (USE_TMA: the sequence's key/value tiles by tensor descriptors) is offered on Hopper
# and later in the shapes that suit long sequences, beside the pointer-load ones; prune_configs keeps it only
# where the descriptors' alignment holds. It stays only if GPU timing shows it faster (benchmarks/gpu_check.py).
_FORWARD_CONFIGS = _configs([
    (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4),
    (32, 64, 4, 3), (16, 64, 4, 3), (16, 128, 4, 2),
], USE_TMA=False) + _configs([(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)], USE_TMA=True)
_KEY_GRAD_CONFIGS = _configs([
    (64, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3),
    (16, 64, 4, 2), (16, 32, 4, 2),
])
_QUERY_GRAD_CONFIGS = _configs([
    (128, 64, 8, 3), (64, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 2),
    (16, 64, 4, 2),
])
# The interpreter cannot time configurations and runs each program in Python: one small block shape (the
# forward's pointer-load variant; tests switch to its TMA variant through the forward launcher's meta).
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}
_AUTOTUNE_KEY = ["q_len_class", "k_len_class", "HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "HAS_KEY_PAD", "HAS_DENSE",
                 "HAS_BIAS", "HAS_DROPOUT", "VARLEN", "HAS_SOFTCAP", "HAS_WINDOW"]
# The forward packs the query heads of a GQA group into one program's rows up to this many queries: decode (1) and
# speculative or chunked decode steps. Longer queries fill whole blocks per head, and their key/value tiles, shared
# by the group's programs running side by side, come from L2.
PACK_GQA_MAX_QUERIES = 16
# Split-KV forward (decode with too few programs for the GPU): the fewest keys a split takes, and the most splits.
MIN_KEYS_PER_SPLIT = 256
MAX_KV_SPLITS = 32
# Register budget (fp32 tile elements live per thread, see _live_per_thread) above which a configuration spills:
# fitted to the compiled kernels at the target shapes (benchmarks/static_report.py), per architecture major.
# On sm_90 the backward's edge is just under 192: the dQ tile 64x64/4w at head dim 128 (192 exactly) spills 4 B.
_REGISTER_BUDGET = {"forward": {9: 160, 8: 128}, "backward": {9: 190, 8: 128}}
_SHARED_SLACK = 2048  # bytes beyond the tiles: row statistics, reductions


def _kernel_kind(kernel_name: str) -> str:
    return {"_backward_key_kernel": "keys", "_backward_query_kernel": "queries"}.get(kernel_name, "forward")


def _live_per_thread(kind, block_m, block_n, d_pad, warps, dv_pad=None):
    """fp32 tile elements each thread holds at the kernel's peak: the accumulators, the score-sized tiles, and the
    16-bit operand tiles kept in registers (counted at half). Forward: acc [M, Dv], scores [M, N], q [M, D]. Key
    gradients: dK [N, D], dV [N, Dv], k [N, D] and v [N, Dv], scores and dP [M, N]. Query gradients: dQ [M, D],
    q [M, D] and dO [M, Dv], scores and dP [M, N]. ``dv_pad``: the values' padded head dim (None: ``d_pad``)."""
    m, n, d = block_m, block_n, d_pad
    dv = d if dv_pad is None else dv_pad
    live = {"forward": m * dv + m * n + m * d / 2, "keys": (n * d + n * dv) * 3 / 2 + 2 * m * n,
            "queries": m * d + (m * d + m * dv) / 2 + 2 * m * n}[kind]
    return live / (32 * warps)


def shared_memory_estimate(kind, block_m, block_n, d_pad, stages, element_size, dv_pad=None):
    """Upper bound of a configuration's shared memory in bytes: ``stages`` buffers of the pipelined operand tiles
    (Triton's pipeliner allocates that many on Hopper, one fewer on Ampere) and the resident tiles, plus slack.
    ``dv_pad``: the values' padded head dim (None: ``d_pad``). Checked against the compiled kernels by
    benchmarks/static_report.py."""
    m, n, d = block_m, block_n, d_pad
    dv = d if dv_pad is None else dv_pad
    tiles = {"forward": stages * (n * d + n * dv) + m * d,   # k, v pipelined; q resident
             "keys": stages * (m * d + m * dv) + n * d + n * dv,  # q, dO pipelined; k, v resident
             "queries": stages * (n * d + n * dv) + m * d + m * dv}[kind]  # k, v pipelined; q, dO resident
    return tiles * element_size + _SHARED_SLACK


def prune_configs(configs, args, kernel_name, capability, shared_per_block):
    """The configurations worth timing for a launch of the kernel named ``kernel_name`` with arguments ``args``
    (by name, constexprs included) on a GPU of compute ``capability`` (major, minor) whose blocks may use
    ``shared_per_block`` bytes of shared memory: those whose tiles fit its shared memory and its register budget
    (_REGISTER_BUDGET: beyond it they spill), and whose query block is not much longer than the queries. If none
    is left, the smallest configuration."""
    kind = _kernel_kind(kernel_name)
    d_pad, q_len_class = args["D_PAD"], args["q_len_class"]
    dv_pad = args.get("DV_PAD", d_pad)
    major = capability[0]
    budget = _REGISTER_BUDGET["forward" if kind == "forward" else "backward"][9 if major >= 9 else 8]
    element_size = max(t.element_size() for t in (args.get("Q"), args.get("PK")) if hasattr(t, "element_size"))

    def fits(c):
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if _live_per_thread(kind, m, n, d_pad, c.num_warps, dv_pad) > budget:
            return False
        if shared_memory_estimate(kind, m, n, d_pad, c.num_stages, element_size, dv_pad) > shared_per_block:
            return False
        # Key blocks of 32 only where the 64-wide ones cannot be used (large head dims); at head dim 64 the 16x32
        # tile spills on sm_90 where 16x64 does not.
        return not (kind == "keys" and n < 64 and max(d_pad, dv_pad) < 128)

    tma_ready = kind == "forward" and major >= 9 and tma_descriptors_serve(args)
    kept = [c for c in configs if fits(c) and c.kwargs["BLOCK_M"] <= max(16, q_len_class)
            and (tma_ready or not c.kwargs.get("USE_TMA", False))]
    fallback = [c for c in configs if not c.kwargs.get("USE_TMA", False)]
    return kept or [min(fallback, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages))]


# TMA copies need 16-byte aligned global addresses and row strides (docs of cuTensorMapEncodeTiled).
_TMA_ALIGNMENT = 16


def tma_descriptors_serve(args) -> bool:
    """Whether the forward's sequence keys/values (``K``, ``V`` with the launch's strides) can be read through
    tensor descriptors: a contiguous head dim, and every sample, head and token start 16-byte aligned (packed
    sequences are not offered the variant)."""
    if args.get("VARLEN", False):
        return False
    for name in ("K", "V"):
        t = args.get(name)
        if not hasattr(t, "element_size") or t.stride(-1) != 1:
            return False
        size = t.element_size()
        if t.data_ptr() % _TMA_ALIGNMENT or t.shape[-1] * size < _TMA_ALIGNMENT:
            return False
        if any(stride * size % _TMA_ALIGNMENT for stride in t.stride()[:-1]):
            return False
    return True


def _ensure_tma_allocator() -> None:
    """Give Triton an allocator for the tensor descriptors a TMA kernel makes on the device (a global scratch per
    launch), unless the program set one of its own."""
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_torch_scratch)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.lru_cache(maxsize=None)
def _device_limits(device: torch.device):
    """(compute capability, opt-in shared memory per block in bytes) of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or {
        (8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448}.get(
            (props.major, props.minor), 101376)
    return (props.major, props.minor), shared


def _autotuning() -> bool:
    """False with PTV2_TRITON_AUTOTUNE=0 (read at each new autotuning key): then no configuration is timed and each
    launch takes the first one prune_configs keeps — for correctness runs (tests, the self-check,
    compute-sanitizer) that would otherwise spend most of their time compiling every configuration."""
    import os

    return os.environ.get("PTV2_TRITON_AUTOTUNE", "1").strip() not in ("0", "")


def _prune(configs, named_args, kernel_name="", **kwargs):
    """The autotuner's early prune: :func:`prune_configs` for the device the call runs on (only the first
    configuration kept with PTV2_TRITON_AUTOTUNE=0)."""
    args = {**named_args, **kwargs}
    device = args["Q"].device
    capability, shared = _device_limits(device) if device.type == "cuda" else ((9, 0), 232448)
    kept = prune_configs(configs, args, kernel_name, capability, shared)
    return kept if _autotuning() else kept[:1]


class _Launcher:
    """A kernel autotuned over ``configs`` on a GPU; in the interpreter, run with the interpreter's block shape
    (and ``interpreter_flags``). ``kernel`` and ``configs`` stay readable (benchmarks/static_report.py compiles
    every configuration)."""

    def __init__(self, kernel, configs, reset_to_zero=None, extra_key=(), interpreter_flags=None):
        self.kernel, self.configs = kernel, configs
        if triton_interpreting():
            self._kernel, self._meta = kernel, {**_INTERPRETER_CONFIG, **(interpreter_flags or {})}
        else:
            prune = functools.partial(_prune, kernel_name=kernel.__name__)
            self._kernel = triton.autotune(configs, key=_AUTOTUNE_KEY + list(extra_key),
                                           prune_configs_by={"early_config_prune": prune},
                                           reset_to_zero=reset_to_zero)(kernel)
            self._meta = {}

    def __getitem__(self, grid):
        return functools.partial(self._kernel[grid], **self._meta)


_forward = _Launcher(_forward_kernel, _FORWARD_CONFIGS, extra_key=["PACK_GQA", "SPLIT_KV", "HAS_SINKS"],
                     interpreter_flags={"USE_TMA": False})
_backward_keys = _Launcher(_backward_key_kernel, _KEY_GRAD_CONFIGS, reset_to_zero=["PrefixGradK", "PrefixGradV"])
_backward_queries = _Launcher(_backward_query_kernel, _QUERY_GRAD_CONFIGS)
# Memory-bound helpers: one fixed block shape each.
_ROW_BLOCK = 16 if triton_interpreting() else 64


# ----------------------------------------------------------------------------------------------------------------
# The backend: forward and backward on checked, normalized arguments (see ptv2_kernels.backends)
# ----------------------------------------------------------------------------------------------------------------

class _Packing(NamedTuple):
    """Packed sequences (the variable-length op): cumulative lengths (int32 [S + 1]), the longest lengths, and
    the token totals."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    total_q: int
    total_k: int

    @property
    def num_seqs(self) -> int:
        return self.cu_q.numel() - 1

    def kernel_args(self):
        """(CuSeqQ, CuSeqK) and (num_seqs, search_steps, total_q, total_k) of a VARLEN launch."""
        return (self.cu_q, self.cu_k), (self.num_seqs, (self.num_seqs - 1).bit_length(), self.total_q,
                                        self.total_k)


# What a padded launch passes for the VARLEN-only arguments.
_NOT_PACKED = ((None, None), (0, 0, 0, 0))


def _packed_view(x: torch.Tensor) -> torch.Tensor:
    """A packed ``[total, H, D]`` tensor as the kernels' ``[1, H, total, D]`` (a view; no copy)."""
    return x.transpose(0, 1).unsqueeze(0)


def _strides3(x: torch.Tensor, packing) -> tuple:
    """(batch, head, token) strides of a 4-D operand; the batch stride is 0 for packed sequences, whose kernels
    find a sequence's first token through its cumulative length instead."""
    strides = x.stride()[:3]
    return strides if packing is None else (0, *strides[1:])


def _problem_constants(q, k, prefix_k, prefix_index, prefix_lengths, attn_mask, attn_bias, causal, dropout_p,
                       packing=None, softcap=None, value_dim=None, prefix_bias=None, window_size=None):
    """Kernel arguments shared by every launch: sizes (the window's two sides last), autotuning classes and
    compile-time flags. Packed sequences pass their longest lengths as the lengths. ``value_dim``: v's head dim
    (None: q's and k's)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if packing is not None:
        q_len, k_len = packing.max_q, packing.max_k
    num_prefixes, prefix_len = prefix_k.shape[0], prefix_k.shape[2]
    value_dim = head_dim if value_dim is None else value_dim
    d_pad = max(16, _next_power_of_2(head_dim))
    dv_pad = max(16, _next_power_of_2(value_dim))
    use_tf32 = q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    sizes = (q_heads, q_len, k_len, num_prefixes, prefix_len, q_heads // kv_heads,
             *_window_sides(window_size, causal, q_len + k_len))
    classes = (_next_power_of_2(q_len), _next_power_of_2(prefix_len + k_len))
    flags = dict(HEAD_DIM=head_dim, D_PAD=d_pad, PAD_D=d_pad != head_dim, HEAD_DIM_V=value_dim, DV_PAD=dv_pad,
                 PAD_DV=dv_pad != value_dim, HAS_INDEX=prefix_index is not None,
                 HAS_LENGTHS=prefix_lengths is not None, HAS_KEY_PAD=attn_mask is not None and attn_mask.dim() == 2,
                 HAS_DENSE=attn_mask is not None and attn_mask.dim() == 4, HAS_BIAS=attn_bias is not None,
                 CAUSAL=causal, HAS_DROPOUT=dropout_p > 0, DOT_PRECISION="tf32" if use_tf32 else "ieee",
                 VARLEN=packing is not None, HAS_SOFTCAP=softcap is not None, HAS_PREFIX_BIAS=prefix_bias is not None,
                 HAS_WINDOW=window_size is not None)
    return sizes, classes, flags


class _ForwardPlan(NamedTuple):
    """What a padded forward derives from its problem alone: every layer of a model's forward and every decode step
    hands the launcher the same shapes and flags again, so the plan is made once per distinct problem."""

    sizes: tuple
    classes: tuple
    flags: dict
    pack: bool  # GQA packing: a program per key/value head, its query heads' rows stacked
    splits: int  # key/value splits (1: none, no merge)
    grid: object  # the launch grid, a function of the chosen block shape


class _BackwardPlan(NamedTuple):
    sizes: tuple
    classes: tuple
    flags: dict
    query_grid: object
    key_grid: object


# Plans of padded launches, by _plan_key. Variable-length launches are not memoized: their grids follow the
# packing's token totals, which change from batch to batch.
_PLANS = Memo(capacity=128)


def _plan_key(kind, q, k, v, prefix_k, prefix_index, prefix_lengths, attn_mask, attn_bias, causal, dropout_p,
              softcap, prefix_bias, window_size) -> tuple:
    """Everything a plan depends on: shapes (strides are passed at every launch, never planned), which optional
    operands are present, the flags, the dtype (with tf32 for float32), the device, and the split-KV rule's inputs
    (multiprocessors to fill, keys per split), so that a plan never outlives what it was made from."""
    tf32 = q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return (kind, tuple(q.shape), k.shape[1], k.shape[2], v.shape[-1], prefix_k.shape[0], prefix_k.shape[2],
            prefix_index is None, prefix_lengths is None, 0 if attn_mask is None else attn_mask.dim(),
            attn_bias is None, bool(causal), dropout_p > 0, softcap is None, prefix_bias is None,
            None if window_size is None else tuple(window_size), q.dtype, tf32, q.device,
            _multiprocessors(q.device), MIN_KEYS_PER_SPLIT)


def _launch_plan(kind: str, q, k, v, prefix_k, prefix_index, prefix_lengths, attn_mask, attn_bias, causal,
                 dropout_p, softcap, prefix_bias, window_size):
    """The :class:`_ForwardPlan` (``kind`` "forward") or :class:`_BackwardPlan` of a padded launch, from the memo
    or made now."""
    key = _plan_key(kind, q, k, v, prefix_k, prefix_index, prefix_lengths, attn_mask, attn_bias, causal, dropout_p,
                    softcap, prefix_bias, window_size)
    plan = _PLANS.get(key)
    if plan is None:
        constants = _problem_constants(q, k, prefix_k, prefix_index, prefix_lengths, attn_mask, attn_bias, causal,
                                       dropout_p, None, softcap, v.shape[-1], prefix_bias, window_size)
        make = _make_forward_plan if kind == "forward" else _make_backward_plan
        plan = make(q, k, prefix_k, constants, multiprocessors=key[-2])
        _PLANS.put(key, plan)
    return plan


def _make_forward_plan(q, k, prefix_k, constants, multiprocessors: int) -> _ForwardPlan:
    sizes, classes, flags = constants
    batch, q_heads, q_len = q.shape[:3]
    kv_heads = k.shape[1]
    pack = packs_query_heads(q_len, q_heads, kv_heads)
    if pack:
        rows, programs_per_sample = q_len * (q_heads // kv_heads), kv_heads
        classes = (_next_power_of_2(rows), classes[1])
    else:
        rows, programs_per_sample = q_len, q_heads
    splits = kv_splits(q_len, batch * programs_per_sample, prefix_k.shape[2] + k.shape[2], multiprocessors)
    per_split = _query_block_grid(rows, programs_per_sample, batch)
    return _ForwardPlan(sizes, classes, flags, pack, splits,
                        lambda meta: (per_split(meta)[0] * splits, *per_split(meta)[1:]))


def _make_backward_plan(q, k, prefix_k, constants, multiprocessors: int) -> _BackwardPlan:
    batch, q_heads, q_len = q.shape[:3]
    return _BackwardPlan(*constants, _query_block_grid(q_len, q_heads, batch),
                         _key_block_grid(prefix_k.shape[2], k.shape[2], k.shape[1], batch))


def _window_sides(window_size, causal: bool, unbounded: int) -> tuple[int, int]:
    """(window_left, window_right) as the kernels read them: both sides bounded, an unbounded side (-1) as
    ``unbounded`` (Nq + Nk: past every key, so the kernels need no case for it), the right side 0 under causal (the
    kernels then skip the key blocks and query rows past the diagonal by the window's rule alone)."""
    if window_size is None:
        return 0, 0
    left, right = window_size
    return (left if left >= 0 else unbounded), (0 if causal else right if right >= 0 else unbounded)


def _score_scales(scale: float, softcap) -> tuple[float, float]:
    """(qk_scale, cap_log2) of the kernels: the dot product's factor to log2 units, scale · log2 e, and no cap; or
    with a cap c, the factor scale / c of the tanh's argument and c · log2 e, the factor of its result."""
    if softcap is None:
        return scale * LOG2E.value, 0.0
    return scale / softcap, softcap * LOG2E.value


def _sinks_arg(sinks):
    """The sinks as the kernels read them: float32, contiguous (a copy of Hq numbers at most), or None."""
    return None if sinks is None else sinks.to(torch.float32).contiguous()


def sinks_grad(sinks, lse, delta):
    """The sinks' gradient ``[Hq]`` from a backward's rows: −Σ p_sink · Δ over the samples and queries of each
    head, with p_sink = exp(sink − lse) (0 where lse = −inf, a sink of −inf on a row that saw nothing) and Δ the
    softmax backward's row term. ``lse`` and ``delta`` are ``[B, Hq, N]``; torch's reduction runs in a fixed order
    (deterministic)."""
    sink_probs = torch.exp(sinks.to(torch.float32)[None, :, None] - lse)
    sink_probs = sink_probs.masked_fill(lse == float("-inf"), 0.0)
    return -(sink_probs * delta).sum((0, 2))


def _mask_args(attn_mask):
    """(key-padding mask, dense mask, their strides) as byte views of the bool mask: no copy."""
    if attn_mask is None:
        return None, None, (0, 0, 0, 0, 0, 0)
    mask = attn_mask.view(torch.uint8)
    if mask.dim() == 2:
        return mask, None, (*mask.stride(), 0, 0, 0, 0)
    return None, mask, (0, 0, *mask.stride())


def _bias_strides(bias):
    """Strides of a [B, Hq, Nq, Nk] (or [B, Hq, Nq, P]) bias view (0 along broadcast dims), or zeros without one."""
    return (0, 0, 0, 0) if bias is None else bias.stride()


def _query_block_grid(q_len, q_heads, batch):
    return lambda meta: (_cdiv(q_len, meta["BLOCK_M"]), q_heads, batch)


def _key_block_grid(prefix_len, k_len, kv_heads, batch):
    """Prefix key blocks first, then sequence key blocks: the key kernel tells them apart by program id."""
    return lambda meta: (_cdiv(prefix_len, meta["BLOCK_N"]) + _cdiv(k_len, meta["BLOCK_N"]), kv_heads,
                         batch)


def packs_query_heads(q_len: int, q_heads: int, kv_heads: int) -> bool:
    """Whether the forward gives each program all query heads of a key/value head (see ``_forward_kernel``)."""
    return q_heads > kv_heads and q_len <= PACK_GQA_MAX_QUERIES


def kv_splits(q_len: int, programs: int, keys: int, multiprocessors: int) -> int:
    """How many key/value splits a forward of few queries (decode) runs: enough programs for about two per
    multiprocessor, each split keeping at least MIN_KEYS_PER_SPLIT keys so that the merge stays cheap. One split
    (no merge) when there are many queries or already enough programs."""
    if q_len > PACK_GQA_MAX_QUERIES or programs >= multiprocessors:
        return 1
    return max(1, min(_cdiv(2 * multiprocessors, programs), keys // MIN_KEYS_PER_SPLIT, MAX_KV_SPLITS))


def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU; 0 elsewhere (the interpreter runs programs one by one: never split)."""
    if device.type != "cuda":
        return 0
    return _device_multiprocessors(device)


@functools.lru_cache(maxsize=None)
def _device_multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def forward(call: Call):
    q, v = call.q, call.v
    batch, q_heads, q_len = q.shape[:3]
    out = q.new_empty(batch, q_len, q_heads, v.shape[-1]).transpose(1, 2)
    lse = q.new_empty(batch, q_heads, q_len, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    _launch_forward(q, call.k, v, call.prefix_k, call.prefix_v, out, lse, call.prefix_index, call.prefix_lengths,
                    call.attn_mask, call.attn_bias, call.seed, call.causal, call.scale, call.dropout_p,
                    softcap=call.softcap, sinks=call.sinks, prefix_bias=call.prefix_bias,
                    window_size=call.window_size)
    return out, lse


def forward_varlen(packed: PackedCall):
    """The variable-length forward (see :func:`ptv2_kernels.prefix_attention_varlen`): ``out [total_q, Hq, D]``
    and ``lse [Hq, total_q]``, one program per query block of each packed sequence."""
    call, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = packed
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths = call[:7]
    seed, causal, scale, dropout_p = call.seed, call.causal, call.scale, call.dropout_p
    softcap, sinks, window_size = call.softcap, call.sinks, call.window_size
    total_q, q_heads = q.shape[:2]
    out = q.new_empty(total_q, q_heads, v.shape[-1])
    lse = q.new_empty(q_heads, total_q, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    packing = _Packing(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q, k.shape[0])
    _launch_forward(*map(_packed_view, (q, k, v)), prefix_k, prefix_v, _packed_view(out), lse, prefix_index,
                    prefix_lengths, None, None, seed, causal, scale, dropout_p, packing, softcap=softcap, sinks=sinks,
                    window_size=window_size)
    return out, lse


def _launch_forward(q, k, v, prefix_k, prefix_v, out, lse, prefix_index, prefix_lengths, attn_mask, attn_bias, seed,
                    causal, scale, dropout_p, packing=None, softcap=None, sinks=None, prefix_bias=None,
                    window_size=None):
    """Write ``out`` and ``lse`` of a forward on 4-D operands (``[1, H, total, D]`` views for packed sequences)."""
    batch, q_heads, q_len = q.shape[:3]
    value_dim = v.shape[-1]
    sinks = _sinks_arg(sinks)
    key_pad, dense, mask_strides = _mask_args(attn_mask)
    if packing is not None:
        sizes, classes, flags = _problem_constants(q, k, prefix_k, prefix_index, prefix_lengths, attn_mask,
                                                   attn_bias, causal, dropout_p, packing, softcap, value_dim,
                                                   prefix_bias, window_size)
        # no GQA packing nor split-KV: programs follow the packed query blocks
        pack, splits = False, 1
        grid = (lambda meta: (packing.total_q // meta["BLOCK_M"] + packing.num_seqs, q_heads, 1))
        cu_seqlens, varlen_sizes = packing.kernel_args()
    else:
        sizes, classes, flags, pack, splits, grid = _launch_plan(
            "forward", q, k, v, prefix_k, prefix_index, prefix_lengths, attn_mask, attn_bias, causal, dropout_p,
            softcap, prefix_bias, window_size)
        cu_seqlens, varlen_sizes = _NOT_PACKED
    # With splits, each writes a float32 partial output and lse of its own; the merge writes out and lse.
    dest, dest_lse = out, lse
    if splits > 1:
        dest = torch.empty(splits, batch, q_heads, q_len, value_dim, dtype=torch.float32, device=q.device)
        dest_lse = torch.empty(splits, batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    dest_strides = dest.stride()[-4:-1] if packing is None else _strides3(dest, packing)
    if q.is_cuda and _device_limits(q.device)[0][0] >= 9:
        _ensure_tma_allocator()
    _forward[grid](
        q, k, v, prefix_k, prefix_v, dest, dest_lse, prefix_index, prefix_lengths, key_pad, dense, attn_bias, seed,
        *cu_seqlens, sinks, prefix_bias, *_strides3(q, packing), *_strides3(k, packing), *_strides3(v, packing),
        *prefix_k.stride(), *prefix_v.stride(), dest.stride(0) if splits > 1 else 0, *dest_strides,
        dest_lse.stride(0) if splits > 1 else 0, *mask_strides, *_bias_strides(attn_bias),
        *_bias_strides(prefix_bias), *sizes,
        *_score_scales(scale, softcap), dropout_p, splits, *varlen_sizes, *classes, PACK_GQA=pack,
        SPLIT_KV=splits > 1, HAS_SINKS=sinks is not None, **flags)
    if splits > 1:
        _combine_splits_kernel[(_cdiv(q_len, _ROW_BLOCK), q_heads, batch)](
            dest, dest_lse, out, lse, sinks, *dest.stride()[:4], dest_lse.stride(0), *out.stride()[:3], q_heads,
            q_len, splits, HEAD_DIM_V=value_dim, DV_PAD=flags["DV_PAD"], HAS_SINKS=sinks is not None,
            BLOCK_M=_ROW_BLOCK)


def backward(grad_out, grad_lse, call: Call, out, lse, *, grad_bias=None, grad_sinks=None, grad_prefix_bias=None):
    q, k, v, prefix_k, prefix_v = call[:5]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d_prefix_k, d_prefix_v = torch.empty_like(prefix_k), torch.empty_like(prefix_v)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_(), d_prefix_k.zero_(), d_prefix_v.zero_()
    _launch_backward(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, call.prefix_index, call.prefix_lengths,
                     call.attn_mask, call.seed, out, lse, call.causal, call.scale, call.dropout_p, call.deterministic,
                     call.attn_bias, grad_bias, dq, dk, dv, d_prefix_k, d_prefix_v, softcap=call.softcap,
                     sinks=call.sinks, grad_sinks=grad_sinks, prefix_bias=call.prefix_bias,
                     grad_prefix_bias=grad_prefix_bias, window_size=call.window_size)
    return dq, dk, dv, d_prefix_k, d_prefix_v


def backward_varlen(grad_out, grad_lse, packed: PackedCall, out, lse, *, grad_sinks=None):
    """The variable-length backward: (dq, dk, dv, dprefix_k, dprefix_v), the prefix gradients summed over the
    sequences in the kernels (atomics, or per sequence then in order when ``deterministic``)."""
    call, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = packed
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths = call[:7]
    seed, causal, scale, dropout_p, deterministic = call.seed, call.causal, call.scale, call.dropout_p, \
        call.deterministic
    softcap, sinks, window_size = call.softcap, call.sinks, call.window_size
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d_prefix_k, d_prefix_v = torch.empty_like(prefix_k), torch.empty_like(prefix_v)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_(), d_prefix_k.zero_(), d_prefix_v.zero_()
    packing = _Packing(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0], k.shape[0])
    _launch_backward(_packed_view(grad_out), None if grad_lse is None else grad_lse.unsqueeze(0),
                     *map(_packed_view, (q, k, v)), prefix_k, prefix_v, prefix_index, prefix_lengths, None, seed,
                     _packed_view(out), lse.unsqueeze(0), causal, scale, dropout_p, deterministic, None, None,
                     *map(_packed_view, (dq, dk, dv)), d_prefix_k, d_prefix_v, packing, softcap=softcap, sinks=sinks,
                     grad_sinks=grad_sinks, window_size=window_size)
    return dq, dk, dv, d_prefix_k, d_prefix_v


def _launch_backward(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed,
                     out, lse, causal, scale, dropout_p, deterministic, attn_bias, grad_bias,
                     dq, dk, dv, d_prefix_k, d_prefix_v, packing=None, softcap=None, sinks=None, grad_sinks=None,
                     prefix_bias=None, grad_prefix_bias=None, window_size=None):
    """Write the five gradients of a backward on 4-D operands (``[1, H, total, D]`` views and a ``[1, Hq, total]``
    lse for packed sequences), the bias gradient into ``grad_bias`` and the prefix bias's into
    ``grad_prefix_bias`` when they are non-empty tensors, and the sinks' into ``grad_sinks`` when there are sinks
    (the kernels need no sink: the lse includes it)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    num_prefixes, prefix_len = prefix_k.shape[0], prefix_k.shape[2]
    if packing is None:
        plan = _launch_plan("backward", q, k, v, prefix_k, prefix_index, prefix_lengths, attn_mask, attn_bias,
                            causal, dropout_p, softcap, prefix_bias, window_size)
        sizes, classes, flags = plan.sizes, plan.classes, plan.flags
    else:
        sizes, classes, flags = _problem_constants(q, k, prefix_k, prefix_index, prefix_lengths, attn_mask,
                                                   attn_bias, causal, dropout_p, packing, softcap, value_dim,
                                                   prefix_bias, window_size)
    qk_scale, cap_log2 = _score_scales(scale, softcap)
    key_pad, dense, mask_strides = _mask_args(attn_mask)

    # Δ runs over the rows as they lie: for packed sequences, one sample of total_q rows.
    delta = torch.empty_like(lse)
    _backward_preprocess_kernel[(_cdiv(q_len, _ROW_BLOCK), q_heads, batch)](
        out, grad_out, grad_lse, delta, *out.stride()[:3], *grad_out.stride(),
        *(grad_lse.stride() if grad_lse is not None else (0, 0, 0)), q_heads, q_len,
        HEAD_DIM_V=value_dim, DV_PAD=flags["DV_PAD"], HAS_DLSE=grad_lse is not None, BLOCK_M=_ROW_BLOCK)
    if sinks is not None and grad_sinks is not None:
        grad_sinks.copy_(sinks_grad(sinks, lse, delta))

    if packing is None:
        samples, cu_seqlens, varlen_sizes = batch, *_NOT_PACKED
        query_grid, key_grid = plan.query_grid, plan.key_grid
    else:
        samples, (cu_seqlens, varlen_sizes) = packing.num_seqs, packing.kernel_args()
        query_grid = (lambda meta: (packing.total_q // meta["BLOCK_M"] + samples, q_heads, 1))
        key_grid = (lambda meta: (samples * _cdiv(prefix_len, meta["BLOCK_N"])
                                  + packing.total_k // meta["BLOCK_N"] + samples, kv_heads, 1))
    # One float32 partial per bank entry (atomics) or per sample (deterministic); never-written slots stay 0.
    slots = samples if deterministic else num_prefixes
    partial_k = torch.zeros(slots, kv_heads, prefix_len, head_dim, dtype=torch.float32, device=q.device)
    partial_v = torch.zeros(slots, kv_heads, prefix_len, value_dim, dtype=torch.float32, device=q.device)
    common = (*_strides3(q, packing), *_strides3(k, packing), *_strides3(v, packing), *prefix_k.stride(),
              *prefix_v.stride(), *_strides3(grad_out, packing), grad_out.stride(3))
    if prefix_len + sizes[2] > 0:
        _backward_keys[key_grid](
            q, k, v, prefix_k, prefix_v, grad_out, lse, delta, dk, dv, partial_k, partial_v, prefix_index,
            prefix_lengths, key_pad, dense, attn_bias, seed, *cu_seqlens, prefix_bias, *common, *_strides3(dk, packing),
            *_strides3(dv, packing), *mask_strides, *_bias_strides(attn_bias), *_bias_strides(prefix_bias), *sizes,
            qk_scale, cap_log2, scale,
            dropout_p, *varlen_sizes, *classes, DETERMINISTIC=deterministic, **flags)
    else:
        dk.zero_()
        dv.zero_()
    bias_grad = grad_bias is not None and grad_bias.numel() > 0
    prefix_bias_grad = grad_prefix_bias is not None and grad_prefix_bias.numel() > 0
    _backward_queries[query_grid](
        q, k, v, prefix_k, prefix_v, grad_out, lse, delta, dq, prefix_index, prefix_lengths, key_pad, dense,
        attn_bias, grad_bias if bias_grad else None, seed, *cu_seqlens, prefix_bias,
        grad_prefix_bias if prefix_bias_grad else None, *common, *_strides3(dq, packing),
        *mask_strides, *_bias_strides(attn_bias), *_bias_strides(grad_bias if bias_grad else None),
        *_bias_strides(prefix_bias), *_bias_strides(grad_prefix_bias if prefix_bias_grad else None), *sizes,
        qk_scale, cap_log2, scale, dropout_p, *varlen_sizes, *classes, BIAS_GRAD=bias_grad,
        PREFIX_BIAS_GRAD=prefix_bias_grad, **flags)
    if prefix_len > 0:
        _prefix_grad_finalize_kernel[(_cdiv(prefix_len, _ROW_BLOCK), kv_heads, num_prefixes)](
            partial_k, partial_v, d_prefix_k, d_prefix_v, prefix_index, *d_prefix_k.stride(), *d_prefix_v.stride(),
            samples, kv_heads, prefix_len, HEAD_DIM=head_dim, D_PAD=flags["D_PAD"], HEAD_DIM_V=value_dim,
            DV_PAD=flags["DV_PAD"], HAS_INDEX=prefix_index is not None, SUM_SAMPLES=deterministic, BLOCK_N=_ROW_BLOCK)
