"""Compiled resource use of every kernel, without a GPU: ``python benchmarks/static_report.py``.

    python benchmarks/static_report.py                   # sm_80 and sm_90, every configuration, Triton and CUDA
    python benchmarks/static_report.py --arch 90 --kept  # only what the autotuner may choose (the CI test's subset)
    python benchmarks/static_report.py --readme          # also rewrite README.md between the static-report markers

Triton: every kernel the Triton backend launches at the target shapes of docs/design.md §6 — P1 (BERT-large
fwd+bwd: D=64, key padding, bidirectional), P3 (LLM fwd+bwd: D=128, causal, GQA) and P4 (decode) — is compiled
ahead of time for each architecture (Triton lowers to PTX and runs its own ``ptxas``; no GPU is needed), in every
autotune configuration. The launches are not described by hand: the backend's own ``forward``/``backward`` run on
``meta`` tensors laid out as the benchmark workloads lay out theirs (benchmarks/workloads.py), with the kernels
replaced by recorders, and each recorded launch is compiled with the same argument specialization Triton's JIT
applies (divisibility of pointers and integers). For each configuration the report gives registers per thread,
spill bytes, shared memory, blocks per SM (the occupancy formula of the architecture), the MMA instruction family
in the PTX (``wgmma`` on Hopper, ``mma.sync`` otherwise), and whether ``_prune`` lets the autotuner try it.

CUDA: every ``csrc/*.cu`` is compiled with ``nvcc -Xptxas -v`` (the flags of the extension build) for each
architecture and each kernel entry point's registers, spills and static shared memory are reported.

These are compiled resource use, not timings. The S1 target (docs/design.md §6) is checked: at each target shape
every configuration the autotuner may choose is spill-free and fits shared memory, at least one spill-free forward
and backward configuration exists per target and architecture, and the CUDA kernels spill nothing. Exit status 1
when it does not hold (or a compile failed), 0 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import glob
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CSRC = REPO / "csrc"
DEFAULT_OUT = BENCH_DIR / "results" / "static"
README_BEGIN = "<!-- static-report:begin -->"
README_END = "<!-- static-report:end -->"
TARGETS = ("P1", "P3", "P4")


@dataclasses.dataclass(frozen=True)
class Arch:
    """What one SM of a GPU architecture offers (CUDA occupancy rules; the reference GPU in brackets)."""

    capability: int
    gpu: str
    sms: int
    shared_per_sm: int  # bytes
    shared_per_block: int  # the opt-in maximum a block may use
    registers: int = 65536
    max_threads: int = 2048
    max_blocks: int = 32
    reserved_shared: int = 1024  # per block, sm_80 and later

    def blocks_per_sm(self, registers: int, warps: int, shared: int) -> int:
        """Resident blocks per SM for a kernel of ``registers`` per thread, ``warps`` warps and ``shared`` bytes of
        shared memory (0: it cannot launch). Registers are allocated per warp in units of 256."""
        if shared > self.shared_per_block or warps <= 0:
            return 0
        per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
        by_registers = (self.registers // per_warp) // warps
        by_threads = self.max_threads // (32 * warps)
        by_shared = self.shared_per_sm // (shared + self.reserved_shared)
        return max(0, min(self.max_blocks, by_registers, by_threads, by_shared))


ARCHS = {
    80: Arch(80, "A100", sms=108, shared_per_sm=167936, shared_per_block=166912),
    90: Arch(90, "H100", sms=132, shared_per_sm=233472, shared_per_block=232448),
}


# ----------------------------------------------------------------------------------------------------------------
# The Triton launches at the target shapes, recorded from the backend's own forward/backward
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    target: str
    kernel: str  # forward, backward_keys, ... (the decode form of the forward is "forward (decode)")
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    configs: Optional[list]  # the autotune configurations; None for a kernel launched with one fixed shape


def target_workloads() -> dict:
    """{target: the GPU quick suite's workload measuring it}; fwd+bwd where there is one (it launches the forward
    as well)."""
    from benchmarks import workloads

    chosen = {}
    for w in workloads.suite("quick", gpu=True):
        for target in w.targets:
            if target in TARGETS and w.kind in workloads.KERNEL_KINDS:
                if target not in chosen or w.kind == "fwdbwd":
                    chosen[target] = w
    return {t: chosen[t] for t in TARGETS if t in chosen}


def _meta_inputs(w):
    """Meta tensors shaped and laid out as benchmarks.workloads.make_kernel_inputs lays out a workload's inputs
    (q/k/v views [B, H, N, D] of [B, N, H, D] projections, a shared [Hkv, P, D] prefix or a bank and its index,
    a [B, N] bool key-padding mask); no data."""
    import torch

    meta = dict(device="meta", dtype=w.torch_dtype)
    B, Hq, Hkv, Nq, N, P, D, T = (w.batch, w.q_heads, w.kv_heads, w.q_len, w.seq_len, w.prefix_len, w.head_dim,
                                  w.num_tasks)

    def projection(length, heads):
        return torch.empty(B, length, heads, D, **meta).transpose(1, 2)

    q, k, v = projection(Nq, Hq), projection(N, Hkv), projection(N, Hkv)
    if T == 1:
        prefix_k, prefix_v, index = torch.empty(Hkv, P, D, **meta), torch.empty(Hkv, P, D, **meta), None
    else:
        prefix_k, prefix_v = torch.empty(T, Hkv, P, D, **meta), torch.empty(T, Hkv, P, D, **meta)
        index = torch.empty(B, device="meta", dtype=torch.int64)
    padding = torch.empty(B, N, device="meta", dtype=torch.bool) if w.padding else None
    grad_out = projection(Nq, Hq) if w.kind == "fwdbwd" else None
    return q, k, v, prefix_k, prefix_v, index, padding, grad_out


class _Recorder:
    def __init__(self, sink, target, kernel, fn, configs):
        self.sink, self.target, self.kernel, self.fn, self.configs = sink, target, kernel, fn, configs

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kernel = self.kernel
            if kernel == "forward" and kwargs.get("PACK_GQA"):
                kernel = "forward (decode)"
            self.sink.append(Launch(self.target, kernel, self.fn, args, kwargs, self.configs))
        return launch


@functools.lru_cache(maxsize=None)
def recorded_launches(capability: int) -> tuple:
    """Every Triton launch of the backend at the target shapes, on an ``ARCHS[capability]`` GPU."""
    from ptv2_kernels import ops
    from ptv2_kernels.call import Call
    from ptv2_kernels.triton import prefix_attention as kernels

    sink: list = []
    patched = {
        "_forward": ("forward", kernels._forward.kernel, kernels._forward.configs),
        "_backward_keys": ("backward_keys", kernels._backward_keys.kernel, kernels._backward_keys.configs),
        "_backward_queries": ("backward_queries", kernels._backward_queries.kernel, kernels._backward_queries.configs),
        "_combine_splits_kernel": ("combine_splits", kernels._combine_splits_kernel, None),
        "_backward_preprocess_kernel": ("backward_preprocess", kernels._backward_preprocess_kernel, None),
        "_prefix_grad_finalize_kernel": ("prefix_grad_finalize", kernels._prefix_grad_finalize_kernel, None),
    }
    saved = {name: getattr(kernels, name) for name in list(patched) + ["_multiprocessors"]}
    try:
        kernels._multiprocessors = lambda device: ARCHS[capability].sms
        for target, w in target_workloads().items():
            for name, (kernel, fn, configs) in patched.items():
                setattr(kernels, name, _Recorder(sink, target, kernel, fn, configs))
            q, k, v, prefix_k, prefix_v, index, padding, grad_out = _meta_inputs(w)
            q, k, v, prefix_k, prefix_v, index, lengths, mask, bias = ops._checked(
                q, k, v, prefix_k, prefix_v, index, None, padding, None, None, w.causal, None, 0.0)
            scale = 1.0 / math.sqrt(w.head_dim)
            call = Call(q, k, v, prefix_k, prefix_v, index, lengths, mask, bias, causal=w.causal, scale=scale)
            out, lse = kernels.forward(call)
            if grad_out is not None:
                kernels.backward(grad_out, None, call, out, lse)
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)
    return tuple(sink)


def config_label(config) -> str:
    if config is None:
        return "fixed"
    kw = config.kwargs
    variant = "/tma" if kw.get("USE_TMA") else ""
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}/{config.num_warps}w/{config.num_stages}s{variant}"


def kept_configs(launch: Launch, capability: int) -> list:
    """The configurations ``_prune`` lets the autotuner try for this launch on an ``ARCHS[capability]`` GPU."""
    from ptv2_kernels.triton import prefix_attention as kernels

    if launch.configs is None:
        return [None]
    names = [p.name for p in launch.fn.params]
    named_args = dict(zip(names, launch.args))
    return kernels.prune_configs(launch.configs, {**named_args, **launch.kwargs}, launch.fn.__name__,
                                 divmod(capability, 10), ARCHS[capability].shared_per_block)


def shared_estimate(launch: Launch, config, capability: int) -> Optional[int]:
    """What ``prune_configs`` assumes a configuration's shared memory to be (None for fixed-shape kernels)."""
    from ptv2_kernels.triton import prefix_attention as kernels

    if config is None:
        return None
    named = {**dict(zip([p.name for p in launch.fn.params], launch.args)), **launch.kwargs}
    size = max(t.element_size() for t in (named.get("Q"), named.get("PK")) if hasattr(t, "element_size"))
    return kernels.shared_memory_estimate(kernels._kernel_kind(launch.fn.__name__), config.kwargs["BLOCK_M"],
                                          config.kwargs["BLOCK_N"], named["D_PAD"], config.num_stages, size,
                                          named.get("DV_PAD"))


