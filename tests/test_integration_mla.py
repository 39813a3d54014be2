"""Multi-head latent attention (DeepSeek-V2, DeepSeek-V3): a patched model against the unpatched one holding the
prefix in its cache.

Their attention caches the compressed latents — ``kv_nope`` (after its norm) and the rotated ``k_rot`` — and expands
them into keys of head dim ``qk_nope + qk_rope`` and values of head dim ``v_head_dim`` at every call, so a cache
can hold only prefixes that are such expansions. The oracle therefore draws each task's prefix as latents: the
unpatched model holds them in its cache (as PEFT places a prefix, positions shifted by its length), and the bank
holds their expansion by each layer's own ``expand_kv``. Checked: the bank's slots (keys and values of their own
head dims), logits of a left-padded batch mixing two tasks of different prefix lengths, the prefix gradients (the
bank's, carried back through ``expand_kv``, against the latents' in the cache), and greedy ``generate`` (tokens
and every step's logits); a packed (padding-free) batch against the padded one; on the reference and Triton
backends.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import ptv2_kernels
from ptv2_kernels import backends
from ptv2_kernels.integrations import hf_transformers
from ptv2_kernels.integrations.hf_transformers import cache_keyword

from .hf_models import VOCAB, assert_close_scaled, random_batch

transformers = pytest.importorskip("transformers")

FAMILIES = {"deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
            "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM")}
# keys of 8 + 4 channels, values of 4: as DeepSeek-V3's 128 + 64 and 128, with q and kv through low-rank latents
DIMS = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=4,
            kv_lora_rank=16, q_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
            first_k_dense_replace=1, max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2)
LENGTHS = [3, 2]  # of task 0 and task 1
TASKS = torch.tensor([1, 0, 1])
NEW_TOKENS = 3
EOS = 2
BACKENDS = [name for name in ("reference", "triton") if backends.unavailable_reason(name) is None]
REL = {"reference": 1e-5, "triton": 1e-4}


def _model(family: str):
    config_class, model_class = (getattr(transformers, name) for name in FAMILIES[family])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_class(config_class(**DIMS)).eval().float()


def _attentions(model):
    return [layer.self_attn for layer in model.model.layers]


def _latents(model, seed: int = 5):
    """Per layer, the tasks' prefix latents ``(kv_nope [T, P, r], k_rot [T, P, rope])``, leaves of autograd."""
    gen = torch.Generator().manual_seed(seed)
    prefix_len = max(LENGTHS)
    return [(torch.randn(len(LENGTHS), prefix_len, attention.kv_lora_rank, generator=gen).requires_grad_(True),
             torch.randn(len(LENGTHS), prefix_len, attention.qk_rope_head_dim, generator=gen).requires_grad_(True))
            for attention in _attentions(model)]


def _expanded(attention, kv_nope, k_rot):
    """The keys ``[T, H, P, Dk]`` and values ``[T, H, P, Dv]`` the attention makes of latents ``[T, P, ...]``."""
    return attention.expand_kv(kv_nope[:, None], k_rot[:, None])


def _bank_holding(model, latents):
    """A bank whose task prefixes are the expansions of ``latents`` by each layer's attention."""
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=len(LENGTHS), prefix_len=LENGTHS)
    rows = []
    with torch.no_grad():
        for attention, (kv_nope, k_rot) in zip(_attentions(model), latents):
            key, value = _expanded(attention, kv_nope, k_rot)
            # the flat [T, P, F] layout: per slot the keys head by head, then the values
            rows += [key.transpose(1, 2).flatten(2), value.transpose(1, 2).flatten(2)]
        bank.encoder.embedding.weight.copy_(torch.cat(rows, -1).flatten(0, 1))
    return bank


