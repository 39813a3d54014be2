"""The workloads: shapes from docs/design.md §6, the suites that group them, their inputs and work counts.

A :class:`Workload` is one shape of one kind of work:

* ``fwd`` / ``fwdbwd`` — prefix attention forward, or forward plus backward (gradients for q, k, v and the prefix);
* ``decode`` — one new query per sample over a cache of ``seq_len`` keys plus the prefix;
* ``train`` — one P-Tuning v2 training step of a model (forward, loss, backward, optimizer step);
* ``generate`` — one decode step of a model whose cache holds ``seq_len`` tokens;
* ``ceiling`` — what the device can do at all (copy bandwidth, matmul throughput), for the targets' fractions.

A *packed* workload (``median_len`` set) holds ``batch`` sequences of skewed lengths instead of ``batch`` samples of
``seq_len`` tokens: the lengths follow a log-normal distribution of median ``median_len`` and shape
``LENGTH_SIGMA``, clipped to ``[min_len, seq_len]`` (:func:`sequence_lengths`). Its kernel providers run the
packed batch (``prefix_attention_varlen``, ``flash_attn_varlen_func``) or the same sequences padded to the longest
(the SDPA baselines), and its work counts (tokens, FLOPs, bytes) count the real tokens only.

Suites: ``quick`` holds the shapes of targets P1–P9 (one per group), ``full`` adds the sweeps over N, P and B and
the mixed-task batches. Without a GPU both are replaced by small shapes of the same groups (a functional run).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import itertools
import math
from statistics import NormalDist
from typing import Optional, Sequence

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
KERNEL_KINDS = ("fwd", "fwdbwd", "decode")

# The performance targets, one line each (docs/design.md §6 has the full statements): the ids a workload's
# ``targets`` may carry. Not every target has a workload yet (``python benchmarks/run.py --list`` says which do).
TARGETS = {
    "P1": "BERT-large fwd+bwd (B=32 H=16 N=256 P=64, key padding): >= 1.6x the PEFT path (expand + cat + SDPA)",
    "P2": "the same shape: time <= 1.0x SDPA on K/V concatenated beforehand (the cat not timed)",
    "P3": "LLM causal (B=4 Hq=32/8 D=128 N=4096 P=128): fwd >= 1.1x best SDPA/flash-attn, 450 TFLOP/s; fwd+bwd >= 1x",
    "P4": "decode (B=64 Hq=32/8 D=128, 2048 cached tokens, shared P=128): >= 80 % of the measured copy bandwidth",
    "P5": "a batch mixing 8 tasks: >= 0.95x the throughput of a one-task batch of the same size",
    "P6": "BERT-large-config training step (B=32 N=256 P=64): >= 1.3x PEFT's tokens/s, peak memory <= 0.85x",
    "P7": "host path (CPU): tiny eager op call <= 1.5x cat + SDPA; patched tiny-Llama decode step <= 1.1x unpatched",
    "P8": "CPU: op fwd+bwd, tiny BERT training, tiny-Llama decode patched with auto: >= 1.0x the PEFT path / model",
    "P9": "packed vs padded BERT-large training step (32 sequences, median 60 in [8, 256]): >= 1.5x real tokens/s",
    "S1": "static resources: the autotuner never picks a spilling or non-fitting config; spill-free on sm_80/90",
}
MODEL_KINDS = ("train", "generate")

# Packed workloads: the shape of the log-normal length distribution (the sigma of the lengths' logarithm) and the
# seed of the order the sequences are packed in.
LENGTH_SIGMA = 0.8
LENGTH_ORDER_SEED = 0


@dataclasses.dataclass(frozen=True)
class Workload:
    group: str
    kind: str
    batch: int = 1
    q_heads: int = 1
    kv_heads: int = 1
    seq_len: int = 0  # N: the sequence's own keys (decode: tokens in the cache, the new one included)
    prefix_len: int = 0  # P
    head_dim: int = 64  # D
    num_tasks: int = 1  # T: bank entries drawn by the samples; 1 = one prefix shared by the batch
    causal: bool = False
    padding: bool = False  # key padding: sample lengths drawn in [N/2, N]
    dtype: str = "bfloat16"
    model: Optional[str] = None  # model-level workloads: "bert" or "llama", with ``size`` "large"/"1b"/"tiny"
    size: str = ""
    targets: tuple = ()  # the targets (docs/design.md §6) this shape measures
    note: str = ""
    query_len: int = 0  # Nq of a fwd/fwdbwd workload whose queries are fewer than its keys (0: Nq = N)
    median_len: int = 0  # packed: ``batch`` sequences, lengths log-normal with this median in [min_len, seq_len]
    min_len: int = 0

    @property
    def packed(self) -> bool:
        return self.median_len > 0

    @property
    def q_len(self) -> int:
        if self.kind in ("decode", "generate"):
            return 1
        return self.query_len or self.seq_len

    @property
    def name(self) -> str:
        if self.kind == "ceiling":
            return f"{self.group}/{self.note}"
        if self.model is not None:
            parts = [f"{self.model}-{self.size}", f"B{self.batch}", f"N{self.seq_len}", f"P{self.prefix_len}"]
        else:
            heads = f"H{self.q_heads}" if self.q_heads == self.kv_heads else f"H{self.q_heads}/{self.kv_heads}"
            parts = [f"B{self.batch}", heads, f"N{self.seq_len}", f"P{self.prefix_len}", f"D{self.head_dim}"]
            if self.query_len:
                parts.insert(2, f"Nq{self.query_len}")
        if self.num_tasks > 1 or self.group.startswith("mixed"):
            parts.append(f"T{self.num_tasks}")
        if self.packed:
            parts.append(f"med{self.median_len}")
        parts.append({"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[self.dtype])
        return f"{self.group}/" + "-".join(parts)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def tokens(self) -> int:
        """Tokens processed per call: B·N for a training step, B for a decode step; the real tokens (the sum of
        the sequence lengths) of a packed workload, however its provider lays them out."""
        if self.packed:
            return sum(sequence_lengths(self))
        return self.batch * self.q_len

    def matches(self, patterns: Sequence[str]) -> bool:
        """True if any pattern is a glob matching the name or the group, or a substring of the name."""
        return any(fnmatch.fnmatchcase(self.name, p) or fnmatch.fnmatchcase(self.group, p) or p in self.name
                   for p in patterns)

    def params(self) -> dict:
        """The shape columns of a result row."""
        return {"group": self.group, "kind": self.kind, "batch": self.batch, "q_heads": self.q_heads,
                "kv_heads": self.kv_heads, "q_len": self.q_len, "seq_len": self.seq_len,
                "prefix_len": self.prefix_len, "head_dim": self.head_dim, "num_tasks": self.num_tasks,
                "causal": self.causal, "padding": self.padding, "dtype": self.dtype,
                "median_len": self.median_len or "", "min_len": self.min_len or "",
                "targets": " ".join(self.targets)}


@functools.lru_cache(maxsize=None)
def sequence_lengths(w: Workload) -> tuple:
    """The ``batch`` sequence lengths of a packed workload: the quantiles ``(i + 1/2) / B`` of a log-normal
    distribution of median ``median_len`` and sigma ``LENGTH_SIGMA``, rounded and clipped to ``[min_len, seq_len]``,
    in an order shuffled with a fixed seed. The same for every provider, input set and run: the batch is the
    distribution itself (median ``median_len``, the longest clipped to ``seq_len`` once ``B`` is large enough)
    rather than a draw that may miss its tail."""
    if not w.packed:
        raise ValueError(f"{w.name} is not a packed workload")
    normal = NormalDist()
    lengths = [min(w.seq_len, max(w.min_len, round(w.median_len * math.exp(LENGTH_SIGMA * normal.inv_cdf(
        (i + 0.5) / w.batch))))) for i in range(w.batch)]
    order = torch.randperm(w.batch, generator=torch.Generator().manual_seed(LENGTH_ORDER_SEED)).tolist()
    return tuple(lengths[i] for i in order)


# ----------------------------------------------------------------------------------------------------------------
# Work counts (docs/design.md §6)
# ----------------------------------------------------------------------------------------------------------------

def visible_pairs(w: Workload) -> float:
    """(query, key) pairs per (sample, head): Nq·P for the prefix plus the sequence part, which docs/design.md §6
    halves when causal (exactly: the bottom-right-aligned visible count when Nq != N, e.g. a decode step)."""
    return _pairs(w.q_len, w.seq_len, w.prefix_len, w.causal)


def _pairs(q_len: int, k_len: int, prefix_len: int, causal: bool) -> float:
    if not causal:
        seq = q_len * k_len
    elif q_len == k_len:
        seq = q_len * k_len / 2
    else:
        offset = k_len - q_len
        seq = sum(min(k_len, max(0, i + offset + 1)) for i in range(q_len))
    return q_len * prefix_len + seq


def _total_pairs(w: Workload) -> float:
    """(query, key) pairs per head over the whole batch: B times :func:`visible_pairs`, or for a packed workload
    the sum over its sequences (each a batch of one: its queries see the prefix and its own keys)."""
    if w.packed:
        return sum(_pairs(n, n, w.prefix_len, w.causal) for n in sequence_lengths(w))
    return w.batch * visible_pairs(w)


def flops(w: Workload) -> float:
    """Attention FLOPs: forward ``4·B·Hq·Nq·(P + Nk)·D`` (sequence part halved when causal), backward 2.5× forward.
    NaN for model-level and ceiling workloads (their rate is tokens/s, or set by the ceiling itself)."""
    if w.kind not in KERNEL_KINDS:
        return math.nan
    forward = 4.0 * w.q_heads * _total_pairs(w) * w.head_dim
    return forward * (3.5 if w.kind == "fwdbwd" else 1.0)


def bytes_moved(w: Workload) -> float:
    """Bytes that must move between memory and the chip at the least: each input read once and each output written
    once. Forward: q, k, v, the prefixes in use (read once, however many samples share them), out. Backward adds
    q, k, v, prefixes, out and dO read, and dq, dk, dv, dprefix written. A decode step's count is P4's "bytes that
    must be read" (the cache dominates). A packed workload counts its real tokens (no padding)."""
    if w.kind not in KERNEL_KINDS:
        return math.nan
    element = torch.finfo(w.torch_dtype).bits // 8
    q_tokens, k_tokens = (w.tokens, w.tokens) if w.packed else (w.batch * w.q_len, w.batch * w.seq_len)
    q = q_tokens * w.q_heads * w.head_dim
    kv = 2 * k_tokens * w.kv_heads * w.head_dim
    prefix = 2 * min(w.num_tasks, w.batch) * w.kv_heads * w.prefix_len * w.head_dim
    forward = q + kv + prefix + q  # out has q's shape
    if w.kind != "fwdbwd":
        return float(forward * element)
    backward = (q + kv + prefix + 2 * q) + (q + kv + prefix)
    return float((forward + backward) * element)


