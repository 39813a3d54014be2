"""Training a prefix as P-Tuning v2 does: convergence against PEFT's path, freeze_backbone, gradient checkpointing,
torch.compile of a patched model, and DistributedDataParallel (gloo, 2 CPU processes)."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import ptv2_kernels
from ptv2_kernels import backends
from ptv2_kernels.integrations import hf_transformers

from .hf_models import assert_close_scaled, encoder_model, patched_twin, peft_twin, random_batch

pytest.importorskip("transformers")
pytest.importorskip("peft")

needs_triton = pytest.mark.skipif(backends.unavailable_reason("triton") is not None,
                                  reason=f"Triton unavailable: {backends.unavailable_reason('triton')}")


def _classification_data(steps, batch=8, length=10, seed=0):
    """Sequences labelled by their first token (3..49 or 50..99): learnable by a prefix + linear head on the
    frozen random encoder's first position."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(steps):
        input_ids, mask = random_batch(batch, length, padding="right", seed=int(torch.randint(0, 10**6, (1,),
                                                                                              generator=gen)))
        data.append((input_ids, mask, (input_ids[:, 0] >= 50).long()))
    return data


def _train(model, params, data, lr=5e-2):
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for input_ids, mask, labels in data:
        optimizer.zero_grad()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_convergence_matches_peft(backend):
    """40 AdamW steps of prefix + head on a tiny BERT classifier: the patched model and PEFT (same seed, same
    data) follow the same loss curve and end with the same prefix. AdamW normalizes updates, so float32 rounding
    differences grow slowly over the steps; 1e-4 (reference) / 1e-3 (Triton) relative bounds leave room for that
    while any real difference (a wrong mask, position or gradient) moves the curve by far more."""
    steps = 40 if backend == "reference" else 4  # the interpreter is ~100x slower
    model = encoder_model("bert", "seq_cls", num_labels=2)
    peft_model = peft_twin(model, "SEQ_CLS", num_virtual_tokens=4)
    ours, bank = patched_twin(model, peft_model, backend=backend)
    peft_model.train(), ours.train()
    trainable = ptv2_kernels.freeze_backbone(ours)
    assert trainable == ["classifier.weight", "classifier.bias", "ptv2_prefix.encoder.embedding.weight"]
    batches = _classification_data(2, batch=8 if backend == "reference" else 4)
    data = [batches[i % 2] for i in range(steps)]  # two batches, seen again and again: the loss must fall
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    # PEFT trains the prefix and a copy of the classifier (modules_to_save): the same parameters as ours.
    assert sorted(p.numel() for p in peft_params) == sorted(p.numel() for p in ours.parameters() if p.requires_grad)
    expected = _train(peft_model, peft_params, data)
    actual = _train(ours, [p for p in ours.parameters() if p.requires_grad], data)
    rel = 1e-4 if backend == "reference" else 1e-3
    assert_close_scaled(torch.tensor(actual), torch.tensor(expected), rel, "loss curve")
    if backend == "reference":
        assert sum(expected[-5:]) < 0.8 * sum(expected[:5])  # it does learn
    assert_close_scaled(bank.encoder.embedding.weight.detach(),
                        peft_model.prompt_encoder.default.embedding.weight.detach(), rel, "final prefix")


def test_gradient_checkpointing(monkeypatch):
    """With gradient checkpointing (which PEFT's prefix tuning refuses) the recomputed attention uses the same
    prefix and task ids, and the gradients equal those without checkpointing."""
    model = encoder_model("bert", "seq_cls", num_labels=2)
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=[3, 5])
    ptv2_kernels.patch(model, bank, backend="reference")
    ptv2_kernels.freeze_backbone(model)
    model.train()
    input_ids, mask = random_batch(4, 8, padding="right", seed=3)
    labels = torch.tensor([0, 1, 1, 0])
    task_ids = torch.tensor([1, 0, 1, 0])
    model.zero_grad()
    model(input_ids=input_ids, attention_mask=mask, labels=labels, task_ids=task_ids).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    calls = []
    original = hf_transformers.prefix_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("prefix_index"))
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_transformers, "prefix_attention", counting)
    # transformers 5.24 renamed it activation checkpointing (the old name warns)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.zero_grad()
    model(input_ids=input_ids, attention_mask=mask, labels=labels, task_ids=task_ids).loss.backward()
    assert len(calls) == 4  # 2 layers, forward and recompute
    assert all(torch.equal(index, task_ids) for index in calls)
    for name, grad in plain.items():
        assert_close_scaled(dict(model.named_parameters())[name].grad, grad, 1e-6, name)


