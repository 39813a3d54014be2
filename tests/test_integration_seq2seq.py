"""patch() on encoder-decoder models (BART): PEFT equivalence (PEFT prefixes the decoder's self-attention only),
and Li & Liang's full prefix (encoder, decoder and cross-attention) against a hand-written oracle per attention.

Tolerances as in test_integration_encoders.py (float32, the reference backend: 1e-5 of the largest value).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import ptv2_kernels
from ptv2_kernels import backends
from ptv2_kernels.integrations import hf_transformers

from .hf_models import (GENERATE_STEPS, assert_close_scaled, patch_with_random_bank, patched_twin, peft_twin,
                        random_batch)

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

REL = 1e-5
TRITON_REL = 1e-4  # float32 summed blockwise, as in the other model tests
GENERATE = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_scores=True,
                return_dict_in_generate=True)


def bart_model(seed=0, layers=2):
    config = transformers.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None)
    torch.manual_seed(seed)
    return transformers.BartForConditionalGeneration(config).eval()


@pytest.mark.parametrize("layers", [2, 3])
def test_bart_matches_peft(layers):
    model = bart_model(layers=layers)
    peft_model = peft_twin(model, "SEQ_2_SEQ_LM", num_virtual_tokens=3)
    ours, bank = patched_twin(model, peft_model)
    assert [slot.name for slot in bank.slots] == [f"decoder.{i}" for i in range(layers)]
    input_ids, mask = random_batch(3, 7, padding="right")
    decoder_ids, _ = random_batch(3, 5, seed=4)
    expected = peft_model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    actual = ours(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert_close_scaled(actual, expected, REL, "logits")
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    (expected * weights).sum().backward()
    (actual * weights).sum().backward()
    # PEFT gives decoder layer i its virtual layer 2i mod L: that layer's gradient sums over the slots using it.
    peft_grad = peft_model.prompt_encoder.default.embedding.weight.grad.view(3, layers, 64)
    ours_grad = bank.encoder.embedding.weight.grad.view(3, layers, 64)
    summed = torch.zeros_like(peft_grad)
    for i in range(layers):
        summed[:, (2 * i) % layers] += ours_grad[:, i]
    assert_close_scaled(summed, peft_grad, REL, "prefix gradient")

    _assert_generates_as_peft(peft_model, ours, input_ids, mask, REL)


def _assert_generates_as_peft(peft_model, ours, input_ids, mask, rel):
    """Greedy ``generate``: the same tokens, and scores within ``rel`` of the largest."""
    first = peft_model.generate(input_ids=input_ids, attention_mask=mask, **GENERATE)
    second = ours.generate(input_ids=input_ids, attention_mask=mask, **GENERATE)
    assert torch.equal(first.sequences, second.sequences)
    for a, b in zip(first.scores, second.scores):
        assert torch.equal(a.isinf(), b.isinf())  # min_new_tokens sets the end token's score to -inf
        assert_close_scaled(b.masked_fill(b.isinf(), 0), a.masked_fill(a.isinf(), 0), rel, "scores")


def _oracle_attention(module, hidden, kv_states, prefix_k, prefix_v, causal):
    """BartAttention by hand over [prefix ; keys]: projections, softmax in float64, output projection."""
    batch, length, _ = hidden.shape
    heads, dim = module.num_heads, module.head_dim

    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, dim).transpose(1, 2).double()

    q = split(module.q_proj(hidden))
    k, v = split(module.k_proj(kv_states)), split(module.v_proj(kv_states))
    keys = torch.cat([prefix_k.double().expand(batch, -1, -1, -1), k], 2)
    values = torch.cat([prefix_v.double().expand(batch, -1, -1, -1), v], 2)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(dim)
    if causal:
        hidden_keys = torch.ones(length, k.shape[2], dtype=torch.bool).triu(1)
        scores[..., prefix_k.shape[-2]:] = scores[..., prefix_k.shape[-2]:].masked_fill(hidden_keys, -math.inf)
    out = (scores.softmax(-1) @ values).transpose(1, 2).reshape(batch, length, heads * dim)
    return module.out_proj(out.float())


def test_bart_encoder_decoder_and_cross_prefixes_against_an_oracle():
    """Li & Liang: every attention (encoder self, decoder self, decoder cross) attends over its own prefix."""
    model = bart_model()
    bank = ptv2_kernels.PrefixBank.for_model(model, prefix_len=3)
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, 0.5)
    kv = {slot.name: pair for slot, pair in zip(bank.slots, bank())}
    ptv2_kernels.patch(model, bank, backend="reference", positions="unshifted")
    captured = {}

    def capture(name):
        def hook(module, args, kwargs, output):
            captured[name] = (module, args[0] if args else kwargs["hidden_states"],
                              kwargs.get("key_value_states"), output[0])
        return hook

    layers = model.model
    handles = [layers.encoder.layers[1].self_attn.register_forward_hook(capture("encoder.1"), with_kwargs=True),
               layers.decoder.layers[0].self_attn.register_forward_hook(capture("decoder.0"), with_kwargs=True),
               layers.decoder.layers[1].encoder_attn.register_forward_hook(capture("cross.1"), with_kwargs=True)]
    input_ids, _ = random_batch(2, 6)
    decoder_ids, _ = random_batch(2, 4, seed=2)
    model(input_ids=input_ids, decoder_input_ids=decoder_ids)
    for handle in handles:
        handle.remove()
    for name, (module, hidden, kv_states, output) in captured.items():
        prefix_k, prefix_v = kv[name]
        expected = _oracle_attention(module, hidden, hidden if kv_states is None else kv_states, prefix_k,
                                     prefix_v, causal=name.startswith("decoder"))
        assert_close_scaled(output, expected.detach(), REL, name)


def test_bart_mixed_tasks_and_shifted_encoder_positions():
    """Two tasks in one batch equal each task alone; with encoder slots, 'shifted' moves encoder positions."""
    model = bart_model()
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=[2, 3])
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, 0.5)
    ptv2_kernels.patch(model, bank, backend="reference")
    input_ids, mask = random_batch(4, 6, padding="right", seed=1)
    decoder_ids, _ = random_batch(4, 3, seed=2)
    tasks = torch.tensor([1, 0, 0, 1])
    mixed = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids, task_ids=tasks).logits
    for i, task in enumerate(tasks.tolist()):
        single = model(input_ids=input_ids[i:i + 1], attention_mask=mask[i:i + 1],
                       decoder_input_ids=decoder_ids[i:i + 1], task_ids=task).logits
        assert_close_scaled(mixed[i:i + 1], single, REL, f"sample {i}")
    generated = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=tasks, max_new_tokens=3,
                               min_new_tokens=3, do_sample=False)
    for i, task in enumerate(tasks.tolist()):
        single = model.generate(input_ids=input_ids[i:i + 1], attention_mask=mask[i:i + 1], task_ids=task,
                                max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert torch.equal(generated[i], single[0])
    ptv2_kernels.unpatch(model)
    ptv2_kernels.patch(model, bank, backend="reference", positions="unshifted")
    unshifted = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids, task_ids=tasks).logits
    assert (unshifted - mixed).abs().max() > 1e-4


def test_bart_generate_steps_equal_full_forwards():
    """Encoder, decoder and cross-attention prefixes of two tasks: at every step of generate, the logits equal one
    forward over the whole decoder sequence so far (no cache), so the shifted decoder positions and the cache of
    real tokens agree step by step. No PEFT involved: this holds on every transformers release."""
    model = bart_model()
    patch_with_random_bank(model, [2, 3], std=0.5)
    input_ids, mask = random_batch(3, 6, padding="right", seed=3)
    tasks = torch.tensor([1, 0, 1])
    out = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=tasks, **GENERATE_STEPS)
    assert len(out.logits) == GENERATE_STEPS["max_new_tokens"]
    for step, logits in enumerate(out.logits):
        with torch.no_grad():
            expected = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :step + 1],
                             task_ids=tasks).logits[:, -1]
        assert_close_scaled(logits, expected, REL, f"logits of step {step}")


def test_for_model_attentions_subset():
    model = bart_model()
    bank = ptv2_kernels.PrefixBank.for_model(model, prefix_len=2, attentions=["decoder", "cross"])
    assert [slot.name for slot in bank.slots] == ["decoder.0", "cross.0", "decoder.1", "cross.1"]
    with pytest.raises(ValueError, match="subset"):
        ptv2_kernels.PrefixBank.for_model(model, attentions=["self"])


def t5_model(seed=0):
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=16, num_layers=2, num_heads=2, d_ff=64,
                                   dropout_rate=0.0, relative_attention_num_buckets=8, pad_token_id=1,
                                   eos_token_id=2, decoder_start_token_id=0)
    torch.manual_seed(seed)
    return transformers.T5ForConditionalGeneration(config).eval()


def _t5_oracle(module, hidden, kv_states, bias, prefix_k, prefix_v, causal):
    """T5Attention by hand over [prefix ; keys]: no score scaling, the relative position bias on the sequence
    columns and zero bias on the prefix columns, softmax in float64."""
    batch, length, _ = hidden.shape
    heads, dim = module.n_heads, module.key_value_proj_dim

    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, dim).transpose(1, 2).double()

    q, k, v = split(module.q(hidden)), split(module.k(kv_states)), split(module.v(kv_states))
    prefix_len = prefix_k.shape[-2]
    keys = torch.cat([prefix_k.double().expand(batch, -1, -1, -1), k], 2)
    values = torch.cat([prefix_v.double().expand(batch, -1, -1, -1), v], 2)
    scores = q @ keys.transpose(-1, -2)
    scores[..., prefix_len:] += bias.double()
    if causal:
        hidden_keys = torch.ones(length, k.shape[2], dtype=torch.bool).triu(1)
        scores[..., prefix_len:] = scores[..., prefix_len:].masked_fill(hidden_keys, -math.inf)
    out = (scores.softmax(-1) @ values).transpose(1, 2).reshape(batch, length, heads * dim)
    return module.o(out.float())


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    backends.unavailable_reason("triton") is not None, reason=f"Triton: {backends.unavailable_reason('triton')}"))])
def test_t5_prefixes_with_zero_bias_columns_against_an_oracle(backend):
    """T5's relative position bias reaches the op as its attn_bias (the prefix keys unbiased): each attention
    equals a hand-written one over [prefix ; keys] with zero bias columns for the prefix."""
    model = t5_model()
    bank = ptv2_kernels.PrefixBank.for_model(model, prefix_len=3)
    assert {slot.name.split(".")[0] for slot in bank.slots} == {"encoder", "decoder", "cross"}
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, 0.5)
    kv = {slot.name: pair for slot, pair in zip(bank.slots, bank())}
    ptv2_kernels.patch(model, bank, backend=backend)
    captured = {}

    def capture(name):
        def hook(module, args, kwargs, output):
            captured[name] = (module, args[0] if args else kwargs["hidden_states"],
                              kwargs.get("key_value_states"), output[1], output[0])
        return hook

    modules = {"encoder.1": model.encoder.block[1].layer[0].SelfAttention,
               "decoder.0": model.decoder.block[0].layer[0].SelfAttention,
               "cross.1": model.decoder.block[1].layer[1].EncDecAttention}
    handles = [m.register_forward_hook(capture(name), with_kwargs=True) for name, m in modules.items()]
    input_ids, _ = random_batch(2, 6)
    decoder_ids, _ = random_batch(2, 4, seed=2)
    model(input_ids=input_ids, decoder_input_ids=decoder_ids)
    for handle in handles:
        handle.remove()
    assert captured.keys() == modules.keys()
    for name, (module, hidden, kv_states, bias, output) in captured.items():
        prefix_k, prefix_v = kv[name]
        expected = _t5_oracle(module, hidden, hidden if kv_states is None else kv_states, bias, prefix_k, prefix_v,
                              causal=name.startswith("decoder"))
        assert_close_scaled(output, expected.detach(), REL if backend == "reference" else TRITON_REL, name)


@pytest.mark.skipif(backends.unavailable_reason("triton") is not None,
                    reason=f"Triton: {backends.unavailable_reason('triton')}")
def test_t5_gradients_with_triton_equal_the_reference():
    """The whole model trainable: the prefix's gradient and that of T5's relative position bias tables (which
    reach the op as attn_bias, broadcast over the batch) agree between the fused kernels and the reference."""
    grads = {}
    for backend in ("reference", "triton"):
        model = t5_model()
        torch.manual_seed(4)
        bank = patch_with_random_bank(model, [3, 2], std=0.5, backend=backend)
        input_ids, mask = random_batch(2, 6, padding="right", seed=6)
        decoder_ids, _ = random_batch(2, 4, seed=7)
        logits = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                       task_ids=torch.tensor([1, 0])).logits
        (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(8))).sum().backward()
        tables = [model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight,
                  model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight]
        grads[backend] = [bank.encoder.embedding.weight.grad] + [table.grad for table in tables]
    for name, got, want in zip(("prefix", "encoder bias table", "decoder bias table"), grads["triton"],
                               grads["reference"]):
        assert want.abs().sum() > 0, name
        assert_close_scaled(got, want, TRITON_REL, name)


def test_t5_generate_and_mixed_tasks():
    """Cached generation equals re-running the whole sequence; two tasks in one batch equal each task alone."""
    model = t5_model()
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=[3, 2])
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, 0.5)
    ptv2_kernels.patch(model, bank, backend="reference")
    input_ids, mask = random_batch(3, 6, padding="right", seed=3)
    tasks = torch.tensor([0, 1, 1])
    out = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=tasks, max_new_tokens=4,
                         min_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    logits = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1],
                   task_ids=tasks).logits
    for step, scores in enumerate(out.scores):
        finite = ~scores.isinf()
        assert_close_scaled(scores[finite], logits[:, step][finite], 1e-5, f"step {step}")
    for i, task in enumerate(tasks.tolist()):
        single = model.generate(input_ids=input_ids[i:i + 1], attention_mask=mask[i:i + 1], task_ids=task,
                                max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(out.sequences[i], single[0])
    out.scores[0].sum()  # scores are plain tensors
    loss = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1],
                 task_ids=tasks).logits.sum()
    loss.backward()
    grad = bank.encoder.embedding.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# A bank placed where a cache would hold it (position_bias="cached", what from_peft imports): the prefix columns
# get T5's relative position bias of their cache positions, as PEFT's prefix does.

T5_FAMILIES = ["t5", "mt5", "umt5"]


def _t5_family_model(model_type, seed=0):
    config_class = {"t5": transformers.T5Config, "mt5": transformers.MT5Config, "umt5": transformers.UMT5Config}
    model_class = {"t5": transformers.T5ForConditionalGeneration, "mt5": transformers.MT5ForConditionalGeneration,
                   "umt5": transformers.UMT5ForConditionalGeneration}
    config = config_class[model_type](vocab_size=100, d_model=32, d_kv=16, num_layers=2, num_heads=2, d_ff=64,
                                      dropout_rate=0.0, relative_attention_num_buckets=8, pad_token_id=1,
                                      eos_token_id=2, decoder_start_token_id=0)
    torch.manual_seed(seed)
    return model_class[model_type](config).eval()


@pytest.mark.parametrize("model_type", T5_FAMILIES)
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    backends.unavailable_reason("triton") is not None, reason=f"Triton: {backends.unavailable_reason('triton')}"))])
def test_t5_family_matches_peft_exactly(model_type, backend):
    """from_peft + positions="shifted": logits, the prefix's gradient and generate equal PEFT's, whose prefix sits
    in the decoder's cache and gets the relative position bias there."""
    model = _t5_family_model(model_type)
    if not any(name.startswith("decoder.") for name, _, _ in hf_transformers._attention_modules(model)):
        pytest.skip(f"{model_type}'s decoder self-attention is not recognized as such in transformers "
                    f"{transformers.__version__} (its modules are not marked causal)")
    peft_model = peft_twin(model, "SEQ_2_SEQ_LM", num_virtual_tokens=3)
    ours, bank = patched_twin(model, peft_model, backend=backend)
    assert bank.position_bias == "cached"
    input_ids, mask = random_batch(3, 7, padding="right")
    decoder_ids, _ = random_batch(3, 5, seed=4)
    expected = peft_model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    actual = ours(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    rel = REL if backend == "reference" else TRITON_REL
    assert_close_scaled(actual, expected, rel, "logits")
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    (expected * weights).sum().backward()
    (actual * weights).sum().backward()
    layers = len(bank.slots)
    peft_grad = peft_model.prompt_encoder.default.embedding.weight.grad.view(3, layers, -1)
    ours_grad = bank.encoder.embedding.weight.grad.view(3, layers, -1)
    summed = torch.zeros_like(peft_grad)
    for i in range(layers):
        summed[:, (2 * i) % layers] += ours_grad[:, i]
    assert_close_scaled(summed, peft_grad, rel, "prefix gradient")

    _assert_generates_as_peft(peft_model, ours, input_ids, mask, rel)


def test_t5_cached_bias_without_peft_differs_from_none_and_follows_each_tasks_length():
    """Without PEFT: the cached bias moves the logits (by far more than the tolerance), and in a batch mixing two
    tasks of different lengths each sample equals its task alone in a bank of that one length."""
    model = _t5_family_model("t5")
    lengths = [3, 2]
    banks = {}
    for position_bias in ("none", "cached"):
        bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=lengths,
                                                 position_bias=position_bias)
        with torch.no_grad():
            bank.encoder.embedding.weight.copy_(torch.randn(bank.encoder.embedding.weight.shape,
                                                            generator=torch.Generator().manual_seed(5)) * 0.5)
        banks[position_bias] = bank
    input_ids, mask = random_batch(2, 6, padding="right", seed=3)
    decoder_ids, _ = random_batch(2, 4, seed=2)
    tasks = torch.tensor([0, 1])
    logits = {}
    for position_bias, bank in banks.items():
        patched = copy.deepcopy(model)
        ptv2_kernels.patch(patched, bank, backend="reference")
        with torch.no_grad():
            logits[position_bias] = patched(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                                            task_ids=tasks).logits
    assert (logits["cached"] - logits["none"]).abs().max() > 1e-2
    for i, task in enumerate(tasks.tolist()):
        alone = ptv2_kernels.PrefixBank.for_model(model, prefix_len=lengths[task], position_bias="cached")
        with torch.no_grad():  # the task's own keys/values, as a bank of its length holds them
            flat = banks["cached"].encoder.embedding.weight.view(2, max(lengths), -1)[task, :lengths[task]]
            alone.encoder.embedding.weight.copy_(flat.reshape(alone.encoder.embedding.weight.shape))
        patched = copy.deepcopy(model)
        ptv2_kernels.patch(patched, alone, backend="reference")
        with torch.no_grad():
            single = patched(input_ids=input_ids[i:i + 1], attention_mask=mask[i:i + 1],
                             decoder_input_ids=decoder_ids[i:i + 1]).logits
        assert_close_scaled(logits["cached"][i:i + 1], single, REL, f"sample {i}")


def test_cached_position_bias_is_refused_where_it_cannot_be_placed():
    bank_model = transformers.MPNetForMaskedLM(transformers.MPNetConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    bank = ptv2_kernels.PrefixBank.for_model(bank_model, prefix_len=2, position_bias="cached")
    with pytest.raises(NotImplementedError, match="position_bias is 'cached'"):
        ptv2_kernels.patch(bank_model, bank)
    with pytest.raises(ValueError, match="position_bias must be one of"):
        ptv2_kernels.PrefixBank.for_model(bank_model, prefix_len=2, position_bias="cache")
    saved = ptv2_kernels.PrefixBank.from_config_dict(bank.config_dict())
    assert saved.position_bias == "cached"
