"""P-Tuning v2 on a Hugging Face transformers model: ``patch(model, bank)`` and ``unpatch(model)``.

How a model is patched, on the instance only (no class is modified):

* An attention function and a mask function are registered under one name with ``transformers.AttentionInterface``
  and ``transformers.AttentionMaskInterface`` (a custom attention name without a mask function would silently get
  no padding mask), and the model is switched to that name with ``set_attn_implementation``.
* Each attention module is bound explicitly to its bank slot (``"layer.i"``, or ``"encoder.i"``, ``"decoder.i"``
  and ``"cross.i"`` for encoder-decoder models, which reuse ``layer_idx`` across the three).
* A forward pre-hook on the model (and on its sub-models, which ``generate`` calls directly) computes the bank's
  per-slot key/value views once per forward and passes them, with the samples' task ids, down to the attention
  function as a keyword argument (transformers forwards such keyword arguments to every attention call, also under
  gradient checkpointing). ``model(**batch, task_ids=ids)`` selects each sample's task.
* ``generate`` gets an instance-level wrapper that accepts ``task_ids``; the cache holds real tokens only.
* A family whose attention does not go through AttentionInterface (DeBERTa, DeBERTa-v2, GPT-Neo, MPNet, Falcon,
  BLOOM, XGLM, MPT) is served by an adapter module of this package (``deberta.py``, ``gpt_neo.py``, ``mpnet.py``,
  ``falcon.py``, ``bloom.py``, ``xglm.py``, ``mpt.py``), which replaces each bound attention module's forward on the
  instance.
* Hooks and the wrapper are instances of module-level classes (no closures), so a patched model deep-copies and
  pickles whole; the copy is patched with its own bank.

The mask function hands the op its cheap mask forms whenever they are exact: no mask, or a ``[B, Nk]`` key-padding
mask, with causality given by a flag (the op's causal mask is aligned bottom-right, which is exact when the queries
are the last ``Nq`` of the ``Nk`` keys), and a sliding layer's window as the op's ``window_size``
(:mod:`ptv2_kernels.integrations.windows`). Anything else (static caches, user 4-D masks) becomes a dense boolean
mask. A packed (padding-free) batch makes no mask at all: its attentions run the variable-length op
(:mod:`ptv2_kernels.integrations.packing`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import threading
import weakref
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..ops import BACKENDS, prefix_attention
from ..prefix import PrefixBank, PrefixSlot
from ..varlen import prefix_attention_varlen
from . import t5, windows
from .packing import Packing, packing_of_call

__all__ = ["patch", "unpatch", "PatchHandle", "freeze_backbone", "prefix_layout", "cache_keyword", "ATTENTION_NAME"]

ATTENTION_NAME = "ptv2_prefix"
CONTEXT_KWARG = "ptv2_prefix_context"
POSITIONS = ("shifted", "unshifted")
_BINDING_ATTR = "_ptv2_prefix_slot"
# The attention module whose relative-position table biases a bound module's prefix columns (position_bias="cached")
_PREFIX_BIAS_ATTR = "_ptv2_prefix_bias_table"
_STATE_ATTR = "_ptv2_patch_state"
_GUARD_ATTR = "_ptv2_unpatched_guard"
_BANK_MODULE = "ptv2_prefix"
_ROLES = ("encoder", "decoder", "cross")


@functools.cache  # the installed release does not change within a process; decode loops call this every step
def cache_keyword() -> str:
    """The keyword under which the installed transformers' models take a KV cache.

    ``"cache"`` from transformers 5.24 on (where ``past_key_values`` is a deprecated alias), ``"past_key_values"``
    before: ``model(input_ids=ids, **{cache_keyword(): cache})`` runs a decode step on either without a warning.
    """
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


# ----------------------------------------------------------------------------------------------------------------
# Finding the attention modules of a model
# ----------------------------------------------------------------------------------------------------------------

_INTERFACE_CLASSES: dict = {}


def _calls_attention_interface(cls) -> bool:
    """Whether ``cls.forward`` dispatches through transformers' AttentionInterface (read from its source)."""
    if cls not in _INTERFACE_CLASSES:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _INTERFACE_CLASSES[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _INTERFACE_CLASSES[cls]


# Families whose attention does not go through AttentionInterface, each served by an adapter module of this package
# (``serves(cls)``, ``install(module)``, ``uninstall(module)``) that replaces a bound attention module's forward on the
# instance; one may also say why it cannot serve a module (``unsupported(module)``: a reason or None), which patch and
# PrefixBank.for_model raise before changing anything. Imported when first asked (an adapter imports this module).
_FAMILY_ADAPTERS = ("deberta", "gpt_neo", "mpnet", "falcon", "bloom", "xglm", "mpt")


@functools.cache
def _family_adapter(cls):
    """The adapter module that serves attention modules of class ``cls``, or None."""
    import importlib

    for name in _FAMILY_ADAPTERS:
        adapter = importlib.import_module(f"{__package__}.{name}")
        if adapter.serves(cls):
            return adapter
    return None


def _refuse_unserved(model, modules):
    """Raise where a family adapter recognizes an attention module it cannot serve (BLOOM's and Falcon's ALiBi)."""
    for _, path, module in modules:
        unsupported = getattr(_family_adapter(type(module)), "unsupported", None)
        why = unsupported(module) if unsupported is not None else None
        if why:
            raise _unsupported(model, f"{why} ({path})")


def _is_encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _attention_modules(model) -> list[tuple[str, str, nn.Module]]:
    """``(slot name, module path, module)`` for every attention module of ``model``, in model order."""
    found = [(path, module) for path, module in model.named_modules()
             if path.split(".")[-1] != _BANK_MODULE
             and (_calls_attention_interface(type(module)) or _family_adapter(type(module)) is not None)]
    counters = {}
    result = []
    if _is_encoder_decoder(model):
        encoder = model.get_encoder()
        encoder_ids = {id(m) for m in encoder.modules()} if encoder is not model else set()
        for path, module in found:
            if id(module) in encoder_ids:
                role = "encoder"
            else:
                role = "decoder" if getattr(module, "is_causal", False) else "cross"
            index = counters.get(role, 0)
            counters[role] = index + 1
            result.append((f"{role}.{index}", path, module))
    else:
        for path, module in found:
            if ("cross" in type(module).__name__.lower() or "crossattention" in path.lower()
                    or path.split(".")[-1] == "encoder_attn"):
                continue  # cross-attention of a decoder-configured model: served without a prefix
            index = counters.get("layer", 0)
            counters["layer"] = index + 1
            result.append((f"layer.{index}", path, module))
    return result


def _first_attr(objects, names):
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _module_kv_shape(module, config) -> tuple[int, int, Optional[int]]:
    """(key/value heads, the keys' head dim, the values' head dim or None where it is the keys') of one attention
    module, from its attributes or its config. Multi-head latent attention (DeepSeek-V2/V3) names its keys' head
    dim ``qk_head_dim`` and its values' ``v_head_dim`` (its config's ``head_dim`` is the rotary part's)."""
    kv_heads, head_dim = _module_key_shape(module, config)
    value_dim = _first_attr([module], ("v_head_dim",))
    return kv_heads, head_dim, None if value_dim == head_dim else value_dim


def _module_key_shape(module, config) -> tuple[int, int]:
    """(key/value heads, the keys' head dim) of one attention module."""
    head_dim = _first_attr([module], ("qk_head_dim", "head_dim", "attention_head_size", "key_value_proj_dim",
                                      "head_size"))
    heads = _first_attr([module], ("num_heads", "num_attention_heads", "n_heads", "n_head"))
    if heads is None:
        heads = _first_attr([config], ("num_attention_heads", "num_heads"))
    kv_heads = _first_attr([module], ("num_key_value_heads", "num_kv_heads"))
    if kv_heads is None:
        groups = _first_attr([module], ("num_key_value_groups",))
        if groups is not None and heads is not None:
            kv_heads = heads // groups
        else:
            kv_heads = None  # from the key projection below, else from the config
    if head_dim is None:
        head_dim = _first_attr([config], ("head_dim",))
        if head_dim is None and heads:
            head_dim = _first_attr([config], ("hidden_size", "d_model")) // heads
    if kv_heads is None:
        # The key projection's width says what the module computes; a config may carry a num_key_value_heads its
        # attention does not use (a BERT-type config).
        keys = [getattr(module, name, None) for name in ("k_proj", "key", "k", "k_lin", "key_proj")]
        width = next((key.out_features for key in keys if isinstance(key, nn.Linear)), None)
        if width and head_dim and width % head_dim == 0:
            kv_heads = width // head_dim
        else:
            kv_heads = _first_attr([config], ("num_key_value_heads",)) or heads
    if not kv_heads or not head_dim:
        raise NotImplementedError(f"cannot read the key/value head count and head dim of {type(module).__name__}")
    return kv_heads, head_dim


def _model_type(model) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _unsupported(model, why: str) -> NotImplementedError:
    return NotImplementedError(f"ptv2_kernels.patch does not support model type {_model_type(model)!r} "
                               f"({type(model).__name__}): {why}")


# Families whose attention goes through AttentionInterface in a way a bank slot cannot serve, by model type: without
# this they would fail at their first forward or silently give results that no cached prefix gives.
_REFUSED_MODEL_TYPES = {
    "jetmoe": "its attention tiles each key/value head over its experts' query heads (key_states.repeat), which a "
              "bank slot's key/value heads do not follow",
    "diffllama": "its differential attention calls the attention function twice, on the two halves of its value "
                 "heads, and the prefix values are not split that way",
    "nllb-moe": "its decoder's self-attention is not marked causal (is_causal=False), so a patched model would run "
                "it without its causal mask",
}


def _refuse_listed_family(model):
    reason = _REFUSED_MODEL_TYPES.get(_model_type(model))
    if reason is not None:
        raise _unsupported(model, reason)
    if _model_type(model) == "falcon" and getattr(model.config, "alibi", False) and any(
            _calls_attention_interface(type(module)) and type(module).__name__ == "FalconAttention"
            for module in model.modules()):
        # transformers >= 5.25: the model adds ALiBi to a dense mask over the sequence keys before the attention
        raise _unsupported(model, "with alibi=True this transformers folds Falcon's ALiBi into the attention mask "
                                  "of the sequence keys, which the integration cannot extend to the prefix keys "
                                  "(the family adapter of transformers < 5.25 can)")


# Families whose adapters place ALiBi on the prefix keys of a bank with position_bias="cached".
_ALIBI_MODEL_TYPES = ("bloom", "falcon", "mpt")
# Families with a position-dependent score bias that a bank with position_bias="cached" would have to place on the
# prefix columns, and that the integration cannot place there (the T5 family's it can: see integrations/t5.py).
_POSITION_BIAS_MODULE_ATTRS = ("relative_attention_bias", "rel_embeddings", "relative_attention_num_buckets")


def _refuse_cached_position_bias(model, bank):
    if bank.position_bias != "cached" or _model_type(model) in t5.MODEL_TYPES + _ALIBI_MODEL_TYPES:
        return
    for name, module in model.named_modules():
        if any(hasattr(module, attr) for attr in _POSITION_BIAS_MODULE_ATTRS):
            raise _unsupported(model, f"the bank's position_bias is 'cached' but its position bias ({name}) cannot "
                                      "be placed on the prefix keys (only the T5 family's and ALiBi can: "
                                      f"{', '.join(t5.MODEL_TYPES + _ALIBI_MODEL_TYPES)}); build the bank with "
                                      "position_bias='none'")


def _check_model(model):
    try:
        from transformers import PreTrainedModel
    except ImportError as error:  # pragma: no cover - transformers is a requirement of this integration
        raise ImportError("ptv2_kernels.patch needs the transformers package") from error
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel instance, got {type(model).__name__}")


def prefix_layout(model, attentions: Optional[Sequence[str]] = None) -> tuple[list[PrefixSlot], int]:
    """The bank slots a model's attentions need, and its hidden size (the input width of a prefix MLP).

    ``attentions`` picks the roles of an encoder-decoder model (``"encoder"``, ``"decoder"``, ``"cross"``; all by
    default); decoder-only and encoder-only models have one role, ``"layer"``.
    """
    _check_model(model)
    modules = _attention_modules(model)
    if not modules:
        raise _unsupported(model, "its attention does not go through transformers' AttentionInterface")
    _refuse_unserved(model, modules)
    _refuse_listed_family(model)
    if attentions is not None:
        if not _is_encoder_decoder(model):
            raise ValueError("attentions selects the encoder/decoder/cross attentions of an encoder-decoder model; "
                             f"{_model_type(model)!r} is not one")
        attentions = tuple(attentions)
        bad = [role for role in attentions if role not in _ROLES]
        if bad or not attentions:
            raise ValueError(f"attentions must be a non-empty subset of {_ROLES}, got {attentions}")
    slots = []
    for name, _, module in modules:
        if attentions is not None and name.split(".")[0] not in attentions:
            continue
        config = getattr(module, "config", None) or model.config
        slots.append(PrefixSlot(name, *_module_kv_shape(module, config)))
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(text_config, "hidden_size", None) or getattr(text_config, "d_model", None)
    return slots, int(hidden)


# ----------------------------------------------------------------------------------------------------------------
# Per-forward context: the bank's views and the samples' task ids
# ----------------------------------------------------------------------------------------------------------------

def _length_error(entries: int, batch: int) -> str:
    return (f"task_ids has {entries} entries, but the model is called on a batch of {batch} samples: give one "
            "task id per sample, or one (an int, a name, or a single-entry list or tensor) for the whole batch")


def _normal_tensors():
    """Under ``torch.inference_mode`` the tensors made here would be inference tensors, which have no version
    counter: the op checks such index tensors on every call instead of once. Make normal tensors instead."""
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        return torch.inference_mode(False)
    return contextlib.nullcontext()


class _TaskSelection:
    """Each sample's bank entry, validated once: for one forward, or for every forward of one ``generate`` call.

    ``index`` is None (a one-task bank: the op shares its prefix) or ``[n]`` on the bank's device, ``n`` being the
    batch the ids were given for, or 1 (one id for the whole batch). The attentions may run a larger batch when
    the model repeats samples (a multiple-choice head flattens ``[B, C, N]`` to ``[B*C, N]``; generate repeats each
    sample per beam or returned sequence): ``repeats`` holds the factors that may occur (None: any, inside
    generate). Each expansion is made once and kept, so every layer and every decode step hands the op the same
    index tensor, whose values the op then reads (one device synchronization) once.
    """

    __slots__ = ("bank", "index", "repeats", "expanded", "shifts", "max_length")

    def __init__(self, bank: PrefixBank, index: Optional[Tensor], repeats, max_length: Optional[int]):
        self.bank, self.index, self.repeats = bank, index, repeats
        self.expanded = {} if index is None else {index.shape[0]: index}
        self.shifts = {}
        self.max_length = max_length  # the longest prefix among the samples' tasks, when the host knows it

    def index_for(self, batch: int) -> Optional[Tensor]:
        index = self.index
        if index is None:
            return None
        found = self.expanded.get(batch)
        if found is None:
            entries = index.shape[0]
            with _normal_tensors():
                if entries == 1:
                    found = index.expand(batch).contiguous()
                elif batch % entries == 0 and (self.repeats is None or batch // entries in self.repeats):
                    found = index.repeat_interleave(batch // entries)
                else:
                    raise ValueError(_length_error(entries, batch))
            self.expanded[batch] = found
        return found

    def shift_for(self, batch: int) -> Tensor:
        """Each sample's prefix length, ``[batch, 1]``."""
        shift = self.shifts.get(batch)
        if shift is None:
            with _normal_tensors():
                shift = self.bank.prefix_lengths[self.index_for(batch)].unsqueeze(-1)
            self.shifts[batch] = shift
        return shift

    def longest_prefix(self) -> int:
        """The longest prefix among the samples' tasks (read from the device once when only it knows)."""
        if self.max_length is None:
            self.max_length = int(self.bank.prefix_lengths[self.index].max()) if self.index.numel() else 0
        return self.max_length


class PrefixContext:
    """What one forward of a patched model hands every attention call: the bank's per-slot (key, value) views
    (computed once), the samples' task selection, and the entries' lengths."""

    __slots__ = ("state", "kv", "tasks", "lengths", "shift", "packing", "past", "windows", "op_mask")

    def __init__(self, state, kv, tasks: _TaskSelection, lengths, shift, packing: Optional[Packing] = None,
                 past=0):
        self.state, self.kv, self.tasks, self.lengths, self.shift = state, kv, tasks, lengths, shift
        self.packing = packing  # the sequences of a packed batch, or None
        self.past = past  # the tokens the call's cache holds already
        # The sliding windows of the masks that the mask function handed over in their key-padding form, by
        # causality: {causal: (left, right)} (see integrations/windows.py).
        self.windows: dict = {}
        # (the mask a model handed its attentions, is_causal, Nk, what _op_mask made of it): every layer of a
        # forward gets the same mask, so the op's form of it is made once.
        self.op_mask: Optional[tuple] = None

    @property
    def index(self) -> Optional[Tensor]:
        return self.tasks.index

    def index_for(self, batch: int) -> Optional[Tensor]:
        """The samples' bank entries for an attention batch of ``batch`` rows (a multiple of the task ids' batch
        when the model repeats samples, as multiple-choice heads and beam search do)."""
        return self.tasks.index_for(batch)

    def shift_for(self, batch: int):
        """Each sample's position shift (its prefix length): a python int when all are equal, else ``[B, 1]``."""
        if self.shift is not None:
            return self.shift
        return self.tasks.shift_for(batch)

    def longest_prefix(self) -> int:
        return self.shift if self.shift is not None else self.tasks.longest_prefix()


class _PatchState:
    """What :func:`patch` changed on one model, and what its forwards share.

    It lives on the model (and in its attention modules' bindings and hooks), so ``copy.deepcopy(model)`` and
    ``torch.save(model)`` copy it with the model; what only the forward running now needs (its context, which
    holds the bank's views: non-leaf tensors, which cannot be deep-copied) is left out of the copy.
    """

    def __init__(self, bank: PrefixBank, positions: str, backend: str, model_name: str):
        self.bank = bank
        self.positions = positions
        self.backend = backend
        self.model_name = model_name
        self.position_room: Optional[tuple[int, Optional[int]]] = None  # (positions, max_position_embeddings)
        # The family numbers a call's positions from its attention mask (real tokens only) when none are given.
        self.positions_from_mask = False
        # The family's model reads the mask before its attention does (see _DENSE_MASK_MODEL_TYPES).
        self.dense_masks = False
        self.bindings: list[nn.Module] = []
        self.hooks = []
        self.previous_implementations: list = []  # (sub-model, implementation before patching)
        self.generate_tasks: list = []  # the task selections of the generate calls running now, innermost last
        self.wrapped_generate = False
        # The context of the innermost hooked forward running now, and the ones it interrupted: for the position
        # hooks, and for attention modules whose callers do not pass the context on as a keyword argument.
        self.current: Optional[PrefixContext] = None
        self.interrupted: list = []
        # Modules that can checkpoint their children (transformers sets their _gradient_checkpointing_func).
        self.checkpointing: list[nn.Module] = []

    def __getstate__(self):
        state = dict(self.__dict__)
        state["current"] = None
        state["interrupted"] = []
        state["generate_tasks"] = []
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        _register()  # a model unpickled in a new process needs the attention and mask functions registered

    def select(self, task_ids, batch: Optional[int] = None, repeats=frozenset()) -> _TaskSelection:
        """Validate ``task_ids`` for a call on ``batch`` samples (when known): one id per sample or one for all.

        Ids given as ints, names or a CPU tensor are checked on the host (no device read); a tensor already on the
        bank's device is left to the op, which reads it once (one device synchronization) and remembers it.
        """
        bank = self.bank
        if task_ids is None:
            if bank.num_tasks != 1:
                raise ValueError(f"the patched model's PrefixBank holds {bank.num_tasks} task prefixes: pass "
                                 "task_ids=... (one per sample, or one for the batch) to the model or to generate")
            return _TaskSelection(bank, None, repeats, bank.prefix_len)
        with _normal_tensors():
            index, host_ids = bank._task_index(task_ids, device=bank.prefix_lengths.device)
            if not torch.compiler.is_compiling() and index.is_inference():
                index = index.clone()
        entries = index.shape[0]
        if batch is not None and entries not in (1, batch):
            raise ValueError(_length_error(entries, batch))
        if bank.num_tasks == 1:
            if host_ids is None and entries and not torch.compiler.is_compiling():
                low, high = torch.stack(index.aminmax()).tolist()  # one read
                if low != 0 or high != 0:
                    raise IndexError(f"task id {high if high else low} is out of range for a bank of 1 task")
            return _TaskSelection(bank, None, repeats, bank.prefix_len)
        if bank.uniform_length:
            longest = bank.prefix_len
        elif host_ids is not None and not torch.compiler.is_compiling():
            lengths = bank.lengths()
            longest = max((lengths[i] for i in host_ids), default=0)
        else:
            longest = None
        return _TaskSelection(bank, index, repeats, longest)

    def context(self, task_ids=None, batch: Optional[int] = None, repeats=frozenset(),
                packing: Optional[Packing] = None, past=0) -> PrefixContext:
        """The context of one forward; for a packed batch ``batch`` is its sequence count (one task id each)."""
        if task_ids is None and self.generate_tasks:
            tasks = self.generate_tasks[-1]
        else:
            tasks = self.select(task_ids, batch, repeats)
        bank = self.bank
        lengths = None if bank.uniform_length else bank.prefix_lengths
        shift = bank.prefix_len if bank.uniform_length else None  # None: each sample's own length
        return PrefixContext(self, bank(), tasks, lengths, shift, packing, past)


# ----------------------------------------------------------------------------------------------------------------
# The attention and mask functions registered with transformers
# ----------------------------------------------------------------------------------------------------------------

_EMPTY_PREFIXES: dict = {}


def _empty_prefix(key: Tensor) -> Tensor:
    shape = (key.shape[1], 0, key.shape[3])
    cache_key = (shape, key.dtype, key.device)
    if cache_key not in _EMPTY_PREFIXES:
        _EMPTY_PREFIXES[cache_key] = key.new_empty(shape)
    return _EMPTY_PREFIXES[cache_key]


def _op_mask_of_forward(attention_mask, is_causal: bool, key: Tensor, context: Optional[PrefixContext]):
    """:func:`_op_mask`, made once per forward for the mask all its layers get (eagerly: a trace makes it once)."""
    if context is None or attention_mask is None or torch.compiler.is_compiling():
        return _op_mask(attention_mask, is_causal, key, context)
    made, k_len = context.op_mask, key.shape[-2]
    if made is not None and made[0] is attention_mask and made[1] == is_causal and made[2] == k_len:
        return made[3]
    forms = _op_mask(attention_mask, is_causal, key, context)
    context.op_mask = (attention_mask, is_causal, k_len, forms)
    return forms


def _op_mask(attention_mask, is_causal: bool, key: Tensor, context: Optional[PrefixContext]):
    """The op's (key_padding_mask, attn_mask, causal, window_size) for the mask a model hands the attention
    function.

    Masks this module's mask function makes: None (causality from the module, as transformers' SDPA path does),
    ``[B, Nk]`` bool (key padding, not causal), ``[B, 1, Nk]`` bool (key padding, causal), the same two in uint8
    for a sliding layer (whose window the mask function recorded on the forward's context), or a dense 4-D bool
    mask. A 4-D mask given by the user may also be an additive float mask (0 = attend, very negative = not), which
    the op adds to the scores as it is: no device read to convert it.
    """
    if attention_mask is None:
        return None, None, is_causal, None
    if attention_mask.dim() in (2, 3):
        causal = attention_mask.dim() == 3
        padding = attention_mask[:, 0] if causal else attention_mask
        window = None
        if attention_mask.dtype == windows.WINDOWED_PADDING_DTYPE:
            window = context.windows.get(causal) if context is not None else None
            if window is None:
                raise ValueError(f"a patched model's attention got a {attention_mask.dim()}-D uint8 attention mask "
                                 "that its mask function did not make in this forward (the mark of a sliding "
                                 "layer's mask): give the model a bool or integer attention mask")
        return padding.to(torch.bool), None, causal, window
    if attention_mask.dim() != 4:
        raise ValueError(f"a patched model's attention got a {attention_mask.dim()}-D attention mask of shape "
                         f"{list(attention_mask.shape)}; expected a 2-D padding mask or a 4-D mask")
    if attention_mask.shape[-1] > key.shape[-2]:
        attention_mask = attention_mask[..., :key.shape[-2]]  # a static cache's mask may be longer than the keys
    if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
        attention_mask = attention_mask != 0
    return None, attention_mask, False, None


def prefix_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                             dropout: float = 0.0, **kwargs):
    """The attention function registered as ``"ptv2_prefix"``: attention over the module's bank slot + K/V."""
    # Gemma2's score cap and GPT-OSS's attention sinks (its s_aux), for the op; not on packed sequences.
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux", kwargs.get("sinks"))
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", False))
    context = _module_context(module, kwargs)
    if context is not None and context.packing is not None:
        return _packed_attention(module, query, key, value, context, is_causal, scaling, dropout, kwargs)
    key_padding_mask, mask, causal, window = _op_mask_of_forward(attention_mask, is_causal, key, context)
    prefix_k, prefix_v, index, lengths, backend = _module_prefix(module, query, key, kwargs, context)
    # T5's relative position bias: on the sequence keys' scores; the prefix keys get none (zero bias columns), or,
    # for a bank placed where a cache would hold it, the bias of their cache positions.
    prefix_bias = _cached_prefix_bias(module, query, key, prefix_k, index, lengths, context)
    if context is not None and context.state.bank.position_bias == "cached" and prefix_k.shape[-2]:
        # ... and the slots that such a cache would have slid out of a sliding layer's window.
        prefix_k, prefix_v, index, lengths, prefix_bias = _slid_out_prefix(
            module, query, key, value, (prefix_k, prefix_v, index, lengths, prefix_bias), context, window, kwargs)
    out = prefix_attention(query, key, value, prefix_k, prefix_v, prefix_index=index, prefix_lengths=lengths,
                           key_padding_mask=key_padding_mask, attn_mask=mask, attn_bias=kwargs.get("position_bias"),
                           causal=causal, scale=scaling, dropout_p=float(dropout), backend=backend, softcap=softcap,
                           sinks=sinks, prefix_bias=prefix_bias, window_size=window)
    return out.transpose(1, 2), None


def _slid_out_prefix(module, query, key, value, prefix, context: PrefixContext, window, kwargs):
    """``prefix`` (prefix_k, prefix_v, prefix_index, prefix_lengths, prefix_bias) of a sliding layer's call with a
    position_bias="cached" bank: the slots that a cache holding the prefix in front of the sequence would have slid
    out of the window get -inf; when the window has passed every slot of every sample, the call gets no prefix."""
    prefix_k, prefix_v, index, lengths, prefix_bias = prefix
    if window is not None:  # the op's window: queries are the last Nq of the Nk keys (a dynamic cache)
        left = window[0]
        first = key.shape[2] - query.shape[2]
    else:  # a dense mask (a static cache, a user's mask): the window of the layer's call, positions from the cache
        sliding = windows.layer_window(module, kwargs)
        if sliding is None:
            return prefix
        left, first = sliding - 1, context.past
    queries = query.shape[2]
    if not isinstance(first, Tensor):
        if first + 1 > left:  # the nearest slot (L - 1) is out of reach of the first query: so is every slot
            return _empty_prefix(key), _empty_prefix(value), None, None, None
        if first + queries - 1 + context.longest_prefix() <= left:  # the last query still reaches slot 0
            return prefix
    positions = torch.arange(queries, device=query.device) + first
    hidden = windows.cached_prefix_window_bias(left, positions, prefix_k.shape[-2],
                                               sample_prefix_lengths(context, index, lengths, query.shape[0]))
    return prefix_k, prefix_v, index, lengths, hidden if prefix_bias is None else prefix_bias + hidden


def _cached_prefix_bias(module, query, key, prefix_k, index, lengths, context) -> Optional[Tensor]:
    """The prefix columns' relative position bias of a bank with position_bias="cached" (None without one)."""
    owner = module.__dict__.get(_PREFIX_BIAS_ATTR)
    if owner is None or prefix_k.shape[-2] == 0:
        return None
    return t5.cached_prefix_bias(owner, query.shape[2], key.shape[2], prefix_k.shape[-2],
                                 sample_prefix_lengths(context, index, lengths, query.shape[0]))


def sample_prefix_lengths(context: PrefixContext, index: Optional[Tensor], lengths: Optional[Tensor],
                          batch: int) -> Union[int, Tensor]:
    """How many prefix keys each of ``batch`` samples sees: one int when every task's prefix has the bank's
    length, else a ``[batch]`` tensor (no device read)."""
    if context.shift is not None:
        return context.shift
    return lengths[index] if index is not None else lengths[:1].expand(batch)


def _packed_attention(module, query, key, value, context: PrefixContext, is_causal: bool, scaling, dropout, kwargs):
    """A packed batch's attention: the variable-length op on the row's sequences (``[1, H, total, D]`` views read
    as ``[total, H, D]``, no copy), each with its own task's prefix; the mask function made no mask."""
    packing = context.packing
    if not packing.serves(query.shape[0], query.shape[2], key.shape[2]):
        raise NotImplementedError(
            f"{type(module).__name__} got queries {list(query.shape)} and keys {list(key.shape)} in a packed batch "
            f"of {packing.total} tokens; a patched model serves packed sequences in self-attention over the packed "
            "row only")
    if module.__dict__.get(_PREFIX_BIAS_ATTR) is not None:
        raise NotImplementedError(f"{type(module).__name__} biases the prefix keys by their cache positions "
                                  "(position_bias='cached'), which a patched model does not serve on packed sequences: "
                                  "pass a padded batch")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux", kwargs.get("sinks")) is not None:
        raise NotImplementedError(f"{type(module).__name__} caps its scores or has attention sinks, which a patched "
                                  "model does not serve on packed sequences: pass a padded batch")
    state, slot = module.__dict__[_BINDING_ATTR]
    prefix_k, prefix_v = context.kv[slot]
    # No mask carries a packed row's window: the one the layer names, in the convention transformers' flash
    # attention (its packed path) gives it, W - 1 keys each way, the causal side cut at 0 by the op.
    sliding = windows.layer_window(module, kwargs)
    window = None if sliding is None else (sliding - 1, sliding - 1)
    if window is not None and state.bank.position_bias == "cached":
        raise NotImplementedError(f"{type(module).__name__} has a sliding window, which would pass the prefix keys "
                                  "of a bank placed by their cache positions (position_bias='cached'): a patched "
                                  "model does not serve that on packed sequences; pass a padded batch")
    out = prefix_attention_varlen(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), prefix_k, prefix_v,
        packing.cu_seqlens, packing.cu_seqlens, packing.max_seqlen, packing.max_seqlen,
        prefix_index=context.index_for(packing.num_seqs), prefix_lengths=context.lengths, causal=is_causal,
        scale=scaling, dropout_p=float(dropout), backend=state.backend, window_size=window)
    return out.unsqueeze(0), None


def _module_context(module, kwargs) -> Optional[PrefixContext]:
    """The context of the forward an attention call belongs to, or None for a module without a bank slot."""
    binding = module.__dict__.get(_BINDING_ATTR)
    if binding is None:
        return None
    state, _ = binding
    context = kwargs.get(CONTEXT_KWARG)
    if context is None or context.state is not state:
        # Some families' layers do not pass their keyword arguments on to the attention (StableLM, Nemotron):
        # the forward running now is found on the state. Outside every forward: views made here.
        if state.current is not None:
            context = state.current
        elif state.bank.num_tasks > 1 and not state.generate_tasks:
            raise ValueError(
                f"{type(module).__name__} ran outside a forward of the patched model and without its per-forward "
                "context, so the samples' tasks are unknown: a layer of this family does not pass keyword "
                "arguments on to its attention, and here it was called on its own (or recomputed by a checkpoint "
                "function other than the one transformers' gradient_checkpointing_enable sets). With a bank of "
                "several tasks, call the whole model.")
        else:
            context = state.context(None)
    return context


def _module_prefix(module, query, key, kwargs, context: Optional[PrefixContext] = None):
    """(prefix_k, prefix_v, prefix_index, prefix_lengths, backend) for one attention call."""
    binding = module.__dict__.get(_BINDING_ATTR)
    if binding is None:  # an attention without a bank slot: no prefix
        empty = _empty_prefix(key)
        return empty, empty, None, None, "auto"
    state, slot = binding
    context = context or _module_context(module, kwargs)
    prefix_k, prefix_v = context.kv[slot]
    return prefix_k, prefix_v, context.index_for(query.shape[0]), context.lengths, state.backend


def prefix_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                          mask_function=None, attention_mask: Optional[Tensor] = None, **kwargs):
    """The mask function registered as ``"ptv2_prefix"`` (see :func:`_op_mask` for the forms it returns). Inside
    the forward of a packed batch it makes none: the attentions run the variable-length op."""
    running = _running_contexts()
    if running and running[-1] is not None and running[-1].packing is not None \
            and running[-1].packing.serves(batch_size, q_length, kv_length):
        return None
    masking_utils = _MASKING_UTILS[0] if _MASKING_UTILS else _masking_utils()
    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    dense = running and running[-1] is not None and running[-1].state.dense_masks
    bidirectional = mask_function is masking_utils.bidirectional_mask_function and not dense
    causal = (mask_function is masking_utils.causal_mask_function and isinstance(q_offset, int) and not dense
              and isinstance(kv_offset, int) and q_offset + q_length == kv_offset + kv_length)
    if bidirectional or causal:
        if attention_mask is None:
            return None
        return _padding(masking_utils, attention_mask, kv_length, kv_offset, causal)
    windowed = None if dense else _windowed_padding(masking_utils, running, batch_size, q_length, kv_length,
                                                    q_offset, kv_offset, mask_function, attention_mask,
                                                    kwargs.get("device"))
    if windowed is not None:
        return windowed
    for name in ("allow_is_causal_skip", "allow_is_bidirectional_skip", "allow_torch_fix", "dtype"):
        kwargs.pop(name, None)
    return masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                   q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                                   attention_mask=attention_mask, allow_is_causal_skip=False,
                                   allow_is_bidirectional_skip=False, **kwargs)


