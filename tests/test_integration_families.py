"""Every transformers family that a tiny config builds, patched and checked, or refused at patch with its reason.

``FAMILIES`` lists each family once: how to build it (``transformers.AutoConfig.for_model`` with the small sizes of
``SMALL`` that its config class takes, the family's overrides, and the ``AutoModelFor...`` of its kind), and what
patching it does at this commit (:class:`Family`): it works; or ``patch`` refuses it with the reason named (a
``NotImplementedError``); or, a bug recorded as it stands, patch takes it and its first forward raises, or it gives
wrong results. docs/integration.md's "Supported families" table is this list (``test_doc_table_lists_the_families``
compares them; ``python -m tests.test_integration_families`` prints the table).

A family that works is patched with a bank of two tasks of different prefix lengths and checked on a padded batch
mixing both tasks:

* forward and backward; after ``freeze_backbone`` only the prefix (and an encoder's classification head) is
  trainable, and gradients reach exactly those: each task's prefix rows within its length, none beyond it;
* each sample of the mixed batch gives what it gives alone;
* against an oracle, logits and prefix gradients, and greedy ``generate`` (tokens and every step's logits):
  ``"cache"`` (decoders): the unpatched model holding the task's prefix in its cache, as PEFT places it, with
  positions shifted by the prefix length (``positions="shifted"``); ``"attention"`` (encoders, encoder-decoders,
  hybrid decoders whose cache is not a plain list of layers, multi-head latent attention whose cache holds
  compressed latents instead of keys and values): the unpatched model running a float64 attention
  function of this module over ``[prefix ; keys]`` with transformers' own masks, the model patched with
  ``positions="unshifted"``; ``None``: families served by an adapter, whose oracle is their own test module;
* ``unpatch`` gives back the unpatched outputs exactly.

Tolerance: 1e-5 of the largest value (float32; the reference backend and the oracles differ in summation order).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import warnings
from pathlib import Path
from typing import Optional

import pytest
import torch

import ptv2_kernels
from ptv2_kernels.integrations import hf_transformers
from ptv2_kernels.integrations.hf_transformers import cache_keyword

from .hf_models import VOCAB, assert_close_scaled, random_batch

transformers = pytest.importorskip("transformers")

# The list below records what each family does with the transformers this survey was made on and after: older
# releases lack some families (gte), build others differently (their T5 relative attention, which the attention
# oracle follows) and route others' attention otherwise. The per-family test modules cover the older releases.
SURVEYED_SINCE = (5, 23)
if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < SURVEYED_SINCE:
    pytest.skip(f"the families survey records transformers >= {'.'.join(map(str, SURVEYED_SINCE))}, got "
                f"{transformers.__version__}", allow_module_level=True)

REL = 1e-5
# Prefix gradients come back through every layer's float32 backward, which compounds rounding more than a forward:
# float64 models agree to ~1e-15, float32 ones to ~2e-5 of the gradient's scale (Gemma4 on an AVX-512 CPU).
GRAD_REL = 1e-4
PREFIX_LENGTHS = [3, 2]  # task 0 and task 1
TASKS = torch.tensor([1, 0, 1])  # the batch's samples' tasks
NEW_TOKENS = 3
EOS = 2
DOC = Path(__file__).resolve().parent.parent / "docs" / "integration.md"
DOC_BEGIN, DOC_END = "<!-- supported-families:begin -->", "<!-- supported-families:end -->"

# Tiny sizes, each given to the config classes that take it (by name or through their attribute_map).
SMALL = dict(vocab_size=VOCAB, hidden_size=32, d_model=32, num_hidden_layers=2, num_layers=2, encoder_layers=2,
             decoder_layers=2, num_decoder_layers=2, num_attention_heads=4, num_heads=4, encoder_attention_heads=4,
             decoder_attention_heads=4, num_key_value_heads=2, intermediate_size=64, d_ff=64, encoder_ffn_dim=64,
             decoder_ffn_dim=64, ffn_dim=64, d_kv=8, head_dim=8, embedding_size=32, max_position_embeddings=128,
             num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=16, shared_expert_intermediate_size=32, num_labels=3, pad_token_id=1,
             bos_token_id=0, eos_token_id=EOS, decoder_start_token_id=0, forced_eos_token_id=None)

# What patch says when it refuses a family, and what the first forward says for the families that patch does not
# refuse but cannot serve (the doc table gives the same words).
NO_INTERFACE = "its attention does not go through transformers' AttentionInterface"
MLA_DIMS = dict(num_key_value_heads=4, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, kv_lora_rank=16,
                q_lora_rank=16)  # keys of 4 + 4 channels, values of 4, as DeepSeek's 128 + 64 and 128
ROTARY = dict(rotary_dim=4)
MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8)  # heads that divide its width


@dataclasses.dataclass(frozen=True)
class Family:
    """One family and what patching it does at this commit: works (``refused``, ``fails`` and ``bug`` None), is
    refused at patch (``refused``: what the error says), is patched but raises at its first forward (``fails``:
    what the error says; a bug, as patch should refuse it), or is patched and gives wrong results (``bug``: which;
    its checks are expected to fail)."""

    name: str  # the transformers model type
    kind: str  # "encoder" (sequence classification), "decoder" (causal LM) or "seq2seq"
    config: dict = dataclasses.field(default_factory=dict)  # overrides of SMALL
    refused: Optional[str] = None
    fails: Optional[str] = None
    bug: Optional[str] = None
    oracle: Optional[str] = "default"  # "cache", "attention" or None; "default": by kind
    position_bias: str = "none"  # the bank's: "cached" where the family's position bias reaches the prefix keys

    @property
    def check(self) -> Optional[str]:
        if self.oracle != "default":
            return self.oracle
        return "cache" if self.kind == "decoder" else "attention"

    @property
    def status(self) -> str:
        if self.refused is not None:
            return f"refused: {self.refused}"
        if self.fails is not None:
            return f"bug, fails at the first forward: {self.fails}"
        if self.bug is not None:
            return f"bug: {self.bug}"
        return "works"


def _encoders(*names, **kwargs):
    return [Family(name, "encoder", **kwargs) for name in names]


def _decoders(*names, **kwargs):
    return [Family(name, "decoder", **kwargs) for name in names]


def _seq2seq(*names, **kwargs):
    return [Family(name, "seq2seq", **kwargs) for name in names]


FAMILIES = [
    *_encoders("bert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "distilbert", "ernie",
               "data2vec-text", "xlm-roberta-xl", "roberta-prelayernorm", "modernbert", "eurobert", "esm",
               "nomic_bert", "gte", "mobilebert", "layoutlm", "markuplm", "roc_bert", "jina_embeddings_v3", "ultrabert"),
    *_encoders("mistral4", config=MLA_DIMS),  # multi-head latent attention; transformers has no causal LM of it
    *_encoders("deberta", "deberta-v2", oracle=None),  # tests/test_integration_deberta.py has their oracle
    *_encoders("mpnet", oracle=None),  # tests/test_integration_adapters.py has its oracle
    *_encoders("megatron-bert", "rembert", "roformer", "convbert", "squeezebert", "ibert", "funnel",
               "flaubert", "longformer", "canine", "nystromformer", "fnet", "luke", "mra", "yoso", "xlm", "big_bird",
               refused=NO_INTERFACE),
    *_decoders("llama", "mistral", "mixtral", "ministral", "ministral3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
               "gemma", "gemma3_text", "phi", "phi3", "phimoe", "glm", "glm4", "glm4_moe", "gpt2", "gpt_bigcode",
               "gpt_neox", "stablelm", "nemotron", "olmo", "olmo2", "olmo3", "olmoe", "flex_olmo", "cohere",
               "cohere2", "granite", "granitemoe", "granitemoeshared", "starcoder2", "smollm3", "helium", "exaone4",
               "exaone_moe", "seed_oss", "arcee", "apertus", "hunyuan_v1_dense", "hunyuan_v1_moe", "ernie4_5",
               "ernie4_5_moe", "biogpt", "persimmon", "bitnet", "llama4_text", "ctrl", "bert-generation", "opt",
               "modernbert-decoder", "afmoe", "apertus1p5_text", "cohere2_moe", "cwm", "exaone", "gpt-sw3", "granite_swa",
               "granitemoe_swa", "hyperclovax", "internlm3", "jais2", "minimax_m2", "nanochat", "sarvam_moe",
               "solar_open"),
    # Gemma4 against the float64 oracle: against the cache oracle its logits match, and its prefix gradient differs
    # by 2e-5 of its scale (float32 sums on both sides), past this survey's bound.
    *_decoders("gemma4_text", oracle="attention"),
    # Doge's dynamic mask attention and DeepSeek sparse attention's indexer compute with the model's mask before
    # the attention: they get transformers' dense masks; Doge's own bias reaches the sequence keys only.
    *_decoders("doge", oracle="attention"),
    # Hybrids without Mamba layers (convolutions, linear attention): their caches are not a list of layers.
    *_decoders("lfm2", "olmo_hybrid", "minimax", oracle="attention"),
    *_decoders("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text",
               config=dict(layer_types=["linear_attention", "full_attention"]), oracle="attention"),
    # Hybrids with Mamba (or recurrent) layers, each configured with one attention layer among its two.
    *_decoders("jamba", config=dict(attn_layer_period=2, attn_layer_offset=1), oracle="attention"),
    *_decoders("zamba2", config=dict(layers_block_type=["mamba", "hybrid"]), oracle="attention"),
    *_decoders("bamba", config=dict(attn_layer_indices=[1], **MAMBA), oracle="attention"),
    *_decoders("granitemoehybrid", config=dict(layer_types=["mamba", "attention"], **MAMBA), oracle="attention"),
    *_decoders("falcon_h1", "nemotron_h", oracle="attention"),
    *_decoders("recurrent_gemma", config=dict(block_types=["recurrent", "attention"]), oracle="attention"),
    *_decoders("jetmoe", refused="tiles each key/value head over its experts' query heads"),
    *_decoders("diffllama", refused="calls the attention function twice, on the two halves of its value heads"),
    *_decoders("gemma2", "vaultgemma", "gpt_oss"),  # attention-logit softcapping; attention sinks
    # Multi-head latent attention: values of another head dim than the keys; its cache holds the compressed
    # latents, not keys and values (tests/test_integration_mla.py checks it against prefixes held there).
    *_decoders("deepseek_v2", "deepseek_v3", "glm4_moe_lite", "minicpm3", "sarvam_mla", "youtu", "deepseek_v32",
               "glm_moe_dsa", config=MLA_DIMS, oracle="attention"),
    *_decoders("falcon"),
    *_decoders("bloom", position_bias="cached"),  # ALiBi on the prefix keys as in the cache
    *_decoders("xglm"),
    *_decoders("mpt", position_bias="cached"),  # ALiBi on the prefix keys as in the cache
    *_decoders("openai-gpt", "gpt_neox_japanese", "falcon_mamba", refused=NO_INTERFACE),
    *_decoders("gptj", "codegen", config=ROTARY, refused=NO_INTERFACE),
    *_decoders("gpt_neo", config=dict(attention_types=[[["global", "local"], 1]])),
    *_seq2seq("t5", "mt5", "umt5", "longt5", "switch_transformers", "bart", "mbart", "pegasus", "pegasus_x",
              "marian", "blenderbot", "blenderbot-small", "plbart", "m2m_100"),
    *_seq2seq("nllb-moe", refused="its decoder's self-attention is not marked causal"),
    *_seq2seq("led", "prophetnet", "mvp", "fsmt", refused=NO_INTERFACE),
]
BY_NAME = {family.name: family for family in FAMILIES}
WORKING = [f.name for f in FAMILIES if f.refused is None and f.fails is None]
REFUSED = [f.name for f in FAMILIES if f.refused is not None]
FAILING = [f.name for f in FAMILIES if f.fails is not None]


# ----------------------------------------------------------------------------------------------------------------
# Building the tiny models
# ----------------------------------------------------------------------------------------------------------------

def _auto_class(kind: str):
    return {"encoder": transformers.AutoModelForSequenceClassification,
            "decoder": transformers.AutoModelForCausalLM,
            "seq2seq": transformers.AutoModelForSeq2SeqLM}[kind]


def _model_class_name(family: Family) -> str:
    from transformers.models.auto import modeling_auto

    names = {"encoder": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
             "decoder": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
             "seq2seq": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES}[family.kind]
    return names[family.name]


def tiny_config(family: Family):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[family.name]
    takes = set(inspect.signature(config_class.__init__).parameters) | set(config_class.attribute_map)
    sizes = {name: value for name, value in SMALL.items() if name in takes}
    sizes.update(family.config)
    config = transformers.AutoConfig.for_model(family.name, **sizes)
    for name, value in list(vars(config).items()):  # dropout off (eval mode turns off the modules; this the rest)
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
            setattr(config, name, 0.0)
    return config


def build(family: Family, seed: int = 0):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if family.name not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {family.name!r} family")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _auto_class(family.kind).from_config(tiny_config(family)).eval()
    assert type(model).__name__ == _model_class_name(family)
    return model.float()


def _batch(family: Family) -> dict:
    """Three samples, padded (decoders on the left, as generate wants, the others on the right)."""
    input_ids, mask = random_batch(3, 6, seed=1, padding="left" if family.kind == "decoder" else "right")
    batch = dict(input_ids=input_ids, attention_mask=mask)
    if family.kind == "seq2seq":
        batch["decoder_input_ids"] = random_batch(3, 4, seed=2)[0]
    return batch


def _rows(batch: dict, rows) -> dict:
    return {name: value[rows] for name, value in batch.items()}


def _logits(output, batch: dict) -> torch.Tensor:
    """The logits that real tokens produce: a decoder's padded positions are left out (nothing reads them)."""
    logits = getattr(output, "logits", output)
    if logits.dim() == 3 and "decoder_input_ids" not in batch:
        return logits[batch["attention_mask"].bool()]
    return logits


