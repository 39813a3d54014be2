"""patch() on encoder models (BERT, RoBERTa, ELECTRA) with their task heads, against PEFT prefix tuning.

PEFT puts the prefix into the model's cache and concatenates it in every layer; the patched model must give the
same logits and the same prefix gradients. Both run in float32; the reference backend computes the same math as
SDPA in another summation order, so the logits agree to float32 rounding (observed ~1e-8 on values ~1; the bound is
1e-5 of the largest value). The Triton kernels (in the interpreter without a GPU) sum blockwise with an online
softmax: a 1e-4 relative bound covers that in float32.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ptv2_kernels
from ptv2_kernels import backends
from ptv2_kernels.integrations.hf_transformers import cache_keyword

from .hf_models import (ENCODER_HEADS, assert_close_scaled, bank_grads, encoder_model, logits_of, loss_of,
                        patched_twin, peft_grads, peft_twin, random_batch)

pytest.importorskip("transformers")
pytest.importorskip("peft")

TASK_TYPES = {"seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS", "qa": "QUESTION_ANS"}
REFERENCE_REL = 1e-5
TRITON_REL = 1e-4
needs_triton = pytest.mark.skipif(backends.unavailable_reason("triton") is not None,
                                  reason=f"Triton unavailable: {backends.unavailable_reason('triton')}")


def _compare_with_peft(peft_model, ours, bank, batch, rel):
    expected = peft_model(**batch)
    actual = ours(**batch)
    assert_close_scaled(logits_of(actual), logits_of(expected), rel, "logits")
    loss_of(expected).backward()
    loss_of(actual).backward()
    want, got = peft_grads(peft_model), bank_grads(bank)
    assert want.keys() == got.keys()
    for name in want:
        assert_close_scaled(got[name], want[name], rel, f"gradient of {name}")


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
@pytest.mark.parametrize("head", ["seq_cls", "token_cls", "qa"])
def test_matches_peft(family, head):
    model = encoder_model(family, head)
    for padding, projection in (("none", None), ("right", 16 if family == "bert" else None)):
        peft_model = peft_twin(model, TASK_TYPES[head], num_virtual_tokens=4, projection_hidden=projection)
        ours, bank = patched_twin(model, peft_model)
        input_ids, mask = random_batch(3, 7, padding=padding, seed=len(padding))
        _compare_with_peft(peft_model, ours, bank, dict(input_ids=input_ids, attention_mask=mask), REFERENCE_REL)


def _multiple_choice_oracle(mc_model, num_virtual_tokens, seed=1):
    """PEFT prefix tuning of the multiple-choice model's encoder, with the choice head applied by hand (PEFT's
    prefix tuning cannot run a multiple-choice head: it sizes the prefix by the unflattened batch)."""
    base = mc_model.base_model
    peft_model = peft_twin(base, "FEATURE_EXTRACTION", num_virtual_tokens, seed=seed)

    def forward(input_ids, attention_mask):
        batch, choices, length = input_ids.shape
        out = peft_model(input_ids=input_ids.view(-1, length), attention_mask=attention_mask.view(-1, length))
        return mc_model.classifier(mc_model.dropout(out.pooler_output)).view(batch, choices)

    return peft_model, forward


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_multiple_choice_matches_peft_encoder(family):
    model = encoder_model(family, "multiple_choice")
    peft_model, oracle = _multiple_choice_oracle(model, 3)
    ours = copy.deepcopy(model)
    bank = ptv2_kernels.PrefixBank.from_peft(peft_model)
    bank.model_type = ours.config.model_type
    ptv2_kernels.patch(ours, bank, backend="reference")
    input_ids, mask = random_batch(2, 6, padding="right", choices=3)
    expected = oracle(input_ids, mask)
    actual = ours(input_ids=input_ids, attention_mask=mask).logits
    assert actual.shape == (2, 3)
    assert_close_scaled(actual, expected, REFERENCE_REL, "logits")
    (expected * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    (actual * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    assert_close_scaled(bank.encoder.embedding.weight.grad, peft_grads(peft_model)["embedding.weight"],
                        REFERENCE_REL, "prefix gradient")


@needs_triton
@pytest.mark.parametrize("head", ["seq_cls", "token_cls"])
def test_matches_peft_with_triton(head):
    model = encoder_model("bert", head)
    peft_model = peft_twin(model, TASK_TYPES[head], num_virtual_tokens=5)
    ours, bank = patched_twin(model, peft_model, backend="triton")
    input_ids, mask = random_batch(3, 9, padding="right", seed=3)
    _compare_with_peft(peft_model, ours, bank, dict(input_ids=input_ids, attention_mask=mask), TRITON_REL)


def _task_banks(model, lengths, seed=0):
    """A T-task bank with the given lengths, and, for each task, a PEFT twin carrying that task's prefix."""
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=len(lengths), prefix_len=list(lengths))
    torch.manual_seed(seed)
    with torch.no_grad():
        bank.encoder.embedding.weight.copy_(torch.randn_like(bank.encoder.embedding.weight) * 0.5)
    rows = bank.encoder.embedding.weight.view(len(lengths), bank.prefix_len, -1)
    return bank, rows


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_mixed_batch_equals_single_task_forwards(backend):
    """Samples of three tasks (prefix lengths 2, 5, 3) in one batch give what each task's PEFT model gives."""
    model = encoder_model("bert", "token_cls")
    lengths = [2, 5, 3]
    bank, rows = _task_banks(model, lengths)
    ours = copy.deepcopy(model)
    ptv2_kernels.patch(ours, bank, backend=backend)
    task_ids = torch.tensor([2, 0, 1, 1, 0, 2])
    input_ids, mask = random_batch(6, 7, padding="right", seed=5)
    mixed = ours(input_ids=input_ids, attention_mask=mask, task_ids=task_ids).logits
    rel = REFERENCE_REL if backend == "reference" else TRITON_REL
    for task, length in enumerate(lengths):
        peft_model = peft_twin(model, "TOKEN_CLS", num_virtual_tokens=length)
        with torch.no_grad():
            peft_model.prompt_encoder.default.embedding.weight.copy_(rows[task, :length])
        samples = (task_ids == task).nonzero().flatten()
        expected = peft_model(input_ids=input_ids[samples], attention_mask=mask[samples]).logits
        assert_close_scaled(mixed[samples], expected, rel, f"task {task}")


