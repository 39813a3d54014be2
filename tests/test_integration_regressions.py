"""Regressions found by using patch() as a new user would: copying and pickling a patched model, banks that do
not fit the model, task_ids of the wrong length, task_ids after unpatch, what freeze_backbone leaves trainable,
prefix + tokens beyond the model's position table, and host reads (device synchronizations) per forward and per
decode step."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ptv2_kernels
from ptv2_kernels.integrations import hf_transformers

from .hf_models import decoder_model, encoder_model, random_batch

transformers = pytest.importorskip("transformers")

REL = 1e-5
GREEDY = dict(do_sample=False, pad_token_id=1)


def _patched(model, num_tasks=2, prefix_len=(2, 3), std=0.5, **kwargs):
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=num_tasks, prefix_len=list(prefix_len), **kwargs)
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, std)
    ptv2_kernels.patch(model, bank, backend="reference")
    return bank


def _bart(layers=2):
    config = transformers.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None)
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(config).eval()


# ----------------------------------------------------------------------------------------------------------------
# Item 5: deepcopy and whole-model pickling
# ----------------------------------------------------------------------------------------------------------------

def _assert_an_independent_patched_copy(original, clone, input_ids, mask, task_ids, unpatched_logits):
    """``clone`` is patched with its own bank, computes what ``original`` computes, and unpatches on its own."""
    state, clone_state = (getattr(m, "_ptv2_patch_state") for m in (original, clone))
    assert clone_state is not state and clone.ptv2_prefix is not original.ptv2_prefix
    assert clone_state.bank is clone.ptv2_prefix
    assert all(binding[0] is clone_state for binding in
               (m.__dict__["_ptv2_prefix_slot"] for m in clone.modules() if "_ptv2_prefix_slot" in m.__dict__))
    expected = original(input_ids=input_ids, attention_mask=mask, task_ids=task_ids).logits
    actual = clone(input_ids=input_ids, attention_mask=mask, task_ids=task_ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    other = [1 - t for t in task_ids]
    torch.testing.assert_close(clone(input_ids=input_ids, attention_mask=mask, task_ids=other).logits,
                               original(input_ids=input_ids, attention_mask=mask, task_ids=other).logits,
                               rtol=0, atol=0)
    # The copy's prefix is its own: changing it changes the copy only.
    with torch.no_grad():
        clone.ptv2_prefix.encoder.embedding.weight.add_(1.0)
    changed = clone(input_ids=input_ids, attention_mask=mask, task_ids=task_ids).logits
    assert (changed - expected).abs().max() > 1e-3
    torch.testing.assert_close(original(input_ids=input_ids, attention_mask=mask, task_ids=task_ids).logits,
                               expected, rtol=0, atol=0)
    ptv2_kernels.unpatch(clone)
    torch.testing.assert_close(clone(input_ids=input_ids, attention_mask=mask).logits, unpatched_logits,
                               rtol=0, atol=0)
    # The original is still patched and unchanged.
    torch.testing.assert_close(original(input_ids=input_ids, attention_mask=mask, task_ids=task_ids).logits,
                               expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_deepcopy_after_a_forward_with_grad(family):
    """The keep-the-best-model pattern: copy.deepcopy of a patched model in the middle of training."""
    model = encoder_model("bert", "seq_cls") if family == "bert" else decoder_model("llama")
    input_ids, mask = random_batch(2, 6, padding="right" if family == "bert" else "left", seed=2)
    with torch.no_grad():
        unpatched = model(input_ids=input_ids, attention_mask=mask).logits
    _patched(model)
    ptv2_kernels.freeze_backbone(model)
    model.train()
    model(input_ids=input_ids, attention_mask=mask, task_ids=[0, 1]).logits.sum().backward()
    best = copy.deepcopy(model)
    model.eval(), best.eval()
    _assert_an_independent_patched_copy(model, best, input_ids, mask, [0, 1], unpatched)


def test_deepcopy_keeps_generate_patched_and_bound_to_the_copy():
    model = decoder_model("llama")
    _patched(model, std=1.0)
    input_ids, mask = random_batch(2, 5, padding="left", seed=3)
    model(input_ids=input_ids, attention_mask=mask, task_ids=[1, 0]).logits.sum().backward()
    clone = copy.deepcopy(model)
    expected = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=[1, 0], max_new_tokens=4, **GREEDY)
    ptv2_kernels.unpatch(model)  # the copy's generate must not go through the original
    assert torch.equal(clone.generate(input_ids=input_ids, attention_mask=mask, task_ids=[1, 0], max_new_tokens=4,
                                      **GREEDY), expected)
    with pytest.raises(ValueError, match="task_ids"):
        clone.generate(input_ids=input_ids, attention_mask=mask, task_ids=[1, 0, 1], max_new_tokens=2, **GREEDY)


@pytest.mark.parametrize("after_forward", [False, True])
def test_torch_save_and_load_of_a_whole_patched_model(monkeypatch, after_forward):
    model = decoder_model("gpt2")
    input_ids, mask = random_batch(2, 6, padding="left", seed=4)
    with torch.no_grad():
        unpatched = model(input_ids=input_ids, attention_mask=mask).logits
    _patched(model)
    if after_forward:
        model(input_ids=input_ids, attention_mask=mask, task_ids=[0, 1]).logits.sum().backward()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    # As in a fresh process: nothing registered with transformers until the model is unpickled.
    from transformers import AttentionInterface, AttentionMaskInterface

    monkeypatch.delitem(AttentionInterface._global_mapping, hf_transformers.ATTENTION_NAME)
    monkeypatch.delitem(AttentionMaskInterface._global_mapping, hf_transformers.ATTENTION_NAME)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert hf_transformers.ATTENTION_NAME in AttentionInterface._global_mapping
    expected = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=[0, 1], max_new_tokens=3, **GREEDY)
    assert torch.equal(loaded.generate(input_ids=input_ids, attention_mask=mask, task_ids=[0, 1], max_new_tokens=3,
                                       **GREEDY), expected)
    _assert_an_independent_patched_copy(model, loaded, input_ids, mask, [0, 1], unpatched)


def test_unpatched_copy_of_a_patched_model_pickles():
    model = encoder_model("bert", "seq_cls")
    _patched(model)
    ptv2_kernels.unpatch(model)
    loaded = torch.load(io.BytesIO(_saved(model)), weights_only=False)
    input_ids, _ = random_batch(2, 5)
    torch.testing.assert_close(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def _saved(model) -> bytes:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Item 6: a bank for another layer count
# ----------------------------------------------------------------------------------------------------------------

def _bank_with_layers(model, layers, kv_heads, head_dim):
    return ptv2_kernels.PrefixBank([(f"layer.{i}", kv_heads, head_dim) for i in range(layers)], prefix_len=2,
                                   model_type=model.config.model_type)


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_bank_for_another_layer_count_is_rejected(tmp_path, family, layers):
    model = decoder_model("gpt2") if family == "gpt2" else encoder_model("bert", "seq_cls")
    bank = _bank_with_layers(model, layers, 2, 16)
    with pytest.raises(ValueError, match=rf"PrefixBank has {layers} .*layer.* but .* has 2"):
        ptv2_kernels.patch(model, bank)
    bank.save(tmp_path / "bank.safetensors")
    with pytest.raises(ValueError, match=rf"PrefixBank has {layers} .*layer.* but .* has 2"):
        ptv2_kernels.patch(model, ptv2_kernels.PrefixBank.load(tmp_path / "bank.safetensors"))
    assert model.config._attn_implementation != hf_transformers.ATTENTION_NAME
    assert not hasattr(model, "ptv2_prefix")


def test_encoder_decoder_bank_must_cover_each_of_its_roles():
    """A bank may prefix a subset of an encoder-decoder model's roles, but each role it has, it has in full."""
    model = _bart(layers=2)
    ptv2_kernels.patch(model, ptv2_kernels.PrefixBank.for_model(model, prefix_len=2, attentions=["decoder"]))
    ptv2_kernels.unpatch(model)
    short = ptv2_kernels.PrefixBank([("decoder.0", 2, 16)], prefix_len=2, model_type="bart")
    with pytest.raises(ValueError, match=r"1 'decoder' .* but .* has 2"):
        ptv2_kernels.patch(model, short)


