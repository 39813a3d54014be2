"""Bad arguments to ``prefix_attention`` raise TypeError/ValueError/IndexError naming the argument (docs/design.md §4).

Every test starts from a valid call (checked to succeed by ``test_valid_call_succeeds``) and breaks one thing.
"""

import dataclasses
import gc
import re
import types
import weakref

import pytest
import torch

from ptv2_kernels import backends, prefix_attention

B, HQ, HKV, NQ, NK, D, P, T = 2, 4, 2, 3, 5, 8, 3, 3


def _valid(dtype=torch.float32, head_dim=D):
    """The arguments of a valid call with a bank of T prefixes, as a dict the tests edit."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return dict(
        q=randn(B, HQ, NQ, head_dim), k=randn(B, HKV, NK, head_dim), v=randn(B, HKV, NK, head_dim),
        prefix_k=randn(T, HKV, P, head_dim), prefix_v=randn(T, HKV, P, head_dim),
        prefix_index=torch.tensor([2, 0]), backend="reference")


def _call(args):
    args = dict(args)
    positional = [args.pop(name) for name in ("q", "k", "v", "prefix_k", "prefix_v")]
    return prefix_attention(*positional, **args)


def _raises(args, exc, *words):
    """The call raises exactly ``exc`` and its message contains every one of ``words`` (as whole words)."""
    with pytest.raises(exc) as info:
        _call(args)
    assert type(info.value) is exc, f"expected {exc.__name__}, got {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for word in words:
        assert re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", message), f"{word!r} not named in: {message}"
    return message


def _not_contiguous_last_dim(t):
    """The same values as ``t`` in a tensor whose last dim has stride 2."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def test_valid_call_succeeds():
    out = _call(_valid())
    assert out.shape == (B, HQ, NQ, D) and torch.isfinite(out).all()


def test_any_strides_with_contiguous_last_dim_are_accepted():
    args = _valid()
    args["q"] = args["q"].transpose(1, 2).contiguous().transpose(1, 2)  # [B, Nq, Hq, D] memory
    args["k"] = args["k"][:, :, :, :]  # a view
    args["prefix_k"] = args["prefix_k"].permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    args["prefix_v"] = torch.randn(HKV, T, P, D).transpose(0, 1)
    assert not args["q"].is_contiguous() and not args["prefix_k"].is_contiguous()
    out = _call(args)
    assert torch.isfinite(out).all()
    # A head dim of 1 is contiguous whatever its stride.
    args = _valid(head_dim=1)
    args["q"] = torch.randn(B, HQ, NQ, 2)[..., ::2]
    assert args["q"].shape[-1] == 1 and args["q"].stride(-1) == 2
    assert torch.isfinite(_call(args)).all()


# ----------------------------------------------------------------------------------------------------------------
# Types, ranks, shapes
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["q", "k", "v", "prefix_k", "prefix_v"])
@pytest.mark.parametrize("bad", [None, 1.0, [[1.0]]], ids=["None", "float", "list"])
def test_non_tensor_input(name, bad):
    args = _valid()
    args[name] = bad
    _raises(args, TypeError, name)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("rank", [3, 5])
def test_wrong_rank_qkv(name, rank):
    args = _valid()
    t = args[name]
    args[name] = t[0] if rank == 3 else t.unsqueeze(0)
    _raises(args, ValueError, name)


@pytest.mark.parametrize("rank", [2, 5])
def test_wrong_rank_prefix(rank):
    args = _valid()
    for name in ("prefix_k", "prefix_v"):
        args[name] = args[name][0, 0] if rank == 2 else args[name].unsqueeze(0)
    _raises(args, ValueError, "prefix_k")


@pytest.mark.parametrize("name", ["k", "v"])
def test_batch_mismatch(name):
    args = _valid()
    for n in ("k", "v"):
        args[n] = args[n][:1]
    _raises(args, ValueError, name, "batch")


def test_head_dim_mismatch():
    args = _valid()
    args["k"], args["v"] = args["k"][..., :D - 1], args["v"][..., :D - 1]
    _raises(args, ValueError, "k", "head dim")


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_k_v_shape_mismatch(dim):
    args = _valid()
    index = [slice(None)] * 4
    index[dim] = slice(0, args["v"].shape[dim] - 1)
    args["v"] = args["v"][tuple(index)]
    _raises(args, ValueError, "k", "v")


