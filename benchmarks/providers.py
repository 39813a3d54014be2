"""The attention implementations compared at the kernel level, on the same inputs.

Each :class:`Provider` turns one set of :class:`~benchmarks.workloads.KernelInputs` into a :class:`Prepared`: a
zero-argument ``call`` that does exactly the work that is timed, and a ``finish`` that turns what ``call`` returned
into the quantities the correctness check compares (``out`` and, for fwd+bwd, the gradients of q, k, v and the
prefix in the inputs' shapes). Work that a provider's users do once, outside the step (concatenating K/V
beforehand for ``sdpa-precat``, building a block mask), happens in ``prepare`` and is not timed.

* ``ptv2-triton``, ``ptv2-cuda``, ``ptv2-native``, ``reference`` — :func:`ptv2_kernels.prefix_attention` with that
  backend (``native``: torch's own fused attention on the prefix and on the sequence, merged by log-sum-exp, the
  strongest path a user could assemble from torch alone).
* ``peft-path`` — what HF PEFT and the P-Tuning v2 code do on every forward: expand the prefix to the batch (or
  gather each sample's bank entry), ``cat`` it in front of K/V, build nothing else, and run SDPA the way
  transformers' ``sdpa_attention_forward`` calls it (``repeat_kv`` for GQA when a mask is passed); in backward
  autograd sums the prefix gradient over the batch. The masks (the prefix columns always visible) are made once.
* ``sdpa-precat`` — SDPA on K/V concatenated beforehand (the cat not timed): the "two sources cost nothing" bar.
  Causal uses torch's bottom-right causal bias, which is exactly the op's causal rule over ``[prefix ; sequence]``.
* ``flash-attn`` — ``flash_attn_func`` on the concatenated K/V (bottom-right causal is its native alignment).
* ``flex-attention`` — ``torch.nn.attention.flex_attention`` (compiled on a GPU) on the concatenated K/V.

A packed workload (``varlen-*``: sequences of skewed lengths, :class:`~benchmarks.workloads.VarlenInputs`) is run
packed by the ptv2 providers (:func:`ptv2_kernels.prefix_attention_varlen`) and by ``flash-attn``
(``flash_attn_varlen_func`` with each sequence's prefix concatenated in front of its keys beforehand), and padded
to the longest sequence by the SDPA baselines: ``peft-path`` and ``sdpa-precat`` do what they do on the padded
batch with its key-padding mask (the padding itself is not timed: a padded pipeline has its batch padded already),
and their per-token results are taken back to the packed rows for the check. Every provider's work is counted as
the real tokens' (``workloads.flops``), so the padding is time the padded baselines lose.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import warnings
from typing import Callable, Optional

from . import env  # first: sets TRITON_INTERPRET before anything imports triton

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from .harness import Unavailable  # noqa: E402
from .workloads import CPU_TIMING_GROUP, HOST_OVERHEAD, KERNEL_KINDS, KernelInputs, VarlenInputs, Workload

BASELINES = ("peft-path", "sdpa-precat")
OPTIONAL = ("flash-attn", "flex-attention")  # third-party comparisons: their failures do not fail a run
REQUESTED: set = set()  # providers named explicitly on the command line (see benchmarks/conftest.py)
GRAD_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


@dataclasses.dataclass
class Prepared:
    call: Callable[[], object]
    finish: Callable[[object], dict]
    note: str = ""


class Provider:
    name = ""
    kinds = KERNEL_KINDS
    description = ""
    # How it runs a packed workload: "varlen" (its ``prepare`` takes the packed VarlenInputs), "padded" (its
    # ``prepare`` runs the same sequences padded, see :func:`on_padded_batch`), or None (it does not).
    packed_form: Optional[str] = None

    def unavailable(self, w: Workload, x: Optional[KernelInputs] = None) -> Optional[str]:
        """None if this provider can run workload ``w`` here, else a sentence saying why not."""
        if w.kind not in self.kinds:
            return f"{self.name} does not serve {w.kind} workloads"
        if w.packed and self.packed_form is None:
            return f"{self.name} is not compared on packed (variable-length) batches"
        return None

    def prepare(self, w: Workload, x: KernelInputs) -> Prepared:
        raise NotImplementedError

    def prepare_inputs(self, w: Workload, x) -> Prepared:
        """:meth:`prepare` on the inputs in the form this provider runs them (the padded batch of a packed workload
        for a padded provider)."""
        if w.packed and self.packed_form == "padded":
            return on_padded_batch(self.prepare, w, x)
        return self.prepare(w, x)


def padded_twin(w: Workload, x: VarlenInputs) -> Workload:
    """The padded workload of a packed one: its sequences as ``batch`` samples of the longest one's length, key
    padding hiding the rest."""
    return dataclasses.replace(w, seq_len=x.max_seqlen, padding=True, median_len=0, min_len=0)


def on_padded_batch(prepare: Callable[[Workload, KernelInputs], Prepared], w: Workload, x: VarlenInputs) -> Prepared:
    """A padded provider's ``prepare`` on the padded form of packed inputs; its per-token results (out and the
    q/k/v gradients) are taken back to the packed rows, the prefix gradients are the bank's already."""
    from .check import TOKEN_QUANTITIES

    inner = prepare(padded_twin(w, x), x.padded)

    def finish(result):
        return {name: x.unpad(t) if name in TOKEN_QUANTITIES else t for name, t in inner.finish(result).items()}
    return Prepared(inner.call, finish, inner.note)