# ----------------------------------------------------------------------------------------------------------------
# Suites
# ----------------------------------------------------------------------------------------------------------------

def _bert(kind, n, p, batch=32, **kw) -> Workload:
    group = kw.pop("group", f"bert-{kind}")
    kw.setdefault("padding", True)
    return Workload(group, kind, batch=batch, q_heads=16, kv_heads=16, seq_len=n, prefix_len=p, head_dim=64, **kw)


def _llm(kind, n, p=128, batch=4, **kw) -> Workload:
    group = kw.pop("group", f"llm-{kind}")
    kw.setdefault("causal", True)
    return Workload(group, kind, batch=batch, q_heads=32, kv_heads=8, seq_len=n, prefix_len=p, head_dim=128, **kw)


def _varlen(kind, **kw) -> Workload:
    return Workload(f"varlen-{kind}", kind, **kw)


# The packed kernel workload at the BERT-large shape (P1's heads, head dim and prefix).
PACKED_BERT = dict(batch=32, q_heads=16, kv_heads=16, seq_len=256, prefix_len=64, head_dim=64, median_len=60,
                   min_len=8)
# The model-level group of target P9: a packed batch against the same sequences padded.
PACKED_VS_PADDED = "packed-vs-padded"


def _gpu_suite(full: bool) -> list[Workload]:
    w: list[Workload] = []
    headline_bert = dict(n=256, p=64)
    # P-Tuning v2, BERT-large shapes: N x P grid (full) or the P1/P2 shape (quick), forward and fwd+bwd.
    grid = [(n, p) for n in (128, 256, 512) for p in (16, 64, 128)] if full else [(256, 64)]
    for kind in ("fwd", "fwdbwd"):
        for n, p in grid:
            tags = ("P1", "P2") if kind == "fwdbwd" and (n, p) == (256, 64) else ()
            w.append(_bert(kind, n, p, targets=tags))
    if full:  # batch sweep at the headline shape
        w += [_bert("fwdbwd", batch=b, **headline_bert) for b in (1, 8, 64, 128)]
    # LLM shapes: GQA 32/8, D=128, P=128, causal; sweep N (and P at N=4096).
    lengths = (1024, 2048, 4096, 8192) if full else (4096,)
    for kind in ("fwd", "fwdbwd"):
        w += [_llm(kind, n, targets=("P3",) if n == 4096 else ()) for n in lengths]
        if full:
            w += [_llm(kind, 4096, p) for p in (32, 512)]
    # Decode: B=64 over 2048 cached tokens (P4); sweeps over N, B and P, and one long-context single-sample step
    # (too few programs to fill a GPU without splitting the keys).
    w.append(_llm("decode", 2048, batch=64, causal=False, targets=("P4",)))
    if full:
        w += [_llm("decode", n, batch=64, causal=False) for n in (512, 8192)]
        w += [_llm("decode", 2048, batch=b, causal=False) for b in (1, 16)]
        w.append(_llm("decode", 32768, batch=1, causal=False))
        w += [_llm("decode", 2048, p, batch=64, causal=False) for p in (32, 512)]
    # Mixed-task batches: T tasks drawn per sample from a bank (T = 1: one shared prefix). P5: T=8 vs T=1.
    tasks = (1, 2, 8) if full else (1, 8)
    w += [_bert("fwdbwd", num_tasks=t, group="mixed-fwdbwd", targets=("P5",) if t in (1, 8) else (),
                **headline_bert) for t in tasks]
    if full:
        w += [_llm("decode", 2048, batch=64, causal=False, num_tasks=t, group="mixed-decode") for t in (1, 8)]
    # Packed batches at the BERT-large shape: 32 sequences of skewed lengths (median 60 in [8, 256]), every
    # provider on the same sequences (packed, or padded to the longest by the SDPA baselines); full adds 8 tasks.
    w += [_varlen(kind, **PACKED_BERT) for kind in ("fwd", "fwdbwd")]
    if full:
        w.append(_varlen("fwdbwd", num_tasks=8, **PACKED_BERT))
    # Model level: a P-Tuning v2 training step, decode steps of a patched decoder with a shared prefix.
    bert_large = dict(model="bert", size="large", q_heads=16, kv_heads=16, head_dim=64)
    llama_1b = dict(model="llama", size="1b", q_heads=32, kv_heads=8, head_dim=64)
    w.append(Workload("model-train", "train", batch=32, seq_len=256, prefix_len=64, padding=True, targets=("P6",),
                      **bert_large))
    w.append(Workload("model-train", "train", batch=4, seq_len=1024, prefix_len=128, causal=True, **llama_1b))
    # P9: the same sequences packed into one row vs padded to the longest, one training step of the patched
    # BERT-large-config token classifier each.
    w.append(Workload(PACKED_VS_PADDED, "train", batch=32, seq_len=256, prefix_len=64, median_len=60, min_len=8,
                      targets=("P9",), **bert_large))
    w.append(Workload("model-decode", "generate", batch=16, seq_len=1024, prefix_len=128, causal=True, **llama_1b))
    # What the device can do at all, measured in the same run: P3's and P4's fractions are relative to these.
    w.append(Workload("ceiling", "ceiling", note="copy-1GiB", dtype="bfloat16"))
    w.append(HOST_OVERHEAD)
    w.append(Workload("ceiling", "ceiling", note="matmul-8192", dtype="bfloat16"))
    return w


def _cpu_suite(full: bool) -> list[Workload]:
    """Small shapes of the same groups, float32 (Triton's interpreter is exact for it): a functional run."""
    f32 = dict(dtype="float32")
    w: list[Workload] = []

    def bert(kind, n, p, batch=2, **kw):
        group = kw.pop("group", f"bert-{kind}")
        return Workload(group, kind, batch=batch, q_heads=2, kv_heads=2, seq_len=n, prefix_len=p, head_dim=16,
                        padding=True, **f32, **kw)

    def llm(kind, n, p=8, batch=1, causal=True, **kw):
        group = kw.pop("group", f"llm-{kind}")
        return Workload(group, kind, batch=batch, q_heads=4, kv_heads=2, seq_len=n, prefix_len=p, head_dim=16,
                        causal=causal, **f32, **kw)

    grid = [(n, p) for n in (16, 32) for p in (4, 8)] if full else [(32, 8)]
    for kind in ("fwd", "fwdbwd"):
        w += [bert(kind, n, p, targets=("P1", "P2") if kind == "fwdbwd" and (n, p) == (32, 8) else ())
              for n, p in grid]
    w += [llm("fwd", 32, targets=("P3",)), llm("fwdbwd", 32, targets=("P3",))]
    w.append(llm("decode", 64, batch=2, causal=False, targets=("P4",)))
    w += [bert("fwdbwd", 32, 8, batch=4, num_tasks=t, group="mixed-fwdbwd", targets=("P5",) if t != 2 else ())
          for t in ((1, 2, 8) if full else (1, 8))]
    packed = dict(batch=6, q_heads=2, kv_heads=2, seq_len=32, prefix_len=8, head_dim=16, median_len=12, min_len=4,
                  **f32)
    w += [_varlen(kind, **packed) for kind in ("fwd", "fwdbwd")]
    if full:
        w.append(_varlen("fwdbwd", **dict(packed, num_tasks=3, q_heads=4)))
    bert_tiny = dict(model="bert", size="tiny", q_heads=2, kv_heads=2, head_dim=16, **f32)
    llama_tiny = dict(model="llama", size="tiny", q_heads=4, kv_heads=2, head_dim=16, **f32)
    w.append(Workload("model-train", "train", batch=2, seq_len=16, prefix_len=4, padding=True,
                      targets=("P6", "P8"), **bert_tiny))
    if full:
        w.append(Workload("model-train", "train", batch=2, seq_len=16, prefix_len=4, causal=True, **llama_tiny))
    w.append(Workload(PACKED_VS_PADDED, "train", batch=6, seq_len=32, prefix_len=4, median_len=12, min_len=4,
                      targets=("P9",), **bert_tiny))
    w.append(Workload("model-decode", "generate", batch=2, seq_len=16, prefix_len=4, causal=True,
                      targets=("P7", "P8"), **llama_tiny))
    w.append(HOST_OVERHEAD)
    # P8: the op at moderate shapes, timed on the CPU (BERT-base-like with key padding; Llama-like, causal, GQA)
    w.append(Workload(CPU_TIMING_GROUP, "fwdbwd", batch=4, q_heads=8, kv_heads=8, seq_len=256, prefix_len=32,
                      head_dim=64, padding=True, targets=("P8",), **f32))
    w.append(Workload(CPU_TIMING_GROUP, "fwdbwd", batch=2, q_heads=8, kv_heads=2, seq_len=256, prefix_len=32,
                      head_dim=64, causal=True, targets=("P8",), **f32))
    w.append(Workload("ceiling", "ceiling", note="copy-64MiB", dtype="float32"))
    return w


