"""The checkpoints users already have (ptv2_kernels/integrations/checkpoints.py).

* Official P-Tuning v2 checkpoints (BERT, RoBERTa; DeBERTa with explicit dims) and ChatGLM-style ones (GLM and GLM-4
  models): fake checkpoints with random weights are imported, and every layer's key/value must equal what the
  original ``get_prompt`` computes, written out below with plain torch ops (view, permute, split). For GLM the
  patched model's logits must also equal the unpatched model's with that prefix passed as its cache, ChatGLM's way
  (real tokens numbered from 0).
* PEFT export: ``peft.PeftModel.from_pretrained`` loads the adapter, ``PrefixBank.from_peft`` gives the same
  keys/values back, and the PEFT model's logits equal the bank-patched model's.
* Every invalid argument raises, naming it.

Float32 throughout; tiny random models built from configs (nothing is downloaded).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import ptv2_kernels
from ptv2_kernels.integrations import checkpoints
from ptv2_kernels.integrations.hf_peft import peft_prefix_tuning_problem
from ptv2_kernels.integrations.hf_transformers import cache_keyword, prefix_layout

from .hf_models import VOCAB, assert_close_scaled, decoder_model, encoder_model, logits_of, random_batch

transformers = pytest.importorskip("transformers")

REL = 1e-5
PROJECTIONS = [None, 24]  # no reparameterization, or an MLP with 24 hidden units


# ----------------------------------------------------------------------------------------------------------------
# Fake checkpoints and the original get_prompt math
# ----------------------------------------------------------------------------------------------------------------

def _random(shape, gen):
    return torch.randn(shape, generator=gen) * 0.5


def fake_encoder(key_prefix, prefix_len, width, embed_dim, projection, seed):
    """A prefix encoder's state dict: ``embedding`` ``[P, width]``, or ``[P, embed_dim]`` plus ``trans.0`` and
    ``trans.2`` (Linear(embed_dim, projection), Tanh, Linear(projection, width))."""
    gen = torch.Generator().manual_seed(seed)
    if projection is None:
        return {key_prefix + "embedding.weight": _random((prefix_len, width), gen)}
    return {key_prefix + "embedding.weight": _random((prefix_len, embed_dim), gen),
            key_prefix + "trans.0.weight": _random((projection, embed_dim), gen),
            key_prefix + "trans.0.bias": _random((projection,), gen),
            key_prefix + "trans.2.weight": _random((width, projection), gen),
            key_prefix + "trans.2.bias": _random((width,), gen)}


def official_checkpoint(layers, heads, head_dim, prefix_len, projection=None, seed=0):
    """THUDM/P-tuning-v2's PrefixEncoder: the MLP's input is the model's hidden size (heads * head_dim)."""
    hidden = heads * head_dim
    return fake_encoder("prefix_encoder.", prefix_len, layers * 2 * hidden, hidden, projection, seed)


def chatglm_checkpoint(layers, groups, channels, prefix_len, projection=None, seed=0):
    """ChatGLM's PrefixEncoder: the MLP's input is the full width, its hidden size the model's hidden_size."""
    width = layers * 2 * channels * groups
    return fake_encoder("transformer.prefix_encoder.", prefix_len, width, width, projection, seed)


def encoder_output(state, key_prefix, batch):
    """The prefix encoder's forward on ``arange(P)`` for each of ``batch`` samples: ``[B, P, F]``."""
    embedding = state[key_prefix + "embedding.weight"]
    tokens = torch.arange(embedding.shape[0]).unsqueeze(0).expand(batch, -1)
    out = torch.nn.functional.embedding(tokens, embedding)
    if key_prefix + "trans.0.weight" in state:
        out = torch.tanh(out @ state[key_prefix + "trans.0.weight"].T + state[key_prefix + "trans.0.bias"])
        out = out @ state[key_prefix + "trans.2.weight"].T + state[key_prefix + "trans.2.bias"]
    return out


