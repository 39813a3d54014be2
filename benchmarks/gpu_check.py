"""GPU evidence in one command: ``python benchmarks/gpu_check.py`` on a fresh GPU machine.

    python benchmarks/gpu_check.py                 # everything, within a total budget of 480 s
    python benchmarks/gpu_check.py --budget-s 900  # more time: the later stages get their full caps
    python benchmarks/gpu_check.py --dry-run       # no GPU: print the plan, run what runs on a CPU

It installs the package from the checkout without the network (``pip install --no-deps --no-build-isolation -e
.``, the CUDA extension for the local GPU's architecture only, all cores), then runs, in order of value: the
self-check of every backend (``python -m ptv2_kernels``), the first-call latency of the CUDA backend, a parallel
warm-up of Triton's cache for the target shapes (benchmarks/static_report.py compiles the configurations the
autotuner may choose, in as many processes as there are cores, into Triton's own cache), the quick benchmark suite
(``benchmarks/run.py``: the suite's own code in a subprocess), compute-sanitizer memcheck on a small forward,
backward and decode case of both kernel backends, a bounded selection of the compiled-kernel tests (bf16, fp16,
fp32), and racecheck and synccheck on the CUDA kernels.

Every stage is a subprocess with a cap (its timeout); a stage that overruns is stopped (its process group killed)
and reported (a benchmark run stopped so still saves what it measured), and the next stage starts with what is
left of ``--budget-s``. After every stage the summary is rewritten, so what finished is always written, even when
the run itself is killed. Everything goes to
``benchmarks/results/<device>-<timestamp>/`` (a dry run: ``benchmarks/results-cpu/gpu-check/...``): one log per
stage, the benchmark results (``bench/results.csv``, raw JSON, ``report.md``, plots), ``summary.md`` with the
P1-P9 verdicts (from benchmarks/report.py) and the ``auto`` backend order the numbers support, and
``summary.json``. When the environment variable ``OUT`` names a folder, at most 8 of those files are copied there.
The last thing printed is a one-screen summary.

Exit status: 0 when every stage that ran passed, 1 otherwise (a stage skipped for lack of budget is not a failure,
and is listed as skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:  # run as a script: make the repository importable (benchmarks.report, ...)
    sys.path.insert(0, str(REPO))

PYTHON = sys.executable
DEFAULT_BUDGET_S = 480.0
MIN_STAGE_S = 15.0  # a stage is not started with less than this left
RESERVE_S = 5.0  # kept back for writing the summary
OUT_LIMIT = 8  # files copied to $OUT
# The providers the benchmark stage times: everything the GPU targets' verdicts (P1-P6, P9) use. flex-attention (a
# torch.compile per shape) and the reference (materialized float32 math) are left out for time; --all-providers
# keeps them.
BENCH_PROVIDERS = ("ptv2-triton", "ptv2-cuda", "peft-path", "sdpa-precat", "flash-attn", "ptv2-packed", "ptv2-padded",
                   "torch")
# Bounded selections of the compiled-kernel tests: every dtype (bf16, fp16, fp32), masks, banks, decode.
TRITON_TESTS = ("tests/test_triton_prefix_attention.py", "-k",
                "(test_matches_reference and (none- or padding-causal)) or (test_packed_query_heads and padding) "
                "or test_float32_prefix_with_half_inputs")
# The forward's TMA variant forced on (Hopper; the tests skip elsewhere): does the autotuner's extra candidate run.
TMA_TESTS = ("tests/test_triton_tma.py", "-k", "test_forward_with_tma_matches_the_oracle and (padding or decode)")
CUDA_TESTS = ("tests/test_cuda_backend.py", "-k",
              "gpu and ((test_matches_reference and (none- or padding-causal)) or test_decode_matches_reference "
              "or test_decode_forward_and_backward or test_deterministic_mode)")


# ----------------------------------------------------------------------------------------------------------------
# Stages and the budgeted runner
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Stage:
    """One step: a command run as a subprocess from the repository root, with a time cap."""

    name: str
    what: str
    argv: Callable[["Context"], list]  # the command (built when the stage starts: it may use earlier results)
    estimate_s: float  # expected on a GPU machine of the kind the project is lent (16 cores, H100/H200 class)
    cap_s: float  # stopped after this long (or when the budget runs out, whichever comes first)
    env: Callable[["Context"], dict] = lambda ctx: {}
    on_cpu: bool = False  # part of a dry run (runs on a CPU)
    cpu_estimate_s: float = 0.0
    skip: Callable[["Context"], Optional[str]] = lambda ctx: None  # a reason not to run it, or None
    parse: Callable[["Context", "Result"], None] = lambda ctx, result: None  # facts from its log


@dataclasses.dataclass
class Result:
    name: str
    status: str  # passed | failed | timed out | skipped | not run (dry run)
    seconds: float = 0.0
    limit_s: float = 0.0
    returncode: Optional[int] = None
    log: Optional[str] = None
    note: str = ""
    facts: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Context:
    run_dir: Path
    dry_run: bool
    budget_s: float
    probe: dict = dataclasses.field(default_factory=dict)
    results: dict = dataclasses.field(default_factory=dict)  # name -> Result
    bench_args: list = dataclasses.field(default_factory=list)
    selfcheck_args: list = dataclasses.field(default_factory=list)
    all_providers: bool = False
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def bench_dir(self) -> Path:
        return self.run_dir / "bench"

    def passed(self, name: str) -> bool:
        return name in self.results and self.results[name].status == "passed"


def run_command(argv: list, env: dict, timeout: float, log_path: Path) -> tuple[Optional[int], bool, float]:
    """Run ``argv`` with its output in ``log_path``; stop its whole process group after ``timeout`` seconds.
    Returns (exit status or None, timed out, seconds)."""
    full_env = {**os.environ, **{k: str(v) for k, v in env.items() if v is not None}}
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(map(str, argv))}\n")
        if env:
            log.write(f"  env: {' '.join(f'{k}={v}' for k, v in env.items())}\n")
        log.flush()
        try:
            process = subprocess.Popen([str(a) for a in argv], cwd=REPO, env=full_env, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as error:
            log.write(f"could not start: {error}\n")
            return 127, False, time.monotonic() - start
        try:
            code = process.wait(timeout=max(1.0, timeout))
            return code, False, time.monotonic() - start
        except subprocess.TimeoutExpired:
            _stop(process)
            log.write(f"\n[gpu_check] stopped after {timeout:.0f} s (the stage's cap or the budget's end)\n")
            return None, True, time.monotonic() - start


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group, SIGKILL if it is still there 10 s later."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stages(stages: Sequence[Stage], ctx: Context, after_each: Callable[[Context], None] = lambda ctx: None,
               clock: Callable[[], float] = time.monotonic, say: Callable[[str], None] = print) -> list:
    """Run ``stages`` in order within ``ctx.budget_s`` (counted from ``ctx.started``); ``after_each`` is called
    after every stage (it writes the summary)."""
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for index, stage in enumerate(stages, 1):
        remaining = ctx.budget_s - (clock() - ctx.started) - RESERVE_S
        reason = None
        if ctx.dry_run and not stage.on_cpu:
            result = Result(stage.name, "not run (dry run)", note="GPU only")
        elif (reason := stage.skip(ctx)) is not None:
            result = Result(stage.name, "skipped", note=reason)
        elif remaining < MIN_STAGE_S:
            result = Result(stage.name, "skipped", note=f"budget spent ({max(0.0, remaining):.0f} s left)")
        else:
            limit = min(stage.cap_s, remaining)
            log = ctx.run_dir / f"{index:02d}-{_slug(stage.name)}.log"
            say(f"[{clock() - ctx.started:5.0f} s] {stage.name} (limit {limit:.0f} s): {stage.what}")
            try:
                argv, env = stage.argv(ctx), stage.env(ctx)
            except Exception as error:  # a stage that cannot even be built is a failed stage, not a crash
                argv, env = None, {}
                result = Result(stage.name, "failed", note=f"could not prepare: {error}")
            if argv is not None:
                code, timed_out, seconds = run_command(argv, env, limit, log)
                status = "timed out" if timed_out else ("passed" if code == 0 else "failed")
                result = Result(stage.name, status, seconds, limit, code, str(log.relative_to(ctx.run_dir)))
                if timed_out:
                    result.note = (f"stopped at its cap of {stage.cap_s:.0f} s" if limit >= stage.cap_s
                                   else f"stopped at the budget's end ({limit:.0f} s left of a {stage.cap_s:.0f} s "
                                        "cap)")
                try:
                    stage.parse(ctx, result)
                except Exception as error:  # facts are best effort; the status stands
                    result.facts["parse error"] = str(error)
                if not result.note and status == "failed":
                    result.note = f"exit status {code}: " + _last_line(ctx.run_dir / result.log)
        ctx.results[stage.name] = result
        out.append(result)
        if result.status in ("passed", "failed", "timed out"):
            say(f"        {result.status} in {result.seconds:.0f} s" + (f": {result.note}" if result.note else ""))
        after_each(ctx)
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _read(ctx: Context, result: Result) -> str:
    if not result.log:
        return ""
    try:
        return (ctx.run_dir / result.log).read_text(errors="replace")
    except OSError:
        return ""


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


# ----------------------------------------------------------------------------------------------------------------
# The stages of a GPU check
# ----------------------------------------------------------------------------------------------------------------

PROBE = r"""
import importlib.util, json, os, shutil, subprocess, sys
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
info = {"python": sys.version.split()[0], "cores": os.cpu_count()}
for name in ("torch", "triton", "transformers", "peft", "pytest", "pytest-benchmark", "pytest-xdist", "ninja",
             "setuptools", "flash-attn"):
    info[name] = version(name)
