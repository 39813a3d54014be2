"""patch()/unpatch() mechanics: restoring, the context-manager form, patching twice, bad arguments, unsupported
models, the mask forms that reach the op, and freeze_backbone."""

from __future__ import annotations

import copy

import pytest
import torch

import ptv2_kernels

from .hf_models import OpSpy, decoder_model, encoder_model, random_batch

transformers = pytest.importorskip("transformers")


def _bank(model, **kwargs):
    bank = ptv2_kernels.PrefixBank.for_model(model, **kwargs)
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, 0.5)
    return bank


def test_unpatch_restores_the_model():
    model = encoder_model("bert", "seq_cls")
    input_ids, mask = random_batch(2, 6, padding="right")
    before = model(input_ids=input_ids, attention_mask=mask).logits
    implementation = model.config._attn_implementation
    params = {name for name, _ in model.named_parameters()}
    hooks = len(model._forward_pre_hooks)

    bank = _bank(model, prefix_len=3)
    ptv2_kernels.patch(model, bank, backend="reference")
    patched = model(input_ids=input_ids, attention_mask=mask).logits
    assert (patched - before).abs().max() > 1e-4  # the prefix changes the output
    assert model.config._attn_implementation == "ptv2_prefix"
    assert model.ptv2_prefix is bank and {n for n, _ in model.named_parameters()} > params

    ptv2_kernels.unpatch(model)
    after = model(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert model.config._attn_implementation == implementation
    assert {n for n, _ in model.named_parameters()} == params
    # One hook stays: it rejects task_ids, which the unpatched model would otherwise silently ignore.
    assert [type(h).__name__ for h in model._forward_pre_hooks.values()][hooks:] == ["_RejectTaskIds"]
    assert not any(hasattr(m, "_ptv2_prefix_slot") for m in model.modules())
    assert "generate" not in model.__dict__
    with pytest.raises(ValueError, match="not patched"):
        ptv2_kernels.unpatch(model)


def test_context_manager_and_handle():
    model = encoder_model("bert", "seq_cls")
    input_ids, _ = random_batch(2, 5)
    before = model(input_ids=input_ids).logits
    bank = _bank(model, prefix_len=2)
    with ptv2_kernels.patch(model, bank, backend="reference") as patched:
        assert patched is model
        inside = model(input_ids=input_ids).logits
    assert (inside - before).abs().max() > 1e-4
    torch.testing.assert_close(model(input_ids=input_ids).logits, before, rtol=0, atol=0)
    handle = ptv2_kernels.patch(model, bank, backend="reference")
    handle.unpatch()
    handle.unpatch()  # a second unpatch through the handle is harmless
    assert model.config._attn_implementation != "ptv2_prefix"


def test_patching_twice_is_a_clear_error():
    model = encoder_model("bert", "seq_cls")
    bank = _bank(model, prefix_len=2)
    ptv2_kernels.patch(model, bank)
    with pytest.raises(RuntimeError, match="already patched"):
        ptv2_kernels.patch(model, bank)
    ptv2_kernels.unpatch(model)
    ptv2_kernels.patch(model, bank)  # and after unpatch it works again
    ptv2_kernels.unpatch(model)


def test_bad_arguments():
    model = encoder_model("bert", "seq_cls")
    bank = _bank(model, prefix_len=2)
    with pytest.raises(TypeError, match="PrefixBank"):
        ptv2_kernels.patch(model, bank.encoder)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        ptv2_kernels.patch(torch.nn.Linear(2, 2), bank)
    with pytest.raises(ValueError, match="positions"):
        ptv2_kernels.patch(model, bank, positions="left")
    with pytest.raises(ValueError, match="backend"):
        ptv2_kernels.patch(model, bank, backend="flash")
    other = encoder_model("roberta", "seq_cls")
    with pytest.raises(ValueError, match="built for model type 'bert'"):
        ptv2_kernels.patch(other, bank)
    wide = encoder_model("bert", "seq_cls", hidden_size=64, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"slot 'layer.0'.*\(2, 16\).*\(4, 16\)"):
        ptv2_kernels.patch(wide, bank)
    deep = ptv2_kernels.PrefixBank([(f"layer.{i}", 2, 16) for i in range(3)], prefix_len=2)
    with pytest.raises(ValueError, match="'layer.2'"):
        ptv2_kernels.patch(model, deep)
    assert model.config._attn_implementation != "ptv2_prefix"  # failed patches leave the model alone
    with pytest.raises(ValueError, match="encoder-decoder"):
        ptv2_kernels.PrefixBank.for_model(model, attentions=["encoder"])


def test_task_ids_errors():
    model = encoder_model("bert", "seq_cls")
    bank = _bank(model, num_tasks=3, prefix_len=2)
    ptv2_kernels.patch(model, bank, backend="reference")
    input_ids, _ = random_batch(2, 5)
    with pytest.raises(ValueError, match="holds 3 task prefixes: pass task_ids"):
        model(input_ids=input_ids)
    with pytest.raises(IndexError):
        model(input_ids=input_ids, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="task_ids has 3 entries, but the model is called on a batch of 2"):
        model(input_ids=input_ids, task_ids=torch.tensor([0, 1, 2]))
    one = model(input_ids=input_ids, task_ids=1).logits  # one id for the whole batch
    both = model(input_ids=input_ids, task_ids=[1, 1]).logits
    torch.testing.assert_close(one, both, rtol=0, atol=0)


def test_unsupported_model_names_its_type():
    config = transformers.SqueezeBertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64, embedding_size=32)
    model = transformers.SqueezeBertForSequenceClassification(config)
    with pytest.raises(NotImplementedError, match="'squeezebert'.*AttentionInterface"):
        ptv2_kernels.PrefixBank.for_model(model)
    bank = ptv2_kernels.PrefixBank([("layer.0", 2, 16)], prefix_len=2)
    with pytest.raises(NotImplementedError, match="'squeezebert'"):
        ptv2_kernels.patch(model, bank)


