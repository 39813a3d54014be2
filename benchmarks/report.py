"""The report of the benchmark results: markdown, plots, the targets of docs/design.md §6, the README's section.

    python benchmarks/report.py                 # report.md and plots/ from benchmarks/results (GPU) or results-cpu
    python benchmarks/report.py --results DIR   # from another results folder
    python benchmarks/report.py --readme        # also rewrite README.md between <!-- perf:begin --> and
                                                # <!-- perf:end --> from the GPU results (never from a CPU run)

Everything here reads ``results.csv`` (written by the suite, see :mod:`benchmarks.results`); nothing is typed by
hand. The report lists, per device, the targets P1-P9 (met, or missed and by how much), then every workload with
each provider's median time and quartiles, rates, peak memory and speedups against ``peft-path`` and
``sdpa-precat`` (computed within one run), and the plots: speedup at the target shapes (every run that has a
tagged workload, the quick suite included), and speedup against N and against P (runs with sweeps: ``--full``).
A plot's value axis is logarithmic when its values span more than ``LOG_SPAN`` (a CPU run, where Triton's
interpreter is thousands of times slower than PyTorch, spans orders of magnitude).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import results  # noqa: E402  (torch-free: the report needs no GPU stack)
from benchmarks.results import as_float  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
GPU_RESULTS = BENCH_DIR / "results"
CPU_RESULTS = BENCH_DIR / "results-cpu"
README_BEGIN = "<!-- perf:begin -->"
README_END = "<!-- perf:end -->"
FUNCTIONAL_BANNER = ("**Functional run (CPU), timings meaningless.** Triton kernels ran in Triton's CPU "
                     "interpreter and the torch providers on the CPU, on small shapes: these numbers show that "
                     "every provider runs and agrees with the reference, and say nothing about GPU speed. The "
                     "exception is P8, a CPU target: the op on torch's fused CPU attention (ptv2-native) and the "
                     "models patched with backend='auto' (ptv2-auto) against the PEFT path, timed on this CPU.")
REPORT_NAME = "report.md"
PLOT_AXES = {"seq_len": "N", "prefix_len": "P"}
PTV2 = ("ptv2-triton", "ptv2-cuda")
DESIGN_REF = "docs/design.md §6"
# The targets' bounds (docs/design.md §6): speedups are "at least", P2's time and P6's memory ratio "at most".
BOUNDS = {"P1": 1.6, "P2": 1.0, "P3 fwd": 1.1, "P3 fwdbwd": 1.0, "P3 TFLOP/s": 450.0, "P4": 0.8, "P5": 0.95,
          "P6 tokens/s": 1.3, "P6 memory": 0.85, "P7 op": 1.5, "P7 decode": 1.1, "P8": 1.0, "P9": 1.5}
# P8 (CPU): the op through the backend auto takes on a CPU, the models patched with auto.
P8_PROVIDERS = {"kernel": "ptv2-native", "model": "ptv2-auto"}
# A plot axis goes logarithmic when its largest value is more than this many times its smallest.
LOG_SPAN = 10.0


# ----------------------------------------------------------------------------------------------------------------
# Reading the rows
# ----------------------------------------------------------------------------------------------------------------

class DeviceResults:
    """The rows of one device, indexed by (workload, provider, metric)."""

    def __init__(self, device: str, rows: list[dict]):
        self.device = device
        self.rows = rows
        self.index = {(r["workload"], r["provider"], r["metric"]): r for r in rows}
        self.workloads: dict = {}
        for r in rows:
            self.workloads.setdefault(r["workload"], r)

    @property
    def functional(self) -> bool:
        return any(r["device_kind"] == "cpu" for r in self.rows)

    def value(self, workload: str, provider: str, metric: str) -> float:
        row = self.index.get((workload, provider, metric))
        return as_float(row["value"]) if row else math.nan

    def row(self, workload: str, provider: str, metric: str = "check") -> Optional[dict]:
        return self.index.get((workload, provider, metric))

    def providers(self, workload: str) -> list[str]:
        found = {p for (w, p, _) in self.index if w == workload}
        return sorted(found, key=_provider_order)

    def tagged(self, target: str, group: Optional[str] = None) -> list[str]:
        return [w for w, r in self.workloads.items()
                if target in r["targets"].split() and (group is None or r["group"] == group)]

    def same_run(self, *keys) -> bool:
        runs = {self.index[k]["run_id"] for k in keys if k in self.index}
        return len(runs) == 1

    def environment(self) -> str:
        first = self.rows[0]
        commits = sorted({r["commit"] for r in self.rows})
        stamps = sorted(r["timestamp"] for r in self.rows)
        when = stamps[0] if stamps[0] == stamps[-1] else f"{stamps[0]} .. {stamps[-1]}"
        return (f"torch {first['torch']}, triton {first['triton']}, CUDA {first['cuda']}, transformers "
                f"{first['transformers']}, peft {first['peft']}; commit {', '.join(commits)}; measured {when}")


def _provider_order(name: str):
    order = list(results.PROVIDER_ORDER)
    return (order.index(name) if name in order else len(order), name)


def by_device(rows: Sequence[dict]) -> list[DeviceResults]:
    grouped: dict = defaultdict(list)
    for r in rows:
        grouped[r["device"]].append(r)
    return [DeviceResults(device, grouped[device]) for device in sorted(grouped)]


# ----------------------------------------------------------------------------------------------------------------
# Targets P1-P9 (docs/design.md §6)
# ----------------------------------------------------------------------------------------------------------------

def _verdict(value: float, target: float, at_least: bool = True) -> tuple[str, str]:
    """(status, margin text) of a measured value against a target bound."""
    if not math.isfinite(value):
        return "not measured", ""
    met = value >= target if at_least else value <= target
    gap = value - target
    relative = abs(gap) / target * 100
    if met:
        return "met", f"by {abs(gap):.2f} ({relative:.0f} % margin)"
    return "missed", f"by {abs(gap):.2f} ({relative:.0f} % short)"


def _target(target_id, what, provider, value, bound, unit, at_least=True, note=""):
    status, margin = _verdict(value, bound, at_least)
    return {"id": target_id, "what": what, "provider": provider,
            "measured": f"{value:.3g}{unit}" if math.isfinite(value) else "—",
            "target": f"{'≥' if at_least else '≤'} {bound:g}{unit}", "status": status, "margin": margin,
            "note": note}


def evaluate_targets(d: DeviceResults) -> list[dict]:
    """Each target of docs/design.md §6 that has workloads, for each ptv2 provider measured on device ``d``."""
    out = []
    ptv2 = [p for p in PTV2 if any(k[1] == p and k[2] == "time_median" for k in d.index)] or ["ptv2-triton"]
    for provider in ptv2:
        for w in d.tagged("P1"):
            out.append(_target("P1", f"{w}: fwd+bwd vs peft-path", provider,
                               d.value(w, provider, "speedup_vs_peft-path"), BOUNDS["P1"], "×"))
        for w in d.tagged("P2"):
            out.append(_target("P2", f"{w}: time vs sdpa-precat (speedup ≥ 1 means time ≤ 1.0×)", provider,
                               d.value(w, provider, "speedup_vs_sdpa-precat"), BOUNDS["P2"], "×"))
        for w in d.tagged("P3"):
            kind = d.workloads[w]["kind"]
            baseline = "flash-attn" if math.isfinite(d.value(w, "flash-attn", "time_median")) else "sdpa-precat"
            keys = [(w, provider, "time_median"), (w, baseline, "time_median")]
            ratio = d.value(w, baseline, "time_median") / d.value(w, provider, "time_median") \
                if d.same_run(*keys) else math.nan
            note = "" if baseline == "flash-attn" else "flash-attn not measured: SDPA on the concatenated KV instead"
            out.append(_target("P3", f"{w}: {kind} vs {baseline}", provider, ratio,
                               BOUNDS["P3 fwd"] if kind == "fwd" else BOUNDS["P3 fwdbwd"], "×", note=note))
            if kind == "fwd":
                out.append(_target("P3", f"{w}: forward throughput", provider, d.value(w, provider, "tflops"),
                                   BOUNDS["P3 TFLOP/s"], " TFLOP/s"))
        for w in d.tagged("P4"):
            ceiling = _copy_ceiling(d)
            fraction = d.value(w, provider, "gbps") / ceiling if ceiling else math.nan
            out.append(_target("P4", f"{w}: bandwidth / measured copy bandwidth ({ceiling:.0f} GB/s)"
                               if ceiling else f"{w}: bandwidth / measured copy bandwidth (not measured)",
                               provider, fraction, BOUNDS["P4"], ""))
        mixed = {int(d.workloads[w]["num_tasks"]): w for w in d.tagged("P5")}
        if 1 in mixed and 8 in mixed:
            one, eight = mixed[1], mixed[8]
            keys = [(one, provider, "time_median"), (eight, provider, "time_median")]
            ratio = d.value(one, provider, "time_median") / d.value(eight, provider, "time_median") \
                if d.same_run(*keys) else math.nan
            out.append(_target("P5", f"{eight} vs {one}: throughput of 8 tasks / 1 task", provider, ratio,
                               BOUNDS["P5"], "×"))
        for w in d.tagged("P6"):
            out.append(_target("P6", f"{w}: tokens/s vs peft-path", provider,
                               d.value(w, provider, "speedup_vs_peft-path"), BOUNDS["P6 tokens/s"], "×"))
            out.append(_target("P6", f"{w}: peak memory vs peft-path", provider,
                               d.value(w, provider, "memory_vs_peft-path"), BOUNDS["P6 memory"], "×",
                               at_least=False))
    out += _p7_targets(d)
    out += _p8_targets(d)
    out += _p9_targets(d)
    return out


def _time_ratio(d: DeviceResults, w: str, provider: str, baseline: str) -> float:
    """provider's median time over baseline's at workload ``w``, measured in one run (else NaN)."""
    keys = [(w, provider, "time_median"), (w, baseline, "time_median")]
    if not d.same_run(*keys):
        return math.nan
    return d.value(w, provider, "time_median") / d.value(w, baseline, "time_median")


def _p7_targets(d: DeviceResults) -> list[dict]:
    """P7, the host path: the eager op call against cat + SDPA (the PEFT path) on tiny tensors, per ptv2 backend
    measured; the patched tiny model's decode step (auto) against the unpatched model's."""
    out = []
    for w in d.tagged("P7"):
        if d.workloads[w]["kind"] == "generate":
            out.append(_target("P7", f"{w}: decode step time vs the unpatched model", "ptv2-auto",
                               _time_ratio(d, w, "ptv2-auto", "unpatched"), BOUNDS["P7 decode"], "×",
                               at_least=False))
            continue
        for provider in [p for p in d.providers(w) if p.startswith("ptv2-")]:
            out.append(_target("P7", f"{w}: op call time vs cat + SDPA (peft-path)", provider,
                               _time_ratio(d, w, provider, "peft-path"), BOUNDS["P7 op"], "×", at_least=False))
    return out


def _p8_targets(d: DeviceResults) -> list[dict]:
    """P8 on a CPU: each tagged workload's speedup over the PEFT path (model workloads: over the PEFT model)."""
    out = []
    for w in d.tagged("P8"):
        level = "model" if d.workloads[w]["kind"] in ("train", "generate") else "kernel"
        provider = P8_PROVIDERS[level]
        what = "tokens/s vs the PEFT model" if level == "model" else "fwd+bwd vs peft-path"
        out.append(_target("P8", f"{w}: {what}", provider, d.value(w, provider, "speedup_vs_peft-path"),
                           BOUNDS["P8"], "×"))
    return out


