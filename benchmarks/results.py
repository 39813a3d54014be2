"""Measurements to result rows, the speedup ratios, and the CSV that accumulates runs.

One row per (device, workload, provider, metric), with the workload's shape, the provider's status, the versions
of torch / triton / CUDA / transformers / peft, the commit, the timestamp and the run id. Re-running a (device,
workload, provider) replaces all of its rows, so the CSV always holds the latest measurement of each.

The speedup of a provider against a baseline is ``median time of the baseline / median time of the provider``,
computed only between measurements of the same run on the same workload (and the same inputs).
"""

from __future__ import annotations

import csv
import datetime
import math
import re
import uuid
from pathlib import Path
from typing import Iterable, Optional, Sequence

BASELINES = ("peft-path", "sdpa-precat")
# The order reports list providers in (kernel level, model level and the device ceilings use the same names).
PROVIDER_ORDER = ("ptv2-triton", "ptv2-cuda", "ptv2-native", "ptv2-auto", "ptv2-packed", "ptv2-padded", "reference",
                  "peft-path", "sdpa-precat", "flash-attn", "flex-attention", "torch")
MODEL_KINDS = ("train", "generate")
SHAPE_COLUMNS = ("group", "kind", "batch", "q_heads", "kv_heads", "q_len", "seq_len", "prefix_len", "head_dim",
                 "num_tasks", "causal", "padding", "dtype", "median_len", "min_len", "targets")
ENV_COLUMNS = ("device_kind", "torch", "triton", "cuda", "transformers", "peft", "commit")
COLUMNS = ("device", "workload", "provider", "metric", "value", "unit", "status", "note") + SHAPE_COLUMNS \
    + ENV_COLUMNS + ("timestamp", "run_id")
KEY = ("device", "workload", "provider")
CSV_NAME = "results.csv"

METRIC_UNITS = {
    "check": "error/bound",
    "time_median": "ms",
    "time_q1": "ms",
    "time_q3": "ms",
    "rounds": "count",
    "tflops": "TFLOP/s",
    "gbps": "GB/s",
    "tokens_per_s": "tokens/s",
    "peak_mem": "MiB",
    "speedup_vs_peft-path": "x",
    "speedup_vs_sdpa-precat": "x",
    "memory_vs_peft-path": "x",
}


def slug(text: str) -> str:
    """A file-name-safe form of a device name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def new_run(environment: dict) -> dict:
    """The columns shared by every row of one run: the environment, a timestamp and a run id."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return dict(environment, timestamp=now.isoformat(), run_id=now.strftime("%Y%m%dT%H%M%SZ") + "-"
                + uuid.uuid4().hex[:6])


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}"
    return str(value)


def _row(run: dict, m, metric: str, value, unit: Optional[str] = None) -> dict:
    row = {key: run.get(key, "") for key in ENV_COLUMNS + ("device", "timestamp", "run_id")}
    row.update({"workload": m.workload.name, "provider": m.provider, "metric": metric, "value": _fmt(value),
                "unit": unit or METRIC_UNITS.get(metric, ""), "status": m.status,
                "note": " ".join(m.note.split()) if metric == "check" else ""})
    row.update({key: _fmt(value) for key, value in m.workload.params().items()})
    return row


def measurement_rows(run: dict, m) -> list[dict]:
    """The rows of one measurement: its check (always), then its timing and rates when it was timed."""
    rows = [_row(run, m, "check", m.check_ratio)]
    if not m.timed:
        return rows
    rows += [_row(run, m, "time_median", m.median_s * 1e3), _row(run, m, "time_q1", m.q1_s * 1e3),
             _row(run, m, "time_q3", m.q3_s * 1e3), _row(run, m, "rounds", m.rounds)]
    if math.isfinite(m.flops):
        rows.append(_row(run, m, "tflops", m.flops / m.median_s / 1e12))
    if math.isfinite(m.bytes):
        rows.append(_row(run, m, "gbps", m.bytes / m.median_s / 1e9))
    if (m.workload.kind in MODEL_KINDS or m.workload.packed) and math.isfinite(m.tokens):  # packed: real tokens
        rows.append(_row(run, m, "tokens_per_s", m.tokens / m.median_s))
    if m.peak_extra_bytes is not None:
        rows.append(_row(run, m, "peak_mem", m.peak_extra_bytes / 2**20, "MiB above inputs"))
    elif m.peak_bytes is not None:
        rows.append(_row(run, m, "peak_mem", m.peak_bytes / 2**20, "MiB in all"))
    return rows


def ratio_rows(run: dict, measurements: Sequence) -> list[dict]:
    """Speedups against each baseline (and memory against peft-path), pair by pair within this run."""
    by_workload: dict = {}
    for m in measurements:
        if m.timed:
            by_workload.setdefault(m.workload.name, {})[m.provider] = m
    rows = []
    for providers in by_workload.values():
        for name, m in providers.items():
            for baseline in BASELINES:
                base = providers.get(baseline)
                if base is None or name == baseline:
                    continue
                rows.append(_row(run, m, f"speedup_vs_{baseline}", base.median_s / m.median_s))
                if baseline == "peft-path":
                    mine, theirs = _peak(m), _peak(base)
                    if mine is not None and theirs:
                        rows.append(_row(run, m, "memory_vs_peft-path", mine / theirs))
    return rows


def _peak(m) -> Optional[int]:
    return m.peak_extra_bytes if m.peak_extra_bytes is not None else m.peak_bytes


def run_rows(run: dict, measurements: Sequence) -> list[dict]:
    rows = [row for m in measurements for row in measurement_rows(run, m)]
    return rows + ratio_rows(run, measurements)


# ----------------------------------------------------------------------------------------------------------------
# The CSV
# ----------------------------------------------------------------------------------------------------------------

def read_csv(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{column: row.get(column) or "" for column in COLUMNS} for row in csv.DictReader(f)]


def write_csv(path: Path, rows: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def merge(existing: Iterable[dict], new: Sequence[dict]) -> list[dict]:
    """``existing`` without the rows of any (device, workload, provider) that ``new`` measured, plus ``new``."""
    replaced = {tuple(row[k] for k in KEY) for row in new}
    kept = [row for row in existing if tuple(row[k] for k in KEY) not in replaced]
    return sorted(kept + list(new), key=_order)


def _order(row: dict):
    names = list(PROVIDER_ORDER)
    provider = row["provider"]
    metric = row["metric"]
    metrics = list(METRIC_UNITS)
    return (row["device"], row["group"], row["workload"], names.index(provider) if provider in names else len(names),
            provider, metrics.index(metric) if metric in metrics else len(metrics), metric)


def save_run(results_dir: Path, run: dict, measurements: Sequence) -> tuple[Path, list[dict]]:
    """Merge this run's rows into ``results_dir/results.csv``; returns the path and the run's rows."""
    rows = run_rows(run, measurements)
    path = Path(results_dir) / CSV_NAME
    write_csv(path, merge(read_csv(path), rows))
    return path, rows


def as_float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan
