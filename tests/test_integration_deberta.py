"""patch() on DeBERTa and DeBERTa-v2 with their task heads, against a hand-written oracle of the official P-Tuning v2
attention (THUDM/P-tuning-v2, model/deberta.py and model/debertaV2.py).

PEFT cannot be the reference: its prefix reaches DeBERTa as a cache, which DeBERTa's attention does not read. The
oracle takes the unpatched transformers module's own query/key/value and relative-position terms and does what the
official code does with them: the prefix concatenated in front of the keys and values, one scale for all keys, a
block of zeros in front of the relative terms, the padding mask with ones prepended for the prefix, a masked softmax
that zeroes a fully masked row, and the absolute positions shifted by the prefix length. Each task's samples run
through the oracle on their own, with their task's prefix length; the patched model runs them all in one batch.
Float32 on both sides: the bound is 1e-5 of the largest value (as for the encoders against PEFT).
"""

from __future__ import annotations

import copy
import functools
import math
import pickle
import types

import pytest
import torch

import ptv2_kernels
from ptv2_kernels.integrations import deberta as deberta_adapter
from ptv2_kernels.integrations import hf_transformers

from .hf_models import (VOCAB, ShapeRecorder, assert_close_scaled, assert_matches_oracle, loss_of, random_batch,
                        seeded_bank)

transformers = pytest.importorskip("transformers")

REL = 1e-5
HEADS = ("seq_cls", "token_cls", "qa", "multiple_choice")
# Tiny configs covering the attention's options: DeBERTa with both relative terms and absolute positions in the
# input; DeBERTa-v2 as DeBERTa-v3 configures it (keys shared with the relative embeddings, log-bucketed positions,
# layer-normed relative embeddings, no absolute positions); DeBERTa-v2 with its own relative projections, one
# relative term (so another scale), the convolution after the first layer, and absolute positions.
CONFIGS = {
    "deberta": ("Deberta", dict(relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=8,
                                position_biased_input=True)),
    "deberta-v2": ("DebertaV2", dict(relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True,
                                     position_buckets=8, max_relative_positions=16, norm_rel_ebd="layer_norm",
                                     position_biased_input=False)),
    "deberta-v2-conv": ("DebertaV2", dict(relative_attention=True, pos_att_type=["c2p"], share_att_key=False,
                                          max_relative_positions=5, conv_kernel_size=3, conv_act="gelu",
                                          position_biased_input=True)),
}
LENGTHS = [2, 5]  # two tasks of different prefix lengths
TASK_IDS = [1, 0, 1, 0]


def deberta_model(name: str, head: str, seed: int = 0, **overrides):
    prefix, options = CONFIGS[name]
    suffix = {"seq_cls": "ForSequenceClassification", "token_cls": "ForTokenClassification",
              "qa": "ForQuestionAnswering", "multiple_choice": "ForMultipleChoice", "base": "Model"}[head]
    model_class = getattr(transformers, prefix + suffix, None)
    if model_class is None:
        pytest.skip(f"this transformers has no {prefix + suffix}")
    config_class = transformers.DebertaConfig if prefix == "Deberta" else transformers.DebertaV2Config
    settings = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    max_position_embeddings=64, num_labels=2 if head == "qa" else 3, pad_token_id=1)
    config = config_class(**{**settings, **options, **overrides})
    torch.manual_seed(seed)
    return model_class(config).eval()


def random_bank(model, lengths=LENGTHS):
    return seeded_bank(model, lengths)


def attention_modules(model):
    return [m for m in model.modules() if type(m).__name__ == "DisentangledSelfAttention"]


# ----------------------------------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------------------------------

