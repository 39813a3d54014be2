"""The op's masks follow scaled_dot_product_attention's conventions, its bias gradient keeps to the bias's size,
and its checks of index values read the device as seldom as they can.

* ``attn_mask`` is read exactly as ``torch.nn.functional.scaled_dot_product_attention`` reads it (bool: True =
  attend; float: added to the scores; broadcast to ``[B, Hq, Nq, Nk]`` from the right), on the sequence keys only;
  ``key_padding_mask`` is the ``[B, Nk]`` form. Checked against SDPA itself on the concatenated keys/values.
* A broadcast ``attn_bias`` gets its gradient without a buffer of the broadcast size ``[B, Hq, Nq, Nk]``.
* The values of ``prefix_index``/``prefix_lengths`` are read once per new tensor, remembered for a few tensors.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ptv2_kernels import backends, ops, prefix_attention
from ptv2_kernels.reference import attention_ref

from .conftest import DEVICE

B, HQ, HKV, NQ, NK, D, P = 3, 4, 2, 3, 6, 8, 2
F64 = dict(rtol=1e-10, atol=1e-10)
KERNEL_BACKENDS = ["reference"] + (["triton"] if backends.unavailable_reason("triton") is None else [])


def _inputs(dtype=torch.float64, batch=B, q_len=NQ, k_len=NK, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)

    return (randn(batch, HQ, q_len, D), randn(batch, HKV, k_len, D), randn(batch, HKV, k_len, D),
            randn(HKV, P, D), randn(HKV, P, D))


def _sdpa_on_concatenation(q, k, v, prefix_k, prefix_v, attn_mask):
    """What a user would compute with SDPA: the prefix concatenated in front, the mask widened with visible
    (True, or 0.0 for a float mask) prefix columns."""
    batch = q.shape[0]
    keys = torch.cat([prefix_k.expand(batch, *prefix_k.shape), k], dim=2).repeat_interleave(HQ // HKV, dim=1)
    values = torch.cat([prefix_v.expand(batch, *prefix_v.shape), v], dim=2).repeat_interleave(HQ // HKV, dim=1)
    full = torch.broadcast_shapes(attn_mask.shape, (batch, HQ, q.shape[2], k.shape[2]))
    mask = attn_mask.expand(full)
    prefix_cols = (torch.ones if mask.dtype == torch.bool else torch.zeros)(
        *full[:3], P, dtype=mask.dtype, device=mask.device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=torch.cat([prefix_cols, mask], dim=-1))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", [(NQ, NK), (1, NK), (HQ, NQ, NK), (B, 1, NQ, NK), (B, HQ, NQ, NK), (NK,)], ids=str)
def test_attn_mask_is_read_as_sdpa_reads_it(backend, kind, shape):
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v, prefix_k, prefix_v = _inputs(dtype)
    gen = torch.Generator().manual_seed(1)
    if kind == "bool":
        mask = torch.rand(shape, generator=gen) > 0.4
    else:
        mask = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        mask = mask.masked_fill(torch.rand(shape, generator=gen) < 0.3, float("-inf"))
    mask = mask.to(DEVICE)
    out = prefix_attention(q, k, v, prefix_k, prefix_v, attn_mask=mask, backend=backend)
    want = _sdpa_on_concatenation(q, k, v, prefix_k, prefix_v, mask)
    tolerance = F64 if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out, want, **tolerance)


def test_2d_mask_with_batch_equal_to_queries_is_not_key_padding():
    """The case that used to be silently misread: with B == Nq a [Nq, Nk] mask has a key-padding shape too. It is
    SDPA's [Nq, Nk] mask."""
    q, k, v, prefix_k, prefix_v = _inputs(batch=NQ)
    mask = torch.rand(NQ, NK, generator=torch.Generator().manual_seed(2)) > 0.5
    out = prefix_attention(q, k, v, prefix_k, prefix_v, attn_mask=mask, backend="reference")
    torch.testing.assert_close(out, _sdpa_on_concatenation(q, k, v, prefix_k, prefix_v, mask), **F64)
    as_padding = prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=mask, backend="reference")
    assert (out - as_padding).abs().max() > 1e-3  # the two readings differ: the test can tell them apart


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_key_padding_mask_equals_the_broadcast_sdpa_mask(backend):
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v, prefix_k, prefix_v = _inputs(dtype)
    padding = (torch.arange(NK)[None, :] < torch.tensor([NK, 2, 0])[:, None]).to(DEVICE)
    out = prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=padding, backend=backend)
    sdpa_form = prefix_attention(q, k, v, prefix_k, prefix_v, attn_mask=padding[:, None, None, :], backend=backend)
    torch.testing.assert_close(out, sdpa_form, rtol=1e-6, atol=1e-6)
    # Sample 2 sees only its prefix: its output is attention over the prefix alone.
    prefix_only = attention_ref(q[2:], k[2:, :, :0], v[2:, :, :0], prefix_k, prefix_v)[0]
    torch.testing.assert_close(out[2:].double(), prefix_only.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_float_mask_and_bias_add_up_and_both_get_gradients(backend):
    dtype = torch.float64 if backend == "reference" else torch.float32
    leaves = [t.requires_grad_() for t in _inputs(dtype)]
    gen = torch.Generator().manual_seed(4)
    mask = torch.randn(NQ, NK, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    bias = torch.randn(1, HQ, NQ, NK, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    out = prefix_attention(*leaves, attn_mask=mask, attn_bias=bias, backend=backend)
    grads = torch.autograd.grad(out.sum(), [*leaves, mask, bias])

    leaves64 = [t.detach().double().requires_grad_() for t in (*leaves, mask, bias)]
    want = attention_ref(*leaves64[:5], attn_bias=leaves64[6] + leaves64[5], compute_dtype=torch.float64)[0]
    want_grads = torch.autograd.grad(want.sum(), leaves64)
    tolerance = F64 if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), want, **tolerance)
    for got, expected in zip(grads, want_grads):
        assert got.shape == expected.shape
        torch.testing.assert_close(got.double(), expected, **tolerance)


# ----------------------------------------------------------------------------------------------------------------
# The bias gradient, reduced over the broadcast dims without the broadcast-size buffer
# ----------------------------------------------------------------------------------------------------------------

class _LargestAllocation(TorchDispatchMode):
    """The largest tensor (in elements) that any op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor) and t._base is None:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // max(1, t.element_size()))
        return result


def _bias_run(backend, bias_shape, deterministic=False, batch=6, requires_grad_inputs=True):
    dtype = torch.float64 if backend == "reference" else torch.float32
    q_len, k_len = bias_shape[-2:]
    leaves = [t.requires_grad_(requires_grad_inputs) for t in _inputs(dtype, batch=batch, q_len=q_len, k_len=k_len)]
    gen = torch.Generator().manual_seed(5)
    bias = torch.randn(bias_shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    index_free = dict(attn_bias=bias, causal=True, backend=backend, deterministic=deterministic)
    out = prefix_attention(*leaves, **index_free)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    wanted = [t for t in leaves if t.requires_grad] + [bias]
    with _LargestAllocation() as watch:
        grads = torch.autograd.grad(out, wanted, grad_out)
    return grads, watch.largest


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("bias_shape", [(1, HQ, 5, 7), (6, 1, 5, 7), (1, 1, 5, 7), (5, 7)], ids=str)
def test_broadcast_bias_gradient_in_chunks_equals_one_pass(backend, bias_shape, monkeypatch):
    """Forced into chunks of one or two samples, the backward gives the gradients of one pass over the batch."""
    one_pass, _ = _bias_run(backend, bias_shape)
    per_sample = HQ * 5 * 7 * 4
    monkeypatch.setattr(ops, "BIAS_GRAD_CHUNK_BYTES", per_sample + 1)  # with a small bias: one sample a chunk
    chunked, _ = _bias_run(backend, bias_shape)
    tolerance = dict(rtol=1e-12, atol=1e-12) if backend == "reference" else dict(rtol=1e-5, atol=1e-6)
    for got, want in zip(chunked, one_pass):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_chunked_bias_gradient_is_deterministic(backend, monkeypatch):
    monkeypatch.setattr(ops, "BIAS_GRAD_CHUNK_BYTES", 2 * HQ * 5 * 7 * 4)
    first, _ = _bias_run(backend, (1, HQ, 5, 7), deterministic=True)
    again, _ = _bias_run(backend, (1, HQ, 5, 7), deterministic=True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_broadcast_bias_gradient_allocates_nothing_of_the_broadcast_size(monkeypatch):
    """The backward of a [1, Hq, Nq, Nk] bias over a batch of 24 allocates no tensor as large as the dense
    [B, Hq, Nq, Nk] bias gradient (the reference backend's own score matrices, per chunk, included). Inputs other
    than the bias need no gradient, as in prefix tuning of a frozen model with a trained position bias."""
    batch, q_len, k_len = 24, 16, 40
    dense = batch * HQ * q_len * k_len
    monkeypatch.setattr(ops, "BIAS_GRAD_CHUNK_BYTES", 4 * HQ * q_len * k_len * 4)  # chunks of 4 samples
    _, largest = _bias_run("reference", (1, HQ, q_len, k_len), batch=batch, requires_grad_inputs=False)
    assert largest < dense / 2, f"largest allocation {largest} elements, the dense bias gradient has {dense}"


# ----------------------------------------------------------------------------------------------------------------
# Reads of the device to check index values
# ----------------------------------------------------------------------------------------------------------------

class _DeviceReads(TorchDispatchMode):
    """Counts the ops that copy a device value to the host (a synchronization on a GPU)."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def _bank_call(index, lengths):
    q, k, v, _, _ = _inputs(torch.float32)
    bank_k = torch.randn(3, HKV, P, D, device=DEVICE)
    return prefix_attention(q, k, v, bank_k, bank_k, prefix_index=index, prefix_lengths=lengths,
                            backend="reference")


def test_index_values_read_once_per_new_tensor_and_in_one_read():
    ops._checked_values.clear()
    index, lengths = torch.tensor([2, 0, 1], device=DEVICE), torch.tensor([2, 1, 0], device=DEVICE)
    with _DeviceReads() as reads:
        _bank_call(index, lengths)
    assert reads.count <= 1, "index and lengths are checked with one read of the device"
    with _DeviceReads() as reads:
        for _ in range(3):
            _bank_call(index, lengths)
    assert reads.count == 0


def test_alternating_index_tensors_are_both_remembered():
    """A server alternating between a few task-id tensors (or a model whose layers get two) reads each once."""
    ops._checked_values.clear()
    first, second = torch.tensor([2, 0, 1], device=DEVICE), torch.tensor([0, 0, 1], device=DEVICE)
    _bank_call(first, None)
    _bank_call(second, None)
    with _DeviceReads() as reads:
        for _ in range(4):
            _bank_call(first, None)
            _bank_call(second, None)
    assert reads.count == 0


def test_remembered_index_is_checked_again_after_an_in_place_write():
    ops._checked_values.clear()
    index = torch.tensor([2, 0, 1], device=DEVICE)
    _bank_call(index, None)
    index[1] = 7
    with pytest.raises(IndexError, match="prefix_index"):
        _bank_call(index, None)