def _padding(masking_utils, attention_mask: Tensor, kv_length: int, kv_offset: int, causal: bool) -> Tensor:
    """The key-padding form ``[B, Nk]`` (``[B, 1, Nk]`` when causal), bool."""
    padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    padding = padding[:, kv_offset:kv_offset + kv_length].to(torch.bool)
    return padding.unsqueeze(1) if causal else padding


def _windowed_padding(masking_utils, running, batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                      attention_mask, device) -> Optional[Tensor]:
    """A sliding layer's mask in its key-padding form, marked (integrations/windows.py), its window recorded on the
    forward's context; None where that form would not be exact (the dense mask is made then)."""
    context = running[-1] if running else None
    if context is None or torch.compiler.is_compiling() or not (
            isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset + q_length == kv_offset + kv_length):
        return None
    found = windows.mask_window(masking_utils, mask_function)
    if found is None:
        return None
    causal, window = found
    if context.windows.setdefault(causal, window) != window:  # two windows of one kind in one forward
        return None
    padding = None if attention_mask is None else _padding(masking_utils, attention_mask, kv_length, kv_offset,
                                                             False)
    if device is None:
        device = attention_mask.device if attention_mask is not None else context.state.bank.prefix_lengths.device
    return windows.windowed_padding(padding, batch_size, kv_length, device, causal)