def official_attention(module, hidden_states, attention_mask, output_attentions=False, query_states=None,
                       relative_pos=None, rel_embeddings=None, *, prefix_k, prefix_v, padding):
    """One attention layer as the official P-Tuning v2 code computes it with a prefix ``[H, L, D]`` of its own.

    ``padding`` is the samples' ``[B, N]`` attention mask; the model's own 4-D mask is not read: the official code
    builds its mask from ``[ones(L); padding]``."""
    batch, length, _ = hidden_states.shape
    heads = module.num_attention_heads
    if hasattr(module, "query_proj"):  # DeBERTa-v2: [B * H, N, D] tensors
        query = module.transpose_for_scores(module.query_proj(hidden_states), heads)
        key = module.transpose_for_scores(module.key_proj(hidden_states), heads)
        value = module.transpose_for_scores(module.value_proj(hidden_states), heads)
        factor = 1 + ("c2p" in module.pos_att_type) + ("p2c" in module.pos_att_type)
        terms = module.disentangled_attention_bias(query, key, relative_pos, module.pos_dropout(rel_embeddings),
                                                   factor)
        query, key, value = (t.view(batch, heads, length, -1) for t in (query, key, value))
        terms = terms.view(batch, heads, length, length)
        query = query / math.sqrt(query.shape[-1] * factor)
    else:  # DeBERTa: [B, H, N, D], the query scaled before the relative terms
        query, key, value = module.transpose_for_scores(module.in_proj(hidden_states)).chunk(3, dim=-1)
        query = query + module.transpose_for_scores(module.q_bias[None, None, :])
        value = value + module.transpose_for_scores(module.v_bias[None, None, :])
        factor = 1 + len(module.pos_att_type)
        query = query / math.sqrt(query.shape[-1] * factor)
        terms = module.disentangled_att_bias(query, key, relative_pos, module.pos_dropout(rel_embeddings), factor)
    prefix_len = prefix_k.shape[1]
    keys = torch.cat([prefix_k.expand(batch, -1, -1, -1), key], dim=2)
    values = torch.cat([prefix_v.expand(batch, -1, -1, -1), value], dim=2)
    scores = query @ keys.transpose(-1, -2)  # one scale for prefix and sequence keys
    scores = scores + torch.cat([terms.new_zeros(batch, heads, length, prefix_len), terms], dim=-1)
    full = torch.cat([torch.ones(batch, prefix_len, dtype=padding.dtype), padding], dim=1).bool()
    visible = (full[:, None, :, None] & full[:, None, None, :])[:, :, prefix_len:, :]  # the real tokens' rows
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).masked_fill(~visible, 0.0)
    context = (probs @ values).permute(0, 2, 1, 3).reshape(batch, length, -1)
    return context, None


def oracle_outputs(model, bank, batch, task_ids, lengths):
    """Each task's samples through ``model`` (unpatched) with the official attention over that task's prefix, the
    positions shifted by its length; the outputs, in the batch's order, and the bank whose gradients they reach."""
    bank = copy.deepcopy(bank)
    kv = bank()
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    length = input_ids.shape[-1]
    task_ids = torch.tensor(task_ids)
    outputs = {}
    for task, prefix_len in enumerate(lengths):
        rows = (task_ids == task).nonzero().flatten()
        if rows.numel() == 0:
            continue
        ids, padding = input_ids[rows], mask[rows]
        for module, (prefix_k, prefix_v) in zip(attention_modules(model), kv):
            module.forward = functools.partial(official_attention, module, prefix_k=prefix_k[task, :, :prefix_len],
                                               prefix_v=prefix_v[task, :, :prefix_len],
                                               padding=padding.reshape(-1, length))
        position_ids = (torch.arange(length) + prefix_len).expand(*ids.shape).contiguous()
        try:
            outputs[task] = (rows, model(input_ids=ids, attention_mask=padding, position_ids=position_ids))
        finally:
            for module in attention_modules(model):
                del module.forward
    names = [name for name in ("logits", "start_logits", "end_logits") if getattr(outputs[0][1], name, None) is not None]
    merged = {}
    for name in names:
        first = getattr(outputs[0][1], name)
        value = first.new_empty((len(task_ids),) + first.shape[1:])
        for rows, output in outputs.values():
            value = value.index_copy(0, rows, getattr(output, name))
        merged[name] = value
    return types.SimpleNamespace(**merged), bank


def test_the_oracle_without_a_prefix_is_the_unpatched_model():
    """With an empty prefix the oracle gives what transformers' module gives (on the real tokens: a padding token's
    row is all masked, which transformers fills with a uniform average and the official softmax with zeros)."""
    for name in CONFIGS:
        model = deberta_model(name, "token_cls")
        bank = random_bank(model, lengths=[1])
        input_ids, mask = random_batch(3, 7, padding="right", seed=2)
        with torch.no_grad():
            expected = model(input_ids=input_ids, attention_mask=mask).logits
            kv = bank()
            for module, (prefix_k, prefix_v) in zip(attention_modules(model), kv):
                module.forward = functools.partial(official_attention, module, prefix_k=prefix_k[0, :, :0],
                                                   prefix_v=prefix_v[0, :, :0], padding=mask)
            actual = model(input_ids=input_ids, attention_mask=mask).logits
        real = mask.bool()
        assert_close_scaled(actual[real], expected[real], REL, name)


# ----------------------------------------------------------------------------------------------------------------
# The patched model against the oracle
# ----------------------------------------------------------------------------------------------------------------

