"""The checkpoints users already have: P-Tuning v2 prefix encoders in, PEFT prefix-tuning adapters out.

Every format below stores, per virtual token, ``F = num_layers * 2 * Hkv * D`` numbers ordered (layer, key/value,
head, channel): the :class:`~ptv2_kernels.PrefixBank`'s own flat layout, so weights are copied unchanged.

**The official P-Tuning v2 code** (THUDM/P-tuning-v2, ``model/prefix_encoder.py``; BERT, RoBERTa, DeBERTa and
DeBERTa-v2 alike). Its ``PrefixEncoder`` is ``embedding`` ``[P, L * 2 * hidden]``, or with ``prefix_projection``
an ``embedding`` ``[P, hidden]`` followed by ``trans`` = ``Linear(hidden, prefix_hidden_size)``, ``Tanh``,
``Linear(prefix_hidden_size, L * 2 * hidden)``; the model's ``get_prompt`` views the output as
``[B, P, 2L, H, D]`` (``D = hidden / H``), permutes it to ``[2L, B, H, P, D]`` and splits it into pairs: layer
``i``'s key is entry ``2i``, its value entry ``2i + 1``. The state dict keys are ``prefix_encoder.embedding.weight``
and ``prefix_encoder.trans.{0,2}.{weight,bias}``. The pairs go to the model as its cache, which numbers the real
tokens after the prefix: patch with ``positions="shifted"``. (The official DeBERTa code gives the prefix columns
no relative-position bias.)

**ChatGLM-style checkpoints** (ChatGLM2/3 and GLM-4's ``modeling_chatglm.py``, their ``ptuning`` scripts). The
``transformer.prefix_encoder.embedding`` is ``[P, L * 2 * C * G]`` (``C`` = ``kv_channels``, ``G`` =
``multi_query_group_num``) with or without ``prefix_projection``; the MLP ``trans`` is ``Linear(F, hidden_size)``,
``Tanh``, ``Linear(hidden_size, F)``. ``get_prompt`` views the output as ``[B, P, 2L, G, C]``, permutes it to
``[2L, P, B, G, C]`` (a sequence-first cache) and splits it into pairs, key ``2i`` and value ``2i + 1`` for layer
``i``. Group ``g`` is key/value head ``g`` of transformers' ``GlmAttention``/``Glm4Attention``: transformers'
conversion makes ``num_key_value_heads = multi_query_group_num`` and ``head_dim = kv_channels`` and splits
``query_key_value`` without reordering channels, and both apply the same interleaved rotary embedding to the
first half of each head, so a cached key channel means the same in both. Cached keys are used as they are (no
rotary embedding on the prefix), as the op does. ChatGLM numbers the real tokens from 0 whatever the prefix
(``get_position_ids`` is ``arange(seq_len)``): patch with ``positions="unshifted"``.

**PEFT** (``PrefixTuningConfig``). :func:`export_peft_adapter` writes ``adapter_config.json`` and
``adapter_model.safetensors`` holding ``prompt_embeddings`` ``[P, L * 2 * token_dim]`` (``token_dim = Hkv * D``,
``num_attention_heads = Hkv``) and, for classification and QA task types, the task head as
``base_model.<module path>.<parameter>``: what PEFT's own ``save_pretrained`` writes for prefix tuning, which saves
the MLP's output and never the MLP. PEFT puts the prefix in the cache, so the adapter
reproduces a bank used with ``positions="shifted"``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from ..prefix import PrefixBank, PrefixSlot, _positive_int

__all__ = ["import_ptuning_v2", "import_chatglm_ptuning", "export_peft_adapter", "PEFT_CONFIG_NAME",
           "PEFT_WEIGHTS_NAME"]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_TENSOR = "prompt_embeddings"
_CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")
_EMBEDDING = "embedding.weight"
_MLP_KEYS = ("trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias")
# The head modules PEFT's task models keep in an adapter (their modules_to_save), by task type.
_PEFT_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}

Checkpoint = Union[Mapping, str, os.PathLike]


class _Encoder(NamedTuple):
    """One checkpoint's prefix encoder: the embedding and, with ``prefix_projection``, the MLP's four tensors."""

    source: str
    embedding: Tensor
    mlp: Optional[tuple[Tensor, Tensor, Tensor, Tensor]]

    @property
    def prefix_len(self) -> int:
        return self.embedding.shape[0]

    @property
    def width(self) -> int:
        return self.mlp[2].shape[0] if self.mlp is not None else self.embedding.shape[1]

    def flat(self, dtype: torch.dtype) -> Tensor:
        """The prefix keys/values ``[P, F]``: the embedding, or the MLP's output (computed in float32 or wider)."""
        if self.mlp is None:
            return self.embedding.to(dtype)
        compute = torch.promote_types(self.embedding.dtype, torch.float32)
        w0, b0, w2, b2 = (t.to(compute) for t in self.mlp)
        hidden = torch.tanh(torch.nn.functional.linear(self.embedding.to(compute), w0, b0))
        return torch.nn.functional.linear(hidden, w2, b2).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Reading a checkpoint