def _weighted(logits: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """A scalar that depends on every logit with a random weight (so no gradient cancels by symmetry)."""
    gen = torch.Generator().manual_seed(seed)
    return (logits * torch.randn(logits.shape, generator=gen)).sum()


def _random_bank(model, position_bias: str = "none") -> ptv2_kernels.PrefixBank:
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=PREFIX_LENGTHS,
                                             position_bias=position_bias)
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    return bank


def _embedding_grad(bank) -> torch.Tensor:
    return bank.encoder.embedding.weight.grad.view(bank.num_tasks, bank.prefix_len, -1)


# ----------------------------------------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------------------------------------

def _forward_takes(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _cache(bank, kv, task: int, count: int):
    """A cache holding task ``task``'s prefix (its own length) for ``count`` samples, one layer per bank slot."""
    from transformers import DynamicCache

    length = bank.lengths()[task]
    return DynamicCache(tuple((key[task, :, :length].expand(count, -1, -1, -1).contiguous(),
                               value[task, :, :length].expand(count, -1, -1, -1).contiguous())
                              for key, value in kv))


def _cache_oracle_step(model, ids, mask, positions, cache):
    arguments = dict(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_keyword(): cache})
    if positions is not None:
        arguments["position_ids"] = positions
    return model(**arguments)