def _p9_targets(d: DeviceResults) -> list[dict]:
    """P9: the packed batch's real-token throughput over the padded batch's (the same sequences, the same real
    tokens, one run), with their peak memory's ratio in the note."""
    out = []
    for w in d.tagged("P9"):
        ratio = _time_ratio(d, w, "ptv2-padded", "ptv2-packed")
        memory = d.value(w, "ptv2-packed", "peak_mem") / d.value(w, "ptv2-padded", "peak_mem")
        note = f"peak memory packed / padded {memory:.2f}×" if math.isfinite(memory) else ""
        out.append(_target("P9", f"{w}: real tokens/s, packed / padded", "ptv2-packed", ratio, BOUNDS["P9"], "×",
                           note=note))
    return out


def _copy_ceiling(d: DeviceResults) -> float:
    values = [as_float(r["value"]) for r in d.rows
              if r["group"] == "ceiling" and r["metric"] == "gbps" and "copy" in r["workload"]]
    values = [v for v in values if math.isfinite(v)]
    return max(values) if values else math.nan


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------

def _num(value: float, digits: int = 3) -> str:
    if not math.isfinite(value):
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _cell_status(row: Optional[dict]) -> str:
    if row is None:
        return "—"
    status = row["status"]
    if status == "ok":
        return "ok"
    note = row["note"].split(" Traceback")[0]
    return f"**{status}**: {note[:160]}" if status in ("wrong", "error") else f"{status}: {note[:120]}"