# transformers.masking_utils, imported once when the functions are registered (eagerly): an import inside the mask
# function would run under torch.compile, whose older releases cannot trace transformers' lazy top-level module.
_MASKING_UTILS: list = []


def _masking_utils():
    import importlib

    if not _MASKING_UTILS:
        _MASKING_UTILS.append(importlib.import_module("transformers.masking_utils"))
    return _MASKING_UTILS[0]


def _register():
    from transformers import AttentionInterface, AttentionMaskInterface

    _masking_utils()

    AttentionInterface.register(ATTENTION_NAME, prefix_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, prefix_attention_mask)


# ----------------------------------------------------------------------------------------------------------------
# Hooks: the per-forward context, task ids and shifted positions
# ----------------------------------------------------------------------------------------------------------------

def _forward_parameters(module) -> tuple[list[str], bool]:
    parameters = list(inspect.signature(module.forward).parameters.values())
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names, any(p.kind == p.VAR_KEYWORD for p in parameters)


def _argument(name, names, args, kwargs):
    if name in kwargs:
        return kwargs[name]
    if name in names and names.index(name) < len(args):
        return args[names.index(name)]
    return None


# (input, how many trailing dims are not batch dims): multiple choice's [B, C, N] has leading dims (B, C)
_BATCH_INPUTS = (("input_ids", 1), ("inputs_embeds", 2), ("decoder_input_ids", 1), ("decoder_inputs_embeds", 2))


def _input_lead(names, args, kwargs) -> Optional[tuple]:
    """The leading dims of a model call's inputs: ``(B,)``, or ``(B, C)`` for a multiple-choice head."""
    for name, trailing in _BATCH_INPUTS:
        value = _argument(name, names, args, kwargs)
        if isinstance(value, Tensor) and value.dim() > trailing:
            return tuple(value.shape[:-trailing])
    return None


def _padding_idx_embeddings(model):
    """RoBERTa-style embeddings (positions count from padding_idx + 1, padding keeps padding_idx), if any."""
    for module in model.modules():
        if hasattr(module, "padding_idx") and (hasattr(module, "create_position_ids_from_input_ids")
                                               or hasattr(module, "create_position_ids_from_inputs_embeds")):  # MPNet
            return module
    return None


class _PreHook:
    """The forward pre-hook of a patched model and of its sub-models: makes the forward's context (the bank's views
    and the samples' task ids, once per forward) and, with ``positions="shifted"``, shifts the positions.

    A module-level class rather than a closure, so that a patched model pickles (``torch.save(model)``) and
    deep-copies with its hooks (which then refer to the copy's state).
    """

    def __init__(self, state: _PatchState, names: list[str], shift_positions: bool, roberta):
        self.state, self.names, self.shift_positions, self.roberta = state, names, shift_positions, roberta

    def __call__(self, module, args, kwargs):
        state = self.state
        state.interrupted.append(state.current)  # first, so that _PostHook's pops match even if this raises
        running = _running_contexts()
        running.append(None)
        context = kwargs.get(CONTEXT_KWARG)
        if context is None and "task_ids" not in kwargs and state.current is not None:
            context = state.current  # a sub-model called by the running forward without its keyword arguments
        if context is not None and context.state is state:
            state.current = running[-1] = context
            return None
        task_ids = kwargs.pop("task_ids", None)
        lead = _input_lead(self.names, args, kwargs)
        batch = lead[0] if lead else None
        # A multiple-choice head runs its B questions' C choices as B*C samples: one task id per question.
        repeats = frozenset([math.prod(lead[1:])]) if lead and len(lead) > 1 else frozenset()
        past = _past_length(self.names, args, kwargs)
        packing = packing_of_call(_argument("position_ids", self.names, args, kwargs),
                                  _argument("attention_mask", self.names, args, kwargs), past, lead, kwargs)
        if packing is not None:
            batch = packing.num_seqs  # one task id per packed sequence
        context = state.context(task_ids, batch=batch, repeats=repeats, packing=packing, past=past)
        kwargs[CONTEXT_KWARG] = context
        state.current = running[-1] = context
        if module.training and torch.is_grad_enabled():
            _recompute_under_context(state)
        if self.shift_positions:
            _shift_positions(context, self.names, args, kwargs, self.roberta)
        return args, kwargs