def test_encoder_masks_reach_the_op_in_cheap_forms(monkeypatch):
    spy = OpSpy(monkeypatch)
    model = encoder_model("bert", "seq_cls")
    ptv2_kernels.patch(model, _bank(model, prefix_len=3), backend="reference")
    input_ids, mask = random_batch(2, 6, padding="right")
    model(input_ids=input_ids)
    assert spy.calls == [(None, False, (1, 2, 3, 16), False)] * 2  # no mask, shared prefix
    spy.calls.clear()
    model(input_ids=input_ids, attention_mask=mask)
    assert spy.calls == [((2, 6), False, (1, 2, 3, 16), False)] * 2  # key padding [B, N]


def test_user_4d_masks_give_the_reference_result():
    """A user's dense 4-D mask (bool, or additive float) equals the same mask given as key padding."""
    model = encoder_model("bert", "seq_cls")
    ptv2_kernels.patch(model, _bank(model, prefix_len=3), backend="reference")
    input_ids, mask = random_batch(2, 6, padding="right", seed=4)
    expected = model(input_ids=input_ids, attention_mask=mask).logits
    dense = mask.bool()[:, None, None, :].expand(2, 1, 6, 6)
    torch.testing.assert_close(model(input_ids=input_ids, attention_mask=dense).logits, expected)
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~dense, torch.finfo(torch.float32).min)
    torch.testing.assert_close(model(input_ids=input_ids, attention_mask=additive).logits, expected)
    # Any additive float mask is added to the sequence keys' scores as SDPA would (the prefix keys unbiased).
    biased = model(input_ids=input_ids, attention_mask=additive + 0.5).logits
    assert torch.isfinite(biased).all() and not torch.allclose(biased, expected)


def test_user_float_4d_mask_reads_nothing_from_the_device():
    """A float 4-D mask goes to the op as it is: no per-layer check of its values (a device read on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.count += func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)
            return func(*args, **(kwargs or {}))

    model = encoder_model("bert", "seq_cls")
    ptv2_kernels.patch(model, _bank(model, prefix_len=3), backend="reference")
    input_ids, mask = random_batch(2, 6, padding="right", seed=4)
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    with Reads():
        model(input_ids=input_ids, attention_mask=additive)
    assert Reads.count == 0


def test_freeze_backbone_leaves_prefix_and_head():
    model = encoder_model("bert", "seq_cls")
    with pytest.raises(ValueError, match="patched"):
        ptv2_kernels.freeze_backbone(model)
    ptv2_kernels.patch(model, _bank(model, prefix_len=2))
    trainable = ptv2_kernels.freeze_backbone(model)
    assert trainable == ["classifier.weight", "classifier.bias", "ptv2_prefix.encoder.embedding.weight"]
    assert ptv2_kernels.freeze_backbone(model, train_head=False) == ["ptv2_prefix.encoder.embedding.weight"]
    lm = decoder_model("gpt2")
    ptv2_kernels.patch(lm, _bank(lm, prefix_len=2))
    # GPT-2's LM head is tied to the input embeddings: it stays frozen.
    assert ptv2_kernels.freeze_backbone(lm) == ["ptv2_prefix.encoder.embedding.weight"]
