"""Tiny Hugging Face models built from configs with random weights (nothing is downloaded), and PEFT twins.

Every model has dropout off (so outputs are deterministic) and runs in float32. ``peft_twin`` wraps a deep copy of
a model in a PEFT prefix-tuning model with a random prefix, and ``patched_twin`` patches another deep copy with a
bank imported from that PEFT model, so both carry the same prefix values. ``OpSpy`` records the masks a patched model
hands the op, ``ShapeRecorder`` the shape of every tensor that aten ops make.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ptv2_kernels
from ptv2_kernels.integrations.hf_peft import peft_prefix_tuning_problem

VOCAB = 100

ENCODER_HEADS = ("seq_cls", "token_cls", "qa", "multiple_choice")


def encoder_config(family: str, **overrides):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  max_position_embeddings=64, num_labels=3, pad_token_id=1)
    common.update(overrides)
    if family == "bert":
        return transformers.BertConfig(**common)
    if family == "roberta":
        return transformers.RobertaConfig(**common)
    if family == "electra":
        return transformers.ElectraConfig(embedding_size=32, **common)
    raise ValueError(family)


def encoder_model(family: str, head: str, seed: int = 0, **overrides):
    import transformers

    prefix = {"bert": "Bert", "roberta": "Roberta", "electra": "Electra"}[family]
    suffix = {"seq_cls": "ForSequenceClassification", "token_cls": "ForTokenClassification",
              "qa": "ForQuestionAnswering", "multiple_choice": "ForMultipleChoice", "base": "Model"}[head]
    if head == "qa":
        overrides.setdefault("num_labels", 2)  # start and end logits
    torch.manual_seed(seed)
    return getattr(transformers, prefix + suffix)(encoder_config(family, **overrides)).eval()


def decoder_model(family: str, seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=2, pad_token_id=1, **overrides)
        return transformers.GPT2LMHeadModel(config).eval()
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, bos_token_id=0,
                  eos_token_id=2, pad_token_id=1, attention_dropout=0.0)
    common.update(overrides)
    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM")}
    config_class, model_class = classes[family]
    config = getattr(transformers, config_class)(**common)
    return getattr(transformers, model_class)(config).eval()


def peft_twin(model, task_type: str, num_virtual_tokens: int, seed: int = 1, projection_hidden=None):
    """A PEFT prefix-tuning model around a deep copy of ``model``, its prefix drawn at random (scaled to 0.5 so
    that the prefix matters without saturating the softmax).

    Skips the test, saying why, where PEFT's prefix tuning does not work with the installed transformers: PEFT is
    the reference these tests compare with, and a broken reference proves nothing. (CI runs these tests again
    on the newest transformers that PEFT supports.)"""
    from peft import PrefixTuningConfig, get_peft_model

    problem = peft_prefix_tuning_problem()
    if problem is not None:
        pytest.skip(f"PEFT's prefix tuning cannot be the reference here: {problem}")

    config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens,
                                prefix_projection=projection_hidden is not None,
                                encoder_hidden_size=projection_hidden or 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    return peft_model.eval()


def patched_twin(model, peft_model, backend: str = "reference", positions: str = "shifted"):
    """A deep copy of ``model`` patched with the prefix imported from ``peft_model``."""
    ours = copy.deepcopy(model)
    bank = ptv2_kernels.PrefixBank.from_peft(peft_model)
    ptv2_kernels.patch(ours, bank, backend=backend, positions=positions)
    return ours, bank


def patch_with_random_bank(model, prefix_len, std: float, backend: str = "reference"):
    """Patch ``model`` in place with a fresh bank of ``len(prefix_len)`` tasks whose prefixes are drawn N(0, std²)."""
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=len(prefix_len), prefix_len=prefix_len)
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, std)
    ptv2_kernels.patch(model, bank, backend=backend)
    return bank


def seeded_bank(model, lengths, std: float = 0.5, seed: int = 3, position_bias: str = "none"):
    """A bank of ``len(lengths)`` tasks for ``model`` whose prefixes are drawn N(0, std²) from a generator of their
    own (``seed``), so that a test's other random draws do not change them."""
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=len(lengths), prefix_len=list(lengths),
                                             position_bias=position_bias)
    with torch.no_grad():
        weight = bank.encoder.embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * std)
    return bank