def test_mixed_batch_by_name_and_multiple_choice():
    """Task names select entries; a multiple-choice head repeats each sample's task over its choices."""
    model = encoder_model("bert", "multiple_choice")
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=[3, 4], task_names=["a", "b"])
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, 0.5)
    ours = copy.deepcopy(model)
    ptv2_kernels.patch(ours, bank, backend="reference")
    input_ids, mask = random_batch(3, 6, padding="right", choices=2, seed=2)
    mixed = ours(input_ids=input_ids, attention_mask=mask, task_ids=["b", "a", "b"]).logits
    for i, task in enumerate([1, 0, 1]):
        single = ours(input_ids=input_ids[i:i + 1], attention_mask=mask[i:i + 1], task_ids=task).logits
        assert_close_scaled(mixed[i:i + 1], single, REFERENCE_REL, f"sample {i}")
    # Different tasks give different results (the task ids are not ignored).
    other = ours(input_ids=input_ids, attention_mask=mask, task_ids=["a", "a", "a"]).logits
    assert (other[0] - mixed[0]).abs().max() > 1e-3


def test_unshifted_positions_match_peft_cache_with_explicit_positions():
    """positions='unshifted' keeps the real tokens at 0..N-1. Oracle: PEFT's mechanism (its prefix as the cache, the
    mask extended by P ones) run on the base model with position ids 0..N-1 (PEFT itself drops position_ids)."""
    model = encoder_model("bert", "seq_cls")
    peft_model = peft_twin(model, "SEQ_CLS", num_virtual_tokens=4)
    ours, bank = patched_twin(model, peft_model, positions="unshifted")
    input_ids, mask = random_batch(3, 7, padding="right")
    position_ids = torch.arange(7).expand(3, -1)
    full_mask = torch.cat([torch.ones(3, 4, dtype=mask.dtype), mask], dim=1)
    base = peft_model.get_base_model()
    with torch.no_grad():
        expected = base(input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids,
                        **{cache_keyword(): peft_model.get_prompt(batch_size=3)}).logits
        shifted = base(input_ids=input_ids, attention_mask=full_mask,
                       **{cache_keyword(): peft_model.get_prompt(batch_size=3)}).logits
        actual = ours(input_ids=input_ids, attention_mask=mask).logits
    assert_close_scaled(actual, expected, REFERENCE_REL, "logits")
    assert (shifted - expected).abs().max() > 1e-4  # the shift matters, so the test can tell the two apart
