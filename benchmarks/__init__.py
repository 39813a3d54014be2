"""The ptv2_kernels benchmark suite: kernels and models timed against the baselines people run today.

Run it with ``python benchmarks/run.py`` (see ``benchmarks/README.md``). The modules, each small and separate:

* :mod:`benchmarks.env` — the device, Triton's CPU interpreter when there is no GPU, versions and commit;
* :mod:`benchmarks.workloads` — the shapes (docs/design.md §6), the suites, inputs, FLOP and byte counts;
* :mod:`benchmarks.providers` — the attention implementations compared at the kernel level;
* :mod:`benchmarks.models` — the model-level workloads: a P-Tuning v2 training step and decode steps;
* :mod:`benchmarks.check` — the correctness check every provider passes before it is timed;
* :mod:`benchmarks.timing` — CUDA-event timing, L2 flush, input rotation, peak memory;
* :mod:`benchmarks.harness` — one (workload, provider) measurement: check, then time;
* :mod:`benchmarks.results` — measurements to CSV rows, speedup ratios, merging runs;
* :mod:`benchmarks.report` — the markdown report, the plots and the README's performance section.

The pytest-benchmark files ``benchmarks/test_bench_*.py`` are the only entry points that measure; ``run.py``
drives them.
"""
