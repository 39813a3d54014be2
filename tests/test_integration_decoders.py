"""patch() on decoder-only models (GPT-2, Llama, Qwen2, Mistral; the last three with GQA) against PEFT prefix tuning:
logits and prefix gradients, left padding, generate (greedy tokens and scores), static caches, mixed tasks in one
generate, and a cache that holds real tokens only.

Tolerances as in test_integration_encoders.py: float32 everywhere, the reference backend differs from SDPA only in
summation order (observed ~1e-7 on logits ~1), Triton in the interpreter sums blockwise (1e-4 relative).
"""

from __future__ import annotations

import copy

import pytest
import torch

import ptv2_kernels
from ptv2_kernels import backends
from ptv2_kernels.integrations import hf_transformers
from ptv2_kernels.integrations.hf_transformers import cache_keyword

from .hf_models import (GENERATE_STEPS, OpSpy, assert_close_scaled, bank_grads, decoder_model,
                        patch_with_random_bank, patched_twin, peft_grads, peft_twin, random_batch)

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

FAMILIES = ["gpt2", "llama", "qwen2", "mistral"]
REFERENCE_REL = 1e-5
TRITON_REL = 1e-4
needs_triton = pytest.mark.skipif(backends.unavailable_reason("triton") is not None,
                                  reason=f"Triton unavailable: {backends.unavailable_reason('triton')}")
GENERATE = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
                pad_token_id=1)


def _model(family):
    # Mistral without a sliding window (its default window is larger than these sequences anyway).
    return decoder_model(family, **({"sliding_window": None} if family == "mistral" else {}))