def _leaves(tensors, requires_grad: bool):
    return [t.detach().requires_grad_(requires_grad) for t in tensors]


def _standard_finish(w: Workload, leaves):
    """``finish`` for a provider whose call returns ``out`` (fwd, decode) or ``(out, grads of the leaves)``."""
    def finish(result):
        if w.kind != "fwdbwd":
            return {"out": result}
        out, grads = result
        return {"out": out, **dict(zip(GRAD_NAMES, grads))}
    return finish


def _timed_body(w: Workload, forward: Callable[[], torch.Tensor], leaves, grad_out):
    """The timed call: forward alone, or forward then the gradients of ``leaves`` (no .grad accumulation)."""
    if w.kind != "fwdbwd":
        def call():
            with torch.no_grad():
                return forward()
        return call

    def call():
        out = forward()
        return out, torch.autograd.grad(out, leaves, grad_out)
    return call


# ----------------------------------------------------------------------------------------------------------------
# ptv2_kernels
# ----------------------------------------------------------------------------------------------------------------

class Ptv2(Provider):
    packed_form = "varlen"

    def __init__(self, backend: str):
        self.backend = backend
        self.name = "reference" if backend == "reference" else f"ptv2-{backend}"
        self.description = (f"ptv2_kernels.prefix_attention(backend={backend!r}); packed batches: "
                            "prefix_attention_varlen")

    def unavailable(self, w, x=None):
        reason = super().unavailable(w, x)
        if reason:
            return reason
        from ptv2_kernels import backends

        reason = backends.unavailable_reason(self.backend)
        if reason is None and self.backend == "reference":
            reason = _reference_memory_reason(w, x)
        if reason is None and self.backend == "triton" and backends.triton_interpreting() \
                and w.group in (CPU_TIMING_GROUP, HOST_OVERHEAD.group):
            reason = ("Triton's CPU interpreter runs each program in Python: its time says nothing of the CPU "
                      "targets (P7, P8) this workload measures")
        return reason

    def prepare(self, w, x):
        import ptv2_kernels

        leaves = _leaves(x.tensors, w.kind == "fwdbwd")
        kwargs = dict(x.op_kwargs(), backend=self.backend)
        op, args = ((ptv2_kernels.prefix_attention_varlen, x.op_args()) if w.packed
                    else (ptv2_kernels.prefix_attention, ()))

        def forward():
            try:
                return op(*leaves, *args, **kwargs)
            except ValueError as error:  # a backend named explicitly that cannot serve this case says why
                if "cannot serve this" in str(error):
                    raise Unavailable(str(error)) from None
                raise
        return Prepared(_timed_body(w, forward, leaves, x.grad_out), _standard_finish(w, leaves))