# ----------------------------------------------------------------------------------------------------------------
# Item 7: task_ids: one per sample or one for the batch
# ----------------------------------------------------------------------------------------------------------------

def test_task_ids_of_another_length_are_rejected():
    model = encoder_model("bert", "seq_cls")
    _patched(model, num_tasks=3, prefix_len=(2, 3, 4))
    input_ids, mask = random_batch(4, 5, padding="right")
    for ids in ([0, 1], torch.tensor([0, 1]), [0, 1, 2, 0, 1, 2, 0, 1]):
        with pytest.raises(ValueError, match=rf"task_ids has {len(ids)} entries.*batch of 4"):
            model(input_ids=input_ids, attention_mask=mask, task_ids=ids)
    with pytest.raises(ValueError, match="task_ids"):
        model(input_ids=input_ids, attention_mask=mask, task_ids=torch.tensor([[0, 1], [1, 0]]))
    per_sample = model(input_ids=input_ids, attention_mask=mask, task_ids=[2, 2, 2, 2]).logits
    for one in (2, [2], torch.tensor(2), torch.tensor([2])):
        torch.testing.assert_close(model(input_ids=input_ids, attention_mask=mask, task_ids=one).logits, per_sample)


def test_multiple_choice_takes_one_task_id_per_question():
    model = encoder_model("bert", "multiple_choice")
    _patched(model, prefix_len=(2, 4))
    input_ids, mask = random_batch(3, 6, padding="right", choices=2, seed=5)
    mixed = model(input_ids=input_ids, attention_mask=mask, task_ids=[1, 0, 1]).logits
    for i, task in enumerate([1, 0, 1]):
        single = model(input_ids=input_ids[i:i + 1], attention_mask=mask[i:i + 1], task_ids=[task]).logits
        torch.testing.assert_close(mixed[i:i + 1], single, rtol=REL, atol=REL)
    with pytest.raises(ValueError, match="task_ids has 6 entries.*batch of 3"):
        model(input_ids=input_ids, attention_mask=mask, task_ids=[1, 1, 0, 0, 1, 1])  # one per choice: no


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_generate_repeats_task_ids_for_beams_and_return_sequences(family):
    """Beam search and num_return_sequences repeat each sample inside generate: each copy keeps its sample's task,
    and task_ids given for the repeated batch (or of another length) are an error."""
    model = decoder_model("llama") if family == "llama" else _bart()
    _patched(model, prefix_len=(2, 4), std=1.0)
    input_ids, mask = random_batch(3, 5, padding="left" if family == "llama" else "right", seed=6)
    tasks = [1, 0, 1]
    for options in (dict(num_beams=2), dict(num_beams=3, num_return_sequences=2)):
        out = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=tasks, max_new_tokens=3,
                             **options, **GREEDY)
        copies = options.get("num_return_sequences", 1)
        assert out.shape[0] == 3 * copies
        for i, task in enumerate(tasks):
            single = model.generate(input_ids=input_ids[i:i + 1], attention_mask=mask[i:i + 1], task_ids=task,
                                    max_new_tokens=3, **options, **GREEDY)
            assert torch.equal(out[i * copies:(i + 1) * copies, -3:], single[:, -3:])
    for wrong in ([1, 0], [1, 1, 0, 0, 1, 1]):
        with pytest.raises(ValueError, match=rf"task_ids has {len(wrong)} entries.*batch of 3"):
            model.generate(input_ids=input_ids, attention_mask=mask, task_ids=wrong, max_new_tokens=2, num_beams=2,
                           **GREEDY)