def official_get_prompt(state, layers, heads, head_dim, batch=1):
    """P-tuning-v2's get_prompt: view [B, P, 2L, H, D], permute to [2L, B, H, P, D], split in pairs; one
    ``(key, value)`` of ``[B, H, P, D]`` per layer."""
    out = encoder_output(state, "prefix_encoder.", batch)
    prefix_len = out.shape[1]
    pairs = out.view(batch, prefix_len, layers * 2, heads, head_dim).permute([2, 0, 3, 1, 4]).split(2)
    return [(pair[0], pair[1]) for pair in pairs]


def chatglm_get_prompt(state, layers, groups, channels, batch=1):
    """ChatGLM's get_prompt: view [B, P, 2L, G, C], permute to [2L, P, B, G, C] (sequence first), split in pairs;
    returned per layer as ``(key, value)`` of ``[B, G, P, C]`` (transformers' cache layout)."""
    out = encoder_output(state, "transformer.prefix_encoder.", batch)
    prefix_len = out.shape[1]
    pairs = out.view(batch, prefix_len, layers * 2, groups, channels).permute([2, 1, 0, 3, 4]).split(2)
    return [(pair[0].permute(1, 2, 0, 3), pair[1].permute(1, 2, 0, 3)) for pair in pairs]


def assert_bank_matches(bank, expected, task=0, length=None):
    """Each slot's key and value of ``task`` (its first ``length`` virtual tokens) equal ``expected``'s layer."""
    with torch.no_grad():
        kv = bank()
    assert len(kv) == len(expected)
    for layer, ((key, value), (want_key, want_value)) in enumerate(zip(kv, expected)):
        length_ = length or want_key.shape[-2]
        torch.testing.assert_close(key[task, :, :length_], want_key[0], rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"layer {layer} key: {m}")
        torch.testing.assert_close(value[task, :, :length_], want_value[0], rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"layer {layer} value: {m}")


# ----------------------------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------------------------

def encoder_dims(model):
    config = model.config
    return config.num_hidden_layers, config.num_attention_heads, config.hidden_size // config.num_attention_heads


GLM_CLASSES = {"glm": ("GlmConfig", "GlmForCausalLM"), "glm4": ("Glm4Config", "Glm4ForCausalLM")}
GLM_DIMS = dict(layers=2, groups=2, channels=8)  # 4 query heads over 2 key/value groups, kv_channels 8


def glm_model(family, seed=0):
    config_class, model_class = GLM_CLASSES[family]
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=GLM_DIMS["layers"], num_attention_heads=4,
        num_key_value_heads=GLM_DIMS["groups"], head_dim=GLM_DIMS["channels"], intermediate_size=64,
        max_position_embeddings=64, attention_dropout=0.0, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval()


def deberta_config(family):
    common = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                  intermediate_size=64, max_position_embeddings=64)
    return (transformers.DebertaV2Config if family == "deberta-v2" else transformers.DebertaConfig)(**common)


# ----------------------------------------------------------------------------------------------------------------
# Official P-Tuning v2
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_official_checkpoint_layout(family, projection):
    model = encoder_model(family, "seq_cls")
    layers, heads, head_dim = encoder_dims(model)
    state = official_checkpoint(layers, heads, head_dim, prefix_len=5, projection=projection)
    bank = ptv2_kernels.PrefixBank.from_ptuning_v2(state, model)
    assert bank.model_type == family and bank.lengths() == [5]
    assert bank.encoder.reparameterized == (projection is not None)  # the MLP is kept, not folded
    expected = official_get_prompt(state, layers, heads, head_dim)
    assert_bank_matches(bank, expected)
    if projection is not None:
        assert_bank_matches(bank.fold(), expected)
        folded = ptv2_kernels.import_ptuning_v2(state, model, fold=True)
        assert not folded.encoder.reparameterized
        assert_bank_matches(folded, expected)