# ----------------------------------------------------------------------------------------------------------------
# Compiling one Triton launch in one configuration
# ----------------------------------------------------------------------------------------------------------------

_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _ptxas_numbers(log: str) -> dict:
    stack, regs = _STACK.search(log), _REGS.search(log)
    if not stack or not regs:
        raise RuntimeError(f"no resource line in the ptxas output:\n{log[-2000:]}")
    return dict(registers=int(regs.group(1)), stack=int(stack.group(1)), spill_stores=int(stack.group(2)),
                spill_loads=int(stack.group(3)))


def _ptxas_log_again(ptx: str, capability: int) -> str:
    """ptxas -v on a kernel's PTX with Triton's own ptxas (for Triton releases whose compiler cannot print it)."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([str(ptxas), "-v", f"--gpu-name={arch}", str(src), "-o", str(src) + ".o"],
                              capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def mma_family(ptx: str) -> str:
    found = [name for name, marker in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync")) if marker in ptx]
    if "cp.async.bulk.tensor" in ptx:
        found.append("TMA")
    return "+".join(found) or "none"


def compile_launch(launch: Launch, config, capability: int):
    """The compiled kernel of ``launch`` in ``config``, specialized as Triton's JIT specializes it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from triton import knobs

    fn = launch.fn
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.all_kwargs())
    # As JITFunction.run sets them, so that the options (and the cache key) are the JIT's own.
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def triton_job(capability: int, index: int, config_index: Optional[int], warm: bool = False) -> dict:
    """Compile the index-th recorded launch in its config_index-th configuration; its resource use (``warm``:
    only compile, into Triton's default cache)."""
    from triton import knobs

    launch = recorded_launches(capability)[index]
    config = None if config_index is None else launch.configs[config_index]
    kept = config in kept_configs(launch, capability)
    row = dict(kind="triton", arch=f"sm_{capability}", target=launch.target, kernel=launch.kernel,
               config=config_label(config), kept=kept)
    if warm:
        start = time.perf_counter()
        compile_launch(launch, config, capability)
        return {**row, "warm": True, "seconds": time.perf_counter() - start}
    knobs.nvidia.dump_ptxas_log = True
    captured = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(captured):
            compiled = compile_launch(launch, config, capability)
    except Exception as error:  # a configuration the compiler rejects is reported, not fatal
        return {**row, "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}",
                "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    log = captured.getvalue()
    if not _STACK.search(log):
        log = _ptxas_log_again(compiled.asm["ptx"], capability)
    numbers = _ptxas_numbers(log)
    warps, shared = compiled.metadata.num_warps, compiled.metadata.shared
    arch = ARCHS[capability]
    return {**row, **numbers, "warps": warps, "shared": shared, "fits": shared <= arch.shared_per_block,
            "shared_estimate": shared_estimate(launch, config, capability),
            "blocks_per_sm": arch.blocks_per_sm(numbers["registers"], warps, shared),
            "mma": mma_family(compiled.asm["ptx"]), "seconds": seconds}


# ----------------------------------------------------------------------------------------------------------------
# CUDA kernels: nvcc -Xptxas -v per source file and architecture
# ----------------------------------------------------------------------------------------------------------------

def find_nvcc() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
    return candidates[-1] if candidates else None


def nvcc_flags() -> list:
    """The device-code flags of the extension build (setup.py: -O3 -lineinfo, plus torch's common nvcc flags)."""
    try:
        import logging

        logging.disable(logging.WARNING)  # cpp_extension warns when no CUDA runtime is found; irrelevant here
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
        common = list(COMMON_NVCC_FLAGS)
    except ImportError:
        common = []
    finally:
        logging.disable(logging.NOTSET)
    return ["-std=c++17", "-O3", "-lineinfo", *common]


def _demangle(names: list) -> list:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return names
    done = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    out = done.stdout.splitlines()
    return out if done.returncode == 0 and len(out) == len(names) else names


def _short_cuda_name(name: str) -> str:
    """``void ptv2::forward_tiled_kernel<__nv_bfloat16, 64>(ptv2::Params)`` -> ``forward_tiled_kernel<bf16, 64>``."""
    name = re.sub(r"^void\s+", "", name).replace("ptv2::", "")
    name = re.sub(r"\((const )?Params\)$", "", name)
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def parse_nvcc_log(log: str) -> list:
    """[(mangled name, numbers)] of every entry function in a ``-Xptxas -v`` log."""
    rows, current = [], None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)'", line)
        if entry:
            current = {"name": entry.group(1)}
            rows.append(current)
        elif current is not None:
            stack = _STACK.search(line)
            if stack:
                current.update(stack=int(stack.group(1)), spill_stores=int(stack.group(2)),
                               spill_loads=int(stack.group(3)))
            regs = _REGS.search(line)
            if regs:
                current["registers"] = int(regs.group(1))
                smem = re.search(r"(\d+) bytes smem", line)
                current["static_shared"] = int(smem.group(1)) if smem else 0
    return rows


