"""P-Tuning v2 modules: the prefix producer (:class:`PrefixEncoder`) and a bank of task prefixes (:class:`PrefixBank`).

Both hand per-layer prefix keys/values to the op in its ``[T, Hkv, P, D]`` layout as **views** of one flat tensor
``[T, P, F]`` (``F`` = the sum over attention slots of ``2 * Hkv * D``, ordered slot by slot, key before value, head
by head — the layout of P-Tuning v2's and PEFT's prefix encoders). A slot whose values have a head dim of their own
(multi-head latent attention: keys of ``Dk``, values of ``Dv``) takes ``Hkv * (Dk + Dv)`` of ``F``, keys first. One
``split`` cuts all slots at once, so the backward of the views is a single concatenation of the slots' gradients,
not a full-size copy per layer.

This module knows nothing of kernels or of transformers: :meth:`PrefixBank.for_model`, :meth:`PrefixBank.from_peft`
and the checkpoint imports and export (:meth:`PrefixBank.from_ptuning_v2`, :meth:`PrefixBank.from_chatglm_ptuning`,
:meth:`PrefixBank.save_peft`) import their integration only when they are called.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["PrefixSlot", "PrefixEncoder", "PrefixBank"]

_FORMAT = "ptv2_kernels.prefix_bank"
_FORMAT_VERSION = 1


# What a model's position-dependent score bias gives the prefix keys (PrefixBank's position_bias).
POSITION_BIASES = ("none", "cached")


class PrefixSlot(tuple):
    """One attention that receives a prefix: its name (``"layer.3"``, ``"encoder.0"``, ``"decoder.1"``,
    ``"cross.1"``), the key/value head count and head dim of that attention, and ``value_dim``: the values' head
    dim where it differs from the keys' (multi-head latent attention, DeepSeek-V2/V3), else None.

    A tuple ``(name, num_kv_heads, head_dim)``, with ``value_dim`` fourth only where the values' head dim differs:
    so a slot of one head dim equals, unpacks and saves as the three-part tuple it has always been."""

    __slots__ = ()

    def __new__(cls, name: str, num_kv_heads: int, head_dim: int, value_dim: Optional[int] = None):
        parts = (name, num_kv_heads, head_dim)
        if value_dim is not None and value_dim != head_dim:
            parts += (value_dim,)
        return super().__new__(cls, parts)

    def __getnewargs__(self):
        return tuple(self)

    @property
    def name(self) -> str:
        return self[0]

    @property
    def num_kv_heads(self) -> int:
        return self[1]

    @property
    def head_dim(self) -> int:
        return self[2]

    @property
    def value_dim(self) -> Optional[int]:
        """The values' head dim where it differs from the keys', else None."""
        return self[3] if len(self) == 4 else None

    @property
    def value_head_dim(self) -> int:
        """The values' head dim: ``value_dim``, or the keys' ``head_dim`` when it is None."""
        return self[len(self) - 1]

    @property
    def width(self) -> int:
        """Elements of one prefix token in this slot, keys and values together: ``Hkv * (Dk + Dv)``."""
        return self.num_kv_heads * (self.head_dim + self.value_head_dim)

    def __repr__(self) -> str:
        value = "" if self.value_dim is None else f", value_dim={self.value_dim}"
        return (f"PrefixSlot(name={self.name!r}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
                f"{value})")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _checked_slots(slots) -> tuple[PrefixSlot, ...]:
    if isinstance(slots, (str, bytes)) or not isinstance(slots, Iterable):
        raise TypeError(f"slots must be a sequence of (name, num_kv_heads, head_dim[, value_dim]), got "
                        f"{type(slots).__name__}")
    checked = []
    for slot in slots:
        if not isinstance(slot, (tuple, list)) or len(slot) not in (3, 4):
            raise ValueError(f"each slot must be (name, num_kv_heads, head_dim) or (name, num_kv_heads, head_dim, "
                             f"value_dim), got {slot!r}")
        name, heads, dim, value_dim = (*slot, None)[:4]
        if not isinstance(name, str) or not name:
            raise ValueError(f"a slot name must be a non-empty str, got {name!r}")
        dim = _positive_int(f"head_dim of slot {name!r}", dim)
        if value_dim is not None:
            value_dim = _positive_int(f"value_dim of slot {name!r}", value_dim)
        checked.append(PrefixSlot(name, _positive_int(f"num_kv_heads of slot {name!r}", heads), dim, value_dim))
    if not checked:
        raise ValueError("a prefix needs at least one slot (attention layer), got none")
    names = [slot.name for slot in checked]
    if len(set(names)) != len(names):
        raise ValueError(f"slot names must be unique, got {names}")
    return tuple(checked)


class PrefixEncoder(nn.Module):
    """P-Tuning v2's prefix producer for ``num_tasks`` tasks of ``prefix_len`` virtual tokens each.

    Without reparameterization it is one embedding ``[T * P, F]`` holding the prefix keys/values themselves. With
    ``projection_hidden=H`` (P-Tuning v2's ``prefix_projection``) the embedding is ``[T * P, embed_dim]`` and an MLP
    ``Linear(embed_dim, H) -> tanh -> Linear(H, F)``, shared by the tasks, produces the keys/values; :meth:`fold`
    replaces the MLP by its output for inference. ``dropout`` applies to the produced prefix while training.

    Args:
        prefix_len: P, virtual tokens per task.
        slots: the attentions that receive a prefix, each ``(name, num_kv_heads, head_dim)``, or
            ``(name, num_kv_heads, head_dim, value_dim)`` for values of another head dim; or give ``num_layers``,
            ``num_kv_heads`` and ``head_dim`` for ``num_layers`` identical slots ``"layer.i"``.
        num_tasks: T, prefixes held side by side.
        projection_hidden: None (no reparameterization) or the MLP's hidden size (P-Tuning v2 uses 512).
        embed_dim: input width of the MLP (default: the first slot's ``Hkv * D``; for a model, its hidden size).
        dropout: dropout probability on the prefix keys/values.

    Calling the module returns one ``(key, value)`` pair per slot, ``[T, Hkv, P, D]`` and ``[T, Hkv, P, Dv]``
    (``Dv = D`` unless the slot says otherwise): views of the flat
    ``[T, P, F]`` output (of the embedding weight itself when there is no MLP and no dropout).
    """

    def __init__(self, prefix_len: int, slots=None, *, num_layers: Optional[int] = None,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None, num_tasks: int = 1,
                 projection_hidden: Optional[int] = None, embed_dim: Optional[int] = None, dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        if slots is None:
            if None in (num_layers, num_kv_heads, head_dim):
                raise ValueError("give either slots, or num_layers, num_kv_heads and head_dim")
            slots = [(f"layer.{i}", num_kv_heads, head_dim) for i in range(_positive_int("num_layers", num_layers))]
        elif (num_layers, num_kv_heads, head_dim) != (None, None, None):
            raise ValueError("give either slots, or num_layers, num_kv_heads and head_dim, not both")
        self.slots = _checked_slots(slots)
        self.prefix_len = _positive_int("prefix_len", prefix_len)
        self.num_tasks = _positive_int("num_tasks", num_tasks)
        if projection_hidden is not None:
            projection_hidden = _positive_int("projection_hidden", projection_hidden)
        if embed_dim is not None:
            embed_dim = _positive_int("embed_dim", embed_dim)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.width = sum(slot.width for slot in self.slots)
        self.projection_hidden = projection_hidden
        self.embed_dim = embed_dim or (self.slots[0].num_kv_heads * self.slots[0].head_dim)
        factory = dict(device=device, dtype=dtype)
        rows = self.num_tasks * self.prefix_len
        if projection_hidden is None:
            self.embedding = nn.Embedding(rows, self.width, **factory)
            self.transform = None
        else:
            self.embedding = nn.Embedding(rows, self.embed_dim, **factory)
            self.transform = nn.Sequential(nn.Linear(self.embed_dim, projection_hidden, **factory), nn.Tanh(),
                                           nn.Linear(projection_hidden, self.width, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else None

    @property
    def reparameterized(self) -> bool:
        return self.transform is not None

    def flat(self) -> Tensor:
        """The prefix keys/values of all tasks and slots as one ``[T, P, F]`` tensor."""
        values = self.embedding.weight
        if self.transform is not None:
            values = self.transform(values)
        if self.dropout is not None:
            values = self.dropout(values)
        return values.view(self.num_tasks, self.prefix_len, self.width)

    def forward(self) -> tuple[tuple[Tensor, Tensor], ...]:
        """One ``(key, value)`` pair ``[T, Hkv, P, D]`` per slot, views of :meth:`flat` made by a single split.

        Without autograd (inference, every step of ``generate``) the pairs are made once and handed out again
        until a parameter changes (an optimizer step, ``load_state_dict``, a move): a decode step then pays no
        MLP and no per-slot views."""
        reusable = (not torch.is_grad_enabled() and (self.dropout is None or not self.training)
                    and not torch.compiler.is_compiling())
        if not reusable:
            return self._views()
        state = _parameter_state(self)
        cached = self.__dict__.get("_reused_views")
        if cached is None or cached[0] != state:
            cached = self.__dict__["_reused_views"] = (state, self._views())
        return cached[1]

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else dict(self.__dict__)
        state = dict(state)
        state.pop("_reused_views", None)  # copies make their own
        return state

    def _views(self) -> tuple[tuple[Tensor, Tensor], ...]:
        sizes = [slot.num_kv_heads * dim for slot in self.slots for dim in (slot.head_dim, slot.value_head_dim)]
        parts = self.flat().split(sizes, dim=-1)
        kv = []
        for i, slot in enumerate(self.slots):
            key, value = (part.view(self.num_tasks, self.prefix_len, slot.num_kv_heads, dim).transpose(1, 2)
                          for part, dim in zip(parts[2 * i:2 * i + 2], (slot.head_dim, slot.value_head_dim)))
            kv.append((key, value))
        return tuple(kv)

    @torch.no_grad()
    def fold(self) -> "PrefixEncoder":
        """Replace the MLP by its output (for inference): afterwards the embedding holds the keys/values. In place."""
        if self.transform is None:
            return self
        weight = self.transform(self.embedding.weight)
        embedding = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
        embedding.weight.copy_(weight)
        self.embedding, self.transform, self.projection_hidden = embedding, None, None
        return self

    def extra_repr(self) -> str:
        return (f"prefix_len={self.prefix_len}, num_tasks={self.num_tasks}, slots={len(self.slots)}, "
                f"width={self.width}, projection_hidden={self.projection_hidden}")


TaskIds = Union[int, str, Sequence[Union[int, str]], Tensor]


def _to_device(ids: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor copied to ``device``; to a GPU from pinned memory without waiting for the copy, so that it
    costs no synchronization (the pinned buffer is kept until the copy is done)."""
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return ids.pin_memory().to(device, non_blocking=True)
    return ids.to(device)


def _parameter_state(module: nn.Module) -> tuple:
    """What identifies the values of ``module``'s parameters (each one's identity, version, memory, dtype and
    device) without reading them: ``module.parameters()`` walked by hand, as a decode step asks it once."""
    state, pending = [], [module]
    while pending:
        current = pending.pop()
        for p in current._parameters.values():
            if p is not None:
                state.append((id(p), p._version, p.data_ptr(), p.dtype, p.device))
        pending.extend(child for child in current._modules.values() if child is not None)
    return tuple(state)


def _tensor_key(t: Tensor):
    """What identifies a tensor's current values without reading them: its memory and its version counter."""
    try:
        return t.data_ptr(), t._version
    except RuntimeError:  # an inference tensor has no version counter
        return t.data_ptr(), None


class PrefixBank(nn.Module):
    """T task prefixes for one model: a :class:`PrefixEncoder` plus each task's own prefix length.

    Storage is padded to ``P = max(prefix_len)``; ``prefix_lengths[t]`` says how many of task t's virtual tokens
    are real (the op ignores the rest). Build one for a model with :meth:`for_model`, save it with :meth:`save`
    (safetensors, with the configuration needed to rebuild it), load it with :meth:`load`, import a PEFT prefix
    with :meth:`from_peft`, and hand it to :func:`ptv2_kernels.patch`.

    Args:
        slots: the attentions that receive a prefix, each ``(name, num_kv_heads, head_dim)`` or
            ``(name, num_kv_heads, head_dim, value_dim)`` (see :class:`PrefixSlot`).
        num_tasks: T.
        prefix_len: one length for every task, or T lengths.
        projection_hidden, embed_dim, dropout: see :class:`PrefixEncoder`.
        task_names: optional T names, so that ``task_ids`` may be given by name.
        model_type: the ``config.model_type`` of the model the bank was built for (checked by ``patch``).
        position_bias: what a position-dependent score bias of the model (T5's relative position bias) gives the
            prefix keys: ``"none"`` (no bias: Li & Liang's prefix tuning, the default) or ``"cached"`` (the bias a
            cache holding the prefix in front of the sequence gives them, as PEFT's prefix tuning does;
            :meth:`from_peft` sets it). See docs/integration.md.
    """

    def __init__(self, slots, num_tasks: int = 1, prefix_len: Union[int, Sequence[int]] = 16, *,
                 projection_hidden: Optional[int] = None, embed_dim: Optional[int] = None, dropout: float = 0.0,
                 task_names: Optional[Sequence[str]] = None, model_type: Optional[str] = None, device=None,
                 dtype=None, position_bias: str = "none"):
        super().__init__()
        if position_bias not in POSITION_BIASES:
            raise ValueError(f"position_bias must be one of {POSITION_BIASES}, got {position_bias!r}")
        self.position_bias = position_bias
        num_tasks = _positive_int("num_tasks", num_tasks)
        if isinstance(prefix_len, int) and not isinstance(prefix_len, bool):
            lengths = [_positive_int("prefix_len", prefix_len)] * num_tasks
        else:
            lengths = list(prefix_len)
            if len(lengths) != num_tasks:
                raise ValueError(f"prefix_len must be an int or {num_tasks} ints (one per task), got {len(lengths)}")
            lengths = [_positive_int("each prefix_len", length) for length in lengths]
        if task_names is not None:
            task_names = [str(name) for name in task_names]
            if len(task_names) != num_tasks or len(set(task_names)) != num_tasks:
                raise ValueError(f"task_names must be {num_tasks} distinct names, got {task_names}")
        self.task_names = task_names
        self.model_type = model_type
        self.encoder = PrefixEncoder(max(lengths), slots, num_tasks=num_tasks, projection_hidden=projection_hidden,
                                     embed_dim=embed_dim, dropout=dropout, device=device, dtype=dtype)
        self.register_buffer("prefix_lengths", torch.tensor(lengths, dtype=torch.long, device=device))
        self.uniform_length = len(set(lengths)) == 1
        self._host_lengths = (_tensor_key(self.prefix_lengths), tuple(lengths))  # what lengths() last read

    # --- shape -----------------------------------------------------------------------------------------------

    @property
    def slots(self) -> tuple[PrefixSlot, ...]:
        return self.encoder.slots

    @property
    def num_tasks(self) -> int:
        return self.encoder.num_tasks

    @property
    def prefix_len(self) -> int:
        """P, the padded length (the longest task's)."""
        return self.encoder.prefix_len

    def lengths(self) -> list[int]:
        """Each task's prefix length. Read from ``prefix_lengths`` only when it was written since the last read
        (a device synchronization when it lives on a GPU): the bank knows its lengths from its configuration."""
        key = _tensor_key(self.prefix_lengths)
        if self.__dict__.get("_host_lengths") is None or self._host_lengths[0] != key:
            self._host_lengths = (key, tuple(int(x) for x in self.prefix_lengths.tolist()))
        return list(self._host_lengths[1])

    def forward(self) -> tuple[tuple[Tensor, Tensor], ...]:
        """One ``(key, value)`` pair ``[T, Hkv, P, D]`` per slot (views; see :class:`PrefixEncoder`)."""
        return self.encoder()

    def fold(self) -> "PrefixBank":
        """Replace the reparameterization MLP by its output (inference). In place; returns self."""
        self.encoder.fold()
        return self

    def task_index(self, task_ids: TaskIds, device=None) -> Tensor:
        """``task_ids`` (an int, a name, a sequence of them, or an integer tensor of at most one dim) as a 1-D long
        tensor on ``device`` (default: a tensor's own device, else the bank's).

        Ids given as ints or names, or as a CPU tensor bound for another device, are checked on the host
        (IndexError when out of range) before they are moved; a tensor already on ``device`` is returned as it is
        (the op checks its values where it is).
        """
        return self._task_index(task_ids, device)[0]

    def _task_index(self, task_ids: TaskIds, device=None) -> tuple[Tensor, Optional[list[int]]]:
        """:meth:`task_index`, and the ids as a list when they were checked on the host (else None)."""
        if device is not None:
            device = torch.device(device)
        else:
            device = task_ids.device if isinstance(task_ids, Tensor) else self.prefix_lengths.device
        if isinstance(task_ids, Tensor):
            if task_ids.is_floating_point() or task_ids.is_complex() or task_ids.dtype == torch.bool:
                raise TypeError(f"task_ids must be an integer tensor, got {task_ids.dtype}")
            if task_ids.dim() > 1:
                raise ValueError(f"task_ids must be one id per sample ([B]) or one id, got shape "
                                 f"{list(task_ids.shape)}")
            ids = task_ids.reshape(1) if task_ids.dim() == 0 else task_ids  # the same tensor: the op remembers it
            if ids.device.type == "cpu" and device.type != "cpu" and not torch.compiler.is_compiling():
                host = ids.tolist()  # CPU memory: no device read
                self._check_range(host)
                return _to_device(ids.to(torch.long), device), host
            return ids.to(device=device, dtype=torch.long), None
        items = [task_ids] if isinstance(task_ids, (int, str)) else list(task_ids)
        ids = []
        for item in items:
            if isinstance(item, str):
                if self.task_names is None or item not in self.task_names:
                    raise KeyError(f"unknown task name {item!r}; the bank's tasks are {self.task_names}")
                ids.append(self.task_names.index(item))
            elif isinstance(item, int) and not isinstance(item, bool):
                ids.append(item)
            else:
                raise TypeError(f"task ids must be ints or task names, got {item!r}")
        self._check_range(ids)
        return _to_device(torch.tensor(ids, dtype=torch.long), device), ids

    def _check_range(self, ids: list) -> None:
        for item in ids:
            if not 0 <= item < self.num_tasks:
                raise IndexError(f"task id {item} is out of range for a bank of {self.num_tasks} tasks")

    # --- construction ----------------------------------------------------------------------------------------

    def config_dict(self) -> dict:
        """Everything needed to rebuild this bank (its tensors aside)."""
        encoder = self.encoder
        return {
            "format": _FORMAT, "version": _FORMAT_VERSION,
            "slots": [list(slot) for slot in self.slots],
            "num_tasks": self.num_tasks,
            "prefix_len": self.lengths(),
            "projection_hidden": encoder.projection_hidden,
            "embed_dim": encoder.embed_dim,
            "dropout": encoder.dropout.p if encoder.dropout is not None else 0.0,
            "task_names": self.task_names,
            "model_type": self.model_type,
            "position_bias": self.position_bias,
        }

    @classmethod
    def from_config_dict(cls, config: dict, device=None, dtype=None) -> "PrefixBank":
        if config.get("format") != _FORMAT:
            raise ValueError(f"not a saved PrefixBank (format {config.get('format')!r}, expected {_FORMAT!r})")
        if config.get("version", 0) > _FORMAT_VERSION:
            raise ValueError(f"this PrefixBank was saved by a newer ptv2_kernels (format version "
                             f"{config['version']} > {_FORMAT_VERSION})")
        return cls([tuple(slot) for slot in config["slots"]], config["num_tasks"], config["prefix_len"],
                   projection_hidden=config["projection_hidden"], embed_dim=config["embed_dim"],
                   dropout=config["dropout"], task_names=config["task_names"], model_type=config["model_type"],
                   device=device, dtype=dtype, position_bias=config.get("position_bias", "none"))

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the bank to ``path`` as one safetensors file (tensors plus the configuration as metadata)."""
        from safetensors.torch import save_file

        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(tensors, os.fspath(path), metadata={_FORMAT: json.dumps(self.config_dict())})

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device=None, dtype=None) -> "PrefixBank":
        """Read a bank written by :meth:`save`; ``dtype`` converts its floating-point tensors."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if _FORMAT not in metadata:
            raise ValueError(f"{os.fspath(path)!r} is not a saved PrefixBank (no {_FORMAT!r} metadata)")
        bank = cls.from_config_dict(json.loads(metadata[_FORMAT]), device=device, dtype=dtype)
        state = load_file(os.fspath(path), device=str(device) if device is not None else "cpu")
        if dtype is not None:
            state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
        bank.load_state_dict(state)
        return bank

    @classmethod
    def for_model(cls, model, num_tasks: int = 1, prefix_len: Union[int, Sequence[int]] = 16, *,
                  projection_hidden: Optional[int] = None, attentions: Optional[Sequence[str]] = None,
                  dropout: float = 0.0, task_names: Optional[Sequence[str]] = None, device=None,
                  dtype=None, position_bias: str = "none") -> "PrefixBank":
        """A bank shaped for a Hugging Face transformers model: one slot per attention, read from its config.

        Layers, key/value heads (GQA) and head dims come from the config. Encoder-decoder models get encoder,
        decoder and cross-attention slots (Li & Liang); ``attentions`` picks a subset of ``("encoder", "decoder",
        "cross")``. The MLP's input width (with ``projection_hidden``) is the model's hidden size. Parameters are
        created on the model's device unless ``device`` is given, in float32 unless ``dtype`` is given.
        ``position_bias``: see the class.
        """
        from .integrations.hf_transformers import prefix_layout

        slots, hidden = prefix_layout(model, attentions)
        if device is None:
            device = next(iter(model.parameters())).device
        return cls(slots, num_tasks, prefix_len, projection_hidden=projection_hidden,
                   embed_dim=hidden if projection_hidden is not None else None, dropout=dropout,
                   task_names=task_names, model_type=getattr(model.config, "model_type", None), device=device,
                   dtype=dtype, position_bias=position_bias)

    @classmethod
    def from_peft(cls, peft_model, adapter_name: Optional[str] = None) -> "PrefixBank":
        """Import the prefix of a PEFT ``PrefixTuningConfig`` model (its MLP, or the folded form) as a one-task bank
        that, given to :func:`ptv2_kernels.patch` with ``positions="shifted"``, reproduces that model."""
        from .integrations.hf_peft import bank_from_peft

        return bank_from_peft(cls, peft_model, adapter_name)

    @classmethod
    def from_ptuning_v2(cls, checkpoint, model=None, **kwargs) -> "PrefixBank":
        """Import an official P-Tuning v2 checkpoint's prefix encoder (BERT, RoBERTa, DeBERTa); patch with
        ``positions="shifted"``. See :func:`ptv2_kernels.integrations.checkpoints.import_ptuning_v2`."""
        from .integrations.checkpoints import import_ptuning_v2

        return import_ptuning_v2(checkpoint, model, bank_class=cls, **kwargs)

    @classmethod
    def from_chatglm_ptuning(cls, checkpoint, model=None, **kwargs) -> "PrefixBank":
        """Import a ChatGLM-style P-Tuning v2 checkpoint for a GLM model; patch with ``positions="unshifted"``.
        See :func:`ptv2_kernels.integrations.checkpoints.import_chatglm_ptuning`."""
        from .integrations.checkpoints import import_chatglm_ptuning

        return import_chatglm_ptuning(checkpoint, model, bank_class=cls, **kwargs)

    def save_peft(self, directory: Union[str, os.PathLike], *, task_type: str, **kwargs):
        """Write one task as a PEFT prefix-tuning adapter directory that ``peft.PeftModel.from_pretrained`` loads
        (``task=`` picks it; ``model=`` gives a classification head). See
        :func:`ptv2_kernels.integrations.checkpoints.export_peft_adapter`."""
        from .integrations.checkpoints import export_peft_adapter

        return export_peft_adapter(self, directory, task_type=task_type, **kwargs)

    def extra_repr(self) -> str:
        extra = "" if self.position_bias == "none" else f", position_bias={self.position_bias!r}"
        return f"num_tasks={self.num_tasks}, prefix_lengths={self.lengths()}, model_type={self.model_type!r}{extra}"