@pytest.mark.parametrize("name", ["v", "prefix_v"])
def test_value_head_dims_must_agree(name):
    """v may have a head dim of its own (multi-head latent attention), but prefix_v must then share it."""
    args = _valid()
    args[name] = args[name][..., :-1]
    _raises(args, ValueError, "prefix_v", "Dv")


@pytest.mark.parametrize("what", ["heads", "head_dim"])
@pytest.mark.parametrize("rank", [3, 4])
def test_prefix_heads_or_head_dim_mismatch(what, rank):
    args = _valid()
    for name in ("prefix_k", "prefix_v"):
        t = args[name] if rank == 4 else args[name][0]
        args[name] = t[..., :1, :, :] if what == "heads" else t[..., :D // 2]
    _raises(args, ValueError, "prefix_k")


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_prefix_k_v_shape_mismatch(dim):
    args = _valid()
    index = [slice(None)] * 4
    index[dim] = slice(0, args["prefix_v"].shape[dim] - 1)
    args["prefix_v"] = args["prefix_v"][tuple(index)]
    _raises(args, ValueError, "prefix_k", "prefix_v")


def test_empty_bank():
    args = _valid()
    args["prefix_k"], args["prefix_v"] = args["prefix_k"][:0], args["prefix_v"][:0]
    args["prefix_index"] = None
    _raises(args, ValueError, "prefix_k")


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 3), (3, 2), (2, 4)])
def test_head_ratio(q_heads, kv_heads):
    args = _valid()
    args["q"] = torch.randn(B, q_heads, NQ, D)
    for name in ("k", "v"):
        args[name] = torch.randn(B, kv_heads, NK, D)
    for name in ("prefix_k", "prefix_v"):
        args[name] = torch.randn(T, kv_heads, P, D)
    message = _raises(args, ValueError, "q")
    assert str(q_heads) in message and str(kv_heads) in message


# ----------------------------------------------------------------------------------------------------------------
# Dtypes, devices, memory layout
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["k", "v"])
def test_qkv_dtype_mismatch(name):
    args = _valid()
    args[name] = args[name].double()
    _raises(args, TypeError, name, "q")


def test_prefix_k_v_dtype_mismatch():
    args = _valid()
    args["prefix_v"] = args["prefix_v"].double()
    _raises(args, TypeError, "prefix_k", "prefix_v")


