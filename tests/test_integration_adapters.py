"""patch() on the families served by the small adapters: GPT-Neo and Falcon (decoders) against the unpatched model
holding each task's prefix in its KV cache, as PEFT places it; MPNet (encoder) against a hand-written oracle.

Decoders. Each task's samples run through the unpatched model (a deep copy) with a ``DynamicCache`` that holds
that task's prefix in every layer and an attention mask with ones prepended for it; its positions start after the
prefix, as the patched model's do with ``positions="shifted"``. The patched model runs the tasks mixed in one
batch. Two deliberate differences of the patched model are built into the reference, not hidden:

* GPT-Neo's local layers: the patched model's window never hides the prefix (as every sliding window of a patched
  model), while a cached prefix slides out of it; the reference's local layers get their window buffer with the
  prefix columns visible (the window over the real tokens is GPT-Neo's own);
* Falcon's new decoder architecture broadcasts each group's key/value to its query heads before caching; the
  reference's cache holds the prefix broadcast the same way (the patched model caches each group once).

MPNet. The oracle replaces each unpatched ``MPNetSelfAttention``'s forward by the math written plainly: the
module's own projections, the prefix concatenated in front of keys and values, scores over ``sqrt(D)``, the
encoder's relative position bias on the real tokens' columns and zero on the prefix columns, padding hidden with
the prefix visible, the module's output projection; the absolute positions shifted by the prefix as MPNet counts
them (from ``padding_idx + 1``, padding keeping ``padding_idx``).

Float32 everywhere: the bound is 1e-5 of the largest value (the reference backend differs only in summation order).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import pickle
import types

import pytest
import torch

import ptv2_kernels
from ptv2_kernels.integrations import bloom as bloom_adapter
from ptv2_kernels.integrations import falcon as falcon_adapter
from ptv2_kernels.integrations import gpt_neo as gpt_neo_adapter
from ptv2_kernels.integrations import hf_transformers
from ptv2_kernels.integrations import mpnet as mpnet_adapter
from ptv2_kernels.integrations.hf_transformers import cache_keyword

from .hf_models import VOCAB, assert_close_scaled, assert_matches_oracle, random_batch, seeded_bank

transformers = pytest.importorskip("transformers")

REL = 1e-5
LENGTHS = [2, 5]  # two tasks of different prefix lengths
TASK_IDS = [1, 0, 1, 0]
GENERATE = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                pad_token_id=1)

# GPT-Neo alternating a global and a local layer whose window (3) is shorter than the sequences; Falcon in each
# fused layout (multi-query, one key/value per head, the new decoder architecture's groups), the SDPA (bool masks)
# and eager (additive float masks) implementations, with and without linear biases and parallel attention.
DECODERS = {
    "gpt_neo": ("GPTNeo", dict(attention_types=[[["global", "local"], 1]], window_size=3)),
    "falcon-multi-query": ("Falcon", dict()),
    "falcon-one-kv-per-head": ("Falcon", dict(multi_query=False, parallel_attn=False, bias=True)),
    "falcon-new-architecture": ("Falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "falcon-eager": ("Falcon", dict(new_decoder_architecture=True, num_kv_heads=2, attn_implementation="eager")),
    # ALiBi (a bank with position_bias="cached": the prefix keys biased as in the cache)
    "falcon-alibi": ("Falcon", dict(alibi=True)),
    "falcon-alibi-eager": ("Falcon", dict(alibi=True, multi_query=False, attn_implementation="eager")),
    "bloom": ("Bloom", dict()),
}
KV_HEADS = {"gpt_neo": 2, "falcon-multi-query": 1, "falcon-one-kv-per-head": 4, "falcon-new-architecture": 2,
            "falcon-eager": 2, "falcon-alibi": 1, "falcon-alibi-eager": 4, "bloom": 4}


def falcon_alibi_in_the_mask(model) -> bool:
    """Whether ``model`` is an ALiBi Falcon of transformers >= 5.25, whose attention goes through AttentionInterface
    and whose ALiBi is folded into the mask: patch refuses it (no adapter serves its modules any more)."""
    return (model.config.model_type == "falcon" and bool(model.config.alibi)
            and not served(model, falcon_adapter))


def decoder(name: str, seed: int = 0, refused_too: bool = False, **overrides):
    """The tiny model ``name``; the test skips where patch refuses it with this transformers (unless
    ``refused_too``)."""
    model = _decoder(name, seed, **overrides)
    if not refused_too and falcon_alibi_in_the_mask(model):
        pytest.skip("this transformers folds Falcon's ALiBi into the attention mask, and patch refuses such a model "
                    "(test_alibi_falcon_refused_where_its_alibi_is_in_the_mask)")
    return model


def _decoder(name: str, seed: int = 0, **overrides):
    family, options = DECODERS[name]
    options = {**options, **overrides}
    torch.manual_seed(seed)
    special = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    if family == "GPTNeo":
        config = transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                                           max_position_embeddings=64, embed_dropout=0.0, attention_dropout=0.0,
                                           resid_dropout=0.0, **special, **options)
        return transformers.GPTNeoForCausalLM(config).eval()
    if family == "Bloom":
        config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, attention_dropout=0.0,
                                          hidden_dropout=0.0, **special, **options)
        return transformers.BloomForCausalLM(config).eval()
    config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=64, attention_dropout=0.0, hidden_dropout=0.0,
                                       **special, **{"alibi": False, **options})
    return transformers.FalconForCausalLM(config).eval()


def uses_alibi(model) -> bool:
    return model.config.model_type == "bloom" or bool(getattr(model.config, "alibi", False))


def random_bank(model, lengths=LENGTHS, std: float = 0.5):
    """ALiBi models get a bank whose prefix keys ALiBi biases as the cache oracle's (position_bias="cached")."""
    return seeded_bank(model, lengths, std, position_bias="cached" if uses_alibi(model) else "none")