def _reference_memory_reason(w: Workload, x: Optional[KernelInputs]) -> Optional[str]:
    """The reference materializes float32 scores, probabilities and masks of [B, Hq, Nq, P + N]: skip it where that
    cannot fit (a long-sequence GPU shape) rather than fail the run with an out-of-memory error."""
    if x is None or x.q.device.type != "cuda":
        return None
    scores = w.batch * w.q_heads * w.q_len * (w.prefix_len + w.seq_len) * 4
    need = scores * (8 if w.kind == "fwdbwd" else 4)
    free, _ = torch.cuda.mem_get_info()
    if need > 0.8 * free:
        return (f"the reference materializes [B, Hq, Nq, P + N] float32 scores: ~{need / 2**30:.0f} GiB needed, "
                f"{free / 2**30:.0f} GiB free")
    return None


# ----------------------------------------------------------------------------------------------------------------
# Baselines on the concatenated K/V
# ----------------------------------------------------------------------------------------------------------------

def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """transformers' repeat_kv: [B, Hkv, N, D] -> [B, Hkv·groups, N, D] (a copy)."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def concat_mask(w: Workload, x: KernelInputs) -> Optional[torch.Tensor]:
    """The bool mask over ``[prefix ; sequence]`` keys that transformers builds with a PEFT prefix in the cache:
    prefix columns always visible, then key padding and/or bottom-right causal over the sequence. None when all
    keys are visible."""
    batch, q_len, k_len, p = w.batch, w.q_len, w.seq_len, w.prefix_len
    device = x.q.device
    if x.key_padding_mask is None and not (w.causal and q_len > 1):
        return None
    visible = torch.ones(batch, 1, q_len, p + k_len, dtype=torch.bool, device=device)
    if x.key_padding_mask is not None:
        visible[:, :, :, p:] &= x.key_padding_mask[:, None, None, :]
    if w.causal and q_len > 1:
        rows = torch.arange(q_len, device=device)[:, None]
        cols = torch.arange(k_len, device=device)[None, :]
        visible[:, :, :, p:] &= cols <= rows + (k_len - q_len)
    if x.key_padding_mask is not None and not (w.causal and q_len > 1):
        return visible[:, :, :1]  # [B, 1, 1, P + N]: key padding broadcasts over the queries
    return visible


def split_concat_grads(x: KernelInputs, grad_kc: torch.Tensor, grad_vc: torch.Tensor) -> dict:
    """Gradients of concatenated per-sample K/V back into the sequence part and the prefix bank (summed over the
    samples that used each entry) — outside any timing, for the check only."""
    p = x.prefix_k.shape[-2]
    out = {}
    for name, grad, prefix in (("k", grad_kc, x.prefix_k), ("v", grad_vc, x.prefix_v)):
        out[name] = grad[:, :, p:]
        out[f"prefix_{name}"] = bank_grad(x, prefix, grad[:, :, :p])
    return out


def bank_grad(x, prefix: torch.Tensor, each: torch.Tensor) -> torch.Tensor:
    """The gradient of a prefix (``[Hkv, P, D]`` or a bank) from each sample's (sequence's) share ``[n, Hkv, P, D]``:
    summed over the samples that used each entry, in float32, returned in the prefix's shape and dtype."""
    bank_shape = prefix.shape if prefix.dim() == 4 else (1, *prefix.shape)
    index = x.prefix_index if x.prefix_index is not None else torch.zeros(
        each.shape[0], dtype=torch.long, device=each.device)
    bank = torch.zeros(bank_shape, dtype=torch.float32, device=each.device)
    bank.index_add_(0, index, each.float())
    return bank.view(prefix.shape).to(prefix.dtype)