@pytest.mark.parametrize("file_name", ["pytorch_model.bin", "model.safetensors"])
def test_official_whole_model_checkpoint_from_a_directory(tmp_path, file_name):
    """The official code saves the whole model (backbone, classifier and prefix encoder) with the Trainer."""
    from safetensors.torch import save_file

    model = encoder_model("bert", "seq_cls")
    layers, heads, head_dim = encoder_dims(model)
    prefix = official_checkpoint(layers, heads, head_dim, prefix_len=4, projection=24)
    state = {**{f"bert.{name}": t for name, t in model.bert.state_dict().items()}, **prefix,
             "classifier.weight": model.classifier.weight.detach(), "classifier.bias": model.classifier.bias.detach()}
    state = {name: t.detach().clone().contiguous() for name, t in state.items()}
    if file_name.endswith(".safetensors"):
        save_file(state, tmp_path / file_name)
    else:
        torch.save(state, tmp_path / file_name)
    for checkpoint in (tmp_path, tmp_path / file_name, str(tmp_path / file_name)):
        bank = ptv2_kernels.import_ptuning_v2(checkpoint, model)
        assert_bank_matches(bank, official_get_prompt(prefix, layers, heads, head_dim))


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("family", ["deberta", "deberta-v2"])
def test_official_deberta_checkpoint_with_explicit_dims(family, projection):
    """The official DeBERTa code uses the same layout; the dims come from the config (no model needed)."""
    config = deberta_config(family)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = config.hidden_size // heads
    state = official_checkpoint(layers, heads, head_dim, prefix_len=3, projection=projection, seed=4)
    bank = ptv2_kernels.import_ptuning_v2(state, num_layers=layers, num_heads=heads, head_dim=head_dim,
                                          model_type=config.model_type)
    assert [slot.name for slot in bank.slots] == [f"layer.{i}" for i in range(layers)]
    assert bank.model_type == config.model_type
    assert_bank_matches(bank, official_get_prompt(state, layers, heads, head_dim))


@pytest.mark.parametrize("family", ["deberta", "deberta-v2"])
def test_official_deberta_checkpoint_for_the_model(family):
    """Once PrefixBank.for_model supports DeBERTa, the model gives the same bank as the explicit dims."""
    model_class = transformers.DebertaV2ForSequenceClassification if family == "deberta-v2" \
        else transformers.DebertaForSequenceClassification
    torch.manual_seed(0)
    model = model_class(deberta_config(family)).eval()
    try:
        prefix_layout(model)
    except NotImplementedError as error:
        pytest.skip(f"PrefixBank.for_model does not support {family} yet: {error}")
    layers, heads, head_dim = encoder_dims(model)
    state = official_checkpoint(layers, heads, head_dim, prefix_len=3)
    bank = ptv2_kernels.import_ptuning_v2(state, model)
    assert_bank_matches(bank, official_get_prompt(state, layers, heads, head_dim))


def test_several_checkpoints_make_a_multi_task_bank():
    """One checkpoint per task, each of its own length (one with an MLP, which is folded: tasks share a bank's)."""
    model = encoder_model("roberta", "seq_cls")
    layers, heads, head_dim = encoder_dims(model)
    first = official_checkpoint(layers, heads, head_dim, prefix_len=3, projection=24, seed=1)
    second = official_checkpoint(layers, heads, head_dim, prefix_len=6, seed=2)
    bank = ptv2_kernels.PrefixBank.from_ptuning_v2([first, second], model, task_names=["rte", "boolq"])
    assert bank.num_tasks == 2 and bank.lengths() == [3, 6] and bank.task_names == ["rte", "boolq"]
    assert not bank.encoder.reparameterized
    assert_bank_matches(bank, official_get_prompt(first, layers, heads, head_dim), task=0, length=3)
    assert_bank_matches(bank, official_get_prompt(second, layers, heads, head_dim), task=1, length=6)


# ----------------------------------------------------------------------------------------------------------------
# ChatGLM-style checkpoints on transformers' GLM models
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("family", sorted(GLM_CLASSES))
def test_chatglm_checkpoint_layout(family, projection):
    model = glm_model(family)
    state = chatglm_checkpoint(**GLM_DIMS, prefix_len=4, projection=projection)
    bank = ptv2_kernels.PrefixBank.from_chatglm_ptuning(state, model)
    assert bank.model_type == family
    assert [(slot.num_kv_heads, slot.head_dim) for slot in bank.slots] == [(2, 8)] * 2
    assert bank.encoder.reparameterized == (projection is not None)
    expected = chatglm_get_prompt(state, **GLM_DIMS)
    assert_bank_matches(bank, expected)
    explicit = ptv2_kernels.import_chatglm_ptuning(state, num_layers=2, multi_query_group_num=2, kv_channels=8)
    assert_bank_matches(explicit, expected)


