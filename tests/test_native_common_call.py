"""The common inference call in one step (native.common_inference_forward: the extension checks the arguments and
runs native's compiled forward): it must give exactly what the op's full path gives wherever it serves, decline
every call the full path would reject or derive something for, and leave the errors to the full path."""

from __future__ import annotations

import pytest
import torch

from ptv2_kernels import native, ops, prefix_attention

from . import kernel_cases
from .kernel_cases import GRID, Case, make_inputs

pytestmark = pytest.mark.skipif(native._compiled is None, reason=native.host_path())


@pytest.fixture(autouse=True)
def cpu_inputs(monkeypatch):
    monkeypatch.setattr(kernel_cases, "DEVICE", "cpu")


class _Counting:
    """The compiled module, counting the calls its common_forward served (returned a tensor for)."""

    def __init__(self, module):
        self._module, self.served, self.declined = module, 0, 0

    def __getattr__(self, name):
        return getattr(self._module, name)

    def common_forward(self, *args):
        out = self._module.common_forward(*args)
        if out is None:
            self.declined += 1
        else:
            self.served += 1
        return out


def _full_path(monkeypatch, call):
    """``call()`` with the one-step path switched off: the op's checks, choice and native.forward."""
    with monkeypatch.context() as m:
        m.setattr(native, "common_inference_forward", lambda *args: None)
        return call()


def _serves(case: Case) -> bool:
    """Whether the one-step path takes a call of the grid (see common_forward in csrc/native/native.cpp)."""
    if case.num_prefixes != 1 or case.lengths or case.mask not in ("none", "padding") or case.bias != "none":
        return False
    if case.softcap is not None or case.sinks or case.prefix_bias != "none" or case.window is not None:
        return False
    if case.value_dim not in (None, case.head_dim) or case.k_len == 0 or case.prefix_len == 0 or case.q_len == 0:
        return False
    if case.causal and case.q_len != 1 and (case.mask == "padding" or case.q_len != case.k_len):
        return False
    return True


COMMON = [
    pytest.param(Case(q_len=1, k_len=17, mask="padding", causal=True), torch.float32, id="decode-padding"),
    pytest.param(Case(q_len=1, k_len=17, causal=True, q_heads=8, kv_heads=1), torch.bfloat16, id="decode-mqa-bf16"),
    pytest.param(Case(q_len=9, k_len=9, causal=True, layout="bnhd"), torch.float32, id="square-causal-bnhd"),
    pytest.param(Case(q_len=12, k_len=12, mask="padding", layout="packed", prefix_layout="shared3d"), torch.float64,
                 id="encoder-padding-packed-3d-bank"),
    pytest.param(Case(q_len=5, k_len=7, prefix_layout="strided", prefix_dtype=torch.float32, scale=0.3),
                 torch.float16, id="strided-float32-bank-scale"),
    pytest.param(Case(q_len=64, k_len=96, head_dim=64, prefix_len=16, mask="padding"), torch.float32,
                 id="fused-calls-size"),
]


@pytest.mark.parametrize("case, dtype", GRID + COMMON)
def test_equals_the_full_path(case, dtype, monkeypatch):
    """Bit for bit and in the same memory layout: the same compiled forward gets the same arguments. Calls it
    does not take run the full path as before (counted, so that the grid's common cases are seen to be taken)."""
    inputs, kwargs = make_inputs(case, dtype)
    counting = _Counting(native._compiled)
    monkeypatch.setattr(native, "_compiled", counting)
    with torch.no_grad():
        got = prefix_attention(*inputs, **kwargs)
    want = _full_path(monkeypatch, lambda: prefix_attention(*inputs, **kwargs))
    assert torch.equal(got, want)
    assert got.stride() == want.stride() and got.dtype == want.dtype
    assert counting.served == int(_serves(case))


