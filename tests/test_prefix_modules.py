"""PrefixEncoder and PrefixBank: layout, views, gradients without per-layer copies, folding, saving and loading."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ptv2_kernels import PrefixBank, PrefixEncoder
from ptv2_kernels.prefix import PrefixSlot

SLOTS = [("layer.0", 2, 8), ("layer.1", 2, 8), ("layer.2", 1, 4)]  # the last slot has its own shape


def manual_kv(flat: torch.Tensor, slots):
    """The per-slot keys/values of a flat [T, P, F] tensor, cut the obvious way (PEFT's order)."""
    out, start = [], 0
    for _, heads, dim in slots:
        pair = []
        for _ in range(2):
            part = flat[:, :, start:start + heads * dim]
            pair.append(part.reshape(flat.shape[0], flat.shape[1], heads, dim).permute(0, 2, 1, 3))
            start += heads * dim
        out.append(tuple(pair))
    assert start == flat.shape[-1]
    return out


def test_encoder_views_in_op_layout():
    torch.manual_seed(0)
    encoder = PrefixEncoder(5, SLOTS, num_tasks=3)
    kv = encoder()
    weight = encoder.embedding.weight
    assert weight.shape == (3 * 5, 2 * (2 * 8 + 2 * 8 + 4))
    for (key, value), (want_k, want_v), (_, heads, dim) in zip(kv, manual_kv(weight.view(3, 5, -1), SLOTS), SLOTS):
        assert key.shape == value.shape == (3, heads, 5, dim)
        assert key.stride(-1) == 1
        # Views of the parameter: no copy was made.
        assert key.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
        torch.testing.assert_close(key, want_k, rtol=0, atol=0)
        torch.testing.assert_close(value, want_v, rtol=0, atol=0)


def test_uniform_slots_shorthand():
    encoder = PrefixEncoder(4, num_layers=3, num_kv_heads=2, head_dim=8)
    assert [slot.name for slot in encoder.slots] == ["layer.0", "layer.1", "layer.2"]
    assert encoder.embedding.weight.shape == (4, 3 * 2 * 2 * 8)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            # Only new memory counts (views and detach share their input's storage).
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize("num_layers", [2, 12])
def test_backward_makes_no_per_layer_full_size_copies(num_layers):
    """The gradient of all slots' views is gathered by one concatenation: the number of full-size tensors the
    backward creates does not grow with the number of layers."""
    encoder = PrefixEncoder(4, num_layers=num_layers, num_kv_heads=2, head_dim=8, num_tasks=2)
    kv = encoder()
    loss = sum((k * 2.0).sum() + (v * 3.0).sum() for k, v in kv)
    recorder = _Recorder()
    with recorder:
        loss.backward()
    full = encoder.embedding.weight.numel()
    big = [name for name, numel in recorder.sizes if numel >= full]
    assert len(big) <= 1, big
    grad = encoder.embedding.weight.grad.view(2, 4, num_layers, 2, 16)
    torch.testing.assert_close(grad[:, :, :, 0], torch.full_like(grad[:, :, :, 0], 2.0))
    torch.testing.assert_close(grad[:, :, :, 1], torch.full_like(grad[:, :, :, 1], 3.0))


def test_projection_and_fold():
    torch.manual_seed(0)
    encoder = PrefixEncoder(6, SLOTS, num_tasks=2, projection_hidden=32, embed_dim=24)
    assert encoder.reparameterized and encoder.embedding.weight.shape == (12, 24)
    flat = encoder.transform(encoder.embedding.weight).view(2, 6, -1)
    before = encoder()
    for (key, value), (want_k, want_v) in zip(before, manual_kv(flat, SLOTS)):
        torch.testing.assert_close(key, want_k, rtol=0, atol=0)
        torch.testing.assert_close(value, want_v, rtol=0, atol=0)
    # Gradients reach the MLP and the embedding.
    sum(k.sum() + v.sum() for k, v in before).backward()
    assert encoder.embedding.weight.grad.abs().sum() > 0 and encoder.transform[0].weight.grad.abs().sum() > 0
    encoder.fold()
    assert not encoder.reparameterized and encoder.embedding.weight.shape == (12, encoder.width)
    for (key, value), (old_k, old_v) in zip(encoder(), before):
        torch.testing.assert_close(key, old_k.detach(), rtol=0, atol=0)
        torch.testing.assert_close(value, old_v.detach(), rtol=0, atol=0)


def test_dropout_only_while_training():
    torch.manual_seed(0)
    encoder = PrefixEncoder(8, num_layers=2, num_kv_heads=2, head_dim=8, dropout=0.5)
    weight = encoder.embedding.weight
    encoder.eval()
    torch.testing.assert_close(encoder.flat(), weight.view(1, 8, -1), rtol=0, atol=0)
    encoder.train()
    flat = encoder.flat()
    zeros = (flat == 0).float().mean().item()
    assert 0.3 < zeros < 0.7  # about half of 512 values dropped
    kept = flat != 0
    torch.testing.assert_close(flat[kept], (weight.view(1, 8, -1) * 2.0)[kept])


@pytest.mark.parametrize("kwargs, match", [
    (dict(slots=[]), "at least one slot"),
    (dict(slots=[("a", 2, 8), ("a", 2, 8)]), "unique"),
    (dict(slots=[("a", 0, 8)]), "num_kv_heads"),
    (dict(slots=[("a", 2)]), "name, num_kv_heads, head_dim"),
    (dict(), "give either slots"),
    (dict(slots=SLOTS, num_layers=2), "not both"),
    (dict(slots=SLOTS, num_tasks=0), "num_tasks"),
    (dict(slots=SLOTS, projection_hidden=0), "projection_hidden"),
    (dict(slots=SLOTS, dropout=1.0), "dropout"),
])
def test_encoder_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrefixEncoder(4, **kwargs)


def test_bank_lengths_names_and_task_index():
    bank = PrefixBank(SLOTS, num_tasks=3, prefix_len=[2, 7, 4], task_names=["a", "b", "c"])
    assert bank.prefix_len == 7 and bank.lengths() == [2, 7, 4] and not bank.uniform_length
    assert bank.prefix_lengths.dtype == torch.long
    assert bank.task_index(["c", 0, "b"]).tolist() == [2, 0, 1]
    assert bank.task_index(1).tolist() == [1]
    assert bank.task_index(torch.tensor([2, 1], dtype=torch.int32)).dtype == torch.long
    with pytest.raises(KeyError, match="unknown task name 'd'"):
        bank.task_index("d")
    with pytest.raises(IndexError, match="out of range"):
        bank.task_index([3])
    with pytest.raises(TypeError, match="integer tensor"):
        bank.task_index(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="one per task"):
        PrefixBank(SLOTS, num_tasks=2, prefix_len=[2, 3, 4])
    with pytest.raises(ValueError, match="distinct names"):
        PrefixBank(SLOTS, num_tasks=2, task_names=["a", "a"])
    kv = bank()
    assert len(kv) == 3 and kv[0][0].shape == (3, 2, 7, 8)


@pytest.mark.parametrize("projection", [None, 16])
def test_save_and_load_roundtrip(tmp_path, projection):
    torch.manual_seed(0)
    bank = PrefixBank(SLOTS, num_tasks=2, prefix_len=[3, 5], projection_hidden=projection, dropout=0.1,
                      task_names=["x", "y"], model_type="bert")
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    assert path.stat().st_size < 64 * 1024
    loaded = PrefixBank.load(path)
    assert loaded.config_dict() == bank.config_dict()
    for name, tensor in bank.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    bank.eval(), loaded.eval()
    for (k0, v0), (k1, v1) in zip(bank(), loaded()):
        torch.testing.assert_close(k1, k0, rtol=0, atol=0)
        torch.testing.assert_close(v1, v0, rtol=0, atol=0)
    half = PrefixBank.load(path, dtype=torch.float16)
    assert half.encoder.embedding.weight.dtype == torch.float16 and half.prefix_lengths.dtype == torch.long


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a saved PrefixBank"):
        PrefixBank.load(path)


def test_slot_width():
    assert PrefixSlot("layer.0", 4, 16).width == 128


def test_task_index_checks_host_ids_before_moving_them():
    """Ids the host holds (ints, names, a CPU tensor bound for another device) are checked before they are moved,
    so a bad id is an IndexError here instead of a device read (or a kernel's NaN rows) later."""
    bank = PrefixBank(SLOTS, num_tasks=3, prefix_len=2)
    with pytest.raises(IndexError, match="task id 5 is out of range for a bank of 3 tasks"):
        bank.task_index(torch.tensor([0, 5]), device="meta")  # "meta" stands in for a GPU
    with pytest.raises(IndexError, match="task id -1"):
        bank.task_index([0, -1], device="meta")
    moved = bank.task_index(torch.tensor([2, 1], dtype=torch.int32), device="meta")
    assert moved.device.type == "meta" and moved.dtype == torch.long and moved.shape == (2,)
    with pytest.raises(ValueError, match=r"one id per sample.*\[2, 2\]"):
        bank.task_index(torch.zeros(2, 2, dtype=torch.long))
    same = torch.tensor([1, 0])
    assert bank.task_index(same) is same  # already a long tensor where it goes: the op checks it (once) there
    assert bank.task_index(torch.tensor(2)).tolist() == [2]


def test_lengths_are_read_from_the_buffer_only_after_it_changes(monkeypatch):
    bank = PrefixBank(SLOTS, num_tasks=3, prefix_len=[2, 5, 3])
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
    assert bank.lengths() == [2, 5, 3] and bank.lengths() == [2, 5, 3]
    assert reads == []  # known from the configuration: no read of the buffer (a GPU synchronization)
    with torch.no_grad():
        bank.prefix_lengths[1] = 4
    assert bank.lengths() == [2, 4, 3] and bank.lengths() == [2, 4, 3]
    assert len(reads) == 1


@pytest.mark.parametrize("projection_hidden", [None, 16])
def test_views_reused_without_autograd_until_a_parameter_changes(projection_hidden):
    """Under no_grad (every generate step) the per-slot views are made once; an optimizer step, an in-place
    write or a move makes them again; with autograd they are always made anew (they carry the graph)."""
    encoder = PrefixEncoder(4, num_layers=3, num_kv_heads=2, head_dim=8, num_tasks=2,
                            projection_hidden=projection_hidden)
    with torch.no_grad():
        first = encoder()
        assert encoder() is first
        first_key = first[0][0].clone()
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    loss = sum(key.sum() + value.square().sum() for key, value in encoder())
    assert encoder() is not encoder()  # autograd on: fresh views each call
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        stepped = encoder()
        assert stepped is not first and encoder() is stepped
        assert not torch.equal(stepped[0][0], first_key)
        encoder.embedding.weight.mul_(2)
        doubled = encoder()
        assert doubled is not stepped
        fresh = encoder._views()
        for (key, value), (want_key, want_value) in zip(doubled, fresh):
            assert torch.equal(key, want_key) and torch.equal(value, want_value)
        encoder.double()
        assert encoder()[0][0].dtype == torch.float64
    copied = copy.deepcopy(encoder)
    assert "_reused_views" not in copied.__dict__


def test_views_not_reused_while_dropout_trains():
    encoder = PrefixEncoder(4, num_layers=2, num_kv_heads=2, head_dim=8, dropout=0.5).train()
    with torch.no_grad():
        assert encoder() is not encoder()
        encoder.eval()
        assert encoder() is encoder()


def test_slots_with_values_of_their_own_head_dim():
    """A slot (name, Hkv, Dk, Dv) holds keys of Dk and values of Dv side by side in the flat layout, keys first;
    Dv equal to Dk is the plain three-part slot."""
    encoder = PrefixEncoder(3, [("layer.0", 2, 6, 4), ("layer.1", 2, 5, 5)], num_tasks=2)
    assert encoder.slots[1] == ("layer.1", 2, 5) and encoder.slots[1].value_head_dim == 5
    assert encoder.slots[0] == ("layer.0", 2, 6, 4) and encoder.slots[0].value_dim == 4
    assert PrefixSlot("layer.0", 2, 6, 6) == ("layer.0", 2, 6) and PrefixSlot("layer.0", 2, 6).value_dim is None
    assert copy.deepcopy(encoder.slots) == encoder.slots and type(copy.deepcopy(encoder.slots[0])) is PrefixSlot
    assert encoder.width == 2 * (6 + 4) + 2 * (5 + 5)
    (key, value), (key1, value1) = encoder()
    assert key.shape == (2, 2, 3, 6) and value.shape == (2, 2, 3, 4) and value1.shape == (2, 2, 3, 5)
    flat = encoder.flat()
    torch.testing.assert_close(value[1, 1, 2], flat[1, 2, 2 * 6 + 4:2 * 6 + 8])
    with pytest.raises(ValueError, match="value_dim of slot 'layer.0' must be a positive int"):
        PrefixEncoder(3, [("layer.0", 2, 6, 0)])
    with pytest.raises(ValueError, match=r"each slot must be \(name, num_kv_heads, head_dim\) or"):
        PrefixEncoder(3, [("layer.0", 2, 6, 4, 1)])