# ----------------------------------------------------------------------------------------------------------------
# Item 8: task_ids after unpatch
# ----------------------------------------------------------------------------------------------------------------

def test_task_ids_after_unpatch_are_an_error():
    model = decoder_model("llama")
    bank = _patched(model)
    input_ids, mask = random_batch(2, 5)
    ptv2_kernels.unpatch(model)
    with pytest.raises(TypeError, match="task_ids"):
        model(input_ids=input_ids, attention_mask=mask, task_ids=[0, 1])
    with pytest.raises((TypeError, ValueError), match="task_ids"):
        model.generate(input_ids=input_ids, attention_mask=mask, task_ids=[0, 1], max_new_tokens=2, **GREEDY)
    model(input_ids=input_ids, attention_mask=mask)  # without task_ids it runs as before patching
    # Patched again, task_ids work again; a pickled copy unpatched later rejects them too.
    ptv2_kernels.patch(model, bank, backend="reference")
    loaded = torch.load(io.BytesIO(_saved(model)), weights_only=False)
    for m in (model, loaded):
        m(input_ids=input_ids, attention_mask=mask, task_ids=[0, 1])
    ptv2_kernels.unpatch(loaded)
    with pytest.raises(TypeError, match="task_ids"):
        loaded(input_ids=input_ids, attention_mask=mask, task_ids=[0, 1])


# ----------------------------------------------------------------------------------------------------------------
# Item 9: freeze_backbone and LM heads
# ----------------------------------------------------------------------------------------------------------------

_TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, pad_token_id=1)


