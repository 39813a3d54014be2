"""The benchmark suite's pre-timing check and workloads: a wrong provider is caught and never timed, right ones
pass, the chunked oracle equals the whole one, and the work counts follow docs/design.md §6."""

from __future__ import annotations

import dataclasses
import itertools
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
        assert tags == {"P1", "P2", "P3", "P4", "P5", "P6", "P7", "P9"} | (set() if gpu else {"P8"})
        assert {w.group for w in chosen if w.packed} == {"varlen-fwd", "varlen-fwdbwd", "packed-vs-padded"}
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
        if provider in models.BATCH_FORMS:  # the packed workload's providers: skipped there too, see below
            assert m.status == "skipped" and "packed workloads only" in m.note, m.note
            continue
        assert m.status == "skipped" and "integration not available yet" in m.note, (provider, m.note)
    packed_train = next(w for w in workloads.suite("quick", gpu=False) if w.group == "packed-vs-padded")
    for provider in models.BATCH_FORMS:
        m = harness.measure(packed_train, provider, lambda: models.model_case(packed_train, provider))
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
    from torch.nn.attention.bias import causal_lower_right

    def flash_attn_func(q, k, v, causal=False):
        mask = causal_lower_right(q.shape[1], k.shape[1]) if causal and q.shape[1] > 1 else None
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)

    assert_flash_attn_provider_right(w, monkeypatch, flash_attn_func=flash_attn_func)