def test_declines_what_needs_a_gradient_and_what_it_does_not_derive(monkeypatch):
    inputs, kwargs = make_inputs(Case(q_len=6, k_len=9, mask="padding"), torch.float32)
    q, k, v, prefix_k, prefix_v = inputs
    padding = kwargs["key_padding_mask"]
    forward = native.common_inference_forward
    assert forward(q, k, v, prefix_k, prefix_v, padding, False, None) is not None
    leaf = q.detach().requires_grad_(True)
    assert forward(leaf, k, v, prefix_k, prefix_v, padding, False, None) is None
    with torch.no_grad():
        assert forward(leaf, k, v, prefix_k, prefix_v, padding, False, None) is not None
    declined = {
        "causal with key padding and several queries": (q, k, v, prefix_k, prefix_v, padding, True, None),
        "causal, Nq != Nk": (q, k, v, prefix_k, prefix_v, None, True, None),
        "a bank of two": (q, k, v, prefix_k.expand(2, -1, -1, -1), prefix_v.expand(2, -1, -1, -1), None, False,
                          None),
        "an empty prefix": (q, k, v, prefix_k[:, :, :0], prefix_v[:, :, :0], None, False, None),
        "no sequence keys": (q, k[:, :, :0], v[:, :, :0], prefix_k, prefix_v, None, False, None),
        "an integer mask": (q, k, v, prefix_k, prefix_v, padding.long(), False, None),
        "a mask of another shape": (q, k, v, prefix_k, prefix_v, padding[:, :-1], False, None),
        "k of another dtype": (q, k.double(), v, prefix_k, prefix_v, None, False, None),
        "an integer q": (q.long(), k, v, prefix_k, prefix_v, None, False, None),
        "q with a strided head dim": (q[..., ::2], k[..., ::2], v[..., ::2], prefix_k[..., ::2], prefix_v[..., ::2],
                                      None, False, None),
        "v of another head dim": (q, k, v[..., :-1], prefix_k, prefix_v[..., :-1], None, False, None),
        "k of another batch": (q, k[:1], v[:1], prefix_k, prefix_v, None, False, None),
        "heads that do not group": (q[:, :3], k, v, prefix_k, prefix_v, None, False, None),
        "a non-finite scale": (q, k, v, prefix_k, prefix_v, None, False, float("nan")),
        "an integer scale": (q, k, v, prefix_k, prefix_v, None, False, 1),
        "a causal flag that is not a bool": (q, k, v, prefix_k, prefix_v, None, 1, None),
        "a parameter": (q, k, v, torch.nn.Parameter(prefix_k, requires_grad=False), prefix_v, None, False, None),
    }
    for what, args in declined.items():
        assert forward(*args) is None, what
    monkeypatch.setattr(native, "_compiled", None)
    assert forward(q, k, v, prefix_k, prefix_v, padding, False, None) is None


@pytest.mark.parametrize("bad, error, match", [
    (dict(key_padding_mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, "key_padding_mask must be"),
    (dict(key_padding_mask=torch.ones(2, 9)), TypeError, "key_padding_mask must be a bool tensor"),
    (dict(scale=float("inf")), ValueError, "scale must be None or a finite number"),
    (dict(dropout_p=1.5), ValueError, "dropout_p must be a number"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(backend="nope"), ValueError, "backend must be one of"),
])
def test_errors_come_from_the_full_path(bad, error, match):
    inputs, kwargs = make_inputs(Case(q_len=6, k_len=9), torch.float32)
    with torch.no_grad(), pytest.raises(error, match=match):
        prefix_attention(*inputs, **{**kwargs, **bad})


def test_is_off_where_the_custom_op_must_be_seen(monkeypatch):
    """Outside eager mode (EAGER_PATH off, as the tests of the custom op set it; torch.compile) the op runs its
    full path."""
    inputs, kwargs = make_inputs(Case(q_len=1, k_len=9, mask="padding"), torch.float32)
    counting = _Counting(native._compiled)
    monkeypatch.setattr(native, "_compiled", counting)
    monkeypatch.setattr(ops, "EAGER_PATH", False)
    with torch.no_grad():
        prefix_attention(*inputs, **kwargs)
    assert counting.served == counting.declined == 0
    monkeypatch.setattr(ops, "EAGER_PATH", True)
    compiled = torch.compile(lambda *a: prefix_attention(*a, **kwargs), backend="eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(*inputs)
    assert counting.served == counting.declined == 0
    with torch.no_grad():
        assert torch.equal(got, prefix_attention(*inputs, **kwargs))
    assert counting.served == 1