def _causal_lm(family):
    if family == "gpt2_untied":
        return decoder_model("gpt2", tie_word_embeddings=False)
    if family in ("llama", "qwen2", "mistral"):
        return decoder_model(family)
    config_class, model_class, extra = {
        "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2)),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(tie_word_embeddings=False)),
        "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(num_key_value_heads=2)),
        "glm": ("GlmConfig", "GlmForCausalLM", dict(num_key_value_heads=2, head_dim=8)),
    }[family]
    config = getattr(transformers, config_class)(**_TINY, **extra)
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2_untied", "phi3", "gpt_neox", "olmo", "glm"])
def test_freeze_backbone_freezes_an_untied_lm_head(family):
    model = _causal_lm(family)
    head = model.get_output_embeddings()
    assert head is not None and head.weight is not model.get_input_embeddings().weight  # untied
    ptv2_kernels.patch(model, ptv2_kernels.PrefixBank.for_model(model, prefix_len=2))
    assert ptv2_kernels.freeze_backbone(model) == ["ptv2_prefix.encoder.embedding.weight"]
    assert not head.weight.requires_grad
    trainable = ptv2_kernels.freeze_backbone(model, train_lm_head=True)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == trainable
    assert head.weight.requires_grad and len(trainable) == 1 + len(list(head.parameters()))
    assert all(name.startswith("ptv2_prefix.") or dict(model.named_parameters())[name] in set(head.parameters())
               for name in trainable)


def test_freeze_backbone_keeps_task_heads_and_freezes_lm_heads():
    classifier = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**_TINY, num_labels=3))
    ptv2_kernels.patch(classifier, ptv2_kernels.PrefixBank.for_model(classifier, prefix_len=2))
    assert ptv2_kernels.freeze_backbone(classifier) == ["score.weight", "ptv2_prefix.encoder.embedding.weight"]
    # A masked-LM head (transform and decoder bias included) is a language-model head too.
    mlm = transformers.BertForMaskedLM(transformers.BertConfig(**{**_TINY, "num_attention_heads": 2}))
    ptv2_kernels.patch(mlm, ptv2_kernels.PrefixBank.for_model(mlm, prefix_len=2))
    assert ptv2_kernels.freeze_backbone(mlm) == ["ptv2_prefix.encoder.embedding.weight"]
    assert "cls.predictions.transform.dense.weight" in ptv2_kernels.freeze_backbone(mlm, train_lm_head=True)
    # GPT-2's double-heads model: the multiple-choice head trains, the LM head does not.
    double = transformers.GPT2DoubleHeadsModel(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, tie_word_embeddings=False))
    ptv2_kernels.patch(double, ptv2_kernels.PrefixBank.for_model(double, prefix_len=2))
    trainable = ptv2_kernels.freeze_backbone(double)
    assert trainable and all(n.startswith(("multiple_choice_head.", "ptv2_prefix.")) for n in trainable)
    assert not double.lm_head.weight.requires_grad


# ----------------------------------------------------------------------------------------------------------------
# Item 10: prefix + tokens beyond the position table
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, limit, usable", [("gpt2", 64, 64), ("bert", 64, 64), ("roberta", 64, 62)])
def test_positions_beyond_the_table_are_a_clear_error(family, limit, usable):
    model = decoder_model("gpt2") if family == "gpt2" else encoder_model(family, "seq_cls")
    _patched(model, num_tasks=2, prefix_len=(8, 4))
    fits, _ = random_batch(2, usable - 8, seed=1)
    model(input_ids=fits, task_ids=[0, 0])  # exactly full: no error
    model(input_ids=torch.cat([fits, fits[:, :4]], 1), task_ids=1)  # the short task fits 4 more tokens
    too_long = torch.cat([fits, fits[:, :1]], 1)
    with pytest.raises(ValueError, match=rf"{limit}.*prefix of 8 tokens.*{usable - 7} tokens"):
        model(input_ids=too_long, task_ids=[0, 1])
    with pytest.raises(ValueError, match=rf"{limit}.*prefix of 8 tokens"):  # a device-side tensor of task ids
        model(input_ids=too_long, task_ids=torch.tensor([1, 0]))


def test_encoder_decoder_positions_beyond_the_table_are_a_clear_error():
    model = _bart()  # max_position_embeddings = 64; the encoder's and the decoder's positions are shifted
    _patched(model, num_tasks=1, prefix_len=(8,))
    decoder_ids, _ = random_batch(2, 3, seed=3)
    fits, _ = random_batch(2, 56, seed=3)
    model(input_ids=fits, decoder_input_ids=decoder_ids)
    with pytest.raises(ValueError, match="64.*prefix of 8 tokens.*57 tokens"):
        model(input_ids=torch.cat([fits, fits[:, :1]], 1), decoder_input_ids=decoder_ids)