def _glm_logits_with_cache(model, state, input_ids, mask):
    """The unpatched model with the prefix in its cache, ChatGLM's way: the prefix's mask columns are ones and the
    real tokens are numbered 0..N-1 (ChatGLM's get_position_ids), whatever the prefix."""
    from transformers import DynamicCache

    batch, length = input_ids.shape
    pairs = chatglm_get_prompt(state, **GLM_DIMS, batch=batch)
    prefix_len = pairs[0][0].shape[2]
    cache = DynamicCache(tuple((key.contiguous(), value.contiguous()) for key, value in pairs))
    full_mask = torch.cat([torch.ones(batch, prefix_len, dtype=mask.dtype), mask], dim=1)
    positions = torch.arange(length).unsqueeze(0).expand(batch, -1)
    return model(input_ids=input_ids, attention_mask=full_mask, position_ids=positions,
                 **{cache_keyword(): cache}).logits


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("family", sorted(GLM_CLASSES))
def test_chatglm_import_reproduces_the_cached_prefix(family, projection):
    model = glm_model(family)
    state = chatglm_checkpoint(**GLM_DIMS, prefix_len=3, projection=projection, seed=3)
    ours = copy.deepcopy(model)
    ptv2_kernels.patch(ours, ptv2_kernels.import_chatglm_ptuning(state, ours), backend="reference",
                       positions="unshifted")
    input_ids, mask = random_batch(2, 6, padding="right")
    with torch.no_grad():
        expected = _glm_logits_with_cache(model, state, input_ids, mask)
        actual = ours(input_ids=input_ids, attention_mask=mask).logits
        without_prefix = model(input_ids=input_ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close_scaled(actual[real], expected[real], REL, "logits")
    assert (without_prefix[real] - expected[real]).abs().max() > 1e-2, "the prefix made no difference"


# ----------------------------------------------------------------------------------------------------------------
# PEFT export
# ----------------------------------------------------------------------------------------------------------------

EXPORT_CASES = {  # model builder, PEFT task type
    "bert": (lambda: encoder_model("bert", "seq_cls"), "SEQ_CLS"),
    "bert-qa": (lambda: encoder_model("bert", "qa"), "QUESTION_ANS"),
    "roberta-token": (lambda: encoder_model("roberta", "token_cls"), "TOKEN_CLS"),
    "llama": (lambda: decoder_model("llama"), "CAUSAL_LM"),
    "glm": (lambda: glm_model("glm"), "CAUSAL_LM"),
}


def _random_bank(model, projection, seed=5):
    """A two-task bank of lengths 3 and 5 with random values (the MLP, when there is one, drawn too)."""
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=[3, 5], task_names=["a", "b"],
                                             projection_hidden=projection)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in bank.encoder.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return bank


