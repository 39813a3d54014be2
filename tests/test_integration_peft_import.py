"""PrefixBank.from_peft: PEFT's MLP form, its folded (inference-mode) form, save/load of an imported bank, errors.

(The PEFT equivalence tests of every family also import their prefix with from_peft.)"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import ptv2_kernels

from .hf_models import assert_close_scaled, decoder_model, encoder_model, patched_twin, peft_twin, random_batch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REL = 1e-5


def test_projection_is_imported_as_an_mlp_and_folds():
    model = decoder_model("llama")
    peft_model = peft_twin(model, "CAUSAL_LM", num_virtual_tokens=3, projection_hidden=24)
    ours, bank = patched_twin(model, peft_model)
    assert bank.encoder.reparameterized and bank.encoder.projection_hidden == 24
    input_ids, mask = random_batch(2, 6, padding="left")
    expected = peft_model(input_ids=input_ids, attention_mask=mask).logits[mask.bool()]
    assert_close_scaled(ours(input_ids=input_ids, attention_mask=mask).logits[mask.bool()], expected, REL, "mlp")
    bank.fold()
    assert not bank.encoder.reparameterized
    assert_close_scaled(ours(input_ids=input_ids, attention_mask=mask).logits[mask.bool()], expected, REL, "folded")


def test_peft_inference_mode_form(tmp_path):
    """A PEFT prefix saved and loaded for inference keeps only the final keys/values: imported as they are."""
    from peft import PeftModel

    model = encoder_model("roberta", "seq_cls")
    peft_model = peft_twin(model, "SEQ_CLS", num_virtual_tokens=4)
    peft_model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter", is_trainable=False).eval()
    assert loaded.peft_config["default"].inference_mode
    ours, bank = patched_twin(model, loaded)
    input_ids, mask = random_batch(3, 7, padding="right")
    assert_close_scaled(ours(input_ids=input_ids, attention_mask=mask).logits,
                        loaded(input_ids=input_ids, attention_mask=mask).logits, REL, "logits")


def test_imported_bank_survives_save_and_load(tmp_path):
    model = encoder_model("electra", "token_cls")
    peft_model = peft_twin(model, "TOKEN_CLS", num_virtual_tokens=5)
    bank = ptv2_kernels.PrefixBank.from_peft(peft_model)
    bank.save(tmp_path / "bank.safetensors")
    fresh = copy.deepcopy(model)
    ptv2_kernels.patch(fresh, ptv2_kernels.PrefixBank.load(tmp_path / "bank.safetensors"), backend="reference")
    input_ids, mask = random_batch(2, 6, padding="right")
    assert_close_scaled(fresh(input_ids=input_ids, attention_mask=mask).logits,
                        peft_model(input_ids=input_ids, attention_mask=mask).logits, REL, "logits")


def test_from_peft_errors():
    model = encoder_model("bert", "seq_cls")
    with pytest.raises(TypeError, match="peft.PeftModel"):
        ptv2_kernels.PrefixBank.from_peft(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(task_type="SEQ_CLS",
                                                                         target_modules=["query"]))
    with pytest.raises(ValueError, match="LORA"):
        ptv2_kernels.PrefixBank.from_peft(lora)
    peft_model = peft_twin(model, "SEQ_CLS", num_virtual_tokens=2)
    with pytest.raises(KeyError, match="no adapter 'other'"):
        ptv2_kernels.PrefixBank.from_peft(peft_model, adapter_name="other")