def test_generate_beyond_the_position_table_is_a_clear_error():
    model = decoder_model("gpt2")
    _patched(model, num_tasks=1, prefix_len=(8,))
    input_ids, mask = random_batch(1, 50, seed=2)
    model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, **GREEDY)
    with pytest.raises(ValueError, match="64.*prefix of 8 tokens.*57 tokens"):
        model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, **GREEDY)


# ----------------------------------------------------------------------------------------------------------------
# Item 11: host reads per forward and per decode step
# ----------------------------------------------------------------------------------------------------------------

class _HostReads(TorchDispatchMode):
    """Counts the reads of tensor values by the host while ``active``: ``item``/``_local_scalar_dense`` (what
    ``int(t)``, ``bool(t)`` and ``t.item()`` dispatch to) and ``Tensor.tolist`` (which reads without dispatching).
    On a GPU each is a device synchronization; on the CPU nothing waits, but the calls are the same."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.active = False
        self.count = 0
        tolist = torch.Tensor.tolist

        def counting_tolist(tensor):
            if self.active:
                self.count += 1
            return tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _reads_per_forward(monkeypatch, model, run):
    """The host reads made inside each forward of ``model`` while ``run()`` runs (generate's own are not counted:
    they happen between forwards)."""
    reads = _HostReads(monkeypatch)
    per_forward = []

    def start(*_):
        reads.active, reads.count = True, 0

    def stop(*_):
        reads.active = False
        per_forward.append(reads.count)

    handles = [model.register_forward_pre_hook(start, prepend=True), model.register_forward_hook(stop)]
    try:
        with reads:
            run()
    finally:
        for handle in handles:
            handle.remove()
    return per_forward


@pytest.mark.parametrize("task_ids", ["list", "tensor", "int"])
def test_at_most_one_host_read_per_forward_and_none_per_decode_step(monkeypatch, task_ids):
    model = decoder_model("llama")
    _patched(model, num_tasks=3, prefix_len=(2, 3, 4))
    ids = {"list": [2, 0], "tensor": torch.tensor([2, 0]), "int": 1}[task_ids]
    input_ids, mask = random_batch(2, 5, padding="left", seed=7)
    with torch.no_grad():
        forwards = _reads_per_forward(monkeypatch, model,
                                      lambda: model(input_ids=input_ids, attention_mask=mask, task_ids=ids))
    assert forwards == [forwards[0]] and forwards[0] <= 1, forwards
    if task_ids == "tensor":  # the same tensor again: the op remembers it was checked
        with torch.no_grad():
            again = _reads_per_forward(monkeypatch, model,
                                       lambda: model(input_ids=input_ids, attention_mask=mask, task_ids=ids))
        assert again == [0], again
    for options in (dict(), dict(num_beams=2), dict(num_beams=2, num_return_sequences=2)):
        steps = _reads_per_forward(monkeypatch, model, lambda: model.generate(
            input_ids=input_ids, attention_mask=mask, task_ids=ids, max_new_tokens=4, min_new_tokens=4,
            **options, **GREEDY))
        assert len(steps) == 4 and steps[0] <= 1 and steps[1:] == [0, 0, 0], (options, steps)


def test_one_task_bank_reads_its_task_ids_once_per_generate(monkeypatch):
    model = decoder_model("gpt2")
    _patched(model, num_tasks=1, prefix_len=(3,))
    input_ids, mask = random_batch(2, 5, padding="left", seed=8)
    steps = _reads_per_forward(monkeypatch, model, lambda: model.generate(
        input_ids=input_ids, attention_mask=mask, task_ids=torch.tensor([0, 0]), max_new_tokens=4, min_new_tokens=4,
        **GREEDY))
    assert sum(steps) <= 1, steps
    with pytest.raises(IndexError, match="out of range"):
        model.generate(input_ids=input_ids, attention_mask=mask, task_ids=torch.tensor([0, 1]), max_new_tokens=2,
                       **GREEDY)


def test_key_value_heads_come_from_the_key_projection():
    """A BERT-type config may carry a num_key_value_heads its attention does not use: the bank follows the
    key projection's width (all heads), and the patched model runs."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
    config.num_key_value_heads = 2
    model = transformers.BertForSequenceClassification(config).eval()
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=1, prefix_len=3)
    assert {(slot.num_kv_heads, slot.head_dim) for slot in bank.slots} == {(4, 8)}
    ptv2_kernels.patch(model, bank, backend="reference")
    with torch.no_grad():
        assert model(input_ids=torch.randint(3, 90, (2, 5))).logits.shape == (2, 2)