def _batch(head: str, seed: int = 5):
    if head == "multiple_choice":
        input_ids, mask = random_batch(len(TASK_IDS), 7, padding="right", choices=2, seed=seed)
    else:
        input_ids, mask = random_batch(len(TASK_IDS), 7, padding="right", seed=seed)
    return dict(input_ids=input_ids, attention_mask=mask)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_the_official_attention(name, head, backend):
    """Two tasks of prefix lengths 2 and 5 mixed in one padded batch: the logits, the prefix gradients and every
    backbone gradient (the relative terms' gradients reach their projections) equal the oracle's."""
    model = deberta_model(name, head)
    oracle_model = copy.deepcopy(model)
    bank = random_bank(model)
    ptv2_kernels.patch(model, bank, backend=backend)
    batch = _batch(head)
    expected, oracle_bank = oracle_outputs(oracle_model, bank, batch, TASK_IDS, LENGTHS)
    actual = model(**batch, task_ids=TASK_IDS)
    assert_matches_oracle(model, actual, bank, oracle_model, expected, oracle_bank, REL)


def test_the_task_ids_matter_and_positions_shift():
    """The samples' tasks change the result, and so does positions='unshifted' for a model with absolute positions
    (the oracle's shifted positions are the official ones)."""
    model = deberta_model("deberta", "seq_cls")
    bank = random_bank(model)
    unshifted = copy.deepcopy(model)
    ptv2_kernels.patch(model, bank, backend="reference")
    ptv2_kernels.patch(unshifted, copy.deepcopy(bank), positions="unshifted", backend="reference")
    batch = _batch("seq_cls")
    with torch.no_grad():
        mixed = model(**batch, task_ids=TASK_IDS).logits
        swapped = model(**batch, task_ids=[1 - t for t in TASK_IDS]).logits
        other = unshifted(**batch, task_ids=TASK_IDS).logits
    assert (mixed - swapped).abs().max() > 1e-3
    assert (mixed - other).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# What reaches the op, and what never gets made
# ----------------------------------------------------------------------------------------------------------------

def test_the_op_gets_the_relative_terms_as_bias_and_the_deberta_scale(monkeypatch):
    calls = []
    original = deberta_adapter.prefix_attention

    def spy(q, k, v, prefix_k, prefix_v, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(prefix_k.shape), tuple(kwargs["attn_bias"].shape),
                      tuple(kwargs["attn_mask"].shape), kwargs["attn_mask"].dtype, kwargs["scale"],
                      kwargs["key_padding_mask"] if "key_padding_mask" in kwargs else None,
                      kwargs["prefix_index"].tolist()))
        return original(q, k, v, prefix_k, prefix_v, **kwargs)

    monkeypatch.setattr(deberta_adapter, "prefix_attention", spy)
    for name, factor in (("deberta", 3), ("deberta-v2", 3), ("deberta-v2-conv", 2)):
        calls.clear()
        model = deberta_model(name, "seq_cls")
        ptv2_kernels.patch(model, random_bank(model), backend="reference")
        with torch.no_grad():
            model(**_batch("seq_cls"), task_ids=TASK_IDS)
        call = ((4, 2, 7, 16), (4, 2, 7, 16), (2, 2, 5, 16), (4, 2, 7, 7), (4, 1, 7, 7), torch.bool,
                1 / math.sqrt(16 * factor), None, TASK_IDS)
        assert calls == [call, call], name


def test_no_tensor_of_the_concatenated_size_is_made():
    """No [.., P + N, D] keys and no [.., N, P + N] scores anywhere in the patched model's forward and backward
    (the op runs as one call here; tests/test_native_backend.py checks the same inside the native backend)."""
    prefix_len, length = 5, 7

    for name in CONFIGS:
        model = deberta_model(name, "token_cls")
        ptv2_kernels.patch(model, random_bank(model, lengths=[prefix_len]))
        input_ids, mask = random_batch(3, length, padding="right", seed=1)
        with ShapeRecorder() as shapes:
            loss_of(model(input_ids=input_ids, attention_mask=mask)).backward()
        assert len(shapes.seen) > 100
        widened = [s for s in shapes.seen if prefix_len + length in s[-2:]]
        assert not widened, f"{name}: {widened[:5]}"


# ----------------------------------------------------------------------------------------------------------------
# Patch, unpatch, copies, training
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_for_model_builds_one_slot_per_layer(name):
    model = deberta_model(name, "seq_cls", num_hidden_layers=3, num_attention_heads=4)
    bank = ptv2_kernels.PrefixBank.for_model(model, prefix_len=4)
    assert [tuple(slot) for slot in bank.slots] == [(f"layer.{i}", 4, 8) for i in range(3)]
    assert bank.model_type == model.config.model_type


