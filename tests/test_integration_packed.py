"""Packed (padding-free) batches through a patched model: transformers' ``DataCollatorWithFlattening`` output
(positions restarting at 0, optionally ``cu_seq_lens_q/k``) gives the same per-token logits, loss and prefix (and
head) gradients as the same sequences padded in an ordinary batch, with one task per packed sequence and tasks of
different prefix lengths; every attention runs the variable-length op and no mask is made.
"""

from __future__ import annotations

import pytest
import torch

import ptv2_kernels
from ptv2_kernels import backends
from ptv2_kernels.integrations import hf_transformers

from .hf_models import VOCAB, decoder_model, encoder_model

transformers = pytest.importorskip("transformers")

LENGTHS = (5, 9, 3, 7)
TASKS = [0, 1, 1, 0]
PREFIX_LENS = [3, 5]


WINDOW = 4  # Mistral's sliding window in the "mistral-window" model: shorter than most of the sequences


def _model(family):
    if family == "bert":
        return encoder_model("bert", "token_cls")
    if family == "mistral-window":
        return decoder_model("mistral", sliding_window=WINDOW)
    return decoder_model(family)


def _patched(family, positions, backend="reference", seed=3):
    model = _model(family)
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=PREFIX_LENS)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in bank.parameters():
            parameter.normal_(std=0.5)
    ptv2_kernels.patch(model, bank, positions=positions, backend=backend)
    return model, bank


def _features(family, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = []
    for length in LENGTHS:
        ids = torch.randint(3, VOCAB, (length,), generator=gen)
        feature = {"input_ids": ids.tolist()}
        if family == "bert":
            feature["labels"] = torch.randint(0, 3, (length,), generator=gen).tolist()
        features.append(feature)
    return features


def _padded_batch(family, features):
    longest = max(LENGTHS)
    ids = torch.full((len(features), longest), 1)
    mask = torch.zeros(len(features), longest, dtype=torch.long)
    labels = torch.full((len(features), longest), -100)
    for i, feature in enumerate(features):
        n = len(feature["input_ids"])
        ids[i, :n] = torch.tensor(feature["input_ids"])
        mask[i, :n] = 1
        # the flattening collator labels a sequence's first token -100 (the separator): so do we here
        wanted = feature["labels"] if family == "bert" else feature["input_ids"]
        labels[i, 1:n] = torch.tensor(wanted[1:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _step(model, bank, batch):
    model.zero_grad(set_to_none=True)
    output = model(**batch, task_ids=TASKS)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in bank.named_parameters() if p.grad is not None}
    head = model.classifier if hasattr(model, "classifier") else None
    if head is not None:
        grads["head"] = head.weight.grad.clone()
    return output.logits.detach(), output.loss.detach(), grads


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position-ids", "flash-kwargs"])
@pytest.mark.parametrize("positions", ["shifted", "unshifted"])
@pytest.mark.parametrize("family", ["bert", "llama", "qwen2", "gpt2", "mistral-window"])
def test_packed_batch_equals_padded_batch(family, positions, flash_kwargs, monkeypatch):
    model, bank = _patched(family, positions)
    model.train()  # dropout is off in the tiny configs; train mode as a training step runs
    features = _features(family)
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    packed = collator(features)
    assert packed["input_ids"].shape == (1, sum(LENGTHS))

    calls = []
    varlen = hf_transformers.prefix_attention_varlen
    monkeypatch.setattr(hf_transformers, "prefix_attention_varlen",
                        lambda *args, **kwargs: calls.append(kwargs) or varlen(*args, **kwargs))
    logits, loss, grads = _step(model, bank, packed)
    assert len(calls) == model.config.num_hidden_layers, "every attention layer runs the variable-length op"
    assert calls[0]["prefix_index"].tolist() == TASKS
    # A sliding layer's window reaches W - 1 keys back (the causal op cuts the forward side), as its padded mask.
    window = (WINDOW - 1, WINDOW - 1) if family == "mistral-window" else None
    assert all(call["window_size"] == window for call in calls)

    monkeypatch.setattr(hf_transformers, "prefix_attention_varlen", varlen)
    p_logits, p_loss, p_grads = _step(model, bank, _padded_batch(family, features))
    want = torch.cat([p_logits[i, :n] for i, n in enumerate(LENGTHS)])
    torch.testing.assert_close(logits[0], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, p_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == p_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], p_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=pytest.mark.skipif(
    backends.unavailable_reason("triton") is not None, reason=str(backends.unavailable_reason("triton"))))])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_packed_batch_on_the_kernel_backends(family, backend):
    """backend='auto' (the native backend one sequence at a time on the CPU, Triton on a GPU) and the Triton
    kernels (the interpreter without a GPU) against the reference."""
    features = _features(family)
    packed = transformers.DataCollatorWithFlattening()(features)
    results = [_step(*_patched(family, "shifted", backend=name), packed) for name in (backend, "reference")]
    (logits, loss, grads), (want_logits, want_loss, want_grads) = results
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_batch_makes_no_mask():
    """The mask function returns None for the packed row inside a patched forward (no [total, total] mask)."""
    model, bank = _patched("llama", "shifted")
    packed = transformers.DataCollatorWithFlattening()(_features("llama"))
    seen = []
    mask_function = hf_transformers.prefix_attention_mask

    def spy(*args, **kwargs):
        seen.append(mask_function(*args, **kwargs))
        return seen[-1]

    transformers.AttentionMaskInterface.register(hf_transformers.ATTENTION_NAME, spy)
    try:
        with torch.no_grad():
            model(**packed, task_ids=TASKS)
    finally:
        transformers.AttentionMaskInterface.register(hf_transformers.ATTENTION_NAME, mask_function)
    assert seen and all(mask is None for mask in seen)


