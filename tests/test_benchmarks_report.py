"""The benchmark suite's bookkeeping: result rows, speedup ratios, merging runs in the CSV, the report, the plots
and the README section. Pure Python on synthetic measurements: fast, no kernels run."""

from __future__ import annotations

import math

import pytest

from benchmarks import report, results, workloads
from benchmarks.harness import Measurement
from benchmarks.workloads import Workload

GPU_ENV = {"device": "NVIDIA H100 80GB HBM3", "device_kind": "cuda", "torch": "2.11.0", "triton": "3.6.0",
           "cuda": "12.8", "transformers": "5.17.0", "peft": "0.21.0", "commit": "abc1234"}
CPU_ENV = dict(GPU_ENV, device="CPU (test, 2 cores)", device_kind="cpu", cuda="none")


def bert(kind="fwdbwd", n=256, p=64, **kw) -> Workload:
    return Workload(kw.pop("group", f"bert-{kind}"), kind, batch=32, q_heads=16, kv_heads=16, seq_len=n,
                    prefix_len=p, head_dim=64, padding=True, **kw)


def timed(w, provider, ms, peak=None, status="ok"):
    return Measurement(w, provider, status=status, check_ratio=0.1, median_s=ms / 1e3, q1_s=ms * 0.9 / 1e3,
                       q3_s=ms * 1.1 / 1e3, mean_s=ms / 1e3, min_s=ms * 0.8 / 1e3, rounds=20,
                       peak_extra_bytes=peak, flops=workloads.flops(w), bytes=workloads.bytes_moved(w),
                       tokens=w.tokens)


def value(rows, workload, provider, metric):
    found = [r for r in rows if (r["workload"], r["provider"], r["metric"]) == (workload, provider, metric)]
    assert len(found) <= 1
    return float(found[0]["value"]) if found else None


# ----------------------------------------------------------------------------------------------------------------
# Rows and ratios
# ----------------------------------------------------------------------------------------------------------------

def test_rows_of_a_timed_measurement_carry_rates_environment_and_shape():
    run = results.new_run(GPU_ENV)
    w = bert(targets=("P1", "P2"))
    rows = results.measurement_rows(run, timed(w, "ptv2-triton", 2.0, peak=3 * 2**20))
    metrics = {r["metric"]: r for r in rows}
    assert set(metrics) >= {"check", "time_median", "time_q1", "time_q3", "rounds", "tflops", "gbps", "peak_mem"}
    assert float(metrics["time_median"]["value"]) == pytest.approx(2.0)
    assert float(metrics["tflops"]["value"]) == pytest.approx(workloads.flops(w) / 2e-3 / 1e12, rel=1e-5)
    assert float(metrics["peak_mem"]["value"]) == pytest.approx(3.0)
    row = metrics["time_median"]
    assert row["device"] == GPU_ENV["device"] and row["commit"] == "abc1234" and row["torch"] == "2.11.0"
    assert row["run_id"] == run["run_id"] and row["timestamp"] == run["timestamp"]
    assert row["seq_len"] == "256" and row["prefix_len"] == "64" and row["targets"] == "P1 P2"
    assert set(row) == set(results.COLUMNS)


def test_a_wrong_provider_has_only_its_check_row():
    run = results.new_run(GPU_ENV)
    m = Measurement(bert(), "ptv2-triton", status="wrong", check_ratio=40.0, note="out: max error 1 > bound 0.01")
    rows = results.run_rows(run, [m, timed(bert(), "peft-path", 3.0)])
    mine = [r for r in rows if r["provider"] == "ptv2-triton"]
    assert [r["metric"] for r in mine] == ["check"]
    assert mine[0]["status"] == "wrong" and "max error" in mine[0]["note"] and float(mine[0]["value"]) == 40.0