def workload_table(d: DeviceResults, workload: str) -> list[str]:
    lines = ["| provider | status | median ms [q1, q3] | TFLOP/s | GB/s | tokens/s | peak MiB | × peft-path | "
             "× sdpa-precat |", "|---|---|---|---|---|---|---|---|---|"]
    for provider in d.providers(workload):
        v = lambda metric: d.value(workload, provider, metric)  # noqa: E731
        median = v("time_median")
        timing = f"{_num(median)} [{_num(v('time_q1'))}, {_num(v('time_q3'))}]" if math.isfinite(median) else "—"
        lines.append(f"| {provider} | {_cell_status(d.row(workload, provider))} | {timing} | {_num(v('tflops'))} | "
                     f"{_num(v('gbps'))} | {_num(v('tokens_per_s'))} | {_num(v('peak_mem'))} | "
                     f"{_num(v('speedup_vs_peft-path'))} | {_num(v('speedup_vs_sdpa-precat'))} |")
    return lines


def targets_table(targets: list[dict]) -> list[str]:
    if not targets:
        return ["No target workload was measured on this device."]
    lines = ["| target | workload and measure | provider | measured | target | status |", "|---|---|---|---|---|---|"]
    for t in targets:
        status = t["status"] + (f" {t['margin']}" if t["margin"] else "") + (f" ({t['note']})" if t["note"] else "")
        lines.append(f"| {t['id']} | {t['what']} | {t['provider']} | {t['measured']} | {t['target']} | {status} |")
    return lines