def _latent_grads_of_bank(model, bank, latents):
    """The bank's prefix gradient carried back through ``expand_kv`` to the latents: what the cache's latents get."""
    grad = bank.encoder.embedding.weight.grad.view(len(LENGTHS), max(LENGTHS), -1)
    grads, start = [], 0
    for attention, (kv_nope, k_rot) in zip(_attentions(model), latents):
        key, value = _expanded(attention, kv_nope, k_rot)
        parts = []
        for t in (key, value):
            width = t.shape[1] * t.shape[3]
            parts.append(grad[..., start:start + width].unflatten(-1, (t.shape[1], t.shape[3])).transpose(1, 2))
            start += width
        grads.append(torch.autograd.grad([key, value], [kv_nope, k_rot], parts))
    return grads


def _cache(latents, task: int, count: int):
    from transformers import DynamicCache

    length = LENGTHS[task]
    return DynamicCache(tuple((kv_nope[task, None, None, :length].expand(count, -1, -1, -1).contiguous(),
                               k_rot[task, None, None, :length].expand(count, -1, -1, -1).contiguous())
                              for kv_nope, k_rot in latents))


def _groups(batch, latents):
    """Per task of the batch: its rows, input ids, mask, the mask with the prefix's columns, its cache, length."""
    for task in sorted(set(TASKS.tolist())):
        rows = TASKS == task
        ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
        full_mask = torch.cat([torch.ones(len(ids), LENGTHS[task], dtype=mask.dtype), mask], 1)
        yield rows, ids, mask, full_mask, _cache(latents, task, len(ids)), LENGTHS[task]


def _oracle_logits(model, batch, latents):
    out = None
    for rows, ids, _, full_mask, cache, _ in _groups(batch, latents):
        logits = model(input_ids=ids, attention_mask=full_mask, use_cache=True, **{cache_keyword(): cache}).logits
        out = logits.new_zeros(len(TASKS), *logits.shape[1:]) if out is None else out
        out = out.index_put((rows.nonzero()[:, 0],), logits)
    return out


def _oracle_generate(model, batch, latents):
    """Greedy decoding with each task's latents in the cache, positions from the mask shifted by the prefix
    length, the end token barred for the NEW_TOKENS steps (as generate with min_new_tokens)."""
    steps = [torch.zeros(len(TASKS), VOCAB) for _ in range(NEW_TOKENS)]
    new = torch.zeros(len(TASKS), NEW_TOKENS, dtype=batch["input_ids"].dtype)
    with torch.no_grad():
        for rows, ids, mask, full_mask, cache, length in _groups(batch, latents):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0) + length
            for step in range(NEW_TOKENS):
                logits = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                               **{cache_keyword(): cache}).logits[:, -1]
                steps[step][rows] = logits
                ids = logits.masked_fill(torch.arange(VOCAB) == EOS, -math.inf).argmax(-1, keepdim=True)
                new[rows, step] = ids[:, 0]
                full_mask = torch.cat([full_mask, torch.ones_like(ids)], 1)
                positions = positions[:, -1:] + 1
    return torch.cat([batch["input_ids"], new], 1), steps


def _weighted(logits, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    return (logits * torch.randn(logits.shape, generator=gen)).sum()


@pytest.mark.parametrize("family", FAMILIES)
def test_bank_slots_have_both_head_dims(family):
    model = _model(family)
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=LENGTHS)
    assert {tuple(slot[1:]) for slot in bank.slots} == {(4, 12, 4)}
    assert all(slot.width == 4 * (12 + 4) for slot in bank.slots)
    key, value = bank()[0]
    assert key.shape == (2, 4, 3, 12) and value.shape == (2, 4, 3, 4)
    restored = ptv2_kernels.PrefixBank.from_config_dict(bank.config_dict())
    assert restored.slots == bank.slots