class _PostHook:
    """The forward hook paired with each :class:`_PreHook` (called even when the forward raises): the context of
    the forward that was interrupted becomes current again, None outside every forward."""

    def __init__(self, state: _PatchState):
        self.state = state

    def __call__(self, module, args, kwargs, output):
        state = self.state
        state.current = state.interrupted.pop() if state.interrupted else None
        running = _running_contexts()
        if running:
            running.pop()
        return None


# The contexts of the hooked forwards running now in this thread (of every patched model), innermost last: the
# mask function, which is told nothing of the model calling it, looks here for a packed batch.
_RUNNING = threading.local()


def _running_contexts() -> list:
    running = getattr(_RUNNING, "contexts", None)
    if running is None:
        running = _RUNNING.contexts = []
    return running


class _CheckpointUnderContext:
    """A layer's checkpoint function wrapped so that the layer runs, in its forward and in its recompute during
    backward, under the context of the forward that called it: families whose layers do not pass the context on
    as a keyword argument (StableLM, Nemotron, DeBERTa) find it on the state, also with several tasks."""

    def __init__(self, state: _PatchState, checkpoint):
        self.state, self.checkpoint = state, checkpoint

    def __call__(self, function, *args, **kwargs):
        context = self.state.current
        if context is None:
            return self.checkpoint(function, *args, **kwargs)
        return self.checkpoint(_UnderContext(self.state, context, function), *args, **kwargs)