def assert_flash_attn_provider_right(w, monkeypatch, **functions):
    """The flash-attn provider, with ``functions`` standing in for the package's, agrees with the oracle."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(**functions))
    x = workloads.make_kernel_inputs(w, DEVICE, seed=5)
    prepared = providers.FlashAttn().prepare_inputs(w, x)
    got = prepared.finish(prepared.call())
    backward = w.kind == "fwdbwd"
    result = check.compare(got, check.kernel_reference(x, backward, torch.float64),
                           check.kernel_reference(x, backward, x.q.dtype), x.q.dtype)
    assert result.ok, result.summary()
    assert set(got) == ({"out", "q", "k", "v", "prefix_k", "prefix_v"} if backward else {"out"})


# ----------------------------------------------------------------------------------------------------------------
# Packed (variable-length) batches
# ----------------------------------------------------------------------------------------------------------------

def packed(kind="fwdbwd", **kw) -> Workload:
    """A small packed workload: 5 sequences, lengths log-normal with median 6 in [2, 14]."""
    settings = dict(batch=5, q_heads=4, kv_heads=2, seq_len=14, prefix_len=5, head_dim=16, median_len=6, min_len=2,
                    dtype="float32")
    settings.update(kw)
    return Workload(f"test-varlen-{kind}", kind, **settings)


def test_packed_lengths_follow_the_stated_distribution():
    """BERT-large's packed shape: 32 sequences whose lengths are the log-normal's quantiles (median 60, sigma
    LENGTH_SIGMA) clipped to [8, 256], in a fixed shuffled order; the work counts count real tokens only."""
    gpu = [w for w in workloads.suite("quick", gpu=True) if w.packed]
    assert {w.group for w in gpu} == {"varlen-fwd", "varlen-fwdbwd", "packed-vs-padded"}
    w = next(w for w in gpu if w.group == "varlen-fwdbwd")
    assert (w.batch, w.q_heads, w.head_dim, w.prefix_len, w.seq_len, w.median_len, w.min_len) == \
        (32, 16, 64, 64, 256, 60, 8)
    lengths = workloads.sequence_lengths(w)
    assert len(lengths) == 32 and min(lengths) >= 8 and max(lengths) == 256
    assert 55 <= sorted(lengths)[15] <= sorted(lengths)[16] <= 65  # the median
    assert sorted(lengths) != list(lengths)  # shuffled, the same every time
    assert workloads.sequence_lengths(dataclasses.replace(w, kind="fwd")) == lengths
    # every workload of the packed groups draws the same sequences at the same shape
    assert {workloads.sequence_lengths(x) for x in gpu} == {lengths}
    assert w.tokens == sum(lengths) and w.tokens * 2 < 32 * 256  # most of a padded batch would be padding
    per_sequence = sum(n * (64 + n) for n in lengths)
    assert workloads.flops(w) == 3.5 * 4 * 16 * 64 * per_sequence
    causal = dataclasses.replace(w, causal=True)
    assert workloads.flops(causal) == 3.5 * 4 * 16 * 64 * sum(n * 64 + n * n / 2 for n in lengths)
    assert workloads.bytes_moved(dataclasses.replace(w, kind="fwd")) == 2 * (
        2 * sum(lengths) * 16 * 64 + 2 * sum(lengths) * 16 * 64 + 2 * 16 * 64 * 64)
    assert w.name == "varlen-fwdbwd/B32-H16-N256-P64-D64-med60-bf16"


def test_packed_inputs_pad_and_unpad_exactly():
    w = packed(num_tasks=3)
    x = workloads.make_kernel_inputs(w, DEVICE, seed=2)
    lengths = workloads.sequence_lengths(w)
    assert isinstance(x, workloads.VarlenInputs) and x.q.shape == (sum(lengths), 4, 16)
    assert x.cu_seqlens.dtype == torch.int32 and x.cu_seqlens.tolist() == [0, *itertools.accumulate(lengths)]
    assert x.prefix_k.shape == (3, 2, 5, 16) and sorted(set(x.prefix_index.tolist())) == [0, 1, 2]
    padded = x.padded
    assert padded.q.shape == (5, 4, max(lengths), 16) and padded.q.transpose(1, 2).is_contiguous()
    assert padded.key_padding_mask.sum(1).tolist() == list(lengths)
    assert not padded.grad_out[~padded.key_padding_mask[:, None, :, None].expand_as(padded.grad_out)].any()
    for name in ("q", "k", "v", "grad_out"):
        assert torch.equal(x.unpad(getattr(padded, name)), getattr(x, name))
    s = 3
    start = sum(lengths[:s])
    assert torch.equal(padded.k[s, :, :lengths[s]].transpose(0, 1), x.k[start:start + lengths[s]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["ptv2-native", "reference", "peft-path", "sdpa-precat"])
def test_right_providers_pass_on_packed_batches(name, dtype):
    spy = SpyBenchmark()
    w = packed(num_tasks=2, dtype=dtype)
    m = measure(w, providers.by_name(name), spy)
    assert m.status == "ok", m.note
    assert 0.0 <= m.check_ratio <= 1.0 and m.timed and spy.pedantic_calls == 1
    assert m.tokens == sum(workloads.sequence_lengths(w)) and m.flops == workloads.flops(w)


def test_the_triton_varlen_provider_passes_the_check():
    from ptv2_kernels import backends

    if backends.unavailable_reason("triton"):
        pytest.skip(backends.unavailable_reason("triton"))
    for w in (packed("fwd", causal=True, num_tasks=2), packed("fwdbwd")):
        m = measure(w, providers.by_name("ptv2-triton"))
        assert m.status == "ok", (w.name, m.note)


class PackedAsOneSequence(providers.Ptv2):
    """Deliberately broken: the whole packed batch as one sequence (every token attends across sequences)."""

    def prepare(self, w, x):
        whole = dataclasses.replace(x, cu_seqlens=x.cu_seqlens[[0, -1]], lengths=(sum(x.lengths),))
        return super().prepare(w, whole)


class PaddingVisible(providers.SdpaPrecat):
    """Deliberately broken: the padded baseline without its key-padding mask (the padding keys attended to)."""

    def prepare(self, w, x):
        return super().prepare(w, dataclasses.replace(x, key_padding_mask=None))


@pytest.mark.parametrize("provider", [PackedAsOneSequence("native"), PaddingVisible()],
                         ids=["sequences-not-separated", "padding-attended"])
def test_a_wrong_packed_provider_is_reported_wrong(provider):
    spy = SpyBenchmark()
    m = measure(packed("fwd"), provider, spy)
    assert m.status == "wrong" and "out" in m.note, m.note
    assert spy.pedantic_calls == 0


def test_providers_without_a_packed_form_skip_packed_workloads():
    m = measure(packed("fwd"), providers.by_name("flex-attention"))
    assert m.status == "skipped" and "packed" in m.note


@pytest.mark.parametrize("w", [packed("fwdbwd", causal=True, num_tasks=3), packed("fwd")],
                         ids=["fwdbwd-causal-gqa-bank", "fwd"])
def test_the_flash_attn_varlen_provider_reads_its_layout_right(w, monkeypatch):
    """flash_attn_varlen_func takes packed keys with each sequence's prefix in front (cumulative lengths moved by
    P per sequence): a stand-in with its semantics (per sequence, bottom-right causal, GQA) checks that the
    provider builds the concatenation and splits its gradients back into the keys and the bank correctly."""
    from torch.nn.attention.bias import causal_lower_right

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
        assert int(cu_k[-1]) == k.shape[0] and max_k == max_q + w.prefix_len
        outs = []
        for (q0, q1), (k0, k1) in zip(zip(cu_q.tolist(), cu_q.tolist()[1:]), zip(cu_k.tolist(), cu_k.tolist()[1:])):
            mask = causal_lower_right(q1 - q0, k1 - k0) if causal else None
            out = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1),
                                                 v[k0:k1].transpose(0, 1), attn_mask=mask, enable_gqa=True)
            outs.append(out.transpose(0, 1))
        return torch.cat(outs)

    assert_flash_attn_provider_right(w, monkeypatch, flash_attn_varlen_func=flash_attn_varlen_func)


# The packed-vs-padded model workload (target P9), CPU form: runs the patched model's packed-batch integration.
PACKED_TRAIN = next(w for w in workloads.suite("quick", gpu=False) if w.group == "packed-vs-padded")


@pytest.mark.parametrize("provider", ["ptv2-packed", "ptv2-padded"])
def test_packed_and_padded_training_steps_pass_the_check(provider):
    from benchmarks import models

    if models.integration_missing():
        pytest.skip(models.integration_missing())
    spy = SpyBenchmark()
    m = harness.measure(PACKED_TRAIN, provider, lambda: models.model_case(PACKED_TRAIN, provider), spy)
    assert m.status == "ok", m.note
    assert m.timed and m.tokens == sum(workloads.sequence_lengths(PACKED_TRAIN))


def test_the_two_forms_hold_the_same_sequences():
    from benchmarks import models

    [pair] = models.make_packed_batches(PACKED_TRAIN, 1)
    lengths = workloads.sequence_lengths(PACKED_TRAIN)
    packed_batch, padded_batch = pair["packed"], pair["padded"]
    assert packed_batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed_batch
    assert padded_batch["input_ids"].shape == (len(lengths), max(lengths))
    assert packed_batch["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    for name in ("input_ids", "labels"):
        assert torch.equal(models.real_token_logits(padded_batch[name][..., None], padded_batch),
                           models.real_token_logits(packed_batch[name][..., None], packed_batch))
    assert packed_batch["task_ids"].tolist() == padded_batch["task_ids"].tolist() == [0] * len(lengths)


def test_a_packed_batch_the_model_does_not_separate_is_caught(monkeypatch):
    """With an all-ones attention mask a packed row is one long sequence to the model (given one task id for it):
    every token attends across the sequences, which the check against the padded batch reports as wrong, never
    timed."""
    from benchmarks import models

    if models.integration_missing():
        pytest.skip(models.integration_missing())
    make = models.make_packed_batches

    def as_one_sequence(*args, **kwargs):
        pairs = make(*args, **kwargs)
        for pair in pairs:
            row = pair["packed"]
            row["attention_mask"] = torch.ones_like(row["input_ids"])
            row["task_ids"] = row["task_ids"][:1]
        return pairs

    monkeypatch.setattr(models, "make_packed_batches", as_one_sequence)
    spy = SpyBenchmark()
    m = harness.measure(PACKED_TRAIN, "ptv2-packed", lambda: models.model_case(PACKED_TRAIN, "ptv2-packed"), spy)
    assert m.status == "wrong" and "pre-timing check" in m.note, m.note
    assert spy.pedantic_calls == 0


def test_packed_providers_belong_to_the_packed_workload():
    from benchmarks import models

    for provider in ("ptv2-packed", "ptv2-padded"):
        m = harness.measure(TINY_TRAIN, provider, lambda: models.model_case(TINY_TRAIN, provider))
        assert m.status == "skipped" and "packed workloads only" in m.note
    for provider in ("ptv2-auto", "peft-path"):
        m = harness.measure(PACKED_TRAIN, provider, lambda: models.model_case(PACKED_TRAIN, provider))
        assert m.status == "skipped" and "not compared on packed batches" in m.note