def test_speedups_are_computed_pair_by_pair_within_the_run():
    run = results.new_run(GPU_ENV)
    a, b = bert(n=128), bert(n=256)
    ms = [timed(a, "ptv2-triton", 1.0, peak=100), timed(a, "peft-path", 2.0, peak=400), timed(a, "sdpa-precat", 0.8),
          timed(b, "ptv2-triton", 5.0), timed(b, "sdpa-precat", 4.0),
          Measurement(b, "peft-path", status="oom", note="out of memory")]
    rows = results.run_rows(run, ms)
    assert value(rows, a.name, "ptv2-triton", "speedup_vs_peft-path") == pytest.approx(2.0)
    assert value(rows, a.name, "ptv2-triton", "speedup_vs_sdpa-precat") == pytest.approx(0.8)
    assert value(rows, a.name, "sdpa-precat", "speedup_vs_peft-path") == pytest.approx(2.5)
    assert value(rows, a.name, "peft-path", "speedup_vs_sdpa-precat") == pytest.approx(0.4)
    assert value(rows, a.name, "peft-path", "speedup_vs_peft-path") is None  # never against itself
    assert value(rows, a.name, "ptv2-triton", "memory_vs_peft-path") == pytest.approx(0.25)
    # b: peft-path was not timed, so nothing is compared with it; sdpa-precat was.
    assert value(rows, b.name, "ptv2-triton", "speedup_vs_peft-path") is None
    assert value(rows, b.name, "ptv2-triton", "speedup_vs_sdpa-precat") == pytest.approx(0.8)


def test_model_level_rows_report_tokens_per_second_and_total_peak_memory():
    run = results.new_run(GPU_ENV)
    w = Workload("model-train", "train", batch=32, seq_len=256, prefix_len=64, model="bert", size="large")
    m = timed(w, "ptv2-triton", 100.0)
    m.peak_extra_bytes, m.peak_bytes = None, 5 * 2**30
    rows = {r["metric"]: r for r in results.measurement_rows(run, m)}
    assert float(rows["tokens_per_s"]["value"]) == pytest.approx(32 * 256 / 0.1)
    assert rows["peak_mem"]["unit"] == "MiB in all" and float(rows["peak_mem"]["value"]) == 5 * 1024
    assert "tflops" not in rows and "gbps" not in rows
    assert results.MODEL_KINDS == workloads.MODEL_KINDS


# ----------------------------------------------------------------------------------------------------------------
# The CSV across runs
# ----------------------------------------------------------------------------------------------------------------

def test_csv_round_trip_and_rerun_replaces_the_same_rows(tmp_path):
    first, second = results.new_run(GPU_ENV), results.new_run(dict(GPU_ENV, commit="def5678"))
    other_device = results.new_run(dict(GPU_ENV, device="NVIDIA H200"))
    a, b = bert(n=128), bert(n=256)
    results.save_run(tmp_path, first, [timed(a, "ptv2-triton", 1.0), timed(a, "peft-path", 2.0),
                                       timed(b, "ptv2-triton", 3.0), timed(b, "peft-path", 6.0)])
    results.save_run(tmp_path, other_device, [timed(a, "ptv2-triton", 0.7)])
    # Re-run only ptv2-triton on a: now wrong. Its old rows (timing, speedup) go; everything else stays.
    results.save_run(tmp_path, second, [Measurement(a, "ptv2-triton", status="wrong", check_ratio=9.0)])
    rows = results.read_csv(tmp_path / results.CSV_NAME)
    h100 = [r for r in rows if r["device"] == GPU_ENV["device"]]
    a_triton = [r for r in h100 if r["workload"] == a.name and r["provider"] == "ptv2-triton"]
    assert [(r["metric"], r["status"], r["commit"]) for r in a_triton] == [("check", "wrong", "def5678")]
    assert value(h100, a.name, "peft-path", "time_median") == pytest.approx(2.0)
    assert value(h100, b.name, "ptv2-triton", "speedup_vs_peft-path") == pytest.approx(2.0)
    assert {r["commit"] for r in h100 if r["workload"] == b.name} == {"abc1234"}
    h200 = [r for r in rows if r["device"] == "NVIDIA H200"]
    assert value(h200, a.name, "ptv2-triton", "time_median") == pytest.approx(0.7)
    # Running the same thing again replaces rather than appends.
    before = len(rows)
    results.save_run(tmp_path, second, [Measurement(a, "ptv2-triton", status="wrong", check_ratio=9.0)])
    assert len(results.read_csv(tmp_path / results.CSV_NAME)) == before


def test_merge_orders_rows_and_keeps_unrelated_ones():
    run = results.new_run(GPU_ENV)
    w = bert()
    old = results.run_rows(run, [timed(w, "sdpa-precat", 1.0), timed(w, "ptv2-triton", 1.0)])
    merged = results.merge([], old)
    providers = [r["provider"] for r in merged if r["metric"] == "time_median"]
    assert providers == ["ptv2-triton", "sdpa-precat"]