def _weighted(logits, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return (logits * torch.randn(logits.shape, generator=gen)).sum()


def _compare_forward(peft_model, ours, bank, padding, rel, seed=0):
    input_ids, mask = random_batch(3, 7, padding=padding, seed=seed)
    expected = peft_model(input_ids=input_ids, attention_mask=mask).logits
    actual = ours(input_ids=input_ids, attention_mask=mask).logits
    real = mask.bool()  # padded positions' outputs are not compared: nothing reads them
    assert_close_scaled(actual[real], expected[real], rel, "logits")
    _weighted(expected[real]).backward()
    _weighted(actual[real]).backward()
    assert_close_scaled(bank_grads(bank)["embedding.weight"], peft_grads(peft_model)["embedding.weight"], rel,
                        "prefix gradient")


def _compare_generate(first, second, rel):
    assert torch.equal(first.sequences, second.sequences)
    assert len(first.scores) == len(second.scores) == GENERATE["max_new_tokens"]
    for a, b in zip(first.scores, second.scores):
        assert_close_scaled(a, b, rel, "scores")


def _compare_with_peft(model):
    """A bank imported from a PEFT twin of ``model`` against the twin: forward and prefix gradient with and without
    left padding, then greedy generate. Returns (the bank, our generate output)."""
    peft_model = peft_twin(model, "CAUSAL_LM", num_virtual_tokens=4)
    ours, bank = patched_twin(model, peft_model)
    for padding in ("none", "left"):
        peft_model.zero_grad(), bank.zero_grad()
        _compare_forward(peft_model, ours, bank, padding, REFERENCE_REL, seed=len(padding))
    input_ids, mask = random_batch(3, 5, padding="left", seed=3)
    expected = peft_model.generate(input_ids=input_ids, attention_mask=mask, **GENERATE)
    actual = ours.generate(input_ids=input_ids, attention_mask=mask, **GENERATE)
    _compare_generate(actual, expected, REFERENCE_REL)
    return bank, actual


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_peft(family):
    _, actual = _compare_with_peft(_model(family))
    assert len(set(actual.sequences[:, -GENERATE["max_new_tokens"]:].flatten().tolist())) > 1


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_matches_peft(family):
    """A window of 3 keys, shorter than the sequences and the prefix: PEFT's prefix sits in the cache and slides
    out of the window; a bank from PEFT (position_bias="cached") loses the same slots (docs/integration.md,
    "Sliding windows"), in the forward, the prefix gradient and every generate step."""
    window = dict(sliding_window=3)
    if family == "qwen2":
        window.update(use_sliding_window=True, max_window_layers=0)
    bank, _ = _compare_with_peft(decoder_model(family, **window))
    assert bank.position_bias == "cached"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_static_cache_generate(family):
    model = _model(family)
    peft_model = peft_twin(model, "CAUSAL_LM", num_virtual_tokens=3)
    ours, _ = patched_twin(model, peft_model)
    input_ids, mask = random_batch(2, 5, padding="left", seed=4)
    dynamic = ours.generate(input_ids=input_ids, attention_mask=mask, **GENERATE)
    static = ours.generate(input_ids=input_ids, attention_mask=mask, cache_implementation="static", **GENERATE)
    _compare_generate(static, dynamic, REFERENCE_REL)


def test_cache_keyword_is_a_parameter_of_the_installed_models():
    import inspect

    forward = inspect.signature(type(_model("llama")).forward).parameters
    assert cache_keyword() in forward and forward[cache_keyword()].kind != inspect.Parameter.VAR_KEYWORD


def test_cache_holds_real_tokens_only():
    model = _model("llama")
    bank = ptv2_kernels.PrefixBank.for_model(model, prefix_len=6)
    ptv2_kernels.patch(model, bank, backend="reference")
    input_ids, mask = random_batch(2, 5)
    out = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
    assert out.past_key_values.get_seq_length() == 5
    # Decoding one more token from that cache equals running the whole sequence at once.
    next_ids = torch.tensor([[7], [9]])
    step = model(input_ids=next_ids, attention_mask=torch.ones(2, 6, dtype=torch.long),
                 **{cache_keyword(): out.past_key_values}).logits[:, -1]
    whole = model(input_ids=torch.cat([input_ids, next_ids], 1), attention_mask=torch.ones(2, 6, dtype=torch.long))
    assert_close_scaled(step, whole.logits[:, -1], REFERENCE_REL, "decode step")


def test_decoder_masks_reach_the_op_in_cheap_forms(monkeypatch):
    spy = OpSpy(monkeypatch)
    model = _model("llama")
    ptv2_kernels.patch(model, ptv2_kernels.PrefixBank.for_model(model, prefix_len=3), backend="reference")
    input_ids, mask = random_batch(2, 5, padding="left", seed=1)
    model(input_ids=input_ids)
    assert [call[:2] for call in spy.calls] == [(None, True)] * 2  # no mask, causal flag
    spy.calls.clear()
    out = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
    assert [call[:2] for call in spy.calls] == [((2, 5), True)] * 2  # key padding + causal
    spy.calls.clear()
    model(input_ids=torch.tensor([[5], [6]]), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
          **{cache_keyword(): out.past_key_values})
    assert [call[:2] for call in spy.calls] == [((2, 6), True)] * 2  # decode step: key padding over the cache
    spy.calls.clear()
    model.generate(input_ids=input_ids, attention_mask=mask, cache_implementation="static", max_new_tokens=2,
                   do_sample=False, pad_token_id=1)
    # A static cache is longer than the tokens written so far: a dense mask, no causal flag.
    assert all(len(call[0]) == 4 and call[1] is False for call in spy.calls)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_steps_equal_full_forwards(family):
    """At every step of generate, the logits equal one forward over the whole sequence so far (no cache): prefix,
    shifted positions and the cache of real tokens agree step by step. PEFT plays no part, so this holds on every
    transformers release, also those PEFT cannot prefix-tune with."""
    model = _model(family)
    patch_with_random_bank(model, [3, 1], std=1.0)
    input_ids, mask = random_batch(3, 5, padding="left", seed=8)
    task_ids = torch.tensor([0, 1, 0])
    out = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=task_ids, pad_token_id=1,
                         **GENERATE_STEPS)
    assert len(out.logits) == GENERATE_STEPS["max_new_tokens"]
    for step, logits in enumerate(out.logits):
        full_mask = torch.cat([mask, torch.ones(3, step, dtype=mask.dtype)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
        with torch.no_grad():
            expected = model(input_ids=out.sequences[:, :full_mask.shape[1]], attention_mask=full_mask,
                             position_ids=positions, task_ids=task_ids).logits[:, -1]
        assert_close_scaled(logits, expected, REFERENCE_REL, f"logits of step {step}")


def test_mixed_tasks_in_one_generate():
    """A batch of two tasks (prefix lengths 2 and 4) generates what each task generates alone, also with beams."""
    model = _model("qwen2")
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=[2, 4])
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, 1.0)
    ptv2_kernels.patch(model, bank, backend="reference")
    input_ids, mask = random_batch(4, 5, padding="left", seed=6)
    task_ids = torch.tensor([1, 0, 0, 1])
    mixed = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=task_ids, **GENERATE)
    for i, task in enumerate(task_ids.tolist()):
        single = model.generate(input_ids=input_ids[i:i + 1], attention_mask=mask[i:i + 1], task_ids=task,
                                **GENERATE)
        # Left padding differs between the batch and the single row; the generated tokens must not.
        new = GENERATE["max_new_tokens"]
        assert torch.equal(mixed.sequences[i, -new:], single.sequences[0, -new:])
        for a, b in zip(mixed.scores, single.scores):
            assert_close_scaled(a[i:i + 1], b, 1e-4, f"scores of sample {i}")
    beams = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=task_ids, num_beams=2,
                           max_new_tokens=3, do_sample=False, pad_token_id=1)
    for i, task in enumerate(task_ids.tolist()):
        single = model.generate(input_ids=input_ids[i:i + 1], attention_mask=mask[i:i + 1], task_ids=task,
                                num_beams=2, max_new_tokens=3, do_sample=False, pad_token_id=1)
        assert torch.equal(beams[i, -3:], single[0, -3:])


