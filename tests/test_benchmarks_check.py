"""The benchmark suite's pre-timing check and workloads: a wrong provider is caught and never timed, right ones
pass, the chunked oracle equals the whole one, and the work counts follow docs/design.md §6."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from benchmarks import check, harness, providers, workloads
from benchmarks.providers import Prepared, Provider
from benchmarks.workloads import Workload

from .conftest import DEVICE


class SpyBenchmark:
    """Stands in for pytest-benchmark's fixture: records whether anything was timed."""

    disabled = False

    def __init__(self):
        self.extra_info = {}
        self.group = None
        self.pedantic_calls = 0
        self.stats = None

    def pedantic(self, target, setup=None, rounds=1, warmup_rounds=0, **_):
        self.pedantic_calls += 1
        durations = []
        for _ in range(warmup_rounds + rounds):
            args, kwargs = setup()
            before = harness.timing.device_clock()
            target(*args, **kwargs)
            durations.append(harness.timing.device_clock() - before)
        timed = sorted(durations[warmup_rounds:])
        middle = timed[len(timed) // 2]
        self.stats = SimpleNamespace(stats=SimpleNamespace(median=middle, q1=timed[0], q3=timed[-1], mean=middle,
                                                           min=timed[0], rounds=rounds))


def tiny(kind="fwdbwd", **kw) -> Workload:
    """A small workload (float32 unless ``dtype`` says otherwise)."""
    settings = dict(batch=3, q_heads=4, kv_heads=2, seq_len=12, prefix_len=5, head_dim=16, dtype="float32")
    settings.update(kw)
    return Workload(f"test-{kind}", kind, **settings)


class IgnoresPrefix(Provider):
    """Deliberately broken: attention over the sequence alone, the prefix forgotten."""

    name = "broken-no-prefix"

    def prepare(self, w, x):
        def call():
            with torch.no_grad():
                return F.scaled_dot_product_attention(x.q, x.k, x.v, enable_gqa=True)
        return Prepared(call, lambda out: {"out": out})


class PrefixGradOfOneSample(providers.PeftPath):
    """Deliberately broken: right output, but the prefix gradient of the first sample only (no batch sum)."""

    name = "broken-prefix-grad"

    def prepare(self, w, x):
        batch = w.batch
        right = super().prepare(w, x)

        def finish(result):
            got = right.finish(result)
            for name in ("prefix_k", "prefix_v"):
                got[name] = got[name] / batch
            return got
        return Prepared(right.call, finish)


class ReturnsNaN(Provider):
    name = "broken-nan"

    def prepare(self, w, x):
        return Prepared(lambda: torch.full_like(x.q, math.nan), lambda out: {"out": out})


def measure(w, provider, benchmark=None):
    harness.release()
    return harness.measure(w, provider.name, lambda: harness.kernel_case(w, provider), benchmark)


# A bf16 decode step over 2048 keys that ignores a 128-key prefix: every output is small, so the error hides under
# the elementwise bound; the relative L2 bound catches it.
LONG_DECODE_BF16 = dict(kind="decode", batch=2, seq_len=2048, prefix_len=128, head_dim=64, dtype="bfloat16")


@pytest.mark.parametrize("provider, settings, words", [
    (IgnoresPrefix(), dict(kind="fwd", padding=True), "out"),
    (IgnoresPrefix(), LONG_DECODE_BF16, "out (relative L2)"),
    (PrefixGradOfOneSample(), dict(kind="fwdbwd", padding=True), "prefix_"),
    (ReturnsNaN(), dict(kind="fwd"), "non-finite"),
], ids=["ignores-prefix", "ignores-prefix-long-bf16-decode", "prefix-grad-not-summed", "nan"])
def test_a_wrong_provider_is_reported_wrong_and_never_timed(provider, settings, words):
    spy = SpyBenchmark()
    m = measure(tiny(**settings), provider, spy)
    assert m.status == "wrong", m.note
    assert words in m.note and "pre-timing check" in m.note
    assert m.check_ratio > 1.0
    assert spy.pedantic_calls == 0 and not m.timed
    with pytest.raises(pytest.fail.Exception, match="is wrong"):
        harness.conclude(m)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["peft-path", "sdpa-precat", "reference"])
def test_right_providers_pass_and_are_timed(name, dtype):
    spy = SpyBenchmark()
    w = tiny("fwdbwd", num_tasks=3, padding=True, dtype=dtype)
    m = measure(w, providers.by_name(name), spy)
    assert m.status == "ok", m.note
    assert 0.0 <= m.check_ratio <= 1.0
    assert spy.pedantic_calls == 1 and m.timed and m.median_s > 0 and m.rounds >= 1
    assert spy.extra_info["workload"] == w.name and spy.extra_info["provider"] == name