def served(model, adapter):
    return [m for m in model.modules() if adapter.serves(type(m))]


# ----------------------------------------------------------------------------------------------------------------
# The decoders' reference: the unpatched model with the prefix in its cache
# ----------------------------------------------------------------------------------------------------------------

def prefix_cache(model, kv, task: int, prefix_len: int, batch: int):
    """A DynamicCache holding ``task``'s prefix in every layer, for ``batch`` samples."""
    cache = transformers.DynamicCache(config=model.config)
    config = model.config
    # Falcon's own attention (transformers < 5.25, served by the adapter) caches each group's key and value once
    # per query head; through AttentionInterface it caches them once per group
    broadcast = config.num_attention_heads // config.num_kv_heads \
        if getattr(config, "new_decoder_architecture", False) and served(model, falcon_adapter) else 1
    for layer, (prefix_k, prefix_v) in enumerate(kv):
        keys, values = (t[task, :, :prefix_len].repeat_interleave(broadcast, dim=0).to(model.dtype)
                        for t in (prefix_k, prefix_v))
        cache.update(keys.expand(batch, *keys.shape), values.expand(batch, *values.shape), layer)
    return cache


@contextlib.contextmanager
def windows_show_the_prefix(model, prefix_len: int):
    """GPT-Neo's local layers with the first ``prefix_len`` key columns (the cached prefix) always visible."""
    local = [m for m in served(model, gpt_neo_adapter) if m.attention_type == "local"]
    saved = [m.bias for m in local]
    for module in local:
        bias = module.bias.clone()
        bias[..., :prefix_len] = True
        module.bias = bias
    try:
        yield
    finally:
        for module, bias in zip(local, saved):
            module.bias = bias


def per_task(task_ids):
    task_ids = torch.tensor(task_ids)
    return [(task, (task_ids == task).nonzero().flatten()) for task in range(len(LENGTHS))]