def test_unpatch_restores_the_modules():
    model = deberta_model("deberta-v2", "token_cls")
    untouched = copy.deepcopy(model)
    input_ids, mask = random_batch(2, 6, padding="right")
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=mask).logits
        with ptv2_kernels.patch(model, random_bank(model)):
            assert all(isinstance(m.forward, deberta_adapter.DisentangledPrefixForward)
                       for m in attention_modules(model))
            assert model.config._attn_implementation == untouched.config._attn_implementation
            patched = model(input_ids=input_ids, attention_mask=mask, task_ids=[0, 1]).logits
        after = model(input_ids=input_ids, attention_mask=mask).logits
    assert all("forward" not in m.__dict__ and not hasattr(m, hf_transformers._BINDING_ATTR)
               for m in attention_modules(model))
    assert not hasattr(model, "ptv2_prefix")
    assert (patched - before).abs().max() > 1e-3
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(after, untouched(input_ids=input_ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_a_patched_model_deep_copies_and_pickles():
    model = deberta_model("deberta", "seq_cls")
    ptv2_kernels.patch(model, random_bank(model), backend="reference")
    batch = _batch("seq_cls")
    with torch.no_grad():
        expected = model(**batch, task_ids=TASK_IDS).logits
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert all(m.forward.module is m for m in attention_modules(twin))
            torch.testing.assert_close(twin(**batch, task_ids=TASK_IDS).logits, expected, rtol=0, atol=0)


def test_freeze_backbone_keeps_the_head_and_the_prefix():
    model = deberta_model("deberta-v2", "seq_cls")
    ptv2_kernels.patch(model, random_bank(model), backend="reference")
    assert ptv2_kernels.freeze_backbone(model) == ["pooler.dense.weight", "pooler.dense.bias", "classifier.weight",
                                                   "classifier.bias", "ptv2_prefix.encoder.embedding.weight"]


def _enable_checkpointing(model):
    # transformers 5.24 renamed it activation checkpointing (the old name warns)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def test_gradient_checkpointing_with_one_task():
    """The recomputed layers attend over the same prefix: the gradients equal those without checkpointing."""
    model = deberta_model("deberta", "seq_cls")
    bank = random_bank(model, lengths=[3])
    ptv2_kernels.patch(model, bank, backend="reference")
    ptv2_kernels.freeze_backbone(model)
    model.train()
    batch = dict(_batch("seq_cls"), labels=torch.tensor([0, 1, 2, 1]))
    model(**batch).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    _enable_checkpointing(model)
    model(**batch).loss.backward()
    for name, grad in plain.items():
        assert_close_scaled(dict(model.named_parameters())[name].grad, grad, 1e-6, name)


def test_gradient_checkpointing_with_several_tasks():
    """DeBERTa's layers pass no keyword arguments down; a layer recomputed during backward runs under the context
    of the forward it recomputes, so a mixed-task batch gets the gradients it gets without checkpointing."""
    model = deberta_model("deberta", "seq_cls")
    bank = random_bank(model)
    ptv2_kernels.patch(model, bank, backend="reference")
    model.train()
    batch = dict(_batch("seq_cls"), labels=torch.tensor([0, 1, 2, 1]), task_ids=TASK_IDS)

    def grads():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    _enable_checkpointing(model)
    checkpointed = grads()
    assert checkpointed.keys() == plain.keys()
    for name, grad in plain.items():
        assert_close_scaled(checkpointed[name], grad, 1e-6, name)


def test_training_with_dropout_runs_and_learns_only_the_prefix_and_head():
    model = deberta_model("deberta-v2", "seq_cls", attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1)
    bank = random_bank(model)
    ptv2_kernels.patch(model, bank)
    ptv2_kernels.freeze_backbone(model)
    model.train()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = dict(_batch("seq_cls"), labels=torch.tensor([0, 1, 2, 1]))
    losses = []
    for _ in range(3):
        loss = model(**batch, task_ids=TASK_IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)


def test_unsupported_options_say_so():
    model = deberta_model("deberta", "seq_cls", talking_head=True)
    ptv2_kernels.patch(model, random_bank(model), backend="reference")
    with pytest.raises(NotImplementedError, match="talking_head"):
        model(**_batch("seq_cls"), task_ids=TASK_IDS)


def test_packed_sequences_are_refused():
    """One row of packed sequences (position ids restarting, no attention mask): DeBERTa's relative positions would
    span the sequences, so the patched model says it does not serve them."""
    model = deberta_model("deberta-v2", "token_cls")
    ptv2_kernels.patch(model, random_bank(model), backend="reference")
    input_ids, _ = random_batch(1, 7)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with pytest.raises(NotImplementedError, match="DeBERTa does not serve packed"):
        model(input_ids=input_ids, position_ids=position_ids, task_ids=[0, 1])