def render_markdown(rows: Sequence[dict], plots: Optional[dict] = None, results_dir: Optional[Path] = None) -> str:
    """The whole report for ``rows`` (all devices); ``plots`` maps a device to its plot files."""
    devices = by_device(rows)
    lines = ["# ptv2_kernels benchmark report", "",
             "_Generated by `python benchmarks/report.py` from `results.csv`; do not edit by hand._", ""]
    if any(d.functional for d in devices):
        lines += [FUNCTIONAL_BANNER, ""]
    if not devices:
        lines += ["No results yet: run `python benchmarks/run.py`.", ""]
    lines += ["Times are medians of rounds timed with CUDA events (on a CPU: the calling thread's CPU time, one "
              "intra-op thread) after a warm-up, with the "
              "L2 cache flushed and the inputs rotated between rounds; every provider was checked against the "
              "reference before it was timed. Speedups are the baseline's median over the provider's, within one "
              f"run. FLOP and byte counts follow {DESIGN_REF} (see benchmarks/workloads.py).", ""]
    for d in devices:
        lines += [f"## {d.device}" + (" — functional run (CPU), timings meaningless" if d.functional else ""), "",
                  d.environment(), ""]
        lines += [f"### Targets ({DESIGN_REF})", ""] + targets_table(evaluate_targets(d)) + [""]
        for path in (plots or {}).get(d.device, []):
            rel = Path(path).relative_to(results_dir) if results_dir else Path(path).name
            lines += [f"![{Path(path).stem}]({rel.as_posix()})", ""]
        groups: dict = defaultdict(list)
        for workload, row in d.workloads.items():
            groups[row["group"]].append(workload)
        for group in sorted(groups, key=_group_order):
            lines += [f"### {group}", ""]
            for workload in sorted(groups[group], key=lambda w: _shape_key(d.workloads[w])):
                lines += [f"**{workload}**" + _tags(d.workloads[workload]), ""] + workload_table(d, workload) + [""]
    return "\n".join(lines).rstrip() + "\n"