def cached_forward(model, bank, input_ids, mask, task_ids):
    """Each task's samples through ``model`` (unpatched) with that task's prefix in the cache: the logits, in the
    batch's order, and the bank copy whose gradients they reach."""
    bank = copy.deepcopy(bank)
    kv = bank()
    logits = None
    for task, rows in per_task(task_ids):
        prefix_len = LENGTHS[task]
        full_mask = torch.cat([torch.ones(len(rows), prefix_len, dtype=mask.dtype), mask[rows]], dim=1)
        with windows_show_the_prefix(model, prefix_len):
            out = model(input_ids=input_ids[rows], attention_mask=full_mask,
                        **{cache_keyword(): prefix_cache(model, kv, task, prefix_len, len(rows))}).logits
        logits = out.new_zeros((len(task_ids),) + out.shape[1:]) if logits is None else logits
        logits = logits.index_copy(0, rows, out)
    return logits, bank


def cached_generate(model, bank, input_ids, mask, task_ids):
    """Greedy generate of each task's samples by ``model`` (unpatched) with that task's prefix in the cache (the
    prefix's places in input_ids hold a placeholder token that generate skips as cached): new tokens and scores."""
    kv = bank()
    new = GENERATE["max_new_tokens"]
    tokens = torch.zeros(len(task_ids), new, dtype=torch.long)
    scores = [None] * new
    for task, rows in per_task(task_ids):
        prefix_len = LENGTHS[task]
        placeholder = torch.full((len(rows), prefix_len), 5, dtype=input_ids.dtype)
        ones = torch.ones(len(rows), prefix_len, dtype=mask.dtype)
        with windows_show_the_prefix(model, prefix_len), torch.no_grad():
            out = model.generate(input_ids=torch.cat([placeholder, input_ids[rows]], 1),
                                 attention_mask=torch.cat([ones, mask[rows]], 1),
                                 **{cache_keyword(): prefix_cache(model, kv, task, prefix_len, len(rows))},
                                 **GENERATE)
        tokens[rows] = out.sequences[:, -new:]
        for step, step_scores in enumerate(out.scores):
            if scores[step] is None:
                scores[step] = step_scores.new_zeros((len(task_ids),) + step_scores.shape[1:])
            scores[step][rows] = step_scores
    return tokens, scores


def _weighted(logits, seed=7):
    return (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))).sum()