# P7: one eager op call on tiny tensors, where the host path is all there is to time (both suites).
HOST_OVERHEAD = Workload("host-overhead", "fwd", batch=2, q_heads=4, kv_heads=2, seq_len=16, query_len=4, prefix_len=8,
                         head_dim=32, dtype="float32", targets=("P7",))

# The CPU suite's group of moderate shapes timed for P8: too large for Triton's interpreter, which skips them.
CPU_TIMING_GROUP = "cpu-fwdbwd"


def suite(name: str = "quick", gpu: Optional[bool] = None) -> list[Workload]:
    """The workloads of suite ``name`` ("quick" or "full") for a GPU, or their small CPU forms."""
    if name not in ("quick", "full"):
        raise ValueError(f"suite must be 'quick' or 'full', got {name!r}")
    if gpu is None:
        gpu = torch.cuda.is_available()
    chosen = _gpu_suite(name == "full") if gpu else _cpu_suite(name == "full")
    names = [w.name for w in chosen]
    assert len(names) == len(set(names)), "workload names must be unique"
    return chosen


def select(workloads: Sequence[Workload], patterns: Optional[Sequence[str]]) -> list[Workload]:
    return list(workloads) if not patterns else [w for w in workloads if w.matches(patterns)]


# ----------------------------------------------------------------------------------------------------------------
# Kernel-level inputs
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _PrefixedInputs:
    """What the two input kinds share: the five attention tensors and the bank index (their own fields follow,
    ``grad_out`` among them), a prefix shared or from a bank."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    prefix_index: Optional[torch.Tensor]

    @property
    def tensors(self) -> tuple:
        return self.q, self.k, self.v, self.prefix_k, self.prefix_v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors
                   + tuple(t for t in (self.grad_out,) if t is not None))

    def bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix as a ``[T, Hkv, P, D]`` bank."""
        if self.prefix_k.dim() == 3:
            return self.prefix_k.unsqueeze(0), self.prefix_v.unsqueeze(0)
        return self.prefix_k, self.prefix_v

    def _each_prefix(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix of each of ``count`` samples (sequences), ``[count, Hkv, P, D]``: an expanded view for a
        shared prefix, a gather for a bank."""
        bank_k, bank_v = self.bank()
        if self.prefix_index is None:
            return (bank_k.expand(count, *bank_k.shape[1:]), bank_v.expand(count, *bank_v.shape[1:]))
        return bank_k[self.prefix_index], bank_v[self.prefix_index]


@dataclasses.dataclass
class KernelInputs(_PrefixedInputs):
    """One set of inputs of a kernel workload, laid out the way a model produces them.

    q/k/v are views ``[B, H, N, D]`` of ``[B, N, H, D]`` projections; the prefix is one shared ``[Hkv, P, D]``
    tensor when T = 1 (``prefix_index`` None), else a ``[T, Hkv, P, D]`` bank indexed per sample. ``key_padding_mask``
    is a ``[B, N]`` bool mask (True = attend) or None; ``grad_out`` is dO for fwd+bwd workloads.
    """

    key_padding_mask: Optional[torch.Tensor]
    causal: bool
    grad_out: Optional[torch.Tensor]

    def per_sample_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's prefix ``[B, Hkv, P, D]``: an expanded view for a shared prefix, a gather for a bank."""
        return self._each_prefix(self.q.shape[0])

    def op_kwargs(self) -> dict:
        return dict(prefix_index=self.prefix_index, key_padding_mask=self.key_padding_mask, causal=self.causal)


@dataclasses.dataclass
class VarlenInputs(_PrefixedInputs):
    """One set of inputs of a packed workload: ``S`` sequences packed along the token dim, as a packed model row
    produces them (``q [total, Hq, D]``, ``k, v [total, Hkv, D]``), delimited by ``cu_seqlens`` (int32 ``[S + 1]``,
    the same for queries and keys: self-attention), with the prefix as in :class:`KernelInputs` (``prefix_index``
    ``[S]`` for a bank). :attr:`padded` is the same batch padded to the longest sequence, what the padded baselines
    and the oracle run; :meth:`unpad` takes their per-token results back to the packed layout."""

    cu_seqlens: torch.Tensor
    lengths: tuple
    causal: bool
    grad_out: Optional[torch.Tensor]

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths, default=0)

    def per_sequence_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's prefix ``[S, Hkv, P, D]`` (a view for a shared prefix, a gather for a bank)."""
        return self._each_prefix(len(self.lengths))

    def op_args(self) -> tuple:
        """The arguments of ``prefix_attention_varlen`` after the five tensors."""
        return self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen

    def op_kwargs(self) -> dict:
        return dict(prefix_index=self.prefix_index, causal=self.causal)

    @functools.cached_property
    def token_mask(self) -> torch.Tensor:
        """``[S, max_seqlen]`` bool: which positions of the padded batch hold real tokens."""
        lengths = torch.tensor(self.lengths, device=self.q.device)
        return torch.arange(self.max_seqlen, device=self.q.device)[None, :] < lengths[:, None]

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """``[total, H, D]`` -> ``[S, H, max_seqlen, D]`` (a view of ``[S, max_seqlen, H, D]``), zeros in the
        padding."""
        out = packed.new_zeros(len(self.lengths), self.max_seqlen, *packed.shape[1:])
        out[self.token_mask] = packed
        return out.transpose(1, 2)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """``[S, H, max_seqlen, D]`` -> ``[total, H, D]``: the real tokens' rows."""
        return padded.transpose(1, 2)[self.token_mask]

    @functools.cached_property
    def padded(self) -> KernelInputs:
        """The same sequences padded to the longest, with a key-padding mask (dO zero in the padding, so the
        padded rows add nothing to any gradient)."""
        grad_out = None if self.grad_out is None else self.pad(self.grad_out)
        return KernelInputs(self.pad(self.q), self.pad(self.k), self.pad(self.v), self.prefix_k, self.prefix_v,
                            self.prefix_index, self.token_mask, self.causal, grad_out)