def test_the_triton_provider_passes_the_check():
    from ptv2_kernels import backends

    if backends.unavailable_reason("triton"):
        pytest.skip(backends.unavailable_reason("triton"))
    w = tiny("fwd", causal=True, num_tasks=2, seq_len=9, batch=2, prefix_len=3)
    m = measure(w, providers.by_name("ptv2-triton"))
    assert m.status == "ok", m.note
    assert m.check_ratio <= 1.0


def test_an_unavailable_provider_is_skipped_with_its_reason():
    m = measure(tiny("fwd"), providers.by_name("flash-attn"))
    assert m.status == "skipped" and m.note
    with pytest.raises(pytest.skip.Exception):
        harness.conclude(m)


def test_a_crashing_provider_is_an_error_not_a_crash():
    class Crashes(Provider):
        name = "broken-crash"

        def prepare(self, w, x):
            def call():
                raise RuntimeError("kernel exploded")
            return Prepared(call, lambda out: {"out": out})

    m = measure(tiny("fwd"), Crashes())
    assert m.status == "error" and "kernel exploded" in m.note


@pytest.mark.parametrize("w", [
    tiny("fwdbwd", num_tasks=3, padding=True),
    tiny("fwdbwd", causal=True, q_heads=6, kv_heads=3),
    tiny("decode", num_tasks=2, seq_len=20),
], ids=["bank-padding", "causal-gqa", "decode"])
def test_the_chunked_oracle_equals_the_whole_one(w, monkeypatch):
    x = workloads.make_kernel_inputs(w, DEVICE, seed=3)
    whole = check.kernel_reference(x, w.kind == "fwdbwd", torch.float64)
    monkeypatch.setitem(check.CHUNK_ELEMENTS, "cpu" if DEVICE == "cpu" else "cuda", 1)  # one (sample, head) each
    assert len(list(check._chunks(x, torch.float64))) == w.batch * w.kv_heads
    chunked = check.kernel_reference(x, w.kind == "fwdbwd", torch.float64)
    assert set(whole) == set(chunked)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-12, atol=1e-12)


def test_work_counts_follow_the_design():
    p1 = Workload("bert-fwdbwd", "fwdbwd", batch=32, q_heads=16, kv_heads=16, seq_len=256, prefix_len=64,
                  head_dim=64, padding=True)
    assert workloads.flops(p1) == 3.5 * 4 * 32 * 16 * 256 * (64 + 256) * 64
    p3 = Workload("llm-fwd", "fwd", batch=4, q_heads=32, kv_heads=8, seq_len=4096, prefix_len=128, head_dim=128,
                  causal=True)
    assert workloads.flops(p3) == 4 * 4 * 32 * 4096 * (128 + 4096 / 2) * 128  # sequence part halved
    p4 = Workload("llm-decode", "decode", batch=64, q_heads=32, kv_heads=8, seq_len=2048, prefix_len=128,
                  head_dim=128)
    assert workloads.flops(p4) == 4 * 64 * 32 * 1 * (128 + 2048) * 128
    # A causal decode step sees every cached key (bottom-right alignment): no halving.
    assert workloads.visible_pairs(Workload("x", "decode", seq_len=2048, prefix_len=128, causal=True)) == 2176
    # P4's bytes: the cache, the shared prefix once, q and out; bf16.
    assert workloads.bytes_moved(p4) == 2 * (2 * 64 * 8 * 2048 * 128 + 2 * 8 * 128 * 128 + 2 * 64 * 32 * 128)
    assert math.isnan(workloads.flops(Workload("m", "train", model="bert", size="tiny")))


@pytest.mark.parametrize("gpu", [True, False])
def test_suites_cover_every_target(gpu):
    quick, full = workloads.suite("quick", gpu=gpu), workloads.suite("full", gpu=gpu)
    for chosen in (quick, full):
        tags = {t for w in chosen for t in w.targets}
        # P7 (the host path) is measured on both; P8 is a CPU target: its workloads are in the CPU suite only
        assert tags == {"P1", "P2", "P3", "P4", "P5", "P6", "P7"} | (set() if gpu else {"P8"})
    assert {w.name for w in quick} <= {w.name for w in full}
    assert workloads.select(full, ["bert-fwdbwd"]) and all(w.group == "bert-fwdbwd"
                                                           for w in workloads.select(full, ["bert-fwdbwd"]))
    if gpu:
        p1 = [w for w in quick if "P1" in w.targets][0]
        assert (p1.batch, p1.q_heads, p1.head_dim, p1.seq_len, p1.prefix_len, p1.padding, p1.causal) == \
            (32, 16, 64, 256, 64, True, False)
        p4 = [w for w in quick if "P4" in w.targets][0]
        assert (p4.batch, p4.q_heads, p4.kv_heads, p4.head_dim, p4.seq_len, p4.prefix_len) == \
            (64, 32, 8, 128, 2048, 128)