class _UnderContext:
    def __init__(self, state: _PatchState, context: PrefixContext, function):
        self.state, self.context, self.function = state, context, function

    def __call__(self, *args, **kwargs):
        state = self.state
        previous, state.current = state.current, self.context
        try:
            return self.function(*args, **kwargs)
        finally:
            state.current = previous


def _recompute_under_context(state: _PatchState):
    """Wrap the checkpoint functions that gradient checkpointing set (now or since the last forward)."""
    for module in state.checkpointing:
        checkpoint = module.__dict__.get("_gradient_checkpointing_func")
        if checkpoint is not None and not isinstance(checkpoint, _CheckpointUnderContext):
            module.__dict__["_gradient_checkpointing_func"] = _CheckpointUnderContext(state, checkpoint)


def _unwrap_checkpointing(state: _PatchState):
    for module in state.checkpointing:
        checkpoint = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(checkpoint, _CheckpointUnderContext):
            module.__dict__["_gradient_checkpointing_func"] = checkpoint.checkpoint


def _past_length(names, args, kwargs) -> int:
    """How many tokens a call's cache holds already (0 without one)."""
    cache = _argument("cache", names, args, kwargs)  # transformers >= 5.24; before, past_key_values
    if cache is None:
        cache = _argument("past_key_values", names, args, kwargs)
    return cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0


def _shift_positions(context: PrefixContext, names, args, kwargs, roberta):
    """Real tokens at positions L..L+N-1 (L the sample's prefix length), as when the prefix sits in the cache."""
    input_ids = _argument("input_ids", names, args, kwargs)
    embeds = _argument("inputs_embeds", names, args, kwargs)
    if input_ids is not None:
        lead, length, device = tuple(input_ids.shape[:-1]), input_ids.shape[-1], input_ids.device
    elif embeds is not None:
        lead, length, device = tuple(embeds.shape[:-2]), embeds.shape[-2], embeds.device
    else:
        return
    if "position_ids" in names and names.index("position_ids") < len(args):
        raise ValueError("give position_ids by keyword to a patched model with positions='shifted'")
    past = context.past
    position_ids = _argument("position_ids", names, args, kwargs)
    _check_position_room(context, past, length, position_ids,
                         offset=roberta.padding_idx + 1 if roberta is not None else 0)
    if context.packing is not None:  # positions as given (or counted along the row, as the model would)
        if position_ids is None:
            position_ids = (torch.arange(length, device=device) + past).view(1, length)
        kwargs["position_ids"] = position_ids + _position_shift(context, 1)
        return
    shift = context.shift_for(lead[0])
    if not isinstance(shift, int):  # [B, 1] -> [B, 1, ..., 1] for inputs like multiple choice's [B, C, N]
        shift = shift.view(lead[0], *([1] * len(lead)))
    attention_mask = _argument("attention_mask", names, args, kwargs)
    if position_ids is None and context.state.positions_from_mask and isinstance(attention_mask, Tensor) \
            and attention_mask.dim() == 2:
        # as the family counts them: real tokens from 0 (padding -1), then after the prefix; padding stays
        real = attention_mask.long()
        position_ids = ((torch.cumsum(real, dim=1) - 1) * real - (1 - real))[:, past:]
        position_ids = position_ids + shift * real[:, past:]
    elif position_ids is None:
        if roberta is not None and input_ids is not None:
            # RoBERTa counts positions from padding_idx + 1 and leaves padding at padding_idx.
            real = input_ids.ne(roberta.padding_idx).long()
            position_ids = (torch.cumsum(real, dim=-1) + past + shift) * real + roberta.padding_idx
        else:
            start = (roberta.padding_idx + 1 if roberta is not None else 0) + past
            if type(shift) is int and type(start) is int:  # one arange (a traced cache's length is symbolic)
                position_ids = torch.arange(start + shift, start + shift + length, device=device)
            else:
                position_ids = torch.arange(length, device=device) + start + shift
            position_ids = position_ids.expand(*lead, length).contiguous()
    else:
        position_ids = position_ids + shift
    kwargs["position_ids"] = position_ids


# Families whose models compute with the mask before handing it to the attention (Doge's dynamic mask attention
# turns it into an additive float mask of its own; DeepSeek sparse attention's indexer picks each query's keys
# within it): they get transformers' dense 4-D masks, never the cheap forms.
_DENSE_MASK_MODEL_TYPES = frozenset({"doge", "deepseek_v32", "glm_moe_dsa"})

# Families whose models number the positions from the attention mask when given none (OPT: cumsum of the mask,
# padding at -1), where the others count every token.
_POSITIONS_FROM_MASK = frozenset({"opt"})


def _position_shift(context: PrefixContext, batch: int):
    """The prefix lengths to add to positions: an int when all are equal, else ``[B, 1]``; for a packed batch
    each sequence's own, spread to its tokens (``[1, total]``)."""
    packing = context.packing
    shift = context.shift_for(batch if packing is None else packing.num_seqs)
    if packing is not None and not isinstance(shift, int):
        shift = packing.token_shift(shift.view(-1))
    return shift


def _check_position_room(context: PrefixContext, past, length: int, position_ids: Optional[Tensor],
                         room: Optional[tuple[int, Optional[int]]] = None, offset: int = 0):
    """Raise a ValueError before the model's position embedding fails on an index past its table (an IndexError on
    the CPU, a device-side assert on a GPU): with ``positions="shifted"`` the real tokens sit after the prefix.

    ``room`` is (positions the table has room for, max_position_embeddings); ``offset`` is what the model adds to
    a position before it looks it up, beyond the positions counted in ``room``. The check reads nothing from the
    device unless the sequence comes within the longest prefix of the end of the table.
    """
    state = context.state
    room = room or state.position_room
    if room is None or not isinstance(past, int) or torch.compiler.is_compiling():
        return
    positions, size = room
    tokens = past + length  # given position ids (generate's, from the attention mask) are below this
    if tokens + state.bank.prefix_len <= positions:
        return
    prefix = context.longest_prefix()
    if position_ids is not None and tokens + prefix > positions and position_ids.numel():
        # Given position ids count from 0 (RoBERTa's from padding_idx + 1, which offset takes out).
        tokens = int(position_ids.max()) + 1 - offset
    if tokens + prefix > positions:
        limit = f"max_position_embeddings = {size}" if size is not None else "its position table"
        raise ValueError(
            f"{state.model_name} has room for {positions} positions ({limit}), but with positions='shifted' the "
            f"real tokens come after the prefix: the prefix of {prefix} tokens and the sequence of {tokens} tokens "
            f"need {prefix + tokens}. Give a shorter sequence, or patch with positions='unshifted'")


def _position_room(model, roberta) -> Optional[tuple[int, Optional[int]]]:
    """(positions, max_position_embeddings) of the learned absolute position table (BERT's
    ``position_embeddings``, GPT-2's ``wpe``) of a decoder-only or encoder-only model, or None when it has none
    (rotary and relative positions have no table to run past)."""
    for path, module in model.named_modules():
        if path.split(".")[-1] in ("position_embeddings", "wpe") and isinstance(module, nn.Embedding):
            start = roberta.padding_idx + 1 if roberta is not None else 0
            text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
            return module.num_embeddings - start, getattr(text_config, "max_position_embeddings", None)
    return None


def _learned_position_modules(model, roles):
    """BART-style learned position embeddings (``embed_positions`` with an ``offset``) of the encoder and decoder
    of an encoder-decoder model whose bank has self-attention slots in that part (``roles``)."""
    parts = []
    if "encoder" in roles:
        parts.append(model.get_encoder())
    if "decoder" in roles and hasattr(model, "get_decoder"):
        parts.append(model.get_decoder())
    found = []
    for part in parts:
        embedding = getattr(part, "embed_positions", None)
        if isinstance(embedding, nn.Embedding) and isinstance(getattr(embedding, "offset", None), int):
            found.append(embedding)
    return found