def cuda_job(capability: int, source: str) -> list:
    nvcc = find_nvcc()
    base = dict(kind="cuda", arch=f"sm_{capability}", source=Path(source).name)
    if nvcc is None:
        return [{**base, "error": "no nvcc found (CUDA_HOME, PATH, /usr/local/cuda*)", "seconds": 0.0}]
    with tempfile.TemporaryDirectory() as folder:
        cmd = [nvcc, *nvcc_flags(), "-Xptxas", "-v", f"-gencode=arch=compute_{capability},code=sm_{capability}",
               f"-I{CSRC}", "-c", source, "-o", os.path.join(folder, "kernel.o")]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        return [{**base, "error": (done.stderr or done.stdout)[-600:], "seconds": seconds}]
    found = parse_nvcc_log(done.stdout + done.stderr)
    names = _demangle([f["name"] for f in found])
    rows = [{**base, **{k: v for k, v in f.items() if k != "name"}, "kernel": _short_cuda_name(n),
             "seconds": seconds / max(1, len(found))} for f, n in zip(found, names)]
    return rows or [{**base, "error": "no entry function in the ptxas output", "seconds": seconds}]


# ----------------------------------------------------------------------------------------------------------------
# Running the jobs
# ----------------------------------------------------------------------------------------------------------------