def _tags(row: dict) -> str:
    return f" (targets {row['targets']})" if row["targets"] else ""


GROUP_ORDER = ("bert-fwd", "bert-fwdbwd", "llm-fwd", "llm-fwdbwd", "llm-decode", "mixed-fwdbwd", "mixed-decode",
               "varlen-fwd", "varlen-fwdbwd", "model-train", "packed-vs-padded", "model-decode", "cpu-fwdbwd",
               "host-overhead", "ceiling")


def _group_order(group: str):
    return (GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER), group)


def _shape_key(row: dict):
    return tuple(as_float(row[c]) for c in ("batch", "seq_len", "prefix_len", "num_tasks")) + (row["workload"],)


# ----------------------------------------------------------------------------------------------------------------
# Plots: speedup vs N and vs P, per device
# ----------------------------------------------------------------------------------------------------------------

def sweep_series(d: DeviceResults, group: str, axis: str, baseline: str) -> dict:
    """{provider: [(axis value, speedup), ...]} for the largest sweep of ``axis`` in ``group`` (the other shape
    parameters fixed), or {} when the group has fewer than two values of ``axis``."""
    return _sweep(d, group, axis, baseline)[0]


def _sweep(d: DeviceResults, group: str, axis: str, baseline: str) -> tuple[dict, Optional[dict]]:
    metric = f"speedup_vs_{baseline}"
    varying = (axis, "q_len") if axis == "seq_len" else (axis,)  # queries follow N except when decoding
    fixed_columns = [c for c in results.SHAPE_COLUMNS if c not in varying + ("targets", "group", "kind")]
    sweeps: dict = defaultdict(list)
    for r in d.rows:
        if r["group"] == group and r["metric"] == metric and math.isfinite(as_float(r["value"])):
            sweeps[tuple(r[c] for c in fixed_columns)].append(r)
    # The longest sweep; among equals, the one through a target's shape (the headline one).
    best = max(sweeps.values(), key=lambda rs: (len({r[axis] for r in rs}), any(r["targets"] for r in rs)),
               default=[])
    if len({r[axis] for r in best}) < 2:
        return {}, None
    series: dict = defaultdict(list)
    for r in best:
        series[r["provider"]].append((as_float(r[axis]), as_float(r["value"])))
    return ({p: sorted(points) for p, points in sorted(series.items(), key=lambda kv: _provider_order(kv[0]))},
            best[0])


def _fixed_shape(row: dict, axis: str) -> str:
    """The parameters a sweep holds fixed, for a panel title: ``B32 P64`` for a sweep over N."""
    parts = [f"B{row['batch']}"]
    if axis != "seq_len":
        parts.append(f"N{row['seq_len']}")
    if axis != "prefix_len":
        parts.append(f"P{row['prefix_len']}")
    if row["num_tasks"] not in ("", "1"):
        parts.append(f"T{row['num_tasks']}")
    return " ".join(parts)


def log_scale_wanted(values, span: float = LOG_SPAN) -> bool:
    """Whether an axis showing ``values`` should be logarithmic: its finite positive values span more than
    ``span`` (max / min). Non-positive and non-finite values are ignored (a log axis cannot show them anyway)."""
    positive = [v for v in values if math.isfinite(v) and v > 0]
    return len(positive) >= 2 and max(positive) > span * min(positive)