# ----------------------------------------------------------------------------------------------------------------
# Decoders against the cached prefix
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_forward_matches_the_prefix_in_the_cache(name, padding):
    """Two tasks of prefix lengths 2 and 5 in one padded batch: the real tokens' logits, the prefix gradients and
    every backbone gradient equal the unpatched model's with each task's prefix in its cache."""
    model = decoder(name)
    reference = copy.deepcopy(model)
    bank = random_bank(model)
    ptv2_kernels.patch(model, bank, backend="reference")
    input_ids, mask = random_batch(len(TASK_IDS), 7, padding=padding, seed=len(padding))
    expected, reference_bank = cached_forward(reference, bank, input_ids, mask, TASK_IDS)
    actual = model(input_ids=input_ids, attention_mask=mask, task_ids=TASK_IDS).logits
    real = mask.bool()  # padded positions' outputs are not compared: nothing reads them
    assert_close_scaled(actual[real], expected[real], REL, "logits")
    _weighted(expected[real]).backward()
    _weighted(actual[real]).backward()
    assert_close_scaled(bank.encoder.embedding.weight.grad, reference_bank.encoder.embedding.weight.grad, REL,
                        "prefix gradient")
    reference_params = dict(reference.named_parameters())
    for param_name, param in model.named_parameters():
        if not param_name.startswith("ptv2_prefix.") and reference_params[param_name].grad.abs().max() > 0:
            assert_close_scaled(param.grad, reference_params[param_name].grad, REL, param_name)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_generate_matches_the_prefix_in_the_cache(name):
    """Greedy generate of a left-padded batch mixing both tasks: the tokens and each step's scores equal the
    unpatched model's generate from each task's prefix in its cache (decode steps go through the module's cache)."""
    model = decoder(name)
    reference = copy.deepcopy(model)
    bank = random_bank(model, std=1.0)
    ptv2_kernels.patch(model, bank, backend="reference")
    input_ids, mask = random_batch(len(TASK_IDS), 5, padding="left", seed=3)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=TASK_IDS, **GENERATE)
    tokens, scores = cached_generate(reference, bank, input_ids, mask, TASK_IDS)
    assert torch.equal(out.sequences[:, -GENERATE["max_new_tokens"]:], tokens)
    for step, (actual, expected) in enumerate(zip(out.scores, scores)):
        assert_close_scaled(actual, expected, REL, f"scores of step {step}")
    assert len(set(tokens.flatten().tolist())) > 1


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_slots_unpatch_and_cache(name):
    """for_model reads each layer's key/value heads (Falcon: 1 for multi-query, the groups of the new
    architecture); the cache holds the real tokens only, with those heads; unpatch restores the outputs exactly."""
    model = decoder(name)
    bank = ptv2_kernels.PrefixBank.for_model(model, prefix_len=3)
    assert [tuple(slot) for slot in bank.slots] == [(f"layer.{i}", KV_HEADS[name], 16 if name == "gpt_neo" else 8)
                                                    for i in range(2)]
    input_ids, mask = random_batch(2, 6, padding="left", seed=1)
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=mask).logits
        with ptv2_kernels.patch(model, bank, backend="reference"):
            out = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
            keys = out.past_key_values.layers[0].keys
            assert tuple(keys.shape) == (2, KV_HEADS[name], 6, keys.shape[-1])
        after = model(input_ids=input_ids, attention_mask=mask).logits
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not hasattr(model, "ptv2_prefix")
    assert (out.logits - before).abs().max() > 1e-3
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_gpt_neo_reaches_the_op_unscaled_with_its_windows(monkeypatch):
    """GPT-Neo's scores are unscaled (scale 1.0); the model's additive mask (causal, padding) reaches the op, in the
    local layer with its window: the last query sees the first key in the global layer only."""
    calls = []
    original = gpt_neo_adapter.prefix_attention

    def spy(q, k, v, prefix_k, prefix_v, **kwargs):
        mask = kwargs["attn_mask"]
        calls.append((kwargs["scale"], kwargs["causal"], tuple(mask.shape), mask.dtype, bool(mask[0, 0, 6, 0] == 0)))
        return original(q, k, v, prefix_k, prefix_v, **kwargs)

    monkeypatch.setattr(gpt_neo_adapter, "prefix_attention", spy)
    model = decoder("gpt_neo")
    ptv2_kernels.patch(model, random_bank(model), backend="reference")
    input_ids, mask = random_batch(len(TASK_IDS), 7, padding="left", seed=2)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=mask, task_ids=TASK_IDS)
    assert calls == [(1.0, False, (4, 1, 7, 7), torch.float32, True), (1.0, False, (4, 1, 7, 7), torch.float32, False)]


def test_gpt_neo_float16_scores_past_its_range(monkeypatch):
    """GPT-Neo computes its unscaled scores and softmax in float32, also in a float16 model; so does the op: with
    scores past float16's range (65504) the patched float16 model matches the unpatched one with the cached prefix
    (to float16's precision), without infinities."""
    largest = []
    original = gpt_neo_adapter.prefix_attention

    def spy(q, k, v, prefix_k, prefix_v, **kwargs):
        largest.append(float((q.float() @ k.float().transpose(-1, -2)).abs().max()))
        return original(q, k, v, prefix_k, prefix_v, **kwargs)

    monkeypatch.setattr(gpt_neo_adapter, "prefix_attention", spy)
    model = decoder("gpt_neo")
    with torch.no_grad():
        for module in served(model, gpt_neo_adapter):
            module.q_proj.weight.mul_(700.0)
            module.k_proj.weight.mul_(700.0)
    model = model.half()
    reference = copy.deepcopy(model)
    bank = random_bank(model)
    ptv2_kernels.patch(model, bank, backend="reference")
    input_ids, mask = random_batch(len(TASK_IDS), 7, padding="left", seed=4)
    with torch.no_grad():
        expected, _ = cached_forward(reference, bank, input_ids, mask, TASK_IDS)
        actual = model(input_ids=input_ids, attention_mask=mask, task_ids=TASK_IDS).logits
    assert max(largest) > 65504  # the scores pass float16's range
    real = mask.bool()
    assert actual.isfinite().all()
    assert_close_scaled(actual[real].float(), expected[real].float(), 2e-2, "float16 logits")