def _worker_init(warm: bool = False):
    os.environ.pop("TRITON_INTERPRET", None)
    if not warm:
        # A private, empty cache: every kernel is really compiled (ptxas prints its resource use only then).
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="ptv2-static-")


def _run_job(job, warm=False):
    kind, *rest = job
    return [triton_job(*rest, warm=warm)] if kind == "triton" else cuda_job(*rest)


def plan_jobs(capabilities: Sequence[int], kept_only: bool, triton_kernels: bool = True,
              cuda_kernels: bool = True, targets: Sequence[str] = TARGETS) -> list:
    jobs = []
    if cuda_kernels:
        jobs += [("cuda", c, str(s)) for c in capabilities for s in sorted(CSRC.glob("*.cu"))]
    if triton_kernels:
        for capability in capabilities:
            for index, launch in enumerate(recorded_launches(capability)):
                if launch.target not in targets:
                    continue
                if launch.configs is None:
                    jobs.append(("triton", capability, index, None))
                    continue
                kept = kept_configs(launch, capability)
                jobs += [("triton", capability, index, i) for i, config in enumerate(launch.configs)
                         if not kept_only or config in kept]
    return jobs


def run_jobs(jobs: list, workers: int, progress=True, warm=False) -> list:
    rows = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, workers), mp_context=context,
                                                initializer=_worker_init, initargs=(warm,)) as pool:
        futures = [pool.submit(_run_job, job, warm) for job in jobs]
        for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
            got = future.result()
            rows += got
            if progress:
                r = got[0]
                what = (f"{r['arch']} {r['target']} {r['kernel']} {r['config']}" if r["kind"] == "triton"
                        else f"{r['arch']} {r['source']} ({len(got)} kernels)")
                print(f"  [{n}/{len(jobs)}] {what}: {sum(g['seconds'] for g in got):.1f} s"
                      + (f"  ERROR {r['error'][:120]}" if "error" in r else ""), file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The S1 target and the report
# ----------------------------------------------------------------------------------------------------------------

ATTENTION_KERNELS = ("forward", "forward (decode)", "backward_keys", "backward_queries")


def spill_free(row: dict) -> bool:
    return "error" not in row and row["spill_stores"] == 0 and row["spill_loads"] == 0


def usable(row: dict) -> bool:
    return spill_free(row) and row.get("fits", True)


def check_targets(rows: list) -> list:
    """The S1 verdicts: [(holds, statement)]."""
    verdicts = []
    triton_rows = [r for r in rows if r["kind"] == "triton"]
    for arch in sorted({r["arch"] for r in triton_rows}):
        for target in [t for t in TARGETS if any(r["target"] == t and r["arch"] == arch for r in triton_rows)]:
            here = [r for r in triton_rows if r["arch"] == arch and r["target"] == target]
            bad = [r for r in here if r["kept"] and not usable(r)]
            verdicts.append((not bad, f"{arch} {target}: every configuration the autotuner may choose is spill-free "
                                      "and fits shared memory"
                             + ("" if not bad else " — not: " + ", ".join(
                                 f"{r['kernel']} {r['config']} ({_problem(r)})" for r in bad))))
            for kernel in sorted({r["kernel"] for r in here if r["kernel"] in ATTENTION_KERNELS}):
                ok = [r for r in here if r["kernel"] == kernel and r["kept"] and usable(r)]
                verdicts.append((bool(ok), f"{arch} {target} {kernel}: {len(ok)} spill-free configuration(s) the "
                                           "autotuner may choose (at least 1 needed)"))
    under = [r for r in triton_rows if "error" not in r and r.get("shared_estimate") is not None
             and r["shared_estimate"] < r["shared"]]
    estimated = [r for r in triton_rows if r.get("shared_estimate") is not None]
    if estimated:
        verdicts.append((not under, "the shared-memory estimate that prunes non-fitting configurations before "
                                    f"autotuning is at least the compiled size in {len(estimated) - len(under)} of "
                                    f"{len(estimated)} configurations"
                         + ("" if not under else " — not: " + ", ".join(
                             f"{r['arch']} {r['target']} {r['kernel']} {r['config']} ({r['shared_estimate']} < "
                             f"{r['shared']} B)" for r in under))))
    cuda_rows = [r for r in rows if r["kind"] == "cuda"]
    for arch in sorted({r["arch"] for r in cuda_rows}):
        here = [r for r in cuda_rows if r["arch"] == arch]
        bad = [r for r in here if not spill_free(r)]
        verdicts.append((not bad, f"{arch} CUDA: {len(here) - len(bad)} of {len(here)} kernel entry points "
                                  "compile spill-free"
                         + ("" if not bad else " — not: " + ", ".join(
                             f"{r.get('kernel', r['source'])} ({_problem(r)})" for r in bad))))
    return verdicts


def _problem(row: dict) -> str:
    if "error" in row:
        return "failed to compile"
    parts = []
    if row["spill_stores"] or row["spill_loads"]:
        parts.append(f"spills {row['spill_stores']} B")
    if not row.get("fits", True):
        parts.append(f"needs {row['shared'] / 1024:.0f} KiB shared memory")
    return ", ".join(parts)


def _kib(value) -> str:
    return f"{value / 1024:.1f}" if isinstance(value, (int, float)) else "—"


def _status(row: dict) -> str:
    if "error" in row:
        return "compile error"
    if not row["kept"]:
        return "pruned"
    return "may be chosen" if usable(row) else "**may be chosen: " + _problem(row) + "**"


def _sort_key(row: dict):
    kernels = ["forward", "forward (decode)", "backward_preprocess", "backward_keys", "backward_queries",
               "prefix_grad_finalize", "combine_splits"]
    return (row["arch"], TARGETS.index(row["target"]) if row.get("target") in TARGETS else 9,
            kernels.index(row["kernel"]) if row.get("kernel") in kernels else 9, row.get("config", ""))


def triton_table(rows: list) -> list:
    lines = ["| arch | target | kernel | config (M×N/warps/stages) | regs | spill B (st/ld) | shared KiB | "
             "blocks/SM | MMA | autotuner |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["kind"] == "triton"), key=_sort_key):
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['target']} | {r['kernel']} | {r['config']} | — | — | — | — | — | "
                         f"compile error: {r['error'][:80]} |")
            continue
        lines.append(f"| {r['arch']} | {r['target']} | {r['kernel']} | {r['config']} | {r['registers']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {_kib(r['shared'])} | {r['blocks_per_sm']} | "
                     f"{r['mma']} | {_status(r)} |")
    return lines