# ----------------------------------------------------------------------------------------------------------------

def _read_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(os.fspath(path), device="cpu")
    return torch.load(os.fspath(path), map_location="cpu", weights_only=True)


def _state_dict(checkpoint: Checkpoint) -> tuple[Mapping, str]:
    """The checkpoint's tensors by name, and how to name the checkpoint in an error."""
    if isinstance(checkpoint, Mapping):
        return checkpoint, "the state dict"
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError("checkpoint must be a state dict (a mapping of names to tensors), a file or a directory, "
                        f"got {type(checkpoint).__name__}")
    path = Path(checkpoint)
    if path.is_dir():
        found = [path / name for name in _CHECKPOINT_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"checkpoint: the directory {os.fspath(path)!r} holds none of "
                                    f"{', '.join(_CHECKPOINT_FILES)} (for a sharded checkpoint, load the shard that "
                                    "holds the prefix encoder and pass its state dict)")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file or directory {os.fspath(path)!r}")
    state = _read_file(path)
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint: {os.fspath(path)!r} holds a {type(state).__name__}, not a state dict")
    return state, repr(os.fspath(path))


def _encoder_prefix(state: Mapping, source: str, key_prefix: Optional[str]) -> str:
    """The key prefix of the checkpoint's prefix encoder (``"prefix_encoder."``, ``"transformer.prefix_encoder."``,
    or ``""`` for the encoder's own state dict)."""
    if key_prefix is not None:
        if not isinstance(key_prefix, str):
            raise TypeError(f"key_prefix must be a str, got {type(key_prefix).__name__}")
        if key_prefix + _EMBEDDING not in state:
            raise KeyError(f"checkpoint: {source} has no key {key_prefix + _EMBEDDING!r} (key_prefix={key_prefix!r})")
        return key_prefix
    found = sorted(name[:-len(_EMBEDDING)] for name in state if isinstance(name, str)
                   and (name == _EMBEDDING or name.endswith("prefix_encoder." + _EMBEDDING)))
    if not found:
        raise KeyError(f"checkpoint: {source} has no prefix encoder (no key 'prefix_encoder.{_EMBEDDING}', "
                       f"'transformer.prefix_encoder.{_EMBEDDING}' or '{_EMBEDDING}'); pass key_prefix if its "
                       "keys are named otherwise")
    if len(found) > 1:
        raise ValueError(f"checkpoint: {source} holds several prefix encoders ({', '.join(map(repr, found))}): "
                         "pick one with key_prefix")
    return found[0]