class PeftPath(Provider):
    name = "peft-path"
    description = ("expand/gather the prefix + cat into K/V + SDPA (as HF PEFT / P-Tuning v2); autograd sums dprefix; "
                   "packed batches: on the padded batch")
    packed_form = "padded"

    def prepare(self, w, x):
        groups = w.q_heads // w.kv_heads
        fwdbwd = w.kind == "fwdbwd"
        q, k, v, prefix_k, prefix_v = _leaves(x.tensors, fwdbwd)
        mask = concat_mask(w, x)
        index = x.prefix_index
        batch = w.batch
        gqa = {}
        if groups > 1 and mask is None:
            gqa = {"enable_gqa": True}
        elif groups > 1 and w.q_len == 1:
            gqa = {"pack": True}

        def forward():
            if index is None:  # PEFT: past_key_values expanded to the batch
                pk = prefix_k.unsqueeze(0).expand(batch, *prefix_k.shape)
                pv = prefix_v.unsqueeze(0).expand(batch, *prefix_v.shape)
            else:  # the multi-task form: each sample's bank entry gathered
                pk, pv = prefix_k[index], prefix_v[index]
            keys = torch.cat([pk, k], dim=2)
            values = torch.cat([pv, v], dim=2)
            if "pack" in gqa:  # transformers' pack_gqa for one query: [B, Hq, 1, D] -> [B, Hkv, groups, D]
                out = F.scaled_dot_product_attention(q.reshape(batch, w.kv_heads, groups, w.head_dim), keys, values,
                                                     attn_mask=mask)
                return out.reshape(batch, w.q_heads, 1, w.head_dim)
            if groups > 1 and not gqa:
                keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, **gqa)

        leaves = [q, k, v, prefix_k, prefix_v]
        return Prepared(_timed_body(w, forward, leaves, x.grad_out), _standard_finish(w, leaves))


class SdpaPrecat(Provider):
    name = "sdpa-precat"
    description = "SDPA on K/V concatenated beforehand (the cat not timed); packed batches: on the padded batch"
    packed_form = "padded"

    def prepare(self, w, x):
        fwdbwd = w.kind == "fwdbwd"
        pk, pv = x.per_sample_prefix()
        kc = torch.cat([pk, x.k], dim=2).detach()
        vc = torch.cat([pv, x.v], dim=2).detach()
        q, kc, vc = _leaves((x.q, kc, vc), fwdbwd)
        mask = _precat_mask(w, x)
        gqa = {"enable_gqa": True} if w.q_heads != w.kv_heads else {}

        def forward():
            return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, **gqa)

        return Prepared(_timed_body(w, forward, [q, kc, vc], x.grad_out), _concat_finish(w, x))


def _precat_mask(w, x):
    if w.causal and w.q_len > 1 and x.key_padding_mask is None:
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(w.q_len, w.prefix_len + w.seq_len)
    return concat_mask(w, x)


def _concat_finish(w, x, sequence_major: bool = False):
    """``finish`` for providers timed on concatenated K/V (leaves q, kc, vc); ``sequence_major`` for those that
    work in [B, N, H, D] (flash-attn), whose results are viewed back as [B, H, N, D]."""
    view = (lambda t: t.transpose(1, 2)) if sequence_major else (lambda t: t)

    def finish(result):
        if w.kind != "fwdbwd":
            return {"out": view(result)}
        out, (grad_q, grad_kc, grad_vc) = result
        return {"out": view(out), "q": view(grad_q), **split_concat_grads(x, view(grad_kc), view(grad_vc))}
    return finish