def _random_prefix(w: Workload, count: int, gen: torch.Generator, device: str):
    """(prefix_k, prefix_v, prefix_index) of a workload: one shared ``[Hkv, P, D]`` prefix for T = 1, else a
    ``[T, Hkv, P, D]`` bank with an index over ``count`` samples or sequences that uses every entry."""
    T, Hkv, P, D, dtype = w.num_tasks, w.kv_heads, w.prefix_len, w.head_dim, w.torch_dtype
    prefix_k = torch.randn(T, Hkv, P, D, generator=gen).to(device=device, dtype=dtype)
    prefix_v = torch.randn(T, Hkv, P, D, generator=gen).to(device=device, dtype=dtype)
    if T == 1:
        return prefix_k[0], prefix_v[0], None
    prefix_index = torch.randint(0, T, (count,), generator=gen)
    prefix_index[:T] = torch.arange(min(T, count))  # every entry in use
    return prefix_k, prefix_v, prefix_index[torch.randperm(count, generator=gen)].to(device)


def make_varlen_inputs(w: Workload, device: str, seed: int = 0) -> VarlenInputs:
    """Random inputs of a packed kernel workload, its sequences of :func:`sequence_lengths` (seeded on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = sequence_lengths(w)
    total = sum(lengths)

    def tokens(heads):
        return torch.randn(total, heads, w.head_dim, generator=gen).to(device=device, dtype=w.torch_dtype)

    q, k, v = tokens(w.q_heads), tokens(w.kv_heads), tokens(w.kv_heads)
    prefix_k, prefix_v, prefix_index = _random_prefix(w, len(lengths), gen, device)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    grad_out = tokens(w.q_heads) if w.kind == "fwdbwd" else None
    return VarlenInputs(q, k, v, prefix_k, prefix_v, prefix_index, cu_seqlens, lengths, w.causal, grad_out)


def make_kernel_inputs(w: Workload, device: str, seed: int = 0):
    """Random inputs of a kernel workload (seeded on the CPU so a GPU and a CPU draw the same values):
    :class:`KernelInputs`, or :class:`VarlenInputs` for a packed workload."""
    if w.kind not in KERNEL_KINDS:
        raise ValueError(f"{w.name} is not a kernel workload")
    if w.packed:
        return make_varlen_inputs(w, device, seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = w.torch_dtype
    B, Hq, Hkv, Nq, N, D = w.batch, w.q_heads, w.kv_heads, w.q_len, w.seq_len, w.head_dim

    def projection(length, heads):
        return torch.randn(B, length, heads, D, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)

    q, k, v = projection(Nq, Hq), projection(N, Hkv), projection(N, Hkv)
    prefix_k, prefix_v, prefix_index = _random_prefix(w, B, gen, device)
    key_padding_mask = None
    if w.padding:
        lengths = torch.randint(max(1, N // 2), N + 1, (B,), generator=gen)
        lengths[0] = N
        key_padding_mask = (torch.arange(N)[None, :] < lengths[:, None]).to(device)
    grad_out = None
    if w.kind == "fwdbwd":
        grad_out = torch.randn(B, Nq, Hq, D, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    return KernelInputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, w.causal, grad_out)