def _load_peft(model, directory):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(model), directory).eval()


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_peft_export_round_trip(tmp_path, case, projection):
    pytest.importorskip("peft")
    build, task_type = EXPORT_CASES[case]
    model = build()
    bank = _random_bank(model, projection)
    directory = bank.save_peft(tmp_path / "adapter", task_type=task_type, task="b", model=model)
    assert (directory / checkpoints.PEFT_CONFIG_NAME).is_file()
    assert (directory / checkpoints.PEFT_WEIGHTS_NAME).is_file()
    loaded = _load_peft(model, directory)
    config = loaded.peft_config["default"]
    assert config.num_virtual_tokens == 5 and not config.prefix_projection
    back = ptv2_kernels.PrefixBank.from_peft(loaded)
    assert back.slots == bank.slots and back.lengths() == [5]
    with torch.no_grad():
        for (key, value), (want_key, want_value) in zip(back(), bank()):
            torch.testing.assert_close(key[0], want_key[1, :, :5], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(value[0], want_value[1, :, :5], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_peft_export_reproduces_the_bank(tmp_path, case):
    pytest.importorskip("peft")
    problem = peft_prefix_tuning_problem()
    if problem is not None:
        pytest.skip(f"PEFT's prefix tuning cannot be the reference here: {problem}")
    build, task_type = EXPORT_CASES[case]
    model = build()
    bank = _random_bank(model, projection=24)
    ptv2_kernels.export_peft_adapter(bank, tmp_path, task_type=task_type, task=0, model=model)
    peft_model = _load_peft(model, tmp_path)
    ours = copy.deepcopy(model)
    ptv2_kernels.patch(ours, bank, backend="reference", positions="shifted")
    input_ids, mask = random_batch(2, 6, padding="right")
    with torch.no_grad():
        expected = logits_of(peft_model(input_ids=input_ids, attention_mask=mask))
        actual = logits_of(ours(input_ids=input_ids, attention_mask=mask, task_ids=0))
    assert_close_scaled(actual, expected, REL, "logits")


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------

BERT_DIMS = (2, 2, 16)  # encoder_model("bert", ...): 2 layers, 2 heads, hidden 32


def _bert_state(**overrides):
    state = official_checkpoint(*BERT_DIMS, prefix_len=3, projection=24)
    for name, value in overrides.items():
        key = "prefix_encoder." + name.replace("__", ".")
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


IMPORT_ERRORS = {
    "no prefix encoder": (lambda: {"bert.pooler.dense.weight": torch.zeros(2, 2)}, {}, KeyError,
                          "no prefix encoder"),
    "wrong key_prefix": (lambda: _bert_state(), {"key_prefix": "encoder."}, KeyError, "key_prefix='encoder.'"),
    "part of an MLP": (lambda: _bert_state(trans__2__bias=None), {}, KeyError, "trans.2.bias"),
    "MLP input width": (lambda: _bert_state(trans__0__weight=torch.zeros(24, 31)), {}, ValueError,
                        r"trans\.0\.weight.*\[24, 32\]"),
    "MLP output width": (lambda: _bert_state(trans__2__bias=torch.zeros(7)), {}, ValueError, r"trans\.2\.bias"),
    "embedding not 2-D": (lambda: {"prefix_encoder.embedding.weight": torch.zeros(128)}, {}, ValueError, "2-D"),
    "integer embedding": (lambda: {"prefix_encoder.embedding.weight": torch.zeros(3, 128, dtype=torch.long)}, {},
                          ValueError, "floating-point"),
    "unknown keys": (lambda: _bert_state(lstm__weight=torch.zeros(2)), {}, ValueError, "lstm.weight"),
    "several encoders": (lambda: {**_bert_state(), "transformer.prefix_encoder.embedding.weight": torch.zeros(3, 4)},
                         {}, ValueError, "several prefix encoders"),
    "layer count": (lambda: official_checkpoint(3, 2, 16, prefix_len=3), {}, ValueError,
                    "holds 3 layers, not 2"),
    "width": (lambda: {"prefix_encoder.embedding.weight": torch.zeros(3, 100)}, {}, ValueError,
              "100 numbers per virtual token.*needs 128"),
    "model and dims": (lambda: _bert_state(), {"num_layers": 2}, ValueError, "not both"),
    "not a checkpoint": (lambda: 42, {}, TypeError, "checkpoint must be"),
    "fold not a bool": (lambda: _bert_state(), {"fold": "yes"}, TypeError, "fold must be a bool"),
    "bank_class": (lambda: _bert_state(), {"bank_class": dict}, TypeError, "bank_class must be PrefixBank"),
    "empty list": (lambda: [], {}, ValueError, "empty list"),
}


@pytest.mark.parametrize("case", sorted(IMPORT_ERRORS))
def test_import_errors(case):
    make, kwargs, error, match = IMPORT_ERRORS[case]
    model = encoder_model("bert", "seq_cls")
    with pytest.raises(error, match=match):
        ptv2_kernels.import_ptuning_v2(make(), model, **kwargs)


@pytest.mark.parametrize("dims, match", [
    (dict(num_layers=2), "missing: num_heads, head_dim"),
    (dict(num_layers=2, num_heads=2, head_dim=0), "head_dim must be a positive int"),
    (dict(num_layers=4, num_heads=2, head_dim=16), "holds 2 layers, not 4"),
])
def test_import_errors_without_a_model(dims, match):
    with pytest.raises(ValueError, match=match):
        ptv2_kernels.import_ptuning_v2(_bert_state(), **dims)


def test_checkpoint_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file or directory"):
        ptv2_kernels.import_ptuning_v2(tmp_path / "missing.bin", num_layers=2, num_heads=2, head_dim=16)
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        ptv2_kernels.import_ptuning_v2(tmp_path, num_layers=2, num_heads=2, head_dim=16)
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not a state dict"):
        ptv2_kernels.import_ptuning_v2(tmp_path, num_layers=2, num_heads=2, head_dim=16)


def test_chatglm_import_errors():
    state = chatglm_checkpoint(**GLM_DIMS, prefix_len=3)
    with pytest.raises(ValueError, match="GLM models.*'bert'"):
        ptv2_kernels.import_chatglm_ptuning(state, encoder_model("bert", "seq_cls"))
    with pytest.raises(ValueError, match="missing: kv_channels"):
        ptv2_kernels.import_chatglm_ptuning(state, num_layers=2, multi_query_group_num=2)
    wider = chatglm_checkpoint(layers=2, groups=4, channels=8, prefix_len=3)
    with pytest.raises(ValueError, match="128 numbers per virtual token.*needs 64 = 2 layers x 2 x 2 key/value"):
        ptv2_kernels.import_chatglm_ptuning(wider, glm_model("glm"))


def test_export_errors(tmp_path):
    pytest.importorskip("peft")
    bank = _random_bank(encoder_model("bert", "seq_cls"), projection=None)
    with pytest.raises(TypeError, match="PrefixBank"):
        ptv2_kernels.export_peft_adapter(object(), tmp_path, task_type="SEQ_CLS", task=0)
    with pytest.raises(ValueError, match="task_type must be one of"):
        ptv2_kernels.export_peft_adapter(bank, tmp_path, task_type="CLASSIFY", task=0)
    with pytest.raises(ValueError, match="holds 2 tasks.*give task="):
        ptv2_kernels.export_peft_adapter(bank, tmp_path, task_type="SEQ_CLS")
    with pytest.raises(KeyError, match="unknown task name 'c'"):
        ptv2_kernels.export_peft_adapter(bank, tmp_path, task_type="SEQ_CLS", task="c")
    with pytest.raises(IndexError, match="out of range"):
        ptv2_kernels.export_peft_adapter(bank, tmp_path, task_type="SEQ_CLS", task=2)
    with pytest.raises(TypeError, match="task must be"):
        ptv2_kernels.export_peft_adapter(bank, tmp_path, task_type="SEQ_CLS", task=1.0)
    with pytest.raises(ValueError, match="model: a SEQ_CLS adapter also holds the task head"):
        ptv2_kernels.export_peft_adapter(bank, tmp_path, task_type="SEQ_CLS", task=0)
    with pytest.raises(ValueError, match="no module named 'qa_outputs'"):
        ptv2_kernels.export_peft_adapter(bank, tmp_path, task_type="QUESTION_ANS", task=0,
                                         model=encoder_model("bert", "seq_cls"))
    with pytest.raises(ValueError, match="built for model type 'bert', not 'llama'"):
        ptv2_kernels.export_peft_adapter(bank, tmp_path, task_type="CAUSAL_LM", task=0, model=decoder_model("llama"))
    with pytest.raises(TypeError, match="base_model_name_or_path"):
        ptv2_kernels.export_peft_adapter(bank, tmp_path, task_type="CAUSAL_LM", task=0, base_model_name_or_path=3)
    seq2seq = ptv2_kernels.PrefixBank([("encoder.0", 2, 4), ("decoder.0", 2, 4)], prefix_len=2)
    with pytest.raises(ValueError, match="one stack of layers"):
        ptv2_kernels.export_peft_adapter(seq2seq, tmp_path, task_type="SEQ_2_SEQ_LM")
    mixed = ptv2_kernels.PrefixBank([("layer.0", 2, 4), ("layer.1", 1, 4)], prefix_len=2)
    with pytest.raises(ValueError, match="same key/value heads"):
        ptv2_kernels.export_peft_adapter(mixed, tmp_path, task_type="CAUSAL_LM")
    assert not list(tmp_path.iterdir()), "a failed export wrote files"