@needs_triton
def test_triton_backend_matches_peft_with_gqa():
    model = _model("llama")
    peft_model = peft_twin(model, "CAUSAL_LM", num_virtual_tokens=4)
    ours, bank = patched_twin(model, peft_model, backend="triton")
    _compare_forward(peft_model, ours, bank, "left", TRITON_REL, seed=2)
    input_ids, mask = random_batch(2, 4, padding="left", seed=3)
    expected = peft_model.generate(input_ids=input_ids, attention_mask=mask, **GENERATE)
    actual = ours.generate(input_ids=input_ids, attention_mask=mask, **GENERATE)
    _compare_generate(actual, expected, TRITON_REL)


def _two_task_bank(model):
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=[4, 3])
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, 0.5)
    ptv2_kernels.patch(model, bank, backend="reference")
    return bank

# Families whose decoder layers do not pass keyword arguments on to their attention: the per-forward context reaches
# the attention through the patch state instead.
_KWARGLESS = {"stablelm": ("StableLmConfig", "StableLmForCausalLM"),
              "nemotron": ("NemotronConfig", "NemotronForCausalLM")}


def _kwargless_model(family):
    config_name, model_name = _KWARGLESS[family]
    if not hasattr(transformers, model_name):
        pytest.skip(f"this transformers has no {model_name}")
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                                max_position_embeddings=64)
    return getattr(transformers, model_name)(config)


@pytest.mark.parametrize("family", sorted(_KWARGLESS))
def test_families_that_drop_attention_kwargs_serve_mixed_tasks(family):
    model = _kwargless_model(family).eval()
    bank = _two_task_bank(model)
    state = getattr(model, hf_transformers._STATE_ATTR)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = model(input_ids=ids, task_ids=torch.tensor([0, 1])).logits
        alone = torch.cat([model(input_ids=ids[i:i + 1], task_ids=torch.tensor([i])).logits for i in range(2)])
        other = model(input_ids=ids[:1], task_ids=torch.tensor([1])).logits
        with pytest.raises(IndexError):
            model(input_ids=ids, task_ids=torch.tensor([0, 5]))
        again = model(input_ids=ids, task_ids=torch.tensor([0, 1])).logits
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone[:1], other, rtol=1e-3, atol=1e-3)  # the task's prefix matters
    torch.testing.assert_close(again, mixed, rtol=0, atol=0)  # a failed forward leaves nothing behind
    assert state.current is None and not state.interrupted  # outside every forward, nothing is current
    del bank


@pytest.mark.parametrize("family", sorted(_KWARGLESS))
def test_families_that_drop_attention_kwargs_recompute_with_several_tasks(family):
    """Gradient checkpointing recomputes a layer during backward, outside the forward: the layer's checkpoint
    function runs it under the context of the forward it recomputes, so a mixed-task batch gets the gradients it
    gets without checkpointing."""
    model = _kwargless_model(family)
    bank = _two_task_bank(model)
    model.train()
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))

    def grads():
        bank.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 1]), use_cache=False).loss.backward()
        return [p.grad.clone() for p in bank.parameters()]

    plain = grads()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    for got, want in zip(grads(), plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    state = model._ptv2_patch_state
    assert state.current is None and not state.interrupted