class _PositionHook:
    """A forward hook on a learned position embedding that re-embeds the positions shifted by the prefix length
    (the position ids are ``arange(past, past + N)`` there, ``past`` being the cache length of real tokens).
    A module-level class, so that the model pickles."""

    def __init__(self, state: _PatchState, max_positions: Optional[int]):
        self.state, self.max_positions = state, max_positions

    def __call__(self, module, args, kwargs, output):
        context = self.state.current
        if context is None:
            return None
        input_ids = args[0] if args else kwargs.get("input_ids")
        past = args[1] if len(args) > 1 else kwargs.get("cache_length", kwargs.get("past_key_values_length", 0))
        position_ids = args[2] if len(args) > 2 else kwargs.get("position_ids")
        batch, length = input_ids.shape[:2]
        _check_position_room(context, past, length, position_ids,
                             room=(module.num_embeddings - module.offset, self.max_positions))
        if position_ids is None:
            position_ids = torch.arange(length, device=module.weight.device) + past
        position_ids = position_ids.reshape(-1, length)
        shift = _position_shift(context, batch)
        return nn.functional.embedding(position_ids + shift + module.offset, module.weight)


# ----------------------------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------------------------

class PatchHandle:
    """Returned by :func:`patch`; ``handle.unpatch()`` or leaving ``with patch(...) as model:`` restores the model."""

    def __init__(self, model):
        self._model = weakref.ref(model)

    @property
    def model(self):
        return self._model()

    def unpatch(self):
        model = self._model()
        if model is not None and getattr(model, _STATE_ATTR, None) is not None:
            unpatch(model)

    def __enter__(self):
        return self._model()

    def __exit__(self, *exc):
        self.unpatch()
        return False


def _sub_models(model):
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def _check_slots(model, prefix: PrefixBank, modules) -> dict:
    """Each bank slot's index by name, after checking that the bank fits the model: for each role it prefixes
    (``layer``, or ``encoder``/``decoder``/``cross``), one slot per attention of that role, of that attention's
    shape."""
    by_name = {name: (path, module) for name, path, module in modules}
    model_roles, bank_roles = {}, {}
    for name in by_name:
        model_roles.setdefault(name.split(".")[0], []).append(name)
    for slot in prefix.slots:
        bank_roles.setdefault(slot.name.split(".")[0], []).append(slot.name)
    model_name = type(model).__name__
    for role, names in bank_roles.items():
        have = model_roles.get(role, [])
        if len(names) != len(have) or set(names) != set(have):
            extra = [name for name in names if name not in by_name]
            missing = [name for name in have if name not in names]
            details = "; ".join(part for part in (
                f"slots the model does not have: {', '.join(repr(n) for n in extra)}" if extra else "",
                f"attentions without a slot: {', '.join(repr(n) for n in missing)}" if missing else "") if part)
            raise ValueError(f"the PrefixBank has {len(names)} {role!r} slots but {model_name} has {len(have)} "
                             f"{role!r} attention layers ({details}): build the bank for this model "
                             "(PrefixBank.for_model)")
    slot_index = {}
    for i, slot in enumerate(prefix.slots):
        path, module = by_name[slot.name]
        config = getattr(module, "config", None) or model.config
        shape = _module_kv_shape(module, config)
        if shape != (slot.num_kv_heads, slot.head_dim, slot.value_dim):
            heads, key_dim, value_dim = shape
            if value_dim is None and slot.value_dim is None:
                names, ours, theirs = "(num_kv_heads, head_dim)", (slot.num_kv_heads, slot.head_dim), shape[:2]
            else:  # values of their own head dim (multi-head latent attention) on either side
                names = "(num_kv_heads, head_dim, value_head_dim)"
                ours = (slot.num_kv_heads, slot.head_dim, slot.value_head_dim)
                theirs = (heads, key_dim, key_dim if value_dim is None else value_dim)
            raise ValueError(f"slot {slot.name!r} of the PrefixBank has {names} = {ours}, but {path} has {theirs}")
        slot_index[slot.name] = i
    return slot_index


def patch(model, prefix: PrefixBank, *, positions: str = "shifted", backend: str = "auto") -> PatchHandle:
    """Make ``model`` attend over ``prefix``'s per-layer keys/values in every attention, with the fused op.

    Args:
        model: a transformers ``PreTrainedModel`` instance (the instance is changed; its class is not).
        prefix: a :class:`~ptv2_kernels.PrefixBank` shaped for the model (``PrefixBank.for_model``): one slot per
            attention layer (of each role it prefixes, for encoder-decoder models), else a ValueError. It becomes
            the submodule ``model.ptv2_prefix`` (so ``model.parameters()``, ``.to()``, DDP and optimizers see it).
        positions: ``"shifted"`` puts the real tokens at positions ``L..L+N-1`` (L = the sample's prefix length),
            which is what PEFT and P-Tuning v2 do (the prefix sits in their cache); ``"unshifted"`` keeps 0..N-1.
            A model with a learned position table (BERT, GPT-2) then has room for that many fewer tokens: a call
            past its end raises a ValueError.
        backend: the op's backend (``"auto"``, ``"triton"``, ``"cuda"``, ``"reference"``).

    Afterwards ``model(**batch, task_ids=ids)`` and ``model.generate(..., task_ids=ids)`` pick each sample's task:
    one id (or name) per sample of the batch, or one for the whole batch (an int, a name, or a single-entry list
    or tensor); any other length is a ValueError. Repeats the model makes itself (a multiple-choice head's choices,
    generate's beams and returned sequences) keep their sample's task. A one-task bank needs no ``task_ids``.

    A patched model can be deep-copied and pickled whole (``torch.save(model)``): the copy stays patched, with its
    own bank. Returns a handle that is also a context manager; :func:`unpatch` restores the model.
    """
    _check_model(model)
    if not isinstance(prefix, PrefixBank):
        raise TypeError(f"prefix must be a ptv2_kernels.PrefixBank, got {type(prefix).__name__}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if getattr(model, _STATE_ATTR, None) is not None:
        raise RuntimeError(f"this {type(model).__name__} is already patched; call ptv2_kernels.unpatch(model) first")
    if hasattr(model, _BANK_MODULE):
        raise RuntimeError(f"the model already has an attribute {_BANK_MODULE!r}")
    if prefix.model_type is not None and prefix.model_type != _model_type(model):
        raise ValueError(f"the PrefixBank was built for model type {prefix.model_type!r}, not "
                         f"{_model_type(model)!r}")
    modules = _attention_modules(model)
    if not modules:
        raise _unsupported(model, "its attention does not go through transformers' AttentionInterface")
    _refuse_unserved(model, modules)
    _refuse_listed_family(model)
    _refuse_cached_position_bias(model, prefix)
    names, var_kwargs = _forward_parameters(model)
    if not var_kwargs:
        raise _unsupported(model, "its forward takes no **kwargs to pass the prefix to its attention")
    slot_index = _check_slots(model, prefix, modules)
    try:
        parameter = next(iter(model.parameters()))
    except StopIteration:
        parameter = None
    if parameter is not None and parameter.device != prefix.prefix_lengths.device:
        raise ValueError(f"the PrefixBank is on {prefix.prefix_lengths.device} but the model is on "
                         f"{parameter.device}; move one of them first")

    _register()
    state = _PatchState(prefix, positions, backend, type(model).__name__)
    # A family served by an adapter keeps its attention implementation: its modules read none.
    interface = [(path, module) for _, path, module in modules if _family_adapter(type(module)) is None]
    previous = [(sub, sub.config._attn_implementation) for sub in _sub_models(model)] if interface else []
    try:
        if interface:
            model.set_attn_implementation(ATTENTION_NAME)
        for sub, _ in previous:  # sub-models sharing the top config class are skipped by some versions
            if sub.config._attn_implementation != ATTENTION_NAME:
                sub.set_attn_implementation(ATTENTION_NAME)
        for path, module in interface:
            config = getattr(module, "config", None) or model.config
            if config._attn_implementation != ATTENTION_NAME:
                raise _unsupported(model, f"{path} did not switch to the attention implementation "
                                          f"{ATTENTION_NAME!r}")
    except BaseException:
        _restore_implementations(previous)
        raise
    state.previous_implementations = previous
    guard = model.__dict__.pop(_GUARD_ATTR, None)  # left by an earlier unpatch
    if guard is not None:
        guard.remove()

    for name, path, module in modules:
        if name in slot_index:
            setattr(module, _BINDING_ATTR, (state, slot_index[name]))
            state.bindings.append(module)
            if prefix.position_bias == "cached" and _model_type(model) in t5.MODEL_TYPES:
                owner = t5.relative_bias_table_owner(model, path, module)
                if owner is not None:  # in __dict__: a reference, not a submodule
                    module.__dict__[_PREFIX_BIAS_ATTR] = owner
            adapter = _family_adapter(type(module))
            if adapter is not None:
                adapter.install(module)
    state.checkpointing = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]
    roberta = _padding_idx_embeddings(model)
    for sub in _sub_models(model):
        sub_names, sub_var_kwargs = _forward_parameters(sub)
        if not sub_var_kwargs:
            continue
        shift = positions == "shifted" and "position_ids" in sub_names and not _is_encoder_decoder(model)
        handle = sub.register_forward_pre_hook(_PreHook(state, sub_names, shift, roberta), with_kwargs=True)
        state.hooks.append(handle)
        state.hooks.append(sub.register_forward_hook(_PostHook(state), with_kwargs=True, always_call=True))
    if positions == "shifted" and not _is_encoder_decoder(model):
        state.position_room = _position_room(model, roberta)
    state.positions_from_mask = _model_type(model) in _POSITIONS_FROM_MASK
    state.dense_masks = _model_type(model) in _DENSE_MASK_MODEL_TYPES
    if positions == "shifted" and _is_encoder_decoder(model):
        roles = {slot.name.split(".")[0] for slot in prefix.slots}
        max_positions = getattr(model.config, "max_position_embeddings", None)
        for embedding in _learned_position_modules(model, roles):
            state.hooks.append(embedding.register_forward_hook(_PositionHook(state, max_positions),
                                                               with_kwargs=True))
    if hasattr(model, "generate") and "generate" not in model.__dict__:
        model.generate = _GenerateWithTasks(model)
        state.wrapped_generate = True
    model.add_module(_BANK_MODULE, prefix)
    object.__setattr__(model, _STATE_ATTR, state)
    return PatchHandle(model)