info["tools"] = {t: shutil.which(t) for t in ("nvcc", "ncu", "compute-sanitizer", "ninja", "nvidia-smi")}
try:
    import torch
    info["cuda_build"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
except Exception as error:
    info["torch_error"] = str(error)
print("PROBE " + json.dumps(info))
"""


def probe(timeout: float = 120.0) -> dict:
    """Versions, tools and the GPU, from a subprocess (this process never initializes CUDA)."""
    try:
        done = subprocess.run([PYTHON, "-c", PROBE], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"probe_error": f"the probe took over {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    return {"probe_error": (done.stderr or done.stdout)[-500:]}


FIRST_CALL = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import ptv2_kernels
from ptv2_kernels import backends
t2 = time.perf_counter()
out = {"import torch s": round(t1 - t0, 3), "import ptv2_kernels s": round(t2 - t1, 3)}
torch.zeros(1, device="cuda"); torch.cuda.synchronize()
out["CUDA context s"] = round(time.perf_counter() - t2, 3)
def inputs(q_len, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to("cuda", torch.bfloat16).requires_grad_(grad)
    return make(4, 16, q_len, 64), make(4, 4, 256, 64), make(4, 4, 256, 64), make(4, 32, 64), make(4, 32, 64)
def timed(fn):
    t = time.perf_counter(); fn(); torch.cuda.synchronize(); return round(time.perf_counter() - t, 4)
for backend in ("cuda", "triton"):
    reason = backends.unavailable_reason(backend)
    if reason is not None:
        out[backend] = {"unavailable": reason}; continue
    row = {}
    q, k, v, pk, pv = inputs(128, False)
    call = lambda: ptv2_kernels.prefix_attention(q, k, v, pk, pv, causal=True, backend=backend)
    row["forward first s"], row["forward second s"] = timed(call), timed(call)
    qd = inputs(1, False)
    call = lambda: ptv2_kernels.prefix_attention(*qd, backend=backend)
    row["decode first s"], row["decode second s"] = timed(call), timed(call)
    q, k, v, pk, pv = inputs(128, True)
    step = lambda: ptv2_kernels.prefix_attention(q, k, v, pk, pv, causal=True, backend=backend).sum().backward()
    row["fwd+bwd first s"], row["fwd+bwd second s"] = timed(step), timed(step)
    out[backend] = row
print("FIRST_CALL " + json.dumps(out))
"""

SANITIZE = r"""
# A small forward, backward and decode case for compute-sanitizer: python sanitize_case.py BACKEND...
import sys
import torch
import ptv2_kernels
g = torch.Generator(device="cpu").manual_seed(0)
def make(*shape, grad=True, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=g).to("cuda", dtype).requires_grad_(grad)
for backend in sys.argv[1:] or ["cuda"]:
    for dtype in (torch.bfloat16, torch.float32):
        # fwd + bwd: GQA, a bank of 3 prefixes with lengths, key padding, causal, ragged sizes
        q, k, v = make(2, 4, 70, 64, dtype=dtype), make(2, 2, 90, 64, dtype=dtype), make(2, 2, 90, 64, dtype=dtype)
        pk, pv = make(3, 2, 13, 64, dtype=dtype), make(3, 2, 13, 64, dtype=dtype)
        index = torch.tensor([2, 0], device="cuda")
        lengths = torch.tensor([13, 5, 9], device="cuda")
        pad = torch.arange(90, device="cuda")[None, :] < torch.tensor([90, 61], device="cuda")[:, None]
        out = ptv2_kernels.prefix_attention(q, k, v, pk, pv, prefix_index=index, prefix_lengths=lengths,
                                            key_padding_mask=pad, causal=True, backend=backend)
        out.float().square().sum().backward()
        # decode: one query per sample over a longer cache (split-KV), shared prefix
        qd, kd, vd = make(3, 8, 1, 128, grad=False, dtype=dtype), make(3, 2, 700, 128, grad=False, dtype=dtype), \
            make(3, 2, 700, 128, grad=False, dtype=dtype)
        ptv2_kernels.prefix_attention(qd, kd, vd, make(2, 16, 128, grad=False, dtype=dtype),
                                      make(2, 16, 128, grad=False, dtype=dtype), backend=backend)
        torch.cuda.synchronize()
    print(f"{backend}: forward, backward and decode ran")
"""


def _local_arch(ctx: Context) -> Optional[str]:
    return ctx.probe.get("capability")


def _install_env(ctx: Context) -> dict:
    arch = _local_arch(ctx)
    return {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": os.cpu_count() or 1, "PTV2_REQUIRE_CUDA_BUILD": "1",
            "PTV2_SKIP_CUDA_BUILD": None}


def _parse_install(ctx: Context, result: Result) -> None:
    lines = [line.strip() for line in _read(ctx, result).splitlines() if "ptv2_kernels setup:" in line]
    result.facts["setup"] = sorted(set(lines))[:5]
    if lines and not result.note:
        result.note = lines[-1][:200]


def _parse_selfcheck(ctx: Context, result: Result) -> None:
    text = _read(ctx, result)
    verdicts = re.findall(r"^  (\w+): (.+) in ([\d.]+) s$", text, flags=re.M)
    result.facts["backends"] = {name: f"{verdict} ({seconds} s)" for name, verdict, seconds in verdicts}
    found = re.search(r"^result: (.+)$", text, flags=re.M)
    if found:
        result.note = found.group(1)[:200]


def _parse_first_call(ctx: Context, result: Result) -> None:
    for line in _read(ctx, result).splitlines():
        if line.startswith("FIRST_CALL "):
            result.facts.update(json.loads(line[len("FIRST_CALL "):]))
            cuda = result.facts.get("cuda", {})
            if "forward first s" in cuda:
                result.note = (f"CUDA backend: first forward {cuda['forward first s'] * 1e3:.0f} ms, second "
                               f"{cuda['forward second s'] * 1e3:.1f} ms")
            elif "unavailable" in cuda:
                result.note = f"CUDA backend unavailable: {cuda['unavailable']}"


def _parse_pytest(ctx: Context, result: Result) -> None:
    text = _read(ctx, result)
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
    if result.status == "timed out":  # no final line: count the verbose per-test lines
        counts = {kind: len(re.findall(rf"\b{kind.upper()}\b", text)) for kind in ("passed", "failed", "skipped")}
    result.facts["tests"] = counts
    result.note = (result.note + "; " if result.note else "") + ", ".join(f"{n} {k}" for k, n in counts.items()
                                                                          if k != "deselected")


def _parse_sanitizer(ctx: Context, result: Result) -> None:
    text = _read(ctx, result)
    found = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazard", text)
    result.facts["errors"] = sum(int(n) for n in found) if found else None
    summary = []
    if found:
        summary.append(f"{result.facts['errors']} error(s)")
    if hazards:
        summary.append(f"{sum(int(n) for n in hazards)} hazard(s)")
    if summary:
        result.note = (result.note + "; " if result.note else "") + ", ".join(summary)


def _parse_bench(ctx: Context, result: Result) -> None:
    text = _read(ctx, result)
    found = re.search(r"(\d+) measurements in (\d+) s", text)
    if found:
        result.facts["measurements"] = int(found.group(1))
    bad = re.search(r"(\d+) provider run\(s\) wrong or failed: (.+)", text)
    if bad:
        result.note = (result.note + "; " if result.note else "") + bad.group(0)[:200]


def _needs_cuda_backend(ctx: Context) -> Optional[str]:
    if ctx.results.get("install") and ctx.results["install"].status != "passed":
        return "the CUDA extension was not built (the install stage did not pass)"
    return None


def _write_script(ctx: Context, name: str, text: str) -> Path:
    path = ctx.run_dir / name
    path.write_text(text)
    return path


def _sanitizer(tool: str, backends: Sequence[str], estimate: float, cap: float) -> Stage:
    def argv(ctx):
        script = _write_script(ctx, "sanitize_case.py", SANITIZE)
        tool_args = ["--tool", tool, "--error-exitcode", "99"]
        if tool == "racecheck":
            tool_args += ["--racecheck-report", "hazard"]
        return ["compute-sanitizer", *tool_args, PYTHON, script, *backends]

    def skip(ctx):
        if not shutil.which("compute-sanitizer"):
            return "compute-sanitizer is not on PATH"
        if "cuda" in backends and len(backends) == 1:
            return _needs_cuda_backend(ctx)
        return None

    return Stage(f"sanitizer {tool}", f"compute-sanitizer --tool {tool} on a small forward, backward and decode "
                                      f"case ({', '.join(backends)})", argv, estimate, cap,
                 # One allocation per tensor, so that memcheck sees an access past a tensor's end.
                 env=lambda ctx: {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "PTV2_TRITON_AUTOTUNE": "0"},
                 skip=skip, parse=_parse_sanitizer)


def _pytest(ctx: Context, selection: Sequence[str]) -> list:
    argv = [PYTHON, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", *selection]
    cores = ctx.probe.get("cores") or os.cpu_count() or 1
    if ctx.probe.get("pytest-xdist") and cores >= 4:
        argv += ["-n", str(min(8, cores // 2))]  # Triton compiles in each worker: spread it over the cores
    return argv


def _bench_argv(ctx: Context) -> list:
    argv = [PYTHON, str(BENCH_DIR / "run.py"), "--results", str(ctx.bench_dir), "--no-progress"]
    if not ctx.all_providers and not any(a.startswith("--provider") for a in ctx.bench_args):
        for name in BENCH_PROVIDERS:
            argv += ["--provider", name]
    return argv + list(ctx.bench_args)


def _warm_skip(ctx: Context) -> Optional[str]:
    from benchmarks import static_report

    arch = _local_arch(ctx)
    if not arch:
        return "no GPU found by the probe"
    capability = int(arch.replace(".", ""))
    if capability not in static_report.ARCHS:
        return f"static_report knows no sm_{capability} (only {', '.join(f'sm_{a}' for a in static_report.ARCHS)})"
    return None


def stages() -> list:
    return [
        Stage("install", "pip install --no-deps --no-build-isolation -e . (CUDA extension for this GPU only)",
              lambda ctx: [PYTHON, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation",
                           "--no-index", "-e", "."],
              estimate_s=150, cap_s=360, env=_install_env, parse=_parse_install),
        Stage("install (Triton only)", "the CUDA build failed: install pure Python (PTV2_SKIP_CUDA_BUILD=1)",
              lambda ctx: [PYTHON, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "-e", "."],
              estimate_s=15, cap_s=120, env=lambda ctx: {"PTV2_SKIP_CUDA_BUILD": "1"},
              skip=lambda ctx: None if ctx.results.get("install") and ctx.results["install"].status != "passed"
              else "not needed: the install passed"),
        Stage("self-check", "python -m ptv2_kernels --quick: every backend against the float64 reference",
              lambda ctx: [PYTHON, "-m", "ptv2_kernels", "--quick", *ctx.selfcheck_args],
              estimate_s=60, cap_s=150, env=lambda ctx: {"PTV2_TRITON_AUTOTUNE": "0"}, on_cpu=True,
              cpu_estimate_s=15, parse=_parse_selfcheck),
        Stage("first-call latency", "first and second call of each backend in a fresh process",
              lambda ctx: [PYTHON, _write_script(ctx, "first_call.py", FIRST_CALL)],
              estimate_s=25, cap_s=90, parse=_parse_first_call),
        Stage("warm Triton cache", "compile the autotuner's configurations at the target shapes in parallel "
                                   "(benchmarks/static_report.py --warm-cache)",
              lambda ctx: [PYTHON, str(BENCH_DIR / "static_report.py"), "--warm-cache", "--kept", "--no-cuda",
                           "--arch", _local_arch(ctx).replace(".", ""), "--out", str(ctx.run_dir / "static")],
              estimate_s=45, cap_s=150, skip=_warm_skip),
        Stage("benchmarks", "the quick benchmark suite (benchmarks/run.py): targets P1-P9",
              _bench_argv, estimate_s=270, cap_s=420, on_cpu=True, cpu_estimate_s=45, parse=_parse_bench),
        _sanitizer("memcheck", ("cuda", "triton"), estimate=60, cap=150),
        Stage("kernel tests", "pytest: a bounded selection of the Triton and CUDA kernel tests (bf16/fp16/fp32)",
              lambda ctx: _pytest(ctx, [*TRITON_TESTS[:1], *TMA_TESTS[:1], *CUDA_TESTS[:1], "-k",
                                        f"({TRITON_TESTS[2]}) or ({TMA_TESTS[2]}) or ({CUDA_TESTS[2]})"]),
              estimate_s=120, cap_s=240, env=lambda ctx: {"PTV2_TRITON_AUTOTUNE": "0"}, parse=_parse_pytest),
        _sanitizer("racecheck", ("cuda",), estimate=60, cap=150),
        _sanitizer("synccheck", ("cuda",), estimate=45, cap=120),
    ]


# ----------------------------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------------------------

def bench_rows(ctx: Context) -> list:
    from benchmarks import results

    path = ctx.bench_dir / results.CSV_NAME
    return results.read_csv(path) if path.exists() else []


def target_verdicts(rows: list) -> list:
    """[(device, functional, [target dicts])] from benchmarks/report.py's own evaluation."""
    from benchmarks import report

    return [(d.device, d.functional, report.evaluate_targets(d)) for d in report.by_device(rows)]


def auto_order(rows: list) -> list:
    """What the numbers say about ``auto``'s order: per kind of work, which of ptv2-triton and ptv2-cuda was
    faster at the workloads measured by both (median time, same run). Lines of text."""
    from benchmarks import report

    lines = []
    for d in report.by_device(rows):
        kinds: dict = {}
        for w, row in d.workloads.items():
            triton_t, cuda_t = d.value(w, "ptv2-triton", "time_median"), d.value(w, "ptv2-cuda", "time_median")
            if triton_t == triton_t and cuda_t == cuda_t and triton_t > 0 and cuda_t > 0:  # both finite
                kinds.setdefault(row["kind"], []).append((w, triton_t / cuda_t))
        for kind, pairs in sorted(kinds.items()):
            faster = ["cuda" if ratio > 1.05 else "triton" if ratio < 1 / 1.05 else "tie" for _, ratio in pairs]
            detail = ", ".join(f"{w.split('/')[0]} {'cuda' if r > 1 else 'triton'} {max(r, 1 / r):.2f}x"
                               for w, r in pairs)
            if all(f == "cuda" for f in faster):
                verdict = "cuda first"
            elif all(f in ("triton", "tie") for f in faster):
                verdict = "triton first (as now)"
            else:
                verdict = "mixed: no single order"
            lines.append(f"{d.device}{' (functional run: meaningless)' if d.functional else ''}: {kind}: "
                         f"{verdict} — {detail}")
    return lines or ["not measured: no workload was timed with both ptv2-triton and ptv2-cuda"]


def write_summary(ctx: Context) -> Path:
    from benchmarks import report

    rows = bench_rows(ctx)
    verdicts = target_verdicts(rows)
    elapsed = time.monotonic() - ctx.started
    p = ctx.probe
    lines = ["# GPU check" + (" (dry run: no GPU, timings meaningless)" if ctx.dry_run else ""), "",
             f"_Written by `python benchmarks/gpu_check.py` after every stage; {elapsed:.0f} s of a "
             f"{ctx.budget_s:.0f} s budget used._", "",
             f"- device: {p.get('device', 'no GPU')} (compute capability {p.get('capability', '—')}, "
             f"{p.get('sms', '—')} SMs), {p.get('cores')} cores",
             f"- python {p.get('python')}, torch {p.get('torch')} (CUDA {p.get('cuda_build')}), triton "
             f"{p.get('triton')}, transformers {p.get('transformers')}, peft {p.get('peft')}, pytest-xdist "
             f"{p.get('pytest-xdist') or 'not installed'}",
             f"- tools: " + ", ".join(f"{t} {'found' if where else 'missing'}"
                                      for t, where in (p.get("tools") or {}).items()),
             "", "## Stages", "", "| stage | status | seconds | limit | note | log |", "|---|---|---|---|---|---|"]
    for r in ctx.results.values():
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.limit_s:.0f} | "
                     f"{r.note.replace('|', '/')[:200]} | {r.log or ''} |")
    lines += ["", "## Targets P1-P9 (benchmarks/report.py)", ""]
    if not verdicts:
        lines.append("Not measured: the benchmark stage wrote no results.")
    for device, functional, targets in verdicts:
        lines += [f"**{device}**" + (" — functional run (CPU), timings meaningless: these verdicts say nothing"
                                     if functional else ""), ""] + report.targets_table(targets) + [""]
    lines += ["## The `auto` order these numbers support", ""] + [f"- {line}" for line in auto_order(rows)]
    first = ctx.results.get("first-call latency")
    if first and first.facts:
        lines += ["", "## First-call latency", "", "```", json.dumps(first.facts, indent=1), "```"]
    lines += ["", "Files: " + ", ".join(sorted(str(f.relative_to(ctx.run_dir)) for f in ctx.run_dir.rglob("*")
                                             if f.is_file() and f.name != "summary.md"))]
    path = ctx.run_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    (ctx.run_dir / "summary.json").write_text(json.dumps(
        {"dry_run": ctx.dry_run, "budget_s": ctx.budget_s, "elapsed_s": elapsed, "probe": ctx.probe,
         "stages": [dataclasses.asdict(r) for r in ctx.results.values()],
         "targets": [{"device": d, "functional": f, "targets": t} for d, f, t in verdicts],
         "auto_order": auto_order(rows)}, indent=1, default=str))
    return path


def screen_summary(ctx: Context) -> str:
    """The one-screen summary printed last."""
    rows = bench_rows(ctx)
    lines = ["", "=" * 100, f"GPU check{' (dry run)' if ctx.dry_run else ''}: {ctx.probe.get('device', 'no GPU')} "
             f"— {time.monotonic() - ctx.started:.0f} s of {ctx.budget_s:.0f} s", "-" * 100]
    for r in ctx.results.values():
        lines.append(f"  {r.name:<22} {r.status:<18} {r.seconds:5.0f} s  {r.note[:90]}")
    lines.append("-" * 100)
    for device, functional, targets in target_verdicts(rows):
        lines.append(f"targets on {device}" + (" (functional run: meaningless)" if functional else "") + ":")
        for t in targets:
            lines.append(f"  {t['id']:<3} {t['provider']:<12} {t['status']:<12} {t['measured']:>10} (target "
                         f"{t['target']}) {t['what'][:48]}")
    lines += ["auto order: " + line for line in auto_order(rows)[:4]]
    lines.append(f"everything in {ctx.run_dir}")
    return "\n".join(lines)


def copy_out(ctx: Context, out: Path) -> list:
    """At most OUT_LIMIT files into ``out``: the summary, the results, the report, the target plot, the logs (one
    file, each stage's log tail)."""
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "gpu_check_logs.txt"
    with open(logs, "w") as combined:
        for path in sorted(ctx.run_dir.glob("*.log")):
            text = path.read_text(errors="replace")
            combined.write(f"===== {path.name} ({len(text)} chars; last 40000)\n{text[-40000:]}\n")
    chosen = [ctx.run_dir / "summary.md", ctx.run_dir / "summary.json", ctx.bench_dir / "results.csv",
              ctx.bench_dir / "report.md", ctx.run_dir / "static" / "report.md"]
    chosen += sorted(ctx.bench_dir.glob("plots/*speedup-at-targets.png"))[:1]
    copied = [logs]
    for path in chosen:
        if path.exists() and len(copied) < OUT_LIMIT:
            name = "static_report.md" if path.parent.name == "static" else path.name
            shutil.copyfile(path, out / name)
            copied.append(out / name)
    return copied


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------

def run_folder(root: Optional[Path], device: str, dry_run: bool) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if root is None:
        root = BENCH_DIR / "results-cpu" / "gpu-check" if dry_run else BENCH_DIR / "results"
    from benchmarks.results import slug

    folder = Path(root) / f"{slug(device)}-{stamp}"
    n = 1
    while folder.exists():
        n += 1
        folder = Path(root) / f"{slug(device)}-{stamp}-{n}"
    return folder


def print_plan(plan: Sequence[Stage], ctx: Context) -> None:
    total_gpu = sum(s.estimate_s for s in plan)
    print(f"plan ({'dry run: only the stages marked CPU run here' if ctx.dry_run else 'GPU run'}; budget "
          f"{ctx.budget_s:.0f} s, every stage stopped at its cap or the budget's end):")
    elapsed = 0.0
    for s in plan:
        elapsed += s.estimate_s
        where = "CPU+GPU" if s.on_cpu else "GPU"
        over = "" if elapsed <= ctx.budget_s else "  (past the budget at these estimates: may be cut or skipped)"
        cpu = f", ~{s.cpu_estimate_s:.0f} s on this CPU" if ctx.dry_run and s.on_cpu else ""
        print(f"  {s.name:<22} ~{s.estimate_s:4.0f} s on a GPU{cpu} (cap {s.cap_s:.0f} s) [{where}] {s.what}")
    print(f"  estimated total on a GPU: {total_gpu:.0f} s"
          + (f" — over the {ctx.budget_s:.0f} s budget: the last stages get what is left" if total_gpu > ctx.budget_s
             else ""))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"total time budget in seconds (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan with each stage's estimated time; run only what runs on a CPU (the "
                             "self-check and the functional benchmark run)")
    parser.add_argument("--results-root", type=Path, default=None,
                        help="parent of the run's folder (default benchmarks/results; a dry run: "
                             "benchmarks/results-cpu/gpu-check)")
    parser.add_argument("--bench-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for benchmarks/run.py (repeatable), e.g. --bench-arg=--workload=bert-*")
    parser.add_argument("--selfcheck-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for python -m ptv2_kernels (repeatable), e.g. --selfcheck-arg=--backend=triton")
    parser.add_argument("--all-providers", action="store_true",
                        help="time every benchmark provider (flex-attention and reference too)")
    parser.add_argument("--only", action="append", default=[], metavar="STAGE",
                        help="run only the stages with these names (repeatable; the others are listed as skipped)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    info = probe()
    dry_run = args.dry_run
    if not dry_run and not info.get("device"):
        print(f"no GPU found ({info.get('probe_error') or info.get('torch_error') or 'torch sees no CUDA device'}):"
              " running as --dry-run")
        dry_run = True
    plan = stages()
    if args.only:
        unknown = set(args.only) - {s.name for s in plan}
        if unknown:
            parser.error(f"no stage named {', '.join(sorted(unknown))}; stages: {', '.join(s.name for s in plan)}")
        for s in plan:
            if s.name not in args.only:
                s.skip = lambda ctx: "not selected (--only)"
    ctx = Context(run_folder(args.results_root, info.get("device") or "cpu", dry_run), dry_run, args.budget_s,
                  probe=info, bench_args=list(args.bench_arg), selfcheck_args=list(args.selfcheck_arg),
                  all_providers=args.all_providers, started=started)
    print_plan(plan, ctx)
    print(f"writing to {ctx.run_dir}")

    def after_each(ctx):
        write_summary(ctx)

    interrupted = False
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        run_stages(plan, ctx, after_each)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: writing what finished")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if (ctx.bench_dir / "results.csv").exists() and not (ctx.bench_dir / "report.md").exists():
        from benchmarks import report

        report.generate(ctx.bench_dir)  # the suite writes it; regenerate when its stage was cut short
    write_summary(ctx)
    out = os.environ.get("OUT")
    if out:
        copied = copy_out(ctx, Path(out))
        print(f"copied {len(copied)} files to {out}")
    print(screen_summary(ctx))
    bad = [r for r in ctx.results.values() if r.status in ("failed", "timed out")]
    return 1 if bad or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