def test_one_task_id_for_every_packed_sequence():
    model, bank = _patched("llama", "shifted")
    packed = transformers.DataCollatorWithFlattening()(_features("llama"))
    with torch.no_grad():
        one = model(**packed, task_ids=1).logits
        each = model(**packed, task_ids=[1] * len(LENGTHS)).logits
    torch.testing.assert_close(one, each, rtol=0, atol=0)


def test_task_ids_must_match_the_packed_sequences():
    model, bank = _patched("llama", "shifted")
    packed = transformers.DataCollatorWithFlattening()(_features("llama"))
    with pytest.raises(ValueError, match="4"):
        model(**packed, task_ids=[0, 1])


def test_packed_batch_with_gradient_checkpointing():
    """Checkpointed layers recompute with the packed context (it travels with the layers' keyword arguments)."""
    model, bank = _patched("llama", "shifted")
    packed = transformers.DataCollatorWithFlattening()(_features("llama"))
    _, loss, grads = _step(model, bank, packed)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    _, checkpointed_loss, checkpointed = _step(model, bank, packed)
    torch.testing.assert_close(checkpointed_loss, loss)
    for name in grads:
        torch.testing.assert_close(checkpointed[name], grads[name], rtol=1e-5, atol=1e-7)


def test_cached_position_bias_refuses_packed_batches():
    """A bank placed where a cache would hold it (position_bias="cached") loses prefix slots to a sliding window
    by their cache positions, which a packed row does not serve: it raises instead of serving them otherwise."""
    model = _model("mistral-window")
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=PREFIX_LENS, position_bias="cached")
    ptv2_kernels.patch(model, bank, backend="reference")
    packed = transformers.DataCollatorWithFlattening()(_features("mistral"))
    with pytest.raises(NotImplementedError, match="position_bias='cached'"):
        model(**packed, task_ids=TASKS)


def test_single_sequence_row_takes_the_ordinary_path(monkeypatch):
    model, bank = _patched("llama", "shifted")
    monkeypatch.setattr(hf_transformers, "prefix_attention_varlen",
                        lambda *a, **k: pytest.fail("a one-sequence row is an ordinary batch"))
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        model(input_ids=ids, position_ids=torch.arange(6)[None], task_ids=[1])