@pytest.mark.parametrize("name", ["q", "k", "v", "prefix_k", "prefix_v"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_non_floating_input(name, dtype):
    args = _valid()
    args[name] = args[name].to(dtype)
    _raises(args, TypeError, name)


def test_prefix_dtype_may_differ_from_q():
    args = _valid(dtype=torch.float16)
    args["prefix_k"], args["prefix_v"] = args["prefix_k"].float(), args["prefix_v"].float()
    assert _call(args).dtype == torch.float16


def _other_device():
    """A device other than the inputs' own where tensors can be created: "meta" (or cpu when testing on cuda)."""
    try:
        torch.empty(1, device="meta")
    except Exception as error:  # pragma: no cover - depends on the build
        pytest.skip(f"cannot create tensors on the meta device: {error}")
    return torch.device("meta")


@pytest.mark.parametrize("name", ["k", "v", "prefix_k", "prefix_v", "prefix_index", "prefix_lengths",
                                  "key_padding_mask", "attn_mask", "attn_bias"])
def test_device_mismatch(name):
    other = _other_device()
    args = _valid()
    args["prefix_lengths"] = torch.tensor([P, 1, 0])
    args["key_padding_mask"] = torch.ones(B, NK, dtype=torch.bool)
    args["attn_mask"] = torch.ones(B, 1, NQ, NK, dtype=torch.bool)
    args["attn_bias"] = torch.zeros(1, HQ, NQ, NK)
    args[name] = args[name].to(other)
    assert args[name].device != args["q"].device
    _raises(args, ValueError, name, str(other))


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_non_contiguous_last_dim(name):
    args = _valid()
    args[name] = _not_contiguous_last_dim(args[name])
    assert args[name].stride(-1) == 2
    _raises(args, ValueError, name, "contiguous")


# ----------------------------------------------------------------------------------------------------------------
# prefix_index, prefix_lengths, and the cache of checked index tensors
# ----------------------------------------------------------------------------------------------------------------

def test_prefix_index_required_for_a_bank():
    args = _valid()
    args["prefix_index"] = None
    _raises(args, ValueError, "prefix_index")


def test_prefix_index_optional_for_a_bank_of_one():
    args = _valid()
    args["prefix_k"], args["prefix_v"] = args["prefix_k"][:1], args["prefix_v"][:1]
    args["prefix_index"] = None
    _call(args)


@pytest.mark.parametrize("name", ["prefix_index", "prefix_lengths"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.complex64])
def test_index_tensors_wrong_dtype(name, dtype):
    args = _valid()
    args[name] = torch.zeros(B if name == "prefix_index" else T, dtype=dtype)
    _raises(args, TypeError, name)


@pytest.mark.parametrize("name", ["prefix_index", "prefix_lengths"])
def test_index_tensors_not_tensors(name):
    args = _valid()
    args[name] = [0] * (B if name == "prefix_index" else T)
    _raises(args, TypeError, name)


@pytest.mark.parametrize("shape", [(B + 1,), (B - 1,), (B, 1), ()], ids=str)
def test_prefix_index_wrong_shape(shape):
    args = _valid()
    args["prefix_index"] = torch.zeros(shape, dtype=torch.long)
    _raises(args, ValueError, "prefix_index")


@pytest.mark.parametrize("shape", [(T + 1,), (T - 1,), (T, 1), ()], ids=str)
def test_prefix_lengths_wrong_shape(shape):
    args = _valid()
    args["prefix_lengths"] = torch.zeros(shape, dtype=torch.long)
    _raises(args, ValueError, "prefix_lengths")


@pytest.mark.parametrize("bad", [-1, T, T + 7, -T - 1])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_prefix_index_out_of_range(bad, dtype):
    args = _valid()
    args["prefix_index"] = torch.tensor([0, bad], dtype=dtype)
    message = _raises(args, IndexError, "prefix_index")
    assert str(bad) in message


@pytest.mark.parametrize("bad", [-1, P + 1])
def test_prefix_lengths_out_of_range(bad):
    args = _valid()
    args["prefix_lengths"] = torch.tensor([0, bad, P])
    message = _raises(args, ValueError, "prefix_lengths")
    assert str(bad) in message


def test_prefix_lengths_zero_and_full_are_valid():
    args = _valid()
    args["prefix_lengths"] = torch.tensor([0, P, 1], dtype=torch.int32)
    _call(args)


def test_index_fixed_in_place_is_checked_again():
    args = _valid()
    index = torch.tensor([0, T])
    args["prefix_index"] = index
    _raises(args, IndexError, "prefix_index")
    index[1] = T - 1  # bumps index._version
    _call(args)
    # The accepted tensor is now remembered; breaking it in place must be caught all the same.
    index[0] = -1
    _raises(args, IndexError, "prefix_index")
    index[0] = 0
    _call(args)
    index.add_(T)
    _raises(args, IndexError, "prefix_index")


def test_index_written_through_a_view_is_checked_again():
    args = _valid()
    base = torch.tensor([0, 1, 0, 1])
    args["prefix_index"] = base[:B]
    _call(args)
    base[1] = T  # the view shares the base's version counter
    _raises(args, IndexError, "prefix_index")


def test_lengths_broken_in_place_are_checked_again():
    args = _valid()
    lengths = torch.tensor([P, 0, 1])
    args["prefix_lengths"] = lengths
    _call(args)
    lengths[2] = P + 1
    _raises(args, ValueError, "prefix_lengths")
    lengths[2] = -1
    _raises(args, ValueError, "prefix_lengths")


def test_accepted_index_is_checked_again_against_a_smaller_bank():
    args = _valid()
    args["prefix_index"] = index = torch.tensor([T - 1, 0])
    args["prefix_lengths"] = lengths = torch.tensor([P, P, P])
    _call(args)
    smaller = _valid()
    smaller["prefix_index"], smaller["prefix_lengths"] = index, lengths[: T - 1]
    smaller["prefix_k"], smaller["prefix_v"] = smaller["prefix_k"][: T - 1], smaller["prefix_v"][: T - 1]
    _raises(smaller, IndexError, "prefix_index")
    # The same lengths tensor against a shorter prefix.
    shorter = _valid()
    shorter["prefix_index"], shorter["prefix_lengths"] = index, lengths
    shorter["prefix_k"], shorter["prefix_v"] = shorter["prefix_k"][:, :, :P - 1], shorter["prefix_v"][:, :, :P - 1]
    _raises(shorter, ValueError, "prefix_lengths")


def test_checked_index_tensors_are_not_kept_alive():
    args = _valid()
    args["prefix_index"], args["prefix_lengths"] = torch.tensor([0, 1]), torch.tensor([1, 2, 3])
    refs = [weakref.ref(args["prefix_index"]), weakref.ref(args["prefix_lengths"])]
    _call(args)
    del args
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


def test_index_tensors_made_in_inference_mode():
    args = _valid()
    with torch.inference_mode():
        args["prefix_index"] = torch.tensor([2, 0])
        args["prefix_lengths"] = torch.tensor([P, 1, 0])
        out = _call(args)
        args["prefix_index"][0] = T  # in-place writes to an inference tensor bump no version counter
        _raises(args, IndexError, "prefix_index")
    expected = _call(dict(args, prefix_index=torch.tensor([2, 0]), prefix_lengths=torch.tensor([P, 1, 0])))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# attn_mask and key_padding_mask
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.int32])
@pytest.mark.parametrize("shape", [(NQ, NK), (B, 1, NQ, NK)], ids=str)
def test_mask_wrong_dtype(dtype, shape):
    args = _valid()
    args["attn_mask"] = torch.ones(shape, dtype=dtype)
    _raises(args, TypeError, "attn_mask")