def test_peft_export_refuses_values_of_their_own_head_dim(tmp_path):
    bank = ptv2_kernels.PrefixBank.for_model(_model("deepseek_v3"), num_tasks=1, prefix_len=2)
    with pytest.raises(ValueError, match="bank: a PEFT prefix-tuning adapter holds keys and values of one head dim; "
                                         "slot 'layer.0' has values of another head dim"):
        bank.save_peft(tmp_path, task_type="CAUSAL_LM")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_latents_in_the_cache(family, backend):
    model = _model(family)
    oracle = copy.deepcopy(model).requires_grad_(False)
    latents = _latents(model)
    bank = _bank_holding(model, latents)
    input_ids, mask = random_batch(3, 6, seed=1, padding="left")
    batch = dict(input_ids=input_ids, attention_mask=mask)
    real = mask.bool()
    ptv2_kernels.patch(model, bank, backend=backend)
    ptv2_kernels.freeze_backbone(model)
    rel = REL[backend]

    logits = model(**batch, task_ids=TASKS).logits[real]
    expected = _oracle_logits(oracle, batch, latents)[real]
    assert_close_scaled(logits, expected.detach(), rel, "logits")
    _weighted(logits).backward()
    _weighted(expected).backward()
    for layer, (ours, (kv_nope, k_rot)) in enumerate(zip(_latent_grads_of_bank(model, bank, latents), latents)):
        assert_close_scaled(ours[0], kv_nope.grad, rel, f"layer {layer}: prefix gradient (kv_nope latents)")
        assert_close_scaled(ours[1], k_rot.grad, rel, f"layer {layer}: prefix gradient (k_rot latents)")

    sequences, steps = _oracle_generate(oracle, batch, latents)
    with torch.no_grad():
        generated = model.generate(**batch, task_ids=TASKS, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                   do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=1)
    assert torch.equal(generated.sequences, sequences), f"{generated.sequences} != {sequences}"
    for step, (ours, want) in enumerate(zip(generated.logits, steps)):
        assert_close_scaled(ours, want, rel, f"logits of generate step {step}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_batch_equals_padded_batch(backend, monkeypatch):
    """A packed (padding-free) batch runs the variable-length op on keys and values of their own head dims: the
    same per-token logits, loss and prefix gradients as the padded batch, one task per packed sequence."""
    lengths, tasks = (5, 3, 4), [1, 0, 1]
    gen = torch.Generator().manual_seed(0)
    features = [{"input_ids": torch.randint(3, VOCAB, (n,), generator=gen).tolist()} for n in lengths]
    packed = transformers.DataCollatorWithFlattening()(features)
    ids = torch.full((len(lengths), max(lengths)), 1)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, feature in enumerate(features):
        n = len(feature["input_ids"])
        ids[i, :n], mask[i, :n] = torch.tensor(feature["input_ids"]), 1
        labels[i, 1:n] = ids[i, 1:n]  # the flattening collator labels each sequence's first token -100
    model = _model("deepseek_v3")
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=LENGTHS)
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    ptv2_kernels.patch(model, bank, backend=backend)
    varlen_calls = []
    varlen = hf_transformers.prefix_attention_varlen
    monkeypatch.setattr(hf_transformers, "prefix_attention_varlen",
                        lambda *args, **kwargs: varlen_calls.append(args[2].shape) or varlen(*args, **kwargs))
    results = []
    for batch in (packed, dict(input_ids=ids, attention_mask=mask, labels=labels)):
        bank.zero_grad(set_to_none=True)
        output = model(**batch, task_ids=tasks)
        output.loss.backward()
        results.append((output.logits.detach(), output.loss.detach(), bank.encoder.embedding.weight.grad.clone()))
    assert varlen_calls == [(sum(lengths), 4, 4)] * 2, "each layer's packed attention takes values of head dim 4"
    (logits, loss, grad), (padded_logits, padded_loss, padded_grad) = results
    torch.testing.assert_close(logits[0], torch.cat([padded_logits[i, :n] for i, n in enumerate(lengths)]),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, padded_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, padded_grad, rtol=1e-4, atol=1e-6)