# ----------------------------------------------------------------------------------------------------------------
# Report, targets, plots, README
# ----------------------------------------------------------------------------------------------------------------

def gpu_rows_with_targets():
    run = results.new_run(GPU_ENV)
    p1 = bert(targets=("P1", "P2"))
    p3 = Workload("llm-fwd", "fwd", batch=4, q_heads=32, kv_heads=8, seq_len=4096, prefix_len=128, head_dim=128,
                  causal=True, targets=("P3",))
    p4 = Workload("llm-decode", "decode", batch=64, q_heads=32, kv_heads=8, seq_len=2048, prefix_len=128,
                  head_dim=128, targets=("P4",))
    t1 = bert(num_tasks=1, group="mixed-fwdbwd", targets=("P5",))
    t8 = bert(num_tasks=8, group="mixed-fwdbwd", targets=("P5",))
    p6 = Workload("model-train", "train", batch=32, seq_len=256, prefix_len=64, model="bert", size="large",
                  targets=("P6",))
    copy = Workload("ceiling", "ceiling", note="copy-1GiB")
    ms = [timed(p1, "ptv2-triton", 1.0, peak=100), timed(p1, "peft-path", 2.0, peak=300),
          timed(p1, "sdpa-precat", 1.25), timed(p3, "ptv2-triton", 2.0), timed(p3, "sdpa-precat", 1.0),
          timed(p4, "ptv2-triton", 0.25), timed(t1, "ptv2-triton", 1.0), timed(t8, "ptv2-triton", 1.02)]
    model_ptv2, model_peft = timed(p6, "ptv2-triton", 100.0), timed(p6, "peft-path", 150.0)
    model_ptv2.peak_bytes, model_peft.peak_bytes = 800, 1000
    ceiling = timed(copy, "torch", 1.0)
    ceiling.bytes = 3.0e12 * 1e-3  # 3 TB/s over its 1 ms
    return results.run_rows(run, ms + [model_ptv2, model_peft, ceiling])


def test_targets_are_evaluated_with_their_margins():
    device = report.by_device(gpu_rows_with_targets())[0]
    found = {(t["id"], t["what"].split(":")[-1].strip()): t for t in report.evaluate_targets(device)}
    p1 = found[("P1", "fwd+bwd vs peft-path")]
    assert p1["status"] == "met" and p1["measured"] == "2×" and "0.40" in p1["margin"]
    p2 = next(t for (i, _), t in found.items() if i == "P2")
    assert p2["status"] == "met"  # 1.25x faster than sdpa-precat
    p3 = [t for (i, _), t in found.items() if i == "P3"]
    assert {t["status"] for t in p3} == {"missed"}  # 0.5x < 1.1x, and 292 < 450 TFLOP/s
    assert any("flash-attn not measured" in t["note"] for t in p3)
    p4 = next(t for (i, _), t in found.items() if i == "P4")
    decode_bytes = workloads.bytes_moved(Workload("llm-decode", "decode", batch=64, q_heads=32, kv_heads=8,
                                                  seq_len=2048, prefix_len=128, head_dim=128))
    assert float(p4["measured"]) == pytest.approx(decode_bytes / 0.25e-3 / 3.0e12, rel=1e-2)
    assert p4["status"] == "missed" and "3000 GB/s" in p4["what"]
    p5 = next(t for (i, _), t in found.items() if i == "P5")
    assert p5["status"] == "met" and float(p5["measured"].rstrip("×")) == pytest.approx(1 / 1.02, rel=1e-2)
    p6 = [t for (i, _), t in found.items() if i == "P6"]
    assert sorted(t["status"] for t in p6) == ["met", "met"]  # 1.5x tokens/s, 0.8x memory


def test_markdown_report_labels_functional_runs_and_lists_every_provider(tmp_path):
    cpu_run = results.new_run(CPU_ENV)
    w = bert()
    rows = results.run_rows(cpu_run, [timed(w, "ptv2-triton", 500.0), timed(w, "peft-path", 10.0),
                                      Measurement(w, "flash-attn", status="skipped", note="not installed")])
    text = report.render_markdown(rows)
    assert report.FUNCTIONAL_BANNER in text and "timings meaningless" in text
    assert "| flash-attn | skipped: not installed |" in text
    assert "| ptv2-triton | ok | 500 [450, 550]" in text
    gpu_text = report.render_markdown(gpu_rows_with_targets())
    assert report.FUNCTIONAL_BANNER not in gpu_text and "### Targets" in gpu_text