def _task_groups(bank, batch: dict, tasks):
    """For each task of the batch: its samples (a bool row mask), their input ids and attention mask, the mask
    with the prefix's columns (ones) in front, a cache holding the task's prefix at its own length, and that
    length."""
    kv = bank()
    for task in sorted(set(tasks.tolist())):
        rows = tasks == task
        ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
        length = bank.lengths()[task]
        full_mask = torch.cat([torch.ones(len(ids), length, dtype=mask.dtype), mask], 1)
        yield rows, ids, mask, full_mask, _cache(bank, kv, task, len(ids)), length


def cache_oracle_logits(model, bank, batch: dict, tasks) -> torch.Tensor:
    """The unpatched decoder with each sample's prefix in its cache: the samples of one task at a time."""
    out = None
    for rows, ids, _, full_mask, cache, _ in _task_groups(bank, batch, tasks):
        logits = _cache_oracle_step(model, ids, full_mask, None, cache).logits
        if out is None:
            out = logits.new_zeros(len(tasks), *logits.shape[1:])
        out = out.index_put((rows.nonzero()[:, 0],), logits)
    return out


def cache_oracle_generate(model, bank, batch: dict, tasks) -> tuple[torch.Tensor, list]:
    """Greedy decoding of the unpatched decoder with each sample's prefix in its cache: the tokens and each step's
    logits, as ``generate`` makes them (positions from the attention mask when the model takes them, the end
    token barred for the ``NEW_TOKENS`` steps, ``min_new_tokens``)."""
    steps = [None] * NEW_TOKENS
    new = torch.zeros(len(tasks), NEW_TOKENS, dtype=batch["input_ids"].dtype)
    with torch.no_grad():
        for rows, ids, mask, full_mask, cache, length in _task_groups(bank, batch, tasks):
            positions = None
            if _forward_takes(model, "position_ids"):
                positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0) + length
            for step in range(NEW_TOKENS):
                logits = _cache_oracle_step(model, ids, full_mask, positions, cache).logits[:, -1]
                if steps[step] is None:
                    steps[step] = logits.new_zeros(len(tasks), logits.shape[-1])
                steps[step][rows] = logits
                ids = logits.masked_fill(torch.arange(logits.shape[-1]) == EOS, -math.inf).argmax(-1, keepdim=True)
                new[rows, step] = ids[:, 0]
                full_mask = torch.cat([full_mask, torch.ones_like(ids)], 1)
                positions = None if positions is None else positions[:, -1:] + 1
    return torch.cat([batch["input_ids"], new], 1), steps