def cuda_table(rows: list) -> list:
    lines = ["| arch | source | kernel | regs | spill B (st/ld) | static shared B |", "|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["kind"] == "cuda"), key=lambda r: (r["arch"], r["source"],
                                                                             r.get("kernel", ""))):
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['source']} | compile error: {r['error'][:80]} | — | — | — |")
            continue
        lines.append(f"| {r['arch']} | {r['source']} | `{r['kernel']}` | {r['registers']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['static_shared']} |")
    return lines


def summary_table(rows: list) -> list:
    """One line per (arch, target, kernel): what the README shows."""
    lines = ["| arch | target | kernel | configs compiled | spilling | not fitting | autotuner may choose | "
             "regs (chosen) | MMA |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        if r["kind"] == "triton":
            groups.setdefault((r["arch"], r["target"], r["kernel"]), []).append(r)
    for key in sorted(groups, key=lambda k: _sort_key(dict(arch=k[0], target=k[1], kernel=k[2]))):
        here = groups[key]
        ok = [r for r in here if "error" not in r]
        spilling = [r for r in ok if not spill_free(r)]
        unfit = [r for r in ok if not r["fits"]]
        chosen = [r for r in ok if r["kept"]]
        chosen_ok = [r for r in chosen if usable(r)]
        regs = sorted({r["registers"] for r in chosen})
        reg_text = (f"{regs[0]}" if len(regs) == 1 else f"{regs[0]}–{regs[-1]}") if regs else "—"

        def names(rs):
            return f"{len(rs)}" + (" (" + ", ".join(f"{r['config']}: {r['spill_stores']} B" if not spill_free(r)
                                                     else r["config"] for r in rs) + ")" if rs else "")
        chosen_text = f"{len(chosen)}, {len(chosen_ok)} spill-free and fitting"
        if len(chosen_ok) < len(chosen):
            chosen_text = f"**{chosen_text}**"
        mma = "/".join(sorted({r["mma"] for r in ok})) or "—"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {len(here)} | {names(spilling)} | "
                     f"{len(unfit)} | {chosen_text} | {reg_text} | {mma} |")
    cuda_rows = [r for r in rows if r["kind"] == "cuda" and "error" not in r]
    for arch in sorted({r["arch"] for r in cuda_rows}):
        here = [r for r in cuda_rows if r["arch"] == arch]
        spilling = [r for r in here if not spill_free(r)]
        regs = sorted(r["registers"] for r in here)
        lines.append(f"| {arch} | all | CUDA (`csrc/*.cu`, {len(here)} entry points) | {len(here)} | "
                     f"{len(spilling)} | — | — | {regs[0]}–{regs[-1]} | mma.sync |")
    return lines