def target_series(d: DeviceResults, baseline: str) -> dict:
    """{provider: [(workload, speedup vs ``baseline``), ...]} over the workloads tagged with a target, in report
    order; the baseline itself is left out."""
    metric = f"speedup_vs_{baseline}"
    tagged = sorted((w for w, r in d.workloads.items() if r["targets"]),
                    key=lambda w: (_group_order(d.workloads[w]["group"]), _shape_key(d.workloads[w])))
    series: dict = defaultdict(list)
    for w in tagged:
        for provider in d.providers(w):
            value = d.value(w, provider, metric)
            if provider != baseline and math.isfinite(value):
                series[provider].append((w, value))
    return dict(series)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, d: DeviceResults, title: str, out_dir: Path, name: str) -> Path:
    if d.functional:
        title += " — functional run (CPU), timings meaningless"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{results.slug(d.device)}-{name}.png"
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _value_axis(ax, values, which: str) -> None:
    """Log scale on the value axis ``which`` ("x" or "y") when the values span orders of magnitude (callers include
    1.0, the line the speedups are read against)."""
    if log_scale_wanted(values):
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")


def write_target_plot(d: DeviceResults, out_dir: Path) -> Optional[Path]:
    """Bars of each provider's speedup at the target shapes, one panel per baseline; None without tagged rows."""
    panels = [(b, target_series(d, b)) for b in results.BASELINES]
    panels = [(b, series) for b, series in panels if series]
    if not panels:
        return None
    plt = _pyplot()
    workloads_shown = max(len({w for points in series.values() for w, _ in points}) for _, series in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(7.0 * len(panels), 2.0 + 0.7 * workloads_shown),
                             squeeze=False)
    for ax, (baseline, series) in zip(axes.flat, panels):
        names = list(dict.fromkeys(w for points in series.values() for w, _ in points))
        rows = {w: i for i, w in enumerate(names)}
        height = 0.8 / max(1, len(series))
        values = []
        for k, (provider, points) in enumerate(series.items()):
            ys = [rows[w] - 0.4 + height * (k + 0.5) for w, _ in points]
            xs = [v for _, v in points]
            values += xs
            ax.barh(ys, xs, height=height, label=provider)
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
        _value_axis(ax, values + [1.0], "x")
        ax.set_yticks(range(len(names)), [f"{w}{_tags(d.workloads[w])}" for w in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"speedup vs {baseline} (×, higher is faster)")
        ax.set_title(f"at the target shapes: speedup vs {baseline}", fontsize=10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(4, len(series)))
    return _save(fig, d, f"{d.device}: speedup at the target shapes", out_dir, "speedup-at-targets")


def write_plots(d: DeviceResults, out_dir: Path) -> list[Path]:
    """PNG plots: speedup at the target shapes, and speedup against N and against P (one panel per group and
    baseline, where the results hold a sweep); returns the files."""
    written = [p for p in [write_target_plot(d, out_dir)] if p is not None]
    groups = sorted({r["group"] for r in d.rows}, key=_group_order)
    for axis, label in PLOT_AXES.items():
        panels = [(g, b, *_sweep(d, g, axis, b)) for g in groups for b in results.BASELINES]
        panels = [p for p in panels if p[2]]
        if not panels:
            continue
        plt = _pyplot()
        columns = min(3, len(panels))
        rows_ = math.ceil(len(panels) / columns)
        fig, axes = plt.subplots(rows_, columns, figsize=(5.2 * columns, 3.8 * rows_), squeeze=False)
        for ax, (group, baseline, series, example) in zip(axes.flat, panels):
            ticks, values = set(), []
            for provider, points in series.items():
                xs, ys = zip(*points)
                ticks.update(xs)
                values += ys
                ax.plot(xs, ys, marker="o", label=provider)
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
            _value_axis(ax, values + [1.0], "y")
            ax.set_title(f"{group} ({_fixed_shape(example, axis)}): speedup vs {baseline}", fontsize=10)
            ax.set_xlabel(label)
            ax.set_ylabel("× (higher is faster)")
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        written.append(_save(fig, d, f"{d.device}: speedup vs {label}", out_dir, f"speedup-vs-{label}"))
    return written


# ----------------------------------------------------------------------------------------------------------------
# The README's performance section
# ----------------------------------------------------------------------------------------------------------------

HEADLINE_METRICS = ("speedup_vs_peft-path", "speedup_vs_sdpa-precat")


def readme_section(rows: Sequence[dict], report_link: str = "benchmarks/results/report.md") -> str:
    """The text between the README markers: GPU results only (a CPU run is never a performance number)."""
    devices = [d for d in by_device([r for r in rows if r["device_kind"] == "cuda"])]
    lines = ["_Generated by `python benchmarks/report.py --readme` from `benchmarks/results/results.csv`; do not "
             "edit by hand._", ""]
    if not devices:
        lines += ["No GPU measurements have been recorded yet. On a machine with an NVIDIA GPU run "
                  "`python benchmarks/run.py --full`, then `python benchmarks/report.py --readme`."]
        return "\n".join(lines) + "\n"
    for d in devices:
        lines += [f"**{d.device}** — {d.environment()}", ""]
        lines += ["| workload | provider | median ms | × PEFT path | × SDPA on pre-concatenated K/V | peak memory "
                  "× PEFT path |", "|---|---|---|---|---|---|"]
        headline = [w for w, r in d.workloads.items() if r["targets"]]
        for w in sorted(headline, key=lambda w: (_group_order(d.workloads[w]["group"]), _shape_key(d.workloads[w]))):
            for provider in [p for p in d.providers(w) if p in PTV2]:
                lines.append(f"| {w}{_tags(d.workloads[w])} | {provider} | "
                             f"{_num(d.value(w, provider, 'time_median'))} | "
                             f"{_num(d.value(w, provider, 'speedup_vs_peft-path'))} | "
                             f"{_num(d.value(w, provider, 'speedup_vs_sdpa-precat'))} | "
                             f"{_num(d.value(w, provider, 'memory_vs_peft-path'))} |")
        lines += ["", f"Targets ({DESIGN_REF}):", ""] + targets_table(evaluate_targets(d)) + [""]
    lines += [f"Every provider is checked against the reference before it is timed. Full tables and plots: "
              f"[{report_link}]({report_link})."]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, section: str) -> tuple[bool, str]:
    """Replace the text between the markers; leave the file untouched (and say so) when they are absent."""
    readme = Path(readme)
    if not readme.exists():
        return False, f"{readme} does not exist; nothing written"
    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < 0 or end < begin:
        return False, (f"{readme} has no {README_BEGIN} ... {README_END} markers; left untouched (add them where "
                       "the performance section belongs)")
    new = text[:begin + len(README_BEGIN)] + "\n" + section + text[end:]
    if new != text:
        readme.write_text(new)
        return True, f"{readme}: performance section rewritten"
    return True, f"{readme}: performance section already up to date"


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------