def _tensor(state: Mapping, name: str, source: str, dims: int) -> Tensor:
    value = state[name]
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() != dims:
        what = (f"a {value.dim()}-D {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__)
        raise ValueError(f"checkpoint: {name!r} of {source} must be a {dims}-D floating-point tensor, got {what}")
    return value


def _expect_shape(name: str, source: str, value: Tensor, shape: tuple, meaning: str) -> None:
    if tuple(value.shape) != shape:
        raise ValueError(f"checkpoint: {name!r} of {source} has shape {list(value.shape)}, expected {list(shape)} "
                         f"({meaning})")


def _read_encoder(checkpoint: Checkpoint, key_prefix: Optional[str]) -> _Encoder:
    state, source = _state_dict(checkpoint)
    prefix = _encoder_prefix(state, source, key_prefix)
    ours = [name for name in state if isinstance(name, str) and name.startswith(prefix)]
    known = {prefix + _EMBEDDING, *(prefix + key for key in _MLP_KEYS)}
    unexpected = [name for name in ours if name not in known]
    if unexpected:
        raise ValueError(f"checkpoint: {source} has prefix-encoder keys this import does not know: {unexpected} "
                         f"(expected {prefix + _EMBEDDING!r} and, with prefix_projection, "
                         f"{', '.join(repr(prefix + key) for key in _MLP_KEYS)})")
    embedding = _tensor(state, prefix + _EMBEDDING, source, 2)
    present = [key for key in _MLP_KEYS if prefix + key in state]
    if not present:
        return _Encoder(source, embedding, None)
    missing = [prefix + key for key in _MLP_KEYS if key not in present]
    if missing:
        raise KeyError(f"checkpoint: {source} has part of a prefix_projection MLP but lacks {missing}")
    w0, b0, w2, b2 = (_tensor(state, prefix + key, source, 2 if key.endswith("weight") else 1)
                      for key in _MLP_KEYS)
    hidden, width = w0.shape[0], w2.shape[0]
    _expect_shape(prefix + _MLP_KEYS[0], source, w0, (hidden, embedding.shape[1]),
                  "[prefix_hidden_size, the embedding's width]")
    _expect_shape(prefix + _MLP_KEYS[1], source, b0, (hidden,), "[prefix_hidden_size]")
    _expect_shape(prefix + _MLP_KEYS[2], source, w2, (width, hidden), "[the prefix width, prefix_hidden_size]")
    _expect_shape(prefix + _MLP_KEYS[3], source, b2, (width,), "[the prefix width, trans.2.weight's rows]")
    return _Encoder(source, embedding, (w0, b0, w2, b2))


def _read_encoders(checkpoint, key_prefix: Optional[str]) -> list[_Encoder]:
    """One encoder per task: ``checkpoint`` is one checkpoint, or a list or tuple of them (one per task)."""
    if isinstance(checkpoint, (list, tuple)):
        if not checkpoint:
            raise ValueError("checkpoint: got an empty list (give one checkpoint, or one per task)")
        return [_read_encoder(item, key_prefix) for item in checkpoint]
    return [_read_encoder(checkpoint, key_prefix)]


# ----------------------------------------------------------------------------------------------------------------
# Building the bank
# ----------------------------------------------------------------------------------------------------------------

def _explicit_slots(dims: dict) -> list[tuple[str, int, int]]:
    missing = [name for name, value in dims.items() if value is None]
    if missing:
        names = ", ".join(dims)
        raise ValueError(f"without a model, give {names} (missing: {', '.join(missing)})")
    layers, heads, dim = (_positive_int(name, value) for name, value in dims.items())
    return [(f"layer.{i}", heads, dim) for i in range(layers)]


def _model_slots(model, dims: dict) -> list:
    given = [name for name, value in dims.items() if value is not None]
    if given:
        raise ValueError(f"give either model or {', '.join(dims)}, not both (got model and {', '.join(given)})")
    from .hf_transformers import prefix_layout

    slots, _ = prefix_layout(model)
    others = [slot.name for slot in slots if not slot.name.startswith("layer.")]
    if others:
        raise ValueError(f"model: a P-Tuning v2 checkpoint prefixes one stack of layers, but "
                         f"{type(model).__name__} is an encoder-decoder model (slots {others[:3]}...)")
    return slots


def _check_width(encoders: list[_Encoder], slots, where: str) -> None:
    """Every checkpoint's prefix width is the slots' total; else say what the checkpoint holds instead."""
    slots = [PrefixSlot(*slot) for slot in slots]  # (name, Hkv, D) tuples or slots of a model's layout
    needed = sum(slot.width for slot in slots)
    heads, dim = slots[0].num_kv_heads, slots[0].head_dim
    uniform = all(slot == (slot.name, heads, dim) for slot in slots)
    detail = f" = {len(slots)} layers x 2 x {heads} key/value heads x {dim}" if uniform else ""
    for encoder in encoders:
        width = encoder.width
        if width == needed:
            continue
        hint = ""
        if uniform and width % (2 * heads * dim) == 0:
            hint = f": the checkpoint holds {width // (2 * heads * dim)} layers, not {len(slots)}"
        raise ValueError(f"checkpoint: the prefix of {encoder.source} has {width} numbers per virtual token, but "
                         f"{where} needs {needed}{detail}{hint}")


def _build(bank_class, encoders: list[_Encoder], slots, *, fold: bool, task_names, dropout: float, model_type,
           device, dtype):
    if dtype is None:
        dtype = encoders[0].embedding.dtype
        for encoder in encoders[1:]:
            dtype = torch.promote_types(dtype, encoder.embedding.dtype)
    lengths = [encoder.prefix_len for encoder in encoders]
    keep_mlp = len(encoders) == 1 and encoders[0].mlp is not None and not fold
    if keep_mlp:
        encoder = encoders[0]
        w0 = encoder.mlp[0]
        bank = bank_class(slots, 1, lengths, projection_hidden=w0.shape[0], embed_dim=w0.shape[1], dropout=dropout,
                          task_names=task_names, model_type=model_type, device=device, dtype=dtype)
        with torch.no_grad():
            bank.encoder.embedding.weight.copy_(encoder.embedding)
            for (weight, bias), linear in zip((encoder.mlp[:2], encoder.mlp[2:]),
                                              (bank.encoder.transform[0], bank.encoder.transform[2])):
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
        return bank
    bank = bank_class(slots, len(encoders), lengths, dropout=dropout, task_names=task_names, model_type=model_type,
                      device=device, dtype=dtype)
    with torch.no_grad():
        rows = bank.encoder.embedding.weight.view(len(encoders), bank.prefix_len, -1)
        rows.zero_()  # a shorter task's padding: never read by the op, kept at zero
        for task, encoder in enumerate(encoders):
            rows[task, :encoder.prefix_len].copy_(encoder.flat(dtype))
    return bank


def _device_of(model, device):
    if device is not None or model is None:
        return device
    return next(iter(model.parameters())).device


def _import(bank_class, checkpoint, model, dims: dict, *, key_prefix, fold, task_names, dropout, model_type,
            device, dtype):
    if not isinstance(fold, bool):
        raise TypeError(f"fold must be a bool, got {fold!r}")
    if not (isinstance(bank_class, type) and issubclass(bank_class, PrefixBank)):
        raise TypeError(f"bank_class must be PrefixBank or a subclass, got {bank_class!r}")
    encoders = _read_encoders(checkpoint, key_prefix)
    if model is not None:
        slots = _model_slots(model, dims)
        where = type(model).__name__
        model_type = getattr(model.config, "model_type", None) if model_type is None else model_type
    else:
        slots = _explicit_slots(dims)
        where = ", ".join(f"{name}={value}" for name, value in dims.items())
    _check_width(encoders, slots, where)
    return _build(bank_class, encoders, slots, fold=fold, task_names=task_names, dropout=dropout,
                  model_type=model_type, device=_device_of(model, device), dtype=dtype)


def import_ptuning_v2(checkpoint, model=None, *, num_layers: Optional[int] = None,
                      num_heads: Optional[int] = None, head_dim: Optional[int] = None,
                      key_prefix: Optional[str] = None, fold: bool = False,
                      task_names: Optional[Sequence[str]] = None, dropout: float = 0.0,
                      model_type: Optional[str] = None, device=None, dtype=None, bank_class=PrefixBank):
    """A :class:`~ptv2_kernels.PrefixBank` holding the prefix of an official P-Tuning v2 checkpoint (THUDM's code
    for BERT, RoBERTa, DeBERTa; the layout is in this module's docstring). Patch with ``positions="shifted"``:
    the official code's cached prefix shifts the real tokens' positions by P.

    Args:
        checkpoint: a state dict, a ``.safetensors`` or ``torch.save`` file, or a directory holding
            ``model.safetensors`` or ``pytorch_model.bin`` (the whole model's, or the prefix encoder's alone); or a
            list of them, one per task, for a multi-task bank (each task keeps its own prefix length).
        model: the transformers model the bank is for; its attentions give the slots (as
            :meth:`PrefixBank.for_model`), and a checkpoint of another layer count or width raises a ValueError.
            Without one, give ``num_layers``, ``num_heads`` and ``head_dim`` (``hidden_size //
            num_attention_heads``) instead.
        key_prefix: what precedes ``embedding.weight`` in the checkpoint's keys (default: found, e.g.
            ``"prefix_encoder."``).
        fold: replace a ``prefix_projection`` MLP by its output. One checkpoint's MLP is kept (and folds later with
            ``bank.fold()``); several checkpoints are always folded, since a bank's MLP is shared by its tasks.
        task_names, dropout, device, dtype: as for :class:`PrefixBank` (default device: the model's, else the
            CPU; default dtype: the checkpoint's).
        model_type: recorded in the bank (default: the model's ``config.model_type``).
        bank_class: the class to build (``PrefixBank`` or a subclass).
    """
    dims = {"num_layers": num_layers, "num_heads": num_heads, "head_dim": head_dim}
    return _import(bank_class, checkpoint, model, dims, key_prefix=key_prefix, fold=fold, task_names=task_names,
                   dropout=dropout, model_type=model_type, device=device, dtype=dtype)


def import_chatglm_ptuning(checkpoint, model=None, *, num_layers: Optional[int] = None,
                           multi_query_group_num: Optional[int] = None, kv_channels: Optional[int] = None,
                           key_prefix: Optional[str] = None, fold: bool = False,
                           task_names: Optional[Sequence[str]] = None, dropout: float = 0.0,
                           model_type: Optional[str] = None, device=None, dtype=None, bank_class=PrefixBank):
    """A :class:`~ptv2_kernels.PrefixBank` holding the prefix of a ChatGLM-style P-Tuning v2 checkpoint
    (``transformer.prefix_encoder.*``; the layout is in this module's docstring), for transformers' GLM models
    (``GlmForCausalLM``, ``Glm4ForCausalLM``). Patch with ``positions="unshifted"``: ChatGLM numbers the real
    tokens from 0 whatever the prefix.

    Args:
        checkpoint: as for :func:`import_ptuning_v2` (ChatGLM's ``ptuning`` scripts save the prefix encoder alone
            in ``pytorch_model.bin``); or a list, one per task.
        model: the GLM model the bank is for (its key/value heads are ChatGLM's ``multi_query_group_num`` groups,
            its head dim ``kv_channels``); a checkpoint of another layer count or width raises a ValueError. Without
            one give ``num_layers``, ``multi_query_group_num`` and ``kv_channels`` (ChatGLM's config names).
        key_prefix, fold, task_names, dropout, model_type, device, dtype, bank_class: as for
            :func:`import_ptuning_v2`. A kept MLP has ChatGLM's shape (its input is the embedding's full width).
    """
    if model is not None:
        kind = str(getattr(getattr(model, "config", None), "model_type", "") or "")
        if not (kind.startswith("glm") or kind == "chatglm"):
            raise ValueError(f"model: ChatGLM checkpoints are for GLM models (GlmForCausalLM, Glm4ForCausalLM), got "
                             f"{type(model).__name__} of model type {kind!r}")
    dims = {"num_layers": num_layers, "multi_query_group_num": multi_query_group_num, "kv_channels": kv_channels}
    return _import(bank_class, checkpoint, model, dims, key_prefix=key_prefix, fold=fold, task_names=task_names,
                   dropout=dropout, model_type=model_type, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# PEFT export
# ----------------------------------------------------------------------------------------------------------------

def _task_of(bank: PrefixBank, task) -> int:
    if task is None:
        if bank.num_tasks != 1:
            raise ValueError(f"task: the bank holds {bank.num_tasks} tasks and a PEFT adapter one; give task= (an "
                             "index or a task name)")
        return 0
    if isinstance(task, Tensor) or isinstance(task, bool) or not isinstance(task, (int, str)):
        raise TypeError(f"task must be a task index (int) or a task name (str), got {task!r}")
    return int(bank.task_index(task)[0])


def _peft_layout(bank: PrefixBank) -> tuple[int, int, int]:
    """(num_layers, Hkv, D) of a bank PEFT can hold: slots ``layer.0 .. layer.L-1`` of one shape."""
    slots = bank.slots
    names = [slot.name for slot in slots]
    if names != [f"layer.{i}" for i in range(len(slots))]:
        raise ValueError(f"bank: a PEFT prefix-tuning adapter holds one stack of layers (slots 'layer.0' ... in "
                         f"order); this bank has slots {names[:4]}{'...' if len(names) > 4 else ''} (PEFT's "
                         "encoder-decoder prefixes feed the decoder only, in a layout a bank cannot be written to)")
    mla = [slot.name for slot in slots if slot.value_dim is not None]
    if mla:
        raise ValueError(f"bank: a PEFT prefix-tuning adapter holds keys and values of one head dim; slot {mla[0]!r} "
                         f"has values of another head dim than its keys (multi-head latent attention)")
    shapes = {(slot.num_kv_heads, slot.head_dim) for slot in slots}
    if len(shapes) != 1:
        raise ValueError(f"bank: PEFT gives every layer the same key/value heads and head dim; this bank's slots have "
                         f"(num_kv_heads, head_dim) in {sorted(shapes)}")
    heads, dim = shapes.pop()
    return len(slots), heads, dim


def _peft_head_tensors(model, task_type: str, bank: PrefixBank) -> dict:
    """The task head PEFT keeps in a classification or QA adapter (its ``modules_to_save``: every module whose path
    ends with one of the head names), keyed as PEFT writes them: ``base_model.<path>.<parameter>``."""
    names = _PEFT_HEADS.get(task_type, ())
    if model is None:
        if names:
            raise ValueError(f"model: a {task_type} adapter also holds the task head (PEFT saves the modules named "
                             f"{' or '.join(map(repr, names))} with the prefix); pass the model whose head to write")
        return {}
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if bank.model_type is not None and kind != bank.model_type:
        raise ValueError(f"model: the bank was built for model type {bank.model_type!r}, not {kind!r}")
    tensors = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if names and path.endswith(names):
            for name, tensor in module.state_dict().items():
                tensors[f"base_model.{path}.{name}"] = tensor.detach().to("cpu", copy=True).contiguous()
    if names and not tensors:
        raise ValueError(f"model: {type(model).__name__} has no module named {' or '.join(map(repr, names))}, the "
                         f"task head a {task_type} adapter holds")
    return tensors


def export_peft_adapter(bank: PrefixBank, directory: Union[str, os.PathLike], *, task_type: str,
                        task: Union[int, str, None] = None, model=None,
                        base_model_name_or_path: Optional[str] = None) -> Path:
    """Write one task of ``bank`` as a PEFT prefix-tuning adapter directory (``adapter_config.json`` and
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(model, directory)`` loads and
    :meth:`PrefixBank.from_peft` imports back.

    The adapter holds the task's final keys/values, ``[L_task, num_layers * 2 * Hkv * D]`` (its own length, not
    the bank's padded one): a bank's MLP is folded into them, as PEFT's own ``save_pretrained`` does with its MLP,
    and the config says ``prefix_projection=False``, which is what those values are (an encoder with an MLP
    could not hold them). PEFT shifts the real tokens' positions by the prefix length: the PEFT model matches the
    bank patched with ``positions="shifted"``.

    Args:
        bank: a bank with slots ``layer.0 .. layer.L-1`` of one shape (a decoder-only or encoder-only model's).
        directory: where to write (created if missing; the two files are replaced).
        task_type: PEFT's task type (``"SEQ_CLS"``, ``"TOKEN_CLS"``, ``"QUESTION_ANS"``, ``"CAUSAL_LM"``,
            ``"FEATURE_EXTRACTION"``, ...).
        task: the task to export (an index or a task name); needed when the bank holds more than one.
        model: the model the bank serves. Needed for ``SEQ_CLS``, ``TOKEN_CLS`` and ``QUESTION_ANS``: PEFT keeps
            the task head (the modules named ``classifier``/``score``, or ``qa_outputs``) in those adapters, and
            its weights are written from this model.
        base_model_name_or_path: recorded in the adapter config (what ``AutoPeftModel`` would load).

    Returns the directory.
    """
    try:
        from peft import PrefixTuningConfig, TaskType
    except ImportError as error:  # pragma: no cover - peft is what this exports to
        raise ImportError("export_peft_adapter needs the peft package") from error
    from safetensors.torch import save_file

    if not isinstance(bank, PrefixBank):
        raise TypeError(f"bank must be a ptv2_kernels.PrefixBank, got {type(bank).__name__}")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str or None, got {base_model_name_or_path!r}")
    task_types = sorted(kind.value for kind in TaskType)
    if task_type not in task_types:
        raise ValueError(f"task_type must be one of PEFT's task types {task_types}, got {task_type!r}")
    index = _task_of(bank, task)
    layers, heads, dim = _peft_layout(bank)
    tensors = _peft_head_tensors(model, task_type, bank)
    length = bank.lengths()[index]
    encoder = bank.encoder
    with torch.no_grad():
        values = encoder.embedding.weight
        if encoder.transform is not None:
            values = encoder.transform(values)  # the bank's own MLP, without its training-time dropout
        values = values.view(bank.num_tasks, bank.prefix_len, encoder.width)[index, :length]
        values = values.detach().to("cpu", copy=True).contiguous()
    config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=length, token_dim=heads * dim,
                                num_attention_heads=heads, num_layers=layers, num_transformer_submodules=1,
                                encoder_hidden_size=encoder.projection_hidden or heads * dim,
                                prefix_projection=False, inference_mode=True,
                                base_model_name_or_path=base_model_name_or_path)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(os.fspath(directory))
    tensors[_PEFT_TENSOR] = values
    save_file(tensors, os.fspath(directory / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    return directory