def test_kernel_inputs_are_laid_out_like_a_model_and_share_one_prefix():
    w = tiny("fwdbwd", padding=True)
    x = workloads.make_kernel_inputs(w, DEVICE)
    assert x.q.transpose(1, 2).is_contiguous() and x.k.transpose(1, 2).is_contiguous()
    assert x.prefix_k.shape == (w.kv_heads, w.prefix_len, w.head_dim) and x.prefix_index is None
    assert x.key_padding_mask.shape == (w.batch, w.seq_len) and bool(x.key_padding_mask[0].all())
    bank = workloads.make_kernel_inputs(tiny("fwd", num_tasks=3, batch=5), DEVICE)
    assert bank.prefix_k.shape[0] == 3 and sorted(set(bank.prefix_index.tolist())) == [0, 1, 2]
    again = workloads.make_kernel_inputs(w, DEVICE)
    assert torch.equal(x.q, again.q)  # seeded: every provider of a workload sees the same values


# ----------------------------------------------------------------------------------------------------------------
# Model level
# ----------------------------------------------------------------------------------------------------------------

TINY_TRAIN = Workload("model-train", "train", batch=2, seq_len=16, prefix_len=4, padding=True, model="bert",
                      size="tiny", dtype="float32")


def test_model_workloads_skip_until_the_integration_exists(monkeypatch):
    import ptv2_kernels

    from benchmarks import models

    monkeypatch.delattr(ptv2_kernels, "patch")
    for provider in models.PROVIDERS:
        m = harness.measure(TINY_TRAIN, provider, lambda: models.model_case(TINY_TRAIN, provider))
        if provider == "unpatched":  # the decode-only baseline, which needs no integration
            assert m.status == "skipped" and "decode steps only" in m.note, m.note
            continue
        assert m.status == "skipped" and "integration not available yet" in m.note, (provider, m.note)


def test_a_model_that_computes_something_else_is_caught(monkeypatch):
    """The patched model with the real tokens at unshifted positions is not what PEFT computes: wrong."""
    import ptv2_kernels
    from ptv2_kernels import backends

    from benchmarks import models

    if models.integration_missing() or backends.unavailable_reason("triton"):
        pytest.skip(models.integration_missing() or backends.unavailable_reason("triton"))

    def repatch_unshifted(model, bank, backend):
        ptv2_kernels.unpatch(model)
        ptv2_kernels.patch(model, bank, positions="unshifted", backend=backend)
        ptv2_kernels.freeze_backbone(model)

    monkeypatch.setattr(models, "_repatch", repatch_unshifted)
    spy = SpyBenchmark()
    m = harness.measure(TINY_TRAIN, "ptv2-triton", lambda: models.model_case(TINY_TRAIN, "ptv2-triton"), spy)
    assert m.status == "wrong", m.note
    assert "logits" in m.note and spy.pedantic_calls == 0


def test_model_workloads_name_the_shapes_of_their_configs():
    from benchmarks import models

    for gpu in (True, False):
        for w in workloads.suite("full", gpu=gpu):
            if w.model is None:
                continue
            config = models.CONFIGS[(w.model, w.size)]
            heads = config["num_attention_heads"]
            assert (w.q_heads, w.kv_heads, w.head_dim) == (
                heads, config.get("num_key_value_heads", heads), config["hidden_size"] // heads), w.name


@pytest.mark.parametrize("w", [tiny("fwdbwd", causal=True, q_heads=4, kv_heads=2, seq_len=16),
                               tiny("fwd", num_tasks=2, seq_len=16), tiny("decode", seq_len=20)],
                         ids=["fwdbwd-causal-gqa", "fwd-bank", "decode"])
def test_the_flash_attn_provider_reads_its_layout_right(w, monkeypatch):
    """flash-attn works in [B, N, H, D]: a stand-in with its semantics (bottom-right causal, GQA) checks that the
    provider lays out its inputs and reads back its outputs and gradients correctly."""
    import sys
    import types

    from torch.nn.attention.bias import causal_lower_right

    def flash_attn_func(q, k, v, causal=False):
        mask = causal_lower_right(q.shape[1], k.shape[1]) if causal and q.shape[1] > 1 else None
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    x = workloads.make_kernel_inputs(w, DEVICE, seed=5)
    prepared = providers.FlashAttn().prepare(w, x)
    got = prepared.finish(prepared.call())
    backward = w.kind == "fwdbwd"
    result = check.compare(got, check.kernel_reference(x, backward, torch.float64),
                           check.kernel_reference(x, backward, x.q.dtype), x.q.dtype)
    assert result.ok, result.summary()
    assert set(got) == ({"out", "q", "k", "v", "prefix_k", "prefix_v"} if backward else {"out"})