def test_torch_compile_of_a_patched_model():
    """torch.compile (whole graph, AOT autograd) of a patched model gives the eager logits and prefix gradients."""
    model = encoder_model("bert", "seq_cls", num_labels=2)
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=3)
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, 0.5)
    ptv2_kernels.patch(model, bank, backend="reference")
    ptv2_kernels.freeze_backbone(model)
    input_ids, mask = random_batch(3, 6, padding="right", seed=1)
    task_ids = torch.tensor([1, 0, 1])
    eager = model(input_ids=input_ids, attention_mask=mask, task_ids=task_ids).logits
    eager.sum().backward()
    eager_grad = bank.encoder.embedding.weight.grad.clone()
    bank.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(input_ids=input_ids, attention_mask=mask, task_ids=task_ids).logits
    out.sum().backward()
    assert_close_scaled(out, eager, 1e-6, "logits")
    assert_close_scaled(bank.encoder.embedding.weight.grad, eager_grad, 1e-6, "prefix gradient")


_DDP_WORKER = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import ptv2_kernels
from tests.hf_models import encoder_model, random_batch
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2)
torch.manual_seed(0)
model = encoder_model("bert", "seq_cls", num_labels=2)
bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=[2, 4])
with torch.no_grad():
    bank.encoder.embedding.weight.normal_(0.0, 0.5)
ptv2_kernels.patch(model, bank, backend="reference")
ptv2_kernels.freeze_backbone(model)
ddp = torch.nn.parallel.DistributedDataParallel(model)
input_ids, mask = random_batch(8, 7, padding="right", seed=11)
labels = torch.arange(8) % 2
tasks = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
part = slice(4 * rank, 4 * rank + 4)
ddp(input_ids=input_ids[part], attention_mask=mask[part], labels=labels[part], task_ids=tasks[part]).loss.backward()
torch.save(bank.encoder.embedding.weight.grad, {out!r} + str(rank))
dist.barrier()  # neither rank leaves while the other still uses their gloo connections
# Leave without running C++ destructors: gloo's teardown at interpreter exit now and then calls std::terminate
# ("terminate called without an active exception") after all the work is done, failing a correct run.
sys.stdout.flush()
os._exit(0)
"""


def test_ddp_gloo_two_processes_give_the_single_process_gradient(tmp_path):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "worker.py"
    out = tmp_path / "grad.pt"
    script.write_text(_DDP_WORKER.format(root=root, store=str(tmp_path / "store"), out=str(out)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, str(script), str(rank)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = [worker.communicate(timeout=240)[0] for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), "\n".join(logs)
    ddp_grad, other_rank_grad = (torch.load(f"{out}{rank}") for rank in range(2))
    torch.testing.assert_close(other_rank_grad, ddp_grad, rtol=0, atol=0)  # DDP's all-reduce left both ranks equal

    torch.manual_seed(0)
    model = encoder_model("bert", "seq_cls", num_labels=2)
    bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=2, prefix_len=[2, 4])
    with torch.no_grad():
        bank.encoder.embedding.weight.normal_(0.0, 0.5)
    ptv2_kernels.patch(model, bank, backend="reference")
    ptv2_kernels.freeze_backbone(model)
    input_ids, mask = random_batch(8, 7, padding="right", seed=11)
    labels = torch.arange(8) % 2
    tasks = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    # DDP averages the two halves' mean losses' gradients: the gradient of the mean of the two half-batch losses.
    losses = [model(input_ids=input_ids[p], attention_mask=mask[p], labels=labels[p], task_ids=tasks[p]).loss
              for p in (slice(0, 4), slice(4, 8))]
    ((losses[0] + losses[1]) / 2).backward()
    assert_close_scaled(ddp_grad, bank.encoder.embedding.weight.grad, 1e-5, "prefix gradient")