def test_gpt_neo_gradient_checkpointing_with_several_tasks():
    """GPT-Neo's layers pass no keyword arguments to the attention: recomputed under checkpointing, they still find
    their forward's tasks (the gradients equal those without checkpointing)."""
    model = decoder("gpt_neo")
    bank = random_bank(model)
    ptv2_kernels.patch(model, bank, backend="reference")
    ptv2_kernels.freeze_backbone(model)
    model.train()
    input_ids, mask = random_batch(len(TASK_IDS), 7, padding="left", seed=5)
    batch = dict(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=TASK_IDS, use_cache=False)
    model(**batch).loss.backward()
    plain = bank.encoder.embedding.weight.grad.clone()
    bank.zero_grad()
    # transformers 5.24 renamed it activation checkpointing (the old name warns)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model(**batch).loss.backward()
    assert_close_scaled(bank.encoder.embedding.weight.grad, plain, 1e-6, "prefix gradient")


def test_alibi_falcon_refused_where_its_alibi_is_in_the_mask():
    """transformers >= 5.25 adds Falcon's ALiBi to the sequence keys' mask before the attention: patch and
    PrefixBank.for_model refuse such a model, saying why, before changing it."""
    model = decoder("falcon-alibi", refused_too=True)
    if not falcon_alibi_in_the_mask(model):
        pytest.skip("this transformers' Falcon computes its attention itself: the family adapter serves ALiBi")
    with pytest.raises(NotImplementedError, match="folds Falcon's ALiBi into the attention mask"):
        ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=3)
    with pytest.raises(NotImplementedError, match="folds Falcon's ALiBi into the attention mask"):
        ptv2_kernels.patch(model, seeded_bank(decoder("falcon-multi-query"), LENGTHS, 0.5))
    assert not hasattr(model, "ptv2_prefix")


def test_a_patched_falcon_deep_copies_and_pickles():
    model = decoder("falcon-new-architecture")
    ptv2_kernels.patch(model, random_bank(model), backend="reference")
    input_ids, mask = random_batch(len(TASK_IDS), 6, padding="left")
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask, task_ids=TASK_IDS).logits
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert all(m.forward.module is m for m in served(twin, falcon_adapter))
            actual = twin(input_ids=input_ids, attention_mask=mask, task_ids=TASK_IDS).logits
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bloom", "falcon-alibi", "falcon-alibi-eager"])
def test_alibi_on_the_prefix_keys_follows_the_banks_position_bias(name, monkeypatch):
    """"cached": slot s of a sample whose task has L keys gets slope · (s - L) (eager Falcon twice, as it counts its
    ALiBi twice), scaled as the family scales its ALiBi; "none": no bias on the prefix keys."""
    adapter = bloom_adapter if name == "bloom" else falcon_adapter
    seen = []
    original = adapter.prefix_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("prefix_bias"))
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter, "prefix_attention", spy)
    input_ids, mask = random_batch(len(TASK_IDS), 5, padding="left", seed=1)
    for position_bias in ("none", "cached"):
        model = decoder(name)
        ptv2_kernels.patch(model, seeded_bank(model, LENGTHS, position_bias=position_bias), backend="reference")
        seen.clear()
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=mask, task_ids=TASK_IDS)
        assert len(seen) == 2
        if position_bias == "none":
            assert seen == [None, None]
            continue
        module = served(model, adapter)[0]
        heads = 4
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])
        factor = 1.0 if name == "bloom" else (2.0 if "eager" in name else 1.0) * module.inv_norm_factor
        lengths = torch.tensor([LENGTHS[task] for task in TASK_IDS], dtype=torch.float32)
        want = slopes[None, :, None] * (torch.arange(max(LENGTHS))[None, None, :] - lengths[:, None, None]) * factor
        torch.testing.assert_close(seen[0], want[:, :, None, :])