def generate(results_dir: Path) -> tuple[Path, list[Path]]:
    """Write ``report.md`` and ``plots/*.png`` in ``results_dir`` from its ``results.csv``."""
    results_dir = Path(results_dir)
    rows = results.read_csv(results_dir / results.CSV_NAME)
    plots = {d.device: write_plots(d, results_dir / "plots") for d in by_device(rows)}
    report = results_dir / REPORT_NAME
    results_dir.mkdir(parents=True, exist_ok=True)
    report.write_text(render_markdown(rows, plots, results_dir))
    return report, [p for paths in plots.values() for p in paths]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=None,
                        help="results folder (default: benchmarks/results if it has results, else results-cpu)")
    parser.add_argument("--readme", nargs="?", const=REPO / "README.md", type=Path, default=None, metavar="PATH",
                        help="also rewrite the performance section of README.md (or PATH) from the GPU results")
    args = parser.parse_args(argv)
    results_dir = args.results
    if results_dir is None:
        results_dir = GPU_RESULTS if (GPU_RESULTS / results.CSV_NAME).exists() else CPU_RESULTS
    if (results_dir / results.CSV_NAME).exists():
        report, plots = generate(results_dir)
        print(f"report: {report}")
        for path in plots:
            print(f"plot:   {path}")
    else:
        print(f"no {results.CSV_NAME} in {results_dir}: run python benchmarks/run.py first")
    if args.readme is not None:
        rows = results.read_csv(GPU_RESULTS / results.CSV_NAME)
        changed, message = update_readme(args.readme, readme_section(rows))
        print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
