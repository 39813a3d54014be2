"""Kernel-level benchmarks: prefix attention forward, forward+backward and decode, every provider on the same
inputs (see benchmarks/workloads.py for the shapes, benchmarks/providers.py for the providers)."""

from benchmarks import harness, providers

KINDS = ("fwd", "fwdbwd", "decode")
PROVIDERS = providers.KERNEL_PROVIDER_NAMES


def test_kernel(bench_case, benchmark, bench_record):
    workload, name = bench_case
    bench_record(harness.measure(workload, name, lambda: harness.kernel_case(workload, providers.by_name(name)),
                                 benchmark))