def _generate_batch(model, args, kwargs) -> int:
    """The batch that ``generate(*args, **kwargs)`` starts from, before it repeats samples, found as generate
    finds it: its inputs (ids or embeddings), else the encoder outputs or another tensor argument, else 1."""
    inputs = args[0] if args else kwargs.get("inputs")
    candidates = [inputs, kwargs.get(getattr(model, "main_input_name", "input_ids")), kwargs.get("input_ids"),
                  kwargs.get("inputs_embeds")]
    encoder_outputs = kwargs.get("encoder_outputs")
    if encoder_outputs is not None:
        candidates.append(getattr(encoder_outputs, "last_hidden_state", None))
        if isinstance(encoder_outputs, (tuple, list)) and encoder_outputs:
            candidates.append(encoder_outputs[0])
    candidates.extend(kwargs.values())
    for value in candidates:
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return 1


class _GenerateWithTasks:
    """``generate`` of a patched model (set on the instance): takes ``task_ids`` for the batch given to it (one per
    sample, or one for all), validates them once, and keeps them for every forward of the call, so every decode
    step hands the op the same index tensor; the samples generate repeats (beams, returned sequences) keep their
    task. A module-level class (not a closure), so that the model pickles and deep-copies."""

    def __init__(self, model):
        self.model = model

    @property
    def __wrapped__(self):
        return type(self.model).generate.__get__(self.model)

    def __call__(self, *args, task_ids=None, **kwargs):
        model = self.model
        generate = type(model).generate.__get__(model)
        state = getattr(model, _STATE_ATTR, None)
        if task_ids is None or state is None:
            return generate(*args, **kwargs)
        state.generate_tasks.append(state.select(task_ids, batch=_generate_batch(model, args, kwargs),
                                                 repeats=None))
        try:
            return generate(*args, **kwargs)
        finally:
            state.generate_tasks.pop()


class _RejectTaskIds:
    """Left on a model by :func:`unpatch`: a forward pre-hook that rejects ``task_ids``. (transformers models take
    any keyword into their ``**kwargs``; without it ``task_ids`` would be silently ignored.)"""

    def __call__(self, module, args, kwargs):
        if "task_ids" in kwargs:
            raise TypeError(f"{type(module).__name__}.forward() got an unexpected keyword argument 'task_ids': the "
                            "model is not patched any more (ptv2_kernels.unpatch), so it has no prefix bank to "
                            "pick tasks from")
        return None


def _restore_implementations(previous):
    for sub, implementation in previous:
        if sub.config._attn_implementation != implementation:
            sub.set_attn_implementation(implementation)


def unpatch(model) -> None:
    """Undo :func:`patch`: the original attention implementation, no hooks, no bindings, no ``ptv2_prefix``.

    One forward pre-hook stays, which raises a TypeError when the model is still given ``task_ids`` (until the
    model is patched again).
    """
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError(f"this {type(model).__name__} is not patched by ptv2_kernels")
    for handle in state.hooks:
        handle.remove()
    _unwrap_checkpointing(state)
    for module in state.bindings:
        module.__dict__.pop(_BINDING_ATTR, None)
        module.__dict__.pop(_PREFIX_BIAS_ATTR, None)
        adapter = _family_adapter(type(module))
        if adapter is not None:
            adapter.uninstall(module)
    if state.wrapped_generate:
        model.__dict__.pop("generate", None)
    _restore_implementations(state.previous_implementations)
    if _BANK_MODULE in model._modules:
        del model._modules[_BANK_MODULE]
    object.__delattr__(model, _STATE_ATTR)
    if "task_ids" not in _forward_parameters(model)[0] and _GUARD_ATTR not in model.__dict__:
        model.__dict__[_GUARD_ATTR] = model.register_forward_pre_hook(_RejectTaskIds(), with_kwargs=True)


def _lm_head_parameters(model) -> set:
    """The ids of the language-model head's parameters: the output embeddings (``get_output_embeddings()``), with
    the module around them outside the base model (BERT's ``cls``, RoBERTa's ``lm_head`` with its transform)."""
    try:
        output = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        output = None
    if not isinstance(output, nn.Module):
        return set()
    base = model.base_model
    head = {id(p) for p in output.parameters()}
    for name, child in model.named_children():
        if child is base or name == _BANK_MODULE:
            continue
        # the module around the output embeddings, and a transform beside it (ModernBERT's head, lm_head)
        if any(module is output for module in child.modules()) or _is_lm_transform(name, child):
            head |= {id(p) for p in child.parameters()}
    return head


def _is_lm_transform(name: str, child: nn.Module) -> bool:
    """A language-model head's transform held beside the output projection rather than around it."""
    kind = type(child).__name__
    return name == "lm_head" or kind.endswith("PredictionHead") or kind.endswith("LMHead")


def freeze_backbone(model, *, train_head: bool = True, train_lm_head: bool = False) -> list[str]:
    """Freeze everything but the prefix and the task head, as P-Tuning v2 trains.

    * The prefix (the bank's parameters) stays trainable.
    * With ``train_head`` (the default), so does the task head: the parameters the model holds outside its base
      model (``model.base_model``), less those shared with it. That is ``classifier``, ``score``, ``qa_outputs``,
      a token-classification head, GPT-2's ``multiple_choice_head``, and the like.
    * A language-model head (``model.get_output_embeddings()``, e.g. ``lm_head``, with the module around it outside
      the base model, such as BERT's ``cls`` with its transform and bias) is not a task head: prefix tuning keeps
      it as pretrained, so it is frozen, tied to the input embeddings or not. ``train_lm_head=True`` leaves it
      trainable; an LM head tied to the input embeddings then trains them too (it is the same tensor).

    Returns the names of the parameters left trainable.
    """
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("freeze_backbone expects a model patched with ptv2_kernels.patch")
    base = model.base_model
    base_params = {id(p) for p in base.parameters()} if base is not model else set()
    bank_params = {id(p) for p in state.bank.parameters()}
    lm_head_params = _lm_head_parameters(model) - bank_params
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in bank_params:
            keep = True
        elif id(param) in lm_head_params:
            keep = train_lm_head
        else:
            keep = train_head and base is not model and id(param) not in base_params
        param.requires_grad_(keep)
    return [name for name, param in model.named_parameters() if param.requires_grad]