def test_mask_not_a_tensor():
    args = _valid()
    args["attn_mask"] = [[True] * NK] * B
    _raises(args, TypeError, "attn_mask")


@pytest.mark.parametrize("shape", [(NQ + 1, NK), (NQ, NK + 1), (NK, NQ), (B, HQ + 1, NQ, NK), (B, HKV, NQ, NK),
                                   (B + 1, 1, NQ, NK), (B, 1, NQ + 1, NK), (B, 1, NQ, NK - 1), (B, 1, NK, NQ),
                                   (B, 1, 1, NQ, NK), (1, B, 1, 1, NK)], ids=str)
def test_mask_not_broadcastable(shape):
    args = _valid()
    args["attn_mask"] = torch.ones(shape, dtype=torch.bool)
    _raises(args, ValueError, "attn_mask")


def test_mask_in_the_old_key_padding_form_says_what_to_pass():
    """A [B, Nk] attn_mask (this op's key-padding form before it took SDPA's convention) is not [Nq, Nk]: the
    error says to pass it as key_padding_mask."""
    args = _valid()
    args["attn_mask"] = torch.ones(B, NK, dtype=torch.bool)
    _raises(args, ValueError, "attn_mask", "key_padding_mask")


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(), (NK,), (1, NK), (NQ, 1), (NQ, NK), (1, NQ, NK), (HQ, NQ, NK), (B, 1, NQ, NK),
                                   (B, HQ, NQ, NK), (1, 1, NQ, NK), (B, 1, 1, NK), (B, HQ, 1, 1)], ids=str)
def test_mask_broadcastable_shapes(shape, dtype):
    """Any shape scaled_dot_product_attention broadcasts is accepted; an all-attend mask changes nothing."""
    args = _valid()
    args["attn_mask"] = torch.ones(shape, dtype=torch.bool) if dtype == torch.bool else torch.zeros(shape, dtype=dtype)
    torch.testing.assert_close(_call(args), _call(_valid()), rtol=0, atol=0)


