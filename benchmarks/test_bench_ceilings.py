"""The device's own ceilings, measured in the same run as the attention numbers they put in proportion."""

from benchmarks import ceilings, harness

KINDS = ("ceiling",)
PROVIDERS = (ceilings.PROVIDER,)


def test_ceiling(bench_case, benchmark, bench_record):
    workload, name = bench_case
    bench_record(harness.measure(workload, name, lambda: ceilings.ceiling_case(workload, name), benchmark))
