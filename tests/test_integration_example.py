"""The P-Tuning v2 example of docs/integration.md, line for line, on a tiny BERT built from a config."""

from __future__ import annotations

import copy

import pytest
import torch

from .hf_models import encoder_model, random_batch

pytest.importorskip("transformers")


def test_documented_example(tmp_path):
    import ptv2_kernels as ptv2

    pretrained = encoder_model("bert", "seq_cls", num_labels=2)  # stands in for from_pretrained(...)
    model, serving_model = copy.deepcopy(pretrained), copy.deepcopy(pretrained)
    input_ids, mask = random_batch(6, 8, padding="right")
    batch = dict(input_ids=input_ids, attention_mask=mask, labels=torch.tensor([0, 1, 1, 0, 1, 0]),
                 task_ids=torch.tensor([0, 1, 2, 2, 1, 0]))
    loader = [batch] * 3

    # --- the documented lines ---
    bank = ptv2.PrefixBank.for_model(model, num_tasks=3, prefix_len=[4, 16, 8], task_names=["rte", "conll", "boolq"])
    ptv2.patch(model, bank)
    ptv2.freeze_backbone(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for b in loader:
        model(**b).loss.backward(); opt.step(); opt.zero_grad()
    bank.save(tmp_path / "prefixes.safetensors")
    served = ptv2.PrefixBank.load(tmp_path / "prefixes.safetensors")
    serving_model.classifier.load_state_dict(model.classifier.state_dict())
    ptv2.patch(serving_model, served)
    logits = serving_model(input_ids=input_ids, attention_mask=mask,
                           task_ids=["rte", "conll", "boolq", "boolq", "conll", "rte"]).logits
    # --- end ---

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask, task_ids=batch["task_ids"]).logits
    torch.testing.assert_close(logits, expected)
    assert (bank.encoder.embedding.weight - served.encoder.embedding.weight).abs().max() == 0