ORACLE_NAME = "ptv2_test_oracle"
_ORACLE_ATTR = "_ptv2_test_oracle_prefix"


def oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over ``[prefix ; keys]`` in float64 by hand: the prefix set on the module for this call's samples
    (visible within each sample's prefix length, never masked or biased), the sequence keys under the mask (and
    T5's position bias) that transformers made for the model; Gemma2's score cap on every score, GPT-OSS's sinks
    (one logit per head) in every row's normalizer."""
    batch, heads, queries, dim = query.shape
    prefix_k, prefix_v, visible = module.__dict__.get(_ORACLE_ATTR) or (
        key.new_zeros(batch, key.shape[1], 0, dim), value.new_zeros(batch, value.shape[1], 0, value.shape[-1]),
        torch.zeros(batch, 0, dtype=torch.bool))
    keys = torch.cat([prefix_k.to(key.dtype), key], 2).double().repeat_interleave(heads // key.shape[1], 1)
    values = torch.cat([prefix_v.to(value.dtype), value], 2).double().repeat_interleave(heads // key.shape[1], 1)
    scores = query.double() @ keys.transpose(-1, -2) * (scaling if scaling is not None else dim ** -0.5)
    if kwargs.get("softcap") is not None:
        scores = kwargs["softcap"] * torch.tanh(scores / kwargs["softcap"])
    length, count = prefix_k.shape[2], key.shape[2]
    sequence = scores[..., length:]
    if kwargs.get("position_bias") is not None:
        sequence = sequence + kwargs["position_bias"][..., -queries:, :count].double()
    if attention_mask is not None:
        mask = attention_mask[..., :count]
        sequence = sequence.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else sequence + mask.double()
    elif kwargs.get("is_causal", getattr(module, "is_causal", False)) and queries > 1:
        hidden = torch.ones(queries, count, dtype=torch.bool).triu(count - queries + 1)
        sequence = sequence.masked_fill(hidden, -math.inf)
    prefix = scores[..., :length].masked_fill(~visible[:, None, None, :], -math.inf)
    logits = torch.cat([prefix, sequence], -1)
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if sinks is not None:
        sink = sinks.double().view(1, heads, 1, 1).expand(batch, heads, queries, 1)
        logits = torch.cat([logits, sink], -1)
    weights = logits.softmax(-1)[..., :keys.shape[2]]
    out = weights @ values
    return out.transpose(1, 2).contiguous().to(query.dtype), None  # [B, N, H, D] memory, as transformers' own


def attention_oracle(model, bank):
    """``model`` (unpatched) switched to :func:`oracle_attention`, and a function that sets each bound attention's
    prefix (from ``bank``, with autograd) for the samples' tasks before a call."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ORACLE_NAME, oracle_attention)
    AttentionMaskInterface.register(ORACLE_NAME, eager_mask)
    model.set_attn_implementation(ORACLE_NAME)
    modules = {name: module for name, _, module in hf_transformers._attention_modules(model)}
    assert all(hf_transformers._calls_attention_interface(type(module)) for module in modules.values()), \
        "the attention oracle serves attentions that go through AttentionInterface (an adapter's: oracle=None)"

    def set_tasks(tasks):
        lengths = bank.prefix_lengths[tasks]
        visible = torch.arange(bank.prefix_len) < lengths[:, None]
        for slot, (key, value) in zip(bank.slots, bank()):
            modules[slot.name].__dict__[_ORACLE_ATTR] = (key[tasks], value[tasks], visible)

    return set_tasks


# ----------------------------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------------------------

def _head_parameters(model) -> set:
    """Names of an encoder's classification head: what it holds outside its base model."""
    prefix = model.base_model_prefix + "."
    return {name for name, _ in model.named_parameters() if not name.startswith(prefix)}


def _check_training(family: Family, model, bank, batch: dict):
    """freeze_backbone leaves the prefix and the head trainable; a mixed-task backward reaches exactly those,
    each task's prefix rows within its length and none beyond."""
    trainable = set(ptv2_kernels.freeze_backbone(model))
    bank_names = {"ptv2_prefix." + name for name, _ in bank.named_parameters()}
    head = _head_parameters(model) - bank_names if family.kind == "encoder" else set()
    assert trainable == bank_names | head, f"trainable: {sorted(trainable)}"
    output = model(**batch, task_ids=TASKS)
    logits = _logits(output, batch)
    assert torch.isfinite(logits).all()
    _weighted(logits).backward()
    with_grad = {name for name, param in model.named_parameters() if param.grad is not None}
    assert with_grad == trainable, f"gradients reached {sorted(with_grad ^ trainable)} unexpectedly"
    grad = _embedding_grad(bank)
    for task, length in enumerate(PREFIX_LENGTHS):
        assert grad[task, :length].abs().amax(-1).min() > 0, f"task {task}: a prefix row got no gradient"
        assert not grad[task, length:].any(), f"task {task}: rows past its prefix length got a gradient"
    for name in head:
        assert model.get_parameter(name).grad.abs().max() > 0, f"{name}: no gradient"
    return logits.detach()


def _check_samples_alone(model, batch: dict, mixed: torch.Tensor):
    with torch.no_grad():
        alone = torch.cat([_logits(model(**_rows(batch, [i]), task_ids=TASKS[i:i + 1]), _rows(batch, [i]))
                           for i in range(len(TASKS))])
    assert_close_scaled(alone, mixed, REL, "each sample alone against the mixed batch")


def _generate(model, batch: dict, **tasks):
    if "decoder_input_ids" in batch:  # an encoder-decoder's decoder continues its given tokens
        tasks["decoder_start_token_id"] = 0
    return model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=1, **tasks)


def _compare_generate(actual, sequences, logits):
    assert torch.equal(actual.sequences, sequences), f"{actual.sequences} != {sequences}"
    assert len(actual.logits) == len(logits) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(actual.logits, logits)):
        assert_close_scaled(a, b, REL, f"logits of generate step {step}")


def _check_against_cache_oracle(original, model, bank, batch: dict, mixed: torch.Tensor):
    """The patched decoder (positions shifted) against the unpatched one holding the prefix in its cache: the
    same logits and prefix gradients, and the same greedy generate."""
    oracle, oracle_bank = copy.deepcopy(original).requires_grad_(False), copy.deepcopy(bank)
    expected = _logits(cache_oracle_logits(oracle, oracle_bank, batch, TASKS), batch)
    assert_close_scaled(mixed, expected.detach(), REL, "logits")
    _weighted(expected).backward()
    assert_close_scaled(_embedding_grad(bank), _embedding_grad(oracle_bank), GRAD_REL, "prefix gradient")
    sequences, logits = cache_oracle_generate(oracle, oracle_bank, batch, TASKS)
    _compare_generate(_generate(model, batch, task_ids=TASKS), sequences, logits)


def _check_against_attention_oracle(family: Family, original, bank, batch: dict):
    """A copy patched with positions="unshifted" against the unpatched model attending over [prefix ; keys] in
    float64: logits, prefix gradients and (for generating models) greedy generate."""
    ours, ours_bank = copy.deepcopy(original), copy.deepcopy(bank)
    ptv2_kernels.patch(ours, ours_bank, backend="reference", positions="unshifted")
    oracle, oracle_bank = copy.deepcopy(original).requires_grad_(False), copy.deepcopy(bank)
    set_tasks = attention_oracle(oracle, oracle_bank)
    actual = _logits(ours(**batch, task_ids=TASKS), batch)
    set_tasks(TASKS)
    expected = _logits(oracle(**batch), batch)
    assert_close_scaled(actual, expected.detach(), REL, "logits")
    _weighted(actual).backward()
    _weighted(expected).backward()
    assert_close_scaled(_embedding_grad(ours_bank), _embedding_grad(oracle_bank), GRAD_REL, "prefix gradient")
    if family.kind != "encoder":
        with torch.no_grad():
            set_tasks(TASKS)
            wanted = _generate(oracle, batch)
            _compare_generate(_generate(ours, batch, task_ids=TASKS), wanted.sequences, wanted.logits)


def _works_params():
    """The families that patch serves; those with a known bug are expected to fail their checks."""
    def expected_failure(name):
        return pytest.mark.xfail(strict=True, raises=AssertionError, reason=BY_NAME[name].bug)

    return [pytest.param(name, marks=expected_failure(name)) if BY_NAME[name].bug else name for name in WORKING]


@pytest.mark.parametrize("name", _works_params())
def test_family_works(name):
    family = BY_NAME[name]
    _check_works(family, build(family))


def _check_works(family: Family, model):
    original = copy.deepcopy(model)
    batch = _batch(family)
    with torch.no_grad():
        unpatched = _logits(model(**batch), batch)
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    bank = _random_bank(model, family.position_bias)
    ptv2_kernels.patch(model, bank, backend="reference")
    mixed = _check_training(family, model, bank, batch)
    assert (mixed - unpatched).abs().max() > 1e-3 * unpatched.abs().max(), "the prefix made no difference"
    _check_samples_alone(model, batch, mixed)
    if family.check == "cache":
        _check_against_cache_oracle(original, model, bank, batch, mixed)
    elif family.check == "attention":
        _check_against_attention_oracle(family, original, bank, batch)
    ptv2_kernels.unpatch(model)
    # freeze_backbone's flags are the training check's doing, which unpatch leaves alone; they are reset so that the
    # comparison runs the same kernels: some of torch's CPU kernels round otherwise for weights that need no grad
    # (RecurrentGemma's on an AVX-512 CPU differ by 2e-7 with a frozen backbone, under no_grad).
    for name, param in model.named_parameters():
        param.requires_grad_(trainable[name])
    with torch.no_grad():
        restored = _logits(model(**batch), batch)
    assert torch.equal(restored, unpatched), "unpatch did not restore the unpatched outputs"


# The families with sliding-window layers, and the config that gives them a window of 3 keys (ModernBERT's reaches 2
# each way): shorter than the checks' sequences (6 tokens, a prefix of 2 or 3, 3 generated), so that the windows
# hide real tokens and, for a bank placed where a cache would hold it, prefix slots. Qwen2's family slides only
# with use_sliding_window, its first max_window_layers layers excepted.
SMALL_WINDOW = dict(sliding_window=3)
QWEN_WINDOW = dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)
SLIDING = {**{name: SMALL_WINDOW for name in (
    "mistral", "mixtral", "ministral", "gemma2", "gemma3_text", "vaultgemma", "cohere2", "olmo3", "exaone4",
    "exaone_moe", "starcoder2", "phi3", "gpt_oss", "modernbert-decoder", "afmoe", "cohere2_moe", "cwm", "granite_swa",
    "granitemoe_swa", "gemma4_text")},
    **{name: QWEN_WINDOW for name in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")},
    "modernbert": dict(local_attention=4)}


def _record_windows(monkeypatch) -> list:
    """The (window_size, attn_mask) of every call the integration makes to the op, from now on."""
    calls = []
    op = hf_transformers.prefix_attention

    def recording(*args, **kwargs):
        calls.append((kwargs.get("window_size"), kwargs.get("attn_mask")))
        return op(*args, **kwargs)

    monkeypatch.setattr(hf_transformers, "prefix_attention", recording)
    return calls


@pytest.mark.parametrize("name", sorted(SLIDING))
def test_sliding_window_family(name, monkeypatch):
    """A sliding layer reaches the op as its window_size, with no dense mask; the default bank's prefix stays
    visible to every query (against the attention oracle, which applies transformers' own windowed masks to the
    sequence keys only); a bank with position_bias="cached" loses the slots that the window passes, as the prefix
    in PEFT's cache does (against the cache oracle: logits, prefix gradients, generate)."""
    family = dataclasses.replace(BY_NAME[name], config={**BY_NAME[name].config, **SLIDING[name]})
    model = build(family)
    config = model.config.get_text_config()
    sliding_layers = sum(kind == "sliding_attention" for kind in getattr(config, "layer_types", None)
                         or ["sliding_attention"] * config.num_hidden_layers)
    assert 0 < sliding_layers
    reach = config.sliding_window if family.kind == "encoder" else config.sliding_window - 1
    batch = _batch(family)
    original = copy.deepcopy(model)

    bank = _random_bank(model)
    patched = copy.deepcopy(model)
    ptv2_kernels.patch(patched, bank, backend="reference")
    calls = _record_windows(monkeypatch)
    with torch.no_grad():
        patched(**batch, task_ids=TASKS)
    assert all(mask is None for _, mask in calls), "a dense mask reached the op"
    windows = [window for window, _ in calls if window is not None]
    assert windows == [(reach, reach if family.kind == "encoder" else 0)] * sliding_layers, calls
    _check_against_attention_oracle(family, original, bank, batch)

    if family.kind == "decoder":
        cached = _random_bank(model, position_bias="cached")
        ptv2_kernels.patch(model, cached, backend="reference")
        mixed = _logits(model(**batch, task_ids=TASKS), batch)
        _weighted(mixed).backward()
        _check_against_cache_oracle(original, model, cached, batch, mixed.detach())


def _assert_names(error: BaseException, family: Family, words: str):
    assert words in str(error), f"{family.name}: {error}"


@pytest.mark.parametrize("name", REFUSED)
def test_family_is_refused_at_patch(name):
    """patch (or PrefixBank.for_model before it) refuses the family, naming its type and why, and leaves the
    model as it was."""
    family = BY_NAME[name]
    model = build(family)
    if family.refused == NO_INTERFACE and hf_transformers._attention_modules(model):
        # a newer transformers routes this family's attention through the interface: then it must work
        _check_works(dataclasses.replace(family, refused=None), model)
        return
    batch = _batch(family)
    with torch.no_grad():
        before = _logits(model(**batch), batch)
    try:
        bank = _random_bank(model)
    except NotImplementedError as error:
        _assert_names(error, family, family.refused)
        bank = ptv2_kernels.PrefixBank([("layer.0", 2, 8)], prefix_len=2)
    with pytest.raises((NotImplementedError, ValueError)) as raised:
        ptv2_kernels.patch(model, bank, backend="reference")
    _assert_names(raised.value, family, family.refused)
    _assert_names(raised.value, family, repr(family.name))
    assert getattr(model, hf_transformers._STATE_ATTR, None) is None and not hasattr(model, "ptv2_prefix")
    with torch.no_grad():
        assert torch.equal(_logits(model(**batch), batch), before)


@pytest.mark.parametrize("name", FAILING)
def test_family_fails_at_forward(name):
    """A bug recorded as it stands: patch takes the family, and the first forward raises (patch should refuse
    it, or the op serve it; whoever changes either moves the family to its new status)."""
    family = BY_NAME[name]
    model = build(family)
    ptv2_kernels.patch(model, _random_bank(model), backend="reference")
    with pytest.raises((NotImplementedError, ValueError)) as raised:
        model(**_batch(family), task_ids=TASKS)
    _assert_names(raised.value, family, family.fails)


# ----------------------------------------------------------------------------------------------------------------
# docs/integration.md's table
# ----------------------------------------------------------------------------------------------------------------

CHECKED = {"cache": "cache oracle", "attention": "attention oracle", None: "its own test module"}


def doc_table() -> str:
    """The "Supported families" table of docs/integration.md, made from FAMILIES."""
    lines = ["| family | kind | model class | status | checked against |", "|---|---|---|---|---|"]
    for family in FAMILIES:
        if family.refused is not None or family.fails is not None:
            checked = "the error"
        else:
            checked = CHECKED[family.check]
        lines.append(f"| `{family.name}` | {family.kind} | `{_model_class_name(family)}` | {family.status} | "
                     f"{checked} |")
    return "\n".join(lines)


def test_doc_table_lists_the_families():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    missing = [family.name for family in FAMILIES if family.name not in CONFIG_MAPPING]
    if missing:  # the table names each family's model class, which only a transformers that has it knows
        pytest.skip(f"transformers {transformers.__version__} lacks {', '.join(missing)}")
    text = DOC.read_text()
    assert DOC_BEGIN in text and DOC_END in text, f"docs/integration.md lacks {DOC_BEGIN} ... {DOC_END}"
    shown = text.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0].strip()
    assert shown == doc_table(), ("docs/integration.md's supported-families table differs from FAMILIES: print "
                                  "the table with `python -m tests.test_integration_families` and paste it")


def test_families_are_listed_once_and_counted():
    assert len(BY_NAME) == len(FAMILIES), "a family is listed twice"
    works = [name for name in WORKING if BY_NAME[name].bug is None]
    assert len(works) >= 55
    counts = f"{len(works)} of the {len(FAMILIES)} families work"
    assert counts in DOC.read_text(), f"docs/integration.md should say {counts!r}"


if __name__ == "__main__":
    print(DOC_BEGIN)
    print(doc_table())
    print(DOC_END)