@pytest.mark.parametrize("mask, exc", [
    ([[True] * NK] * B, TypeError),
    (torch.ones(B, NK), TypeError),  # float: key padding is bool; an additive mask goes to attn_mask
    (torch.ones(B, NK, dtype=torch.int64), TypeError),
    (torch.ones(B, NK + 1, dtype=torch.bool), ValueError),
    (torch.ones(B + 1, NK, dtype=torch.bool), ValueError),
    (torch.ones(1, NK, dtype=torch.bool), ValueError),  # one row per sample, no broadcasting
    (torch.ones(B, 1, 1, NK, dtype=torch.bool), ValueError),
    (torch.ones(NK, dtype=torch.bool), ValueError),
], ids=["list", "float", "int", "keys", "batch", "broadcast-batch", "4d", "1d"])
def test_key_padding_mask_bad(mask, exc):
    args = _valid()
    args["key_padding_mask"] = mask
    _raises(args, exc, "key_padding_mask")


def test_key_padding_mask_and_bool_mask_combine():
    """Both masks given: a key is attended only where both allow it."""
    gen = torch.Generator().manual_seed(3)
    padding = torch.rand(B, NK, generator=gen) > 0.3
    dense = torch.rand(B, HQ, NQ, NK, generator=gen) > 0.3
    both = _call(dict(_valid(), key_padding_mask=padding, attn_mask=dense))
    combined = _call(dict(_valid(), attn_mask=dense & padding[:, None, None, :]))
    torch.testing.assert_close(both, combined, rtol=0, atol=0)


@pytest.mark.parametrize("bias, exc", [
    ([[0.0] * NK] * NQ, TypeError),
    (torch.zeros(B, 1, NQ, NK, dtype=torch.int32), TypeError),
    (torch.zeros(B, 1, NQ, NK, dtype=torch.bool), TypeError),
    (torch.zeros(B, NK), ValueError),  # a key-padding shape is a mask's, not a bias's
    (torch.zeros(B, HKV, NQ, NK), ValueError),
    (torch.zeros(B, 1, NQ, NK + 1), ValueError),
    (torch.zeros(B, 1, NQ, NK, device="meta"), ValueError),
], ids=["list", "int", "bool", "2d", "kv-heads", "keys", "device"])
def test_bias_bad(bias, exc):
    args = _valid()
    args["attn_bias"] = bias
    _raises(args, exc, "attn_bias")


@pytest.mark.parametrize("shape", [(B, HQ, NQ, NK), (1, 1, NQ, NK), (B, 1, 1, NK)], ids=str)
def test_bias_valid_shapes(shape):
    args = _valid()
    args["attn_bias"] = torch.zeros(shape)
    torch.testing.assert_close(_call(args), _call(_valid()), rtol=0, atol=0)  # a zero bias changes nothing


def test_cuda_backend_rejects_a_bias(monkeypatch):
    """The CUDA kernels take no bias: named explicitly that backend says so, and auto passes it over. (Asked of
    the backend choice directly, as if the extension could run here, with a stand-in for a CUDA tensor.)"""
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: None)
    cuda_like = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16, shape=(1, 1, 4, 16))
    with pytest.raises(ValueError, match="backend='cuda' cannot serve this call: .*attn_bias"):
        backends.choose("cuda", cuda_like, cuda_like, cuda_like, attn_bias=cuda_like)
    assert backends.choose("auto", cuda_like, cuda_like, cuda_like, attn_bias=cuda_like) == "triton"


# ----------------------------------------------------------------------------------------------------------------
# Scalars and the backend
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, False, "0.1", None])
def test_dropout_p_outside_unit_interval(bad):
    args = _valid()
    args["dropout_p"] = bad
    _raises(args, ValueError, "dropout_p")


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), True, "0.5"])
def test_scale_not_finite(bad):
    args = _valid()
    args["scale"] = bad
    _raises(args, ValueError, "scale")


@pytest.mark.parametrize("bad", [1, 0, None, "yes", torch.tensor(True)])
def test_causal_not_bool(bad):
    args = _valid()
    args["causal"] = bad
    _raises(args, TypeError, "causal")


@pytest.mark.parametrize("bad", ["Triton", "flash", "", None])
def test_unknown_backend(bad):
    args = _valid()
    args["backend"] = bad
    _raises(args, ValueError, "backend")


def test_cuda_backend_not_built():
    x = torch.empty(1, 1, 1, D)
    reason = backends.unsupported_reason("cuda", x, x, x)
    if reason is None:
        pytest.skip("the CUDA backend can serve calls on this machine")
    args = _valid()
    args["backend"] = "cuda"
    message = _raises(args, ValueError, "backend")
    assert "cuda" in message and reason in message