def test_packed_sequences_are_refused():
    model = decoder("gpt_neo")
    ptv2_kernels.patch(model, random_bank(model), backend="reference")
    input_ids, _ = random_batch(1, 7)
    with pytest.raises(NotImplementedError, match="GPT-Neo does not serve packed"):
        model(input_ids=input_ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]]), task_ids=[0, 1])


# ----------------------------------------------------------------------------------------------------------------
# MPNet against a hand-written oracle
# ----------------------------------------------------------------------------------------------------------------

MPNET_HEADS = ("seq_cls", "token_cls", "qa", "multiple_choice")


def mpnet(head: str, seed: int = 0, **overrides):
    suffix = {"seq_cls": "ForSequenceClassification", "token_cls": "ForTokenClassification",
              "qa": "ForQuestionAnswering", "multiple_choice": "ForMultipleChoice"}[head]
    config = transformers.MPNetConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0, max_position_embeddings=64,
                                                num_labels=2 if head == "qa" else 3), **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, "MPNet" + suffix)(config).eval()


def plain_attention(module, hidden_states, attention_mask=None, position_bias=None, output_attentions=False,
                    *, prefix_k, prefix_v, padding):
    """One MPNet attention with a prefix ``[H, L, D]``, written plainly; ``padding`` is the samples' ``[B, N]``
    mask (the model's own mask is not read)."""
    batch, length, _ = hidden_states.shape
    heads, dim = module.num_attention_heads, module.attention_head_size
    q, k, v = (proj(hidden_states).view(batch, length, heads, dim).permute(0, 2, 1, 3)
               for proj in (module.q, module.k, module.v))
    prefix_len = prefix_k.shape[1]
    keys = torch.cat([prefix_k.expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([prefix_v.expand(batch, -1, -1, -1), v], dim=2)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(dim)
    scores = scores + torch.cat([position_bias.new_zeros(batch, heads, length, prefix_len), position_bias], dim=-1)
    visible = torch.cat([torch.ones(batch, prefix_len, dtype=torch.bool), padding.bool()], dim=1)
    probs = torch.softmax(scores.masked_fill(~visible[:, None, None, :], float("-inf")), dim=-1)
    context = (probs @ values).permute(0, 2, 1, 3).reshape(batch, length, heads * dim)
    return (module.o(context),)


def mpnet_oracle(model, bank, input_ids, mask, task_ids, lengths=LENGTHS):
    """Each task's samples through ``model`` (unpatched) with the plain attention over that task's prefix and
    positions shifted by its length; the outputs in the batch's order, and the bank whose gradients they reach."""
    bank = copy.deepcopy(bank)
    kv = bank()
    modules = served(model, mpnet_adapter)
    length = input_ids.shape[-1]
    outputs = []
    for task, rows in per_task(task_ids):
        if rows.numel() == 0:
            continue
        ids, padding = input_ids[rows], mask[rows]
        for module, (prefix_k, prefix_v) in zip(modules, kv):
            module.forward = functools.partial(plain_attention, module, prefix_k=prefix_k[task, :, :lengths[task]],
                                               prefix_v=prefix_v[task, :, :lengths[task]],
                                               padding=padding.reshape(-1, length))
        real = ids.ne(1).long()  # MPNet's padding_idx
        position_ids = (real.cumsum(-1) + lengths[task]) * real + 1
        try:
            outputs.append((rows, model(input_ids=ids, attention_mask=padding, position_ids=position_ids)))
        finally:
            for module in modules:
                del module.forward
    merged = {}
    for name in ("logits", "start_logits", "end_logits"):
        parts = [(rows, getattr(out, name, None)) for rows, out in outputs]
        if parts[0][1] is None:
            continue
        value = parts[0][1].new_zeros((len(task_ids),) + parts[0][1].shape[1:])
        for rows, part in parts:
            value = value.index_copy(0, rows, part)
        merged[name] = value
    return types.SimpleNamespace(**merged), bank


def _mpnet_batch(head: str, seed: int = 5):
    choices = 2 if head == "multiple_choice" else 0
    input_ids, mask = random_batch(len(TASK_IDS), 7, padding="right", choices=choices, seed=seed)
    return dict(input_ids=input_ids, attention_mask=mask)


def test_the_mpnet_oracle_without_a_prefix_is_the_unpatched_model():
    model = mpnet("token_cls")
    bank = random_bank(model, lengths=[1])
    input_ids, mask = random_batch(3, 7, padding="right", seed=2)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask).logits
        for module, (prefix_k, prefix_v) in zip(served(model, mpnet_adapter), bank()):
            module.forward = functools.partial(plain_attention, module, prefix_k=prefix_k[0, :, :0],
                                               prefix_v=prefix_v[0, :, :0], padding=mask)
        actual = model(input_ids=input_ids, attention_mask=mask).logits
    assert_close_scaled(actual[mask.bool()], expected[mask.bool()], REL, "logits")


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("head", MPNET_HEADS)
def test_mpnet_matches_the_oracle(head, backend):
    """Two tasks of prefix lengths 2 and 5 mixed in one right-padded batch: the logits, the prefix gradients and
    every backbone gradient (the relative position bias table's too) equal the oracle's."""
    model = mpnet(head)
    oracle_model = copy.deepcopy(model)
    bank = random_bank(model)
    ptv2_kernels.patch(model, bank, backend=backend)
    batch = _mpnet_batch(head)
    expected, oracle_bank = mpnet_oracle(oracle_model, bank, batch["input_ids"], batch["attention_mask"], TASK_IDS)
    actual = model(**batch, task_ids=TASK_IDS)
    assert_matches_oracle(model, actual, bank, oracle_model, expected, oracle_bank, REL)
    assert oracle_model.mpnet.encoder.relative_attention_bias.weight.grad.abs().max() > 0


def test_mpnet_tasks_and_positions_matter_and_unpatch_restores():
    model = mpnet("seq_cls")
    bank = random_bank(model)
    unshifted = copy.deepcopy(model)
    batch = _mpnet_batch("seq_cls")
    with torch.no_grad():
        before = model(**batch).logits
        ptv2_kernels.patch(model, bank, backend="reference")
        ptv2_kernels.patch(unshifted, copy.deepcopy(bank), positions="unshifted", backend="reference")
        mixed = model(**batch, task_ids=TASK_IDS).logits
        swapped = model(**batch, task_ids=[1 - t for t in TASK_IDS]).logits
        other = unshifted(**batch, task_ids=TASK_IDS).logits
        ptv2_kernels.unpatch(model)
        after = model(**batch).logits
    assert (mixed - swapped).abs().max() > 1e-3 and (mixed - other).abs().max() > 1e-3
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_mpnet_slots_and_freeze_backbone():
    model = mpnet("seq_cls", num_hidden_layers=3, num_attention_heads=4)
    bank = ptv2_kernels.PrefixBank.for_model(model, prefix_len=4)
    assert [tuple(slot) for slot in bank.slots] == [(f"layer.{i}", 4, 8) for i in range(3)]
    ptv2_kernels.patch(model, bank)
    assert ptv2_kernels.freeze_backbone(model) == ["classifier.dense.weight", "classifier.dense.bias",
                                                   "classifier.out_proj.weight", "classifier.out_proj.bias",
                                                   "ptv2_prefix.encoder.embedding.weight"]
