"""Model-level benchmarks: a P-Tuning v2 training step and decode steps, the patched model against PEFT prefix
tuning (see benchmarks/models.py)."""

from benchmarks import harness, models

KINDS = ("train", "generate")
PROVIDERS = models.PROVIDERS


def test_model(bench_case, benchmark, bench_record):
    workload, name = bench_case
    harness.release()  # the kernel workloads' inputs are not needed here
    bench_record(harness.measure(workload, name, lambda: models.model_case(workload, name), benchmark))