def test_plots_of_speedup_vs_n_and_p_are_written(tmp_path):
    run = results.new_run(GPU_ENV)
    ms = []
    for n in (128, 256, 512):
        for p in (16, 64):
            w = bert(n=n, p=p)
            ms += [timed(w, "ptv2-triton", n * p / 1e4), timed(w, "peft-path", n * p / 5e3),
                   timed(w, "sdpa-precat", n * p / 8e3)]
    results.save_run(tmp_path, run, ms)
    path, plots = report.generate(tmp_path)
    names = sorted(p.name for p in plots)
    assert names == ["nvidia-h100-80gb-hbm3-speedup-vs-N.png", "nvidia-h100-80gb-hbm3-speedup-vs-P.png"]
    for plot in plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    text = path.read_text()
    assert "![nvidia-h100-80gb-hbm3-speedup-vs-N](plots/nvidia-h100-80gb-hbm3-speedup-vs-N.png)" in text
    device = report.by_device(results.read_csv(tmp_path / results.CSV_NAME))[0]
    series = report.sweep_series(device, "bert-fwdbwd", "seq_len", "peft-path")
    assert [x for x, _ in series["ptv2-triton"]] == [128, 256, 512]
    assert all(y == pytest.approx(2.0) for _, y in series["ptv2-triton"])


def test_no_plot_without_a_sweep(tmp_path):
    run = results.new_run(GPU_ENV)
    results.save_run(tmp_path, run, [timed(bert(), "ptv2-triton", 1.0), timed(bert(), "peft-path", 2.0)])
    _, plots = report.generate(tmp_path)
    assert plots == []


def test_readme_section_is_rewritten_between_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{report.README_BEGIN}\nold numbers\n{report.README_END}\n\nafter\n")
    section = report.readme_section(gpu_rows_with_targets())
    changed, message = report.update_readme(readme, section)
    text = readme.read_text()
    assert changed and "old numbers" not in text
    assert text.startswith("# title\n\nintro\n\n" + report.README_BEGIN + "\n")
    assert text.endswith(report.README_END + "\n\nafter\n")
    assert "NVIDIA H100 80GB HBM3" in text and "abc1234" in text and "| P1 |" in text
    assert report.update_readme(readme, section)[0]  # idempotent
    assert readme.read_text() == text


def test_readme_without_markers_is_left_untouched(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\nno markers here\n")
    changed, message = report.update_readme(readme, "anything")
    assert not changed and "markers" in message and "untouched" in message
    assert readme.read_text() == "# title\nno markers here\n"


def test_readme_section_never_shows_cpu_numbers():
    cpu_rows = results.run_rows(results.new_run(CPU_ENV), [timed(bert(targets=("P1",)), "ptv2-triton", 500.0),
                                                            timed(bert(targets=("P1",)), "peft-path", 1.0)])
    section = report.readme_section(cpu_rows)
    assert "No GPU measurements have been recorded yet" in section and "500" not in section


def test_report_cli_with_readme_flag(tmp_path, capsys, monkeypatch):
    results.save_run(tmp_path, results.new_run(GPU_ENV), [timed(bert(), "ptv2-triton", 1.0)])
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    monkeypatch.setattr(report, "GPU_RESULTS", tmp_path)
    assert report.main(["--results", str(tmp_path), "--readme", str(readme)]) == 0
    out = capsys.readouterr().out
    assert "report:" in out and "untouched" in out
    assert (tmp_path / "report.md").exists() and readme.read_text() == "no markers\n"


# ----------------------------------------------------------------------------------------------------------------
# Log axes, the plot at the target shapes, and the target tags in run.py's --help and --list
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, wanted", [
    ([0.5, 1.0, 2.0], False),             # a GPU run's speedups: linear
    ([1.0, 10.0], False),                 # exactly 10x is not more than 10x
    ([1.0, 10.5], True),
    ([2e-4, 0.15, 1.0, 2.1], True),       # a CPU run: Triton's interpreter against PyTorch
    ([0.0, -1.0, math.nan, math.inf, 3.0], False),  # only finite positive values count: one left
    ([], False),
])
def test_log_axis_where_values_span_more_than_ten_times(values, wanted):
    assert report.log_scale_wanted(values) is wanted
    assert report.LOG_SPAN == 10.0


def quick_style_run(spread: float):
    """One shape per group, as the quick suite measures: ptv2-triton ``spread`` times slower than peft-path."""
    run = results.new_run(CPU_ENV)
    p1 = bert(targets=("P1", "P2"))
    p4 = Workload("llm-decode", "decode", batch=2, q_heads=4, kv_heads=2, seq_len=64, prefix_len=8, head_dim=16,
                  targets=("P4",))
    untagged = bert(kind="fwd")
    ms = []
    for w in (p1, p4, untagged):
        ms += [timed(w, "ptv2-triton", spread), timed(w, "peft-path", 1.0), timed(w, "sdpa-precat", 0.5)]
    return run, ms, (p1, p4, untagged)


@pytest.mark.parametrize("spread, log_axis", [(5000.0, True), (0.8, False)])
def test_a_quick_run_writes_the_plot_at_the_target_shapes(tmp_path, monkeypatch, spread, log_axis):
    import matplotlib.axes

    scales = []
    original = matplotlib.axes.Axes.set_xscale
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xscale",
                        lambda self, value, **kw: (scales.append(value), original(self, value, **kw))[1])
    run, ms, (p1, p4, untagged) = quick_style_run(spread)
    results.save_run(tmp_path, run, ms)
    path, plots = report.generate(tmp_path)
    assert [p.name for p in plots] == ["cpu-test-2-cores-speedup-at-targets.png"]  # no sweep: no vs-N/vs-P plots
    assert plots[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plots[0].stat().st_size > 5000
    assert scales == (["log", "log"] if log_axis else [])  # one panel per baseline
    assert "![cpu-test-2-cores-speedup-at-targets](plots/cpu-test-2-cores-speedup-at-targets.png)" in \
        path.read_text()
    device = report.by_device(results.read_csv(tmp_path / results.CSV_NAME))[0]
    series = report.target_series(device, "peft-path")
    assert set(series) == {"ptv2-triton", "sdpa-precat"}  # never the baseline against itself
    assert [w for w, _ in series["ptv2-triton"]] == [p1.name, p4.name]  # tagged workloads only, report order
    assert all(v == pytest.approx(1 / spread) for _, v in series["ptv2-triton"])


def test_sweep_plots_take_a_log_axis_when_speedups_span_orders_of_magnitude(tmp_path, monkeypatch):
    import matplotlib.axes

    scales = []
    original = matplotlib.axes.Axes.set_yscale
    monkeypatch.setattr(matplotlib.axes.Axes, "set_yscale",
                        lambda self, value, **kw: (scales.append(value), original(self, value, **kw))[1])
    run = results.new_run(CPU_ENV)
    ms = []
    for n in (16, 32):
        w = bert(n=n)
        ms += [timed(w, "ptv2-triton", 1000.0 * n), timed(w, "peft-path", 1.0)]
    results.save_run(tmp_path, run, ms)
    _, plots = report.generate(tmp_path)
    assert [p.name for p in plots] == ["cpu-test-2-cores-speedup-vs-N.png"]
    assert scales == ["log"]


def test_run_help_explains_every_target_in_one_line():
    from benchmarks import run

    text = run.build_parser().format_help()
    assert "docs/design.md §6" in text
    for target, description in workloads.TARGETS.items():
        lines = [line for line in text.splitlines() if line.strip().startswith(f"{target} ")]
        assert lines == [f"  {target:<3} {description}"], (target, lines)
        assert len(lines[0]) <= 120
    assert set(workloads.TARGETS) == {f"P{i}" for i in range(1, 10)} | {"S1"}


def test_run_list_says_which_workloads_measure_each_target():
    from benchmarks import run

    chosen = workloads.suite("quick", gpu=True)
    text = "\n".join(run.targets_lines(chosen))
    p1 = next(w for w in chosen if "P1" in w.targets)
    assert text.startswith("targets (docs/design.md §6):")
    assert f"  P1  {workloads.TARGETS['P1']}\n        measured by {p1.name}" in text
    untagged = [t for t in workloads.TARGETS
                if not any(t in w.targets for full in ("quick", "full") for gpu in (True, False)
                           for w in workloads.suite(full, gpu=gpu))]
    for target in untagged:
        assert f"  {target:<3} {workloads.TARGETS[target]}\n        not measured by this suite yet" in text
    only_decode = [w for w in chosen if w.group == "llm-decode"]
    assert "P1  " in "\n".join(run.targets_lines(only_decode)) and \
        "no workload of this selection measures it" in "\n".join(run.targets_lines(only_decode))
    every_tag = {t for w in workloads.suite("full", gpu=True) + workloads.suite("full", gpu=False) for t in w.targets}
    assert every_tag <= set(workloads.TARGETS), "a workload carries a tag that TARGETS does not describe"


# ----------------------------------------------------------------------------------------------------------------
# Packed batches: real tokens, P9
# ----------------------------------------------------------------------------------------------------------------

PACKED_KERNEL = Workload("varlen-fwdbwd", "fwdbwd", batch=32, q_heads=16, kv_heads=16, seq_len=256, prefix_len=64,
                         head_dim=64, median_len=60, min_len=8)
PACKED_MODEL = Workload("packed-vs-padded", "train", batch=32, seq_len=256, prefix_len=64, median_len=60, min_len=8,
                        model="bert", size="large", targets=("P9",))


def test_packed_workloads_report_real_tokens_per_second():
    run = results.new_run(GPU_ENV)
    real = sum(workloads.sequence_lengths(PACKED_KERNEL))
    rows = results.run_rows(run, [timed(PACKED_KERNEL, "ptv2-triton", 2.0), timed(PACKED_KERNEL, "peft-path", 5.0)])
    assert value(rows, PACKED_KERNEL.name, "ptv2-triton", "tokens_per_s") == pytest.approx(real / 2e-3, rel=1e-5)
    assert value(rows, PACKED_KERNEL.name, "ptv2-triton", "speedup_vs_peft-path") == pytest.approx(2.5)
    row = next(r for r in rows if r["metric"] == "time_median")
    assert (row["median_len"], row["min_len"], row["seq_len"]) == ("60", "8", "256")
    # not a packed kernel workload: no tokens/s row, as before
    assert value(results.run_rows(run, [timed(bert(), "ptv2-triton", 2.0)]), bert().name, "ptv2-triton",
                 "tokens_per_s") is None


@pytest.mark.parametrize("padded_ms, status", [(160.0, "met"), (120.0, "missed")])
def test_p9_is_the_packed_step_s_throughput_over_the_padded_one(padded_ms, status):
    packed, padded = timed(PACKED_MODEL, "ptv2-packed", 100.0), timed(PACKED_MODEL, "ptv2-padded", padded_ms)
    packed.peak_bytes, padded.peak_bytes = 300 * 2**20, 1000 * 2**20
    rows = results.run_rows(results.new_run(GPU_ENV), [packed, padded])
    assert value(rows, PACKED_MODEL.name, "ptv2-packed", "tokens_per_s") == pytest.approx(
        PACKED_MODEL.tokens / 0.1, rel=1e-5)
    [p9] = [t for t in report.evaluate_targets(report.by_device(rows)[0]) if t["id"] == "P9"]
    assert p9["status"] == status and p9["measured"] == f"{padded_ms / 100:.3g}×" and p9["target"] == "≥ 1.5×"
    assert "peak memory packed / padded 0.30×" in p9["note"]
    assert f"**{PACKED_MODEL.name}** (targets P9)" in report.render_markdown(rows)


def test_p9_is_not_measured_without_both_forms():
    rows = results.run_rows(results.new_run(GPU_ENV), [timed(PACKED_MODEL, "ptv2-packed", 100.0)])
    [p9] = [t for t in report.evaluate_targets(report.by_device(rows)[0]) if t["id"] == "P9"]
    assert p9["status"] == "not measured" and p9["note"] == ""


def test_the_gpu_check_times_the_providers_of_the_gpu_targets():
    from benchmarks import gpu_check, models

    assert set(models.BATCH_FORMS) <= set(gpu_check.BENCH_PROVIDERS)  # P9
    assert {"ptv2-triton", "peft-path", "sdpa-precat"} <= set(gpu_check.BENCH_PROVIDERS)  # P1-P6, the varlen group