def assert_matches_oracle(model, actual, bank, oracle_model, expected, oracle_bank, rel: float):
    """The patched ``model``'s outputs ``actual`` equal the oracle's ``expected`` (logits, start/end logits), and so
    do, after a backward of :func:`loss_of` on both, the prefix gradient and every backbone gradient that the oracle
    gives (``oracle_model`` is the unpatched twin the oracle ran, ``oracle_bank`` its copy of ``bank``)."""
    assert_close_scaled(logits_of(actual), logits_of(expected), rel, "logits")
    loss_of(expected).backward()
    loss_of(actual).backward()
    assert_close_scaled(bank.encoder.embedding.weight.grad, oracle_bank.encoder.embedding.weight.grad, rel,
                        "prefix gradient")
    oracle_params = dict(oracle_model.named_parameters())
    for name, param in model.named_parameters():
        oracle = oracle_params.get(name)
        if oracle is not None and oracle.grad is not None and oracle.grad.abs().max() > 0:
            assert_close_scaled(param.grad, oracle.grad, rel, name)


# generate's raw logits at each step, for comparing with forwards over the whole sequence so far
GENERATE_STEPS = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                      return_dict_in_generate=True)


def random_batch(batch: int, length: int, seed: int = 0, padding: str = "none", choices: int = 0):
    """input_ids (no pad id inside real tokens) and an attention mask with right or left padding."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, choices, length) if choices else (batch, length)
    input_ids = torch.randint(3, VOCAB, shape, generator=gen)
    mask = torch.ones(shape, dtype=torch.long)
    if padding != "none":
        lengths = torch.randint(2, length + 1, shape[:-1], generator=gen)
        lengths.view(-1)[0] = length  # one full row
        positions = torch.arange(length)
        if padding == "right":
            mask = (positions < lengths.unsqueeze(-1)).long()
        else:
            mask = (positions >= (length - lengths).unsqueeze(-1)).long()
        input_ids = input_ids.masked_fill(mask == 0, 1)
    return input_ids, mask


def peft_grads(peft_model):
    """The PEFT prefix's gradients, named as in the bank's encoder (``embedding.weight``, ``transform.0.bias``)."""
    return {name.split(".", 1)[1]: p.grad.clone() for name, p in peft_model.prompt_encoder.named_parameters()}


def bank_grads(bank):
    return {name: p.grad.clone() for name, p in bank.encoder.named_parameters()}


def assert_close_scaled(actual, expected, rel: float, what: str = ""):
    """max |actual - expected| <= rel * max |expected|: a bound relative to the tensor's scale, for values (like
    prefix gradients) whose entries span orders of magnitude."""
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert scale > 0, f"{what}: comparing against an all-zero tensor"
    assert error <= rel * scale, f"{what}: max error {error:.3g} > {rel:g} * scale {scale:.3g}"


def loss_of(output, weights_seed: int = 7):
    """A scalar that depends on every logit with a random weight (so no gradient cancels by symmetry)."""
    logits = [t for t in (getattr(output, "logits", None), getattr(output, "start_logits", None),
                          getattr(output, "end_logits", None)) if t is not None]
    gen = torch.Generator().manual_seed(weights_seed)
    return sum((t * torch.randn(t.shape, generator=gen).to(t)).sum() for t in logits)


def logits_of(output):
    if getattr(output, "logits", None) is not None:
        return output.logits
    return torch.stack([output.start_logits, output.end_logits])


class OpSpy:
    """Records the mask arguments the integration hands the op."""

    def __init__(self, monkeypatch):
        from ptv2_kernels.integrations import hf_transformers

        self.calls = []
        original = hf_transformers.prefix_attention

        def spy(q, k, v, prefix_k, prefix_v, **kwargs):
            mask = kwargs.get("attn_mask")
            if mask is None:
                mask = kwargs.get("key_padding_mask")
            self.calls.append((None if mask is None else tuple(mask.shape), kwargs.get("causal"),
                               tuple(prefix_k.shape), kwargs.get("prefix_index") is not None))
            return original(q, k, v, prefix_k, prefix_v, **kwargs)

        monkeypatch.setattr(hf_transformers, "prefix_attention", spy)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns while the mode is on (``with ShapeRecorder() as r:``)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.seen.append(tuple(t.shape))
        return result