def _triton_or_skip():
    reason = backends.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"backend='triton' cannot run here at all: {reason}")


def test_triton_backend_rejects_float64():
    _triton_or_skip()
    args = _valid(dtype=torch.float64)
    args["backend"] = "triton"
    _raises(args, ValueError, "backend", "torch.float64")


def test_triton_backend_rejects_float64_prefix():
    _triton_or_skip()
    args = _valid()
    args["prefix_k"], args["prefix_v"] = args["prefix_k"].double(), args["prefix_v"].double()
    args["backend"] = "triton"
    _raises(args, ValueError, "backend", "prefix_k", "torch.float64")


def test_triton_backend_rejects_large_head_dim():
    _triton_or_skip()
    args = _valid(head_dim=300)
    args["backend"] = "triton"
    _raises(args, ValueError, "backend", "300", str(backends.MAX_HEAD_DIM))


def test_auto_says_when_a_cuda_call_falls_back_to_the_reference():
    """CUDA tensors that no fused kernel can take (float64 here) go to the reference under auto, with a warning
    that says why each kernel backend declined. A stand-in for a CUDA tensor lets this run without a GPU."""
    cuda_like = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float64, shape=(1, 1, 4, 16))
    for _ in range(2):  # a fallback that warns is not remembered: it warns each time
        with pytest.warns(RuntimeWarning, match=r"runs the PyTorch reference .*\(triton: .*; cuda: .*\)"):
            assert backends.choose("auto", cuda_like, cuda_like, cuda_like) == "reference"


@pytest.mark.parametrize("dtype,head_dim", [(torch.float64, D), (torch.float32, 300)])
def test_auto_serves_what_the_reference_serves(dtype, head_dim):
    """On CPU auto takes the native backend (torch's fused attention), which sums in another order than the
    reference: equal to rounding."""
    args = _valid(dtype=dtype, head_dim=head_dim)
    expected = _call(args)
    args["backend"] = "auto"
    torch.testing.assert_close(_call(args), expected, **(dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64
                                                         else dict(rtol=1e-5, atol=1e-6)))


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.4.6", False), ("3.10.0", "3.0.0", False),
])
def test_triton_interpreter_and_numpy_versions(monkeypatch, triton_version, numpy_version, refused):
    """Triton < 3.7's interpreter cannot run with numpy >= 2.4: the triton backend says so rather than fail inside
    a kernel, and auto (which never takes the interpreter) is unaffected."""
    import importlib.metadata

    versions = {"triton": triton_version, "numpy": numpy_version}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    backends._interpreter_problem.cache_clear()
    try:
        problem = backends._interpreter_problem()
    finally:
        backends._interpreter_problem.cache_clear()
    assert (problem is not None) == refused
    if refused:
        assert f"Triton {triton_version}" in problem and "numpy<2.4 or triton>=3.7" in problem


def test_an_explicit_backend_lists_every_reason_it_cannot_serve():
    """The limits are declared once per backend and every one a call exceeds is named, not only the first."""
    from ptv2_kernels import cuda_backend

    q = torch.empty(2, 4, 3, 300, dtype=torch.float64)
    k = torch.empty(2, 4, 5, 300, dtype=torch.float64)
    prefix = torch.empty(1, 4, 2, 300, dtype=torch.float64)
    limits = backends.TRITON_LIMITS
    reasons = backends.limit_reasons(limits, q, k, prefix, 0.0, torch.empty(1, 1, 3, 5, dtype=torch.float64))
    assert len(reasons) == 4, reasons
    assert any("q/k/v of dtype float16, bfloat16 or float32, got torch.float64" in r for r in reasons)
    assert any("prefix_k/prefix_v" in r for r in reasons) and any("attn_bias of dtype" in r for r in reasons)
    assert any(f"head dims up to {limits.max_head_dim}, got 300" in r for r in reasons)
    no_bias = dataclasses.replace(limits, takes_bias=False, size_bits=4)
    reasons = backends.limit_reasons(no_bias, q, k, prefix, 0.5, torch.empty(1, 1, 3, 5))
    assert any("take no additive score bias" in r for r in reasons)
    assert any("below 2**4" in r for r in reasons)  # B * Hq * Nq = 24 >= 16
    assert not any("with dropout" in r for r in reasons)  # Nq * (P + Nk) = 21 < 2**31
    if backends.unavailable_reason("triton") is None:
        with pytest.raises(ValueError) as raised:
            prefix_attention(q, k, k, prefix, prefix, backend="triton")
        message = str(raised.value)
        assert "got torch.float64" in message and "head dims up to" in message and message.count(";") >= 2
    if cuda_backend.unavailable_reason() is None or "no CUDA device" in (cuda_backend.unavailable_reason() or ""):
        if cuda_backend._extension()[0] is not None:  # the built extension states the CUDA kernels' limits
            stated = cuda_backend.limits()
            assert (stated.max_head_dim, stated.max_grid_dim, stated.size_bits) == (256, 65535, 31)
            assert not stated.takes_bias and stated.dtypes == cuda_backend.DTYPES


