"""Import the prefix of a PEFT prefix-tuning model (``PrefixTuningConfig``) into a :class:`~ptv2_kernels.PrefixBank`.

PEFT's prefix encoder produces ``[P, num_layers * 2 * token_dim]`` with, per virtual token, layer by layer the key
then the value, head by head: the bank's own flat layout, so its weights (embedding, and MLP when
``prefix_projection``) are copied as they are. PEFT then puts the prefix in the model's cache, which shifts the
real tokens' positions by P: patch with ``positions="shifted"`` to reproduce it. For the same reason a position
bias of the model (T5's) reaches the prefix keys too: the bank's ``position_bias`` is ``"cached"``.

For encoder-decoder models PEFT builds a cache of ``num_layers`` entries for the decoder only (the cross-attention
part of that cache is discarded), and entry ``i`` holds its prefix's virtual layers ``2i`` and ``2i + 1``
(wrapping around past the last layer) as self-attention keys/values. The import reproduces exactly that: a bank
with decoder self-attention slots only, each a view of the PEFT layer PEFT gives it.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch


def _peft_parts(peft_model, adapter_name: Optional[str]):
    try:
        from peft import PeftModel
    except ImportError as error:  # pragma: no cover
        raise ImportError("PrefixBank.from_peft needs the peft package") from error
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"from_peft expects a peft.PeftModel, got {type(peft_model).__name__}")
    adapter = adapter_name or peft_model.active_adapter
    if adapter not in peft_model.peft_config:
        raise KeyError(f"the PEFT model has no adapter {adapter!r} (it has {list(peft_model.peft_config)})")
    config = peft_model.peft_config[adapter]
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if peft_type != "PREFIX_TUNING":
        raise ValueError(f"from_peft imports prefix tuning (PrefixTuningConfig), got a {peft_type} adapter")
    return config, peft_model.prompt_encoder[adapter], peft_model.get_base_model()


def bank_from_peft(bank_class, peft_model, adapter_name: Optional[str] = None):
    """See :meth:`ptv2_kernels.PrefixBank.from_peft`."""
    config, encoder, base = _peft_parts(peft_model, adapter_name)
    prefix_len = config.num_virtual_tokens
    layers, heads = config.num_layers, config.num_attention_heads
    head_dim = config.token_dim // heads
    weight = encoder.embedding.weight
    projection = bool(getattr(encoder, "prefix_projection", False)) and getattr(encoder, "transform", None) is not None
    model_type = getattr(base.config, "model_type", None)
    encoder_decoder = bool(getattr(base.config, "is_encoder_decoder", False))
    if encoder_decoder and config.num_transformer_submodules == 2:
        # Decoder layer i's self-attention gets PEFT's virtual layer 2i mod L (see _peft_seq2seq_layers); the
        # bank holds a copy per slot, folded when PEFT uses an MLP (the MLP's output is what gets picked).
        slot_layers = _peft_seq2seq_layers(layers)
        slots = [(f"decoder.{i}", heads, head_dim) for i in range(len(slot_layers))]
    elif encoder_decoder:
        raise NotImplementedError("from_peft supports PEFT encoder-decoder prefixes of num_transformer_submodules=2")
    else:
        slot_layers = None
        slots = [(f"layer.{i}", heads, head_dim) for i in range(layers)]

    if slot_layers is not None:
        bank = bank_class(slots, 1, prefix_len, model_type=model_type, device=weight.device, dtype=weight.dtype,
                          position_bias="cached")
        with torch.no_grad():
            flat = encoder(torch.arange(prefix_len, device=weight.device)) if projection else weight
            per_layer = flat.view(prefix_len, layers, 2 * config.token_dim)
            picked = per_layer[:, slot_layers].reshape(prefix_len, -1)
            bank.encoder.embedding.weight.copy_(picked)
        return bank

    bank = bank_class(slots, 1, prefix_len, projection_hidden=config.encoder_hidden_size if projection else None,
                      embed_dim=config.token_dim if projection else None, model_type=model_type,
                      device=weight.device, dtype=weight.dtype, position_bias="cached")
    with torch.no_grad():
        bank.encoder.embedding.weight.copy_(weight)
        if projection:
            bank.encoder.transform.load_state_dict(encoder.transform.state_dict())
    return bank


def _peft_seq2seq_layers(num_layers: int) -> list[int]:
    """The virtual layer whose key/value pair PEFT gives decoder layer i of an encoder-decoder model.

    PEFT concatenates the ``2 L`` key/value chunks with themselves and splits them into groups of four: group i is
    (key, value) of virtual layers ``2i mod L`` (self-attention) and ``2i + 1 mod L`` (cross-attention, dropped).
    """
    return [(2 * i) % num_layers for i in range(num_layers)]


@functools.lru_cache(maxsize=None)
def peft_prefix_tuning_problem() -> Optional[str]:
    """None when PEFT's own prefix tuning runs correctly with the installed transformers, else what goes wrong.

    PEFT follows transformers' releases with a lag: PEFT 0.21.2 cannot prefix-tune with transformers 5.24, which
    renamed the models' ``past_key_values`` argument to ``cache`` (an encoder's forward then raises, and
    ``generate`` drops the prefix). Whatever compares with PEFT (the equivalence tests, the benchmarks' PEFT
    baseline) asks this first. It runs two tiny random models on the CPU, once per process.
    """
    try:
        import peft
        import transformers
    except ImportError as error:
        return f"{error.name} is not installed"
    versions = f"peft {peft.__version__} with transformers {transformers.__version__}"
    tiny = dict(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                max_position_embeddings=32)
    ids = torch.tensor([[3, 5, 7, 9]])
    mask = torch.ones_like(ids)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        encoder = transformers.BertForSequenceClassification(transformers.BertConfig(**tiny)).eval()
        encoder = peft.get_peft_model(encoder, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
        try:
            encoder(input_ids=ids, attention_mask=mask)
        except Exception as error:  # noqa: BLE001 - any failure means PEFT cannot serve here; report it
            return f"{versions}: an encoder's prefix-tuning forward raises {type(error).__name__}: {error}"
        decoder = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=1, **tiny)).eval()
        decoder = peft.get_peft_model(decoder, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
        try:
            logits = decoder(input_ids=ids, attention_mask=mask).logits[:, -1]
            scores = decoder.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                      output_scores=True, return_dict_in_generate=True, pad_token_id=0).scores[0]
        except Exception as error:  # noqa: BLE001
            return f"{versions}: a decoder's prefix-tuning generate raises {type(error).__name__}: {error}"
        if not torch.allclose(scores, logits, rtol=1e-4, atol=1e-5):
            return f"{versions}: generate's first scores differ from the forward's logits (the prefix is dropped)"
    return None