class FlashAttn(Provider):
    name = "flash-attn"
    description = ("flash_attn_func on the concatenated K/V; packed batches: flash_attn_varlen_func, each "
                   "sequence's prefix in front of its keys")
    packed_form = "varlen"

    def unavailable(self, w, x=None):
        reason = super().unavailable(w, x)
        if reason:
            return reason
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash_attn package is not installed"
        if not env.ON_GPU:
            return "flash-attn runs on CUDA devices only"
        if w.padding:
            return "key padding needs flash-attn's varlen packing, which changes the work; not compared"
        if w.dtype not in ("float16", "bfloat16"):
            return f"flash-attn supports float16/bfloat16, not {w.dtype}"
        return None

    def prepare(self, w, x):
        if w.packed:
            return self._prepare_varlen(w, x)
        from flash_attn import flash_attn_func

        fwdbwd = w.kind == "fwdbwd"
        pk, pv = x.per_sample_prefix()
        # [B, N, H, D] layout, which flash-attn takes; q already is one underneath.
        q = x.q.transpose(1, 2)
        kc = torch.cat([pk, x.k], dim=2).transpose(1, 2).contiguous()
        vc = torch.cat([pv, x.v], dim=2).transpose(1, 2).contiguous()
        q, kc, vc = _leaves((q, kc, vc), fwdbwd)
        grad_out = None if x.grad_out is None else x.grad_out.transpose(1, 2)
        causal = w.causal and w.q_len > 1

        def forward():
            return flash_attn_func(q, kc, vc, causal=causal)

        return Prepared(_timed_body(w, forward, [q, kc, vc], grad_out), _concat_finish(w, x, sequence_major=True))

    def _prepare_varlen(self, w: Workload, x: VarlenInputs) -> Prepared:
        """``flash_attn_varlen_func`` on packed keys/values with each sequence's prefix in front of its own keys
        (the concatenation made beforehand, not timed, as for the padded flash-attn)."""
        from flash_attn import flash_attn_varlen_func

        keys = PrefixedPacking(x)
        q, kc, vc = _leaves((x.q, keys.concat(x.k, 0), keys.concat(x.v, 1)), w.kind == "fwdbwd")
        cu_q, max_q = x.cu_seqlens, x.max_seqlen
        causal = w.causal

        def forward():
            return flash_attn_varlen_func(q, kc, vc, cu_q, keys.cu_seqlens, max_q, keys.max_seqlen, causal=causal)

        def finish(result):
            if w.kind != "fwdbwd":
                return {"out": result}
            out, (grad_q, grad_kc, grad_vc) = result
            return {"out": out, "q": grad_q, **keys.split(grad_kc, grad_vc)}
        return Prepared(_timed_body(w, forward, [q, kc, vc], x.grad_out), finish)


class PrefixedPacking:
    """Packed keys with each sequence's prefix in front of its own keys: sequence s's ``P`` prefix rows then its
    keys, so its keys start at ``cu_seqlens[s] + s·P`` (the cumulative lengths of the concatenation)."""

    def __init__(self, x: VarlenInputs):
        self.x = x
        p = x.prefix_k.shape[-2]
        lengths = torch.tensor(x.lengths, device=x.q.device)
        count = len(x.lengths)
        self.cu_seqlens = x.cu_seqlens + p * torch.arange(count + 1, dtype=torch.int32, device=x.q.device)
        self.max_seqlen = x.max_seqlen + p
        # Rows of the concatenation: each sequence's prefix rows [S, P]; key t of sequence s moves (s + 1)·P down.
        self.prefix_rows = self.cu_seqlens[:-1, None].long() + torch.arange(p, device=x.q.device)[None, :]
        sequence = torch.repeat_interleave(torch.arange(count, device=x.q.device), lengths)
        self.key_rows = torch.arange(sequence.numel(), device=x.q.device) + p * (sequence + 1)

    def concat(self, packed: torch.Tensor, which: int) -> torch.Tensor:
        """``[total + S·P, Hkv, D]``: ``packed`` keys (values) with the prefix (``which`` 0: keys, 1: values)."""
        prefix = self.x.per_sequence_prefix()[which]  # [S, Hkv, P, D]
        out = packed.new_empty(self.key_rows.numel() + self.prefix_rows.numel(), *packed.shape[1:])
        out[self.key_rows] = packed
        out[self.prefix_rows.reshape(-1)] = prefix.transpose(1, 2).reshape(-1, *packed.shape[1:])
        return out

    def split(self, grad_kc: torch.Tensor, grad_vc: torch.Tensor) -> dict:
        """The gradients of the concatenations back into the packed keys/values and the prefix bank."""
        out = {}
        for name, grad, prefix in (("k", grad_kc, self.x.prefix_k), ("v", grad_vc, self.x.prefix_v)):
            out[name] = grad[self.key_rows]
            out[f"prefix_{name}"] = bank_grad(self.x, prefix, grad[self.prefix_rows].transpose(1, 2))
        return out