def environment() -> str:
    import torch
    import triton

    nvcc = find_nvcc()
    version = ""
    if nvcc:
        found = re.search(r"release (\S+),", subprocess.run([nvcc, "--version"], capture_output=True,
                                                            text=True).stdout)
        version = found.group(1) if found else "?"
    return f"triton {triton.__version__}, torch {torch.__version__}, nvcc {version or 'not found'}"


def render(rows: list, verdicts: list, seconds: float, kept_only: bool, workers: int) -> str:
    compile_s = sum(r["seconds"] for r in rows)
    lines = ["# Compiled resource use of the kernels (static report)", "",
             "_Generated by `python benchmarks/static_report.py`; compiled resource use, not timings. No GPU was "
             "used: Triton and nvcc compile for the architectures named._", "",
             f"{environment()}; {len(rows)} kernels compiled "
             f"({'only the configurations the autotuner may choose' if kept_only else 'every configuration'}) in "
             f"{seconds:.0f} s wall ({compile_s:.0f} s of compile time over {workers} process(es)). Blocks/SM: "
             "resident blocks by the occupancy rules of " + ", ".join(f"sm_{a.capability} ({a.gpu}: "
                                                                      f"{a.shared_per_block // 1024} KiB shared "
                                                                      "memory per block)" for a in ARCHS.values())
             + ". Target shapes: " + "; ".join(f"{t} = `{w.name}`" for t, w in target_workloads().items()) + ".",
             "", "## S1 (docs/design.md §6)", ""]
    lines += [f"- {'holds' if ok else '**fails**'}: {text}" for ok, text in verdicts]
    lines += ["", "## Summary", ""] + summary_table(rows)
    lines += ["", "## Triton kernels, every configuration", ""] + triton_table(rows)
    if any(r["kind"] == "cuda" for r in rows):
        lines += ["", "## CUDA kernels (`nvcc -Xptxas -v`)", ""] + cuda_table(rows)
    return "\n".join(lines) + "\n"