def test_an_explicit_backend_lists_every_reason_it_cannot_serve():
    """Each backend states what it serves once; a call that needs several things it lacks gets all of them, from
    the backend's own list and in the error of the op."""
    args = _valid()
    native = backends.REGISTRY["native"]
    problem = backends.Problem(args["q"], args["k"], args["prefix_k"], softcap=30.0, sinks=torch.zeros(HQ),
                               prefix_bias=torch.zeros(1, 1, 1, P), value_dim=D + 8)
    reasons = native.unsupported_reasons(problem)
    assert len(reasons) == 4
    for word, reason in zip(("softcap", "sinks", "prefix_bias", "head dim"), reasons):
        assert word in reason
    assert backends.REGISTRY["reference"].unsupported_reasons(problem) == []
    args.update(backend="native", softcap=30.0, sinks=torch.zeros(HQ), prefix_bias=torch.zeros(1, 1, 1, P))
    message = _raises(args, ValueError, "backend")
    assert all(word in message for word in ("softcap", "sinks", "prefix_bias"))


def test_every_backend_is_declared_once():
    """The registry holds one declaration per backend name, and the tables derived from it agree with the
    declarations (which backend serves which score option, which take values of another head dim)."""
    assert tuple(backends.REGISTRY) == backends.NAMES
    for name, backend in backends.REGISTRY.items():
        assert backend.name == name
        for option in backends.SCORE_OPTIONS:
            served = option in backend.score_options
            assert served == (name in backends.SERVES_SCORE_OPTION[option])
            assert served or option in backend.score_option_why  # a reason for each option it lacks
        assert (backend.value_head_dim_why is None) == (name in backends.SERVES_VALUE_HEAD_DIM)
    assert backends.implementation("reference") is backends.ReferenceBackend
    with pytest.raises(ValueError, match="backend"):
        backends.implementation("flash")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32])
@pytest.mark.parametrize("options", [{}, dict(softcap=5.0), dict(dropout_p=0.1), dict(value_dim=D + 8),
                                     dict(window_size=(2, 0))], ids=["plain", "softcap", "dropout", "dv", "window"])
def test_auto_choice_is_remembered_per_problem_key(dtype, options):
    """auto chooses once per problem key and every later call of that key (the other layers, the next decode
    steps) gets the same backend as a fresh choice; a decode step's longer sequence keeps its key."""
    q, prefix = torch.zeros(B, HQ, 1, D, dtype=dtype), torch.zeros(T, HKV, P, D)
    fresh = None
    for k_len in range(NK, NK + 12):  # a growing cache
        problem = backends.Problem(q, torch.zeros(B, HKV, k_len, D, dtype=dtype), prefix, **options)
        expected, warned = backends._choose_auto(problem)
        assert not warned
        assert backends.choose_for("auto", problem) == expected
        assert backends.choose_for("auto", problem) == expected
        fresh = fresh or expected
        assert expected == fresh
    keys = {backends._choice_key(backends.Problem(q, torch.zeros(B, HKV, k_len, D), prefix, **options))
            for k_len in range(17, 32)}  # lengths of one bit length
    assert len(keys) == (15 if options.get("dropout_p") else 1)  # dropout's reasons read the exact length