class FlexAttention(Provider):
    name = "flex-attention"
    description = "torch flex_attention (compiled on a GPU) on the concatenated K/V with a block mask"

    def unavailable(self, w, x=None):
        reason = super().unavailable(w, x)
        if reason:
            return reason
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
        if not env.ON_GPU and w.kind == "fwdbwd":
            return "flex_attention has no backward on the CPU"
        if env.ON_GPU and not w.targets and self.name not in REQUESTED:
            return ("compiled anew for every shape (minutes per sweep): measured on the target shapes only; "
                    "pass --provider flex-attention for every shape")
        return None

    def prepare(self, w, x):
        from torch.nn.attention.flex_attention import create_block_mask

        fwdbwd = w.kind == "fwdbwd"
        pk, pv = x.per_sample_prefix()
        kc = torch.cat([pk, x.k], dim=2).detach()
        vc = torch.cat([pv, x.v], dim=2).detach()
        q, kc, vc = _leaves((x.q, kc, vc), fwdbwd)
        p, q_len, k_len = w.prefix_len, w.q_len, w.seq_len
        keep = None
        if x.key_padding_mask is not None:
            keep = torch.cat([torch.ones(w.batch, p, dtype=torch.bool, device=x.q.device), x.key_padding_mask], dim=1)
        causal = w.causal and q_len > 1
        offset = p + k_len - q_len

        def mask_mod(b, h, q_idx, kv_idx):
            visible = kv_idx >= 0
            if keep is not None:
                visible = visible & keep[b, kv_idx]
            if causal:
                visible = visible & (kv_idx <= q_idx + offset)
            return visible

        block_mask = None
        if keep is not None or causal:
            block_mask = create_block_mask(mask_mod, B=w.batch if keep is not None else None, H=None, Q_LEN=q_len,
                                           KV_LEN=p + k_len, device=x.q.device.type)
        attend = _flex_function()
        gqa = {"enable_gqa": True} if w.q_heads != w.kv_heads else {}

        def forward():
            return attend(q, kc, vc, block_mask=block_mask, **gqa)

        return Prepared(_timed_body(w, forward, [q, kc, vc], x.grad_out), _concat_finish(w, x))


@functools.lru_cache(maxsize=None)
def _flex_function():
    from torch.nn.attention.flex_attention import flex_attention

    if not env.ON_GPU:  # eager (it warns that it is slow): the CPU run is functional only
        def eager(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return flex_attention(*args, **kwargs)
        return eager
    import torch._dynamo

    # One compiled graph per shape: allow the suite's shapes without falling back to the (slow) eager path.
    config = torch._dynamo.config
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, knob):
            setattr(config, knob, max(getattr(config, knob), 256))
    return torch.compile(flex_attention, dynamic=False)


# ----------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------

def kernel_providers() -> list[Provider]:
    """Every kernel-level provider, in the order the reports list them."""
    return [Ptv2("triton"), Ptv2("cuda"), Ptv2("native"), Ptv2("reference"), PeftPath(), SdpaPrecat(), FlashAttn(), FlexAttention()]


KERNEL_PROVIDER_NAMES = tuple(p.name for p in kernel_providers())


def by_name(name: str) -> Provider:
    for provider in kernel_providers():
        if provider.name == name:
            return provider
    raise KeyError(f"no kernel provider named {name!r} (known: {', '.join(KERNEL_PROVIDER_NAMES)})")