def readme_section(rows: list, verdicts: list) -> str:
    held = all(ok for ok, _ in verdicts)
    lines = ["_Compiled resource use, not timings: generated by `python benchmarks/static_report.py --readme` "
             f"without a GPU ({environment()}). The full per-configuration table is "
             "[benchmarks/results/static/report.md](benchmarks/results/static/report.md)._", "",
             f"S1 (no configuration the autotuner may choose spills or overflows shared memory; at least one "
             f"spill-free forward and backward configuration per target shape; CUDA kernels spill-free): "
             f"**{'holds' if held else 'fails'}**.", ""]
    return "\n".join(lines + summary_table(rows)) + "\n"


def update_readme(readme: Path, section: str) -> str:
    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        return f"{readme} has no {README_BEGIN} ... {README_END} markers: left untouched"
    readme.write_text(text[:begin + len(README_BEGIN)] + "\n" + section + text[end:])
    return f"{readme}: static report section rewritten"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/static_report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS),
                        help="compute capability to compile for (repeatable; default: all of " +
                             ", ".join(str(a) for a in ARCHS) + ")")
    parser.add_argument("--target", action="append", choices=TARGETS, help="only this target shape (repeatable)")
    parser.add_argument("--kept", action="store_true",
                        help="compile only the configurations the autotuner may choose (the CI test's subset)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: cores)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder of report.md and report.json "
                                                                       f"(default {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument("--readme", nargs="?", const=REPO / "README.md", type=Path, default=None, metavar="PATH",
                        help="also rewrite README.md's static-report section (between its markers)")
    parser.add_argument("--list", action="store_true", help="print what would be compiled, compile nothing")
    parser.add_argument("--warm-cache", action="store_true",
                        help="only compile, into Triton's default cache (as the JIT would: a GPU's later "
                             "autotuning at the target shapes loads them instead of compiling one by one); no "
                             "report")
    args = parser.parse_args(argv)
    # The interpreter replaces the kernels when they are defined: off before anything imports triton (this module
    # imports it only inside functions, so importing it, e.g. from a test, leaves the environment alone).
    os.environ.pop("TRITON_INTERPRET", None)
    capabilities = args.arch or sorted(ARCHS)
    targets = args.target or TARGETS

    start = time.perf_counter()
    jobs = plan_jobs(capabilities, args.kept, not args.no_triton, not args.no_cuda, targets)
    if args.list:
        for job in jobs:
            if job[0] == "cuda":
                print(f"sm_{job[1]} CUDA {Path(job[2]).name}")
            else:
                launch = recorded_launches(job[1])[job[2]]
                config = None if job[3] is None else launch.configs[job[3]]
                print(f"sm_{job[1]} {launch.target} {launch.kernel} {config_label(config)}"
                      + ("" if config in kept_configs(launch, job[1]) else " (pruned)"))
        return 0
    print(f"static report: {len(jobs)} compile jobs for {', '.join(f'sm_{c}' for c in capabilities)} on "
          f"{args.jobs} process(es)", file=sys.stderr, flush=True)
    # The longest first (nvcc on a whole file, then the big attention kernels), for an even spread.
    jobs.sort(key=lambda j: (j[0] != "cuda", j[0] == "triton" and j[3] is None))
    if args.warm_cache:
        rows = run_jobs([j for j in jobs if j[0] == "triton"], args.jobs, warm=True)
        print(f"warmed Triton's cache with {len(rows)} kernels in {time.perf_counter() - start:.0f} s")
        return 0
    rows = run_jobs(jobs, args.jobs)
    seconds = time.perf_counter() - start
    verdicts = check_targets(rows)
    errors = [r for r in rows if "error" in r and not (r["kind"] == "triton" and not r["kept"])]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(render(rows, verdicts, seconds, args.kept, args.jobs))
    (args.out / "report.json").write_text(json.dumps(
        {"environment": environment(), "seconds": seconds, "kept_only": args.kept, "rows": rows,
         "verdicts": [{"holds": ok, "what": text} for ok, text in verdicts]}, indent=1))
    print("\n".join(summary_table(rows)))
    print()
    for ok, text in verdicts:
        print(f"{'holds' if ok else 'FAILS'}: {text}")
    print(f"\n{len(rows)} kernels in {seconds:.0f} s wall ({sum(r['seconds'] for r in rows):.0f} s compiling); "
          f"report: {args.out / 'report.md'}")
    if args.readme is not None:
        print(update_readme(args.readme, readme_section(rows, verdicts)))
    if errors:
        print(f"{len(errors)} compile error(s)")
    return 0 if all(ok for ok, _ in verdicts) and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
