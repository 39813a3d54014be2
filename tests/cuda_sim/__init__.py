"""Run the CUDA kernels of csrc/ on the CPU, in the host simulation of ptv2_sim.h (tests only).

The kernels, their launchers and csrc/api.cpp compile with g++ as plain C++ (``-DPTV2_SIM``) into one program,
``ptv2_sim``, which runs one call on tensors passed through files. :class:`SimBackend` wraps it in the interface
of ``ptv2_kernels.backends`` and mirrors what ``csrc/bindings.cpp`` does around the same calls (output layouts,
index and mask conversions), so the backend tests can run the CUDA backend's kernel code without a GPU.

Building needs g++ and the CUDA headers (cuda_fp16.h, cuda_bf16.h), not nvcc or a GPU; the program is cached
under ``PTV2_SIM_BUILD_DIR`` (default ``~/.cache/ptv2_kernels/cuda_sim``) keyed by a hash of its sources.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Optional

import torch

from ptv2_kernels import cuda_backend

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
KERNEL_SOURCES = ["forward.cu", "decode.cu", "backward_query.cu", "backward_keys.cu", "misc.cu"]
HOST_SOURCES = ["api.cpp"]

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.uint8: 3, torch.int32: 4,
                torch.int64: 5}
_BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16}


def cuda_include_dir() -> Optional[str]:
    """A folder holding cuda_fp16.h: the toolkit's include/ (CUDA_HOME, /usr/local/cuda*, or next to nvcc)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_fp16.h")):
            return os.path.join(home, "include")
    return None


def unavailable_reason() -> Optional[str]:
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++) to build the host simulation"
    if cuda_include_dir() is None:
        return "no CUDA headers (cuda_fp16.h) found for the host simulation"
    return None


def _sources() -> list[str]:
    paths = [os.path.join(CSRC, name) for name in KERNEL_SOURCES + HOST_SOURCES]
    paths += sorted(glob.glob(os.path.join(CSRC, "*.h")) + glob.glob(os.path.join(CSRC, "*.cuh")))
    paths += [os.path.join(HERE, "ptv2_sim.h"), os.path.join(HERE, "sim_main.cpp")]
    return paths


def binary() -> str:
    """Path of the simulation program, built first if its sources changed."""
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    build_dir = os.environ.get("PTV2_SIM_BUILD_DIR",
                               os.path.join(os.path.expanduser("~"), ".cache", "ptv2_kernels", "cuda_sim"))
    os.makedirs(build_dir, exist_ok=True)
    target = os.path.join(build_dir, f"ptv2_sim-{digest.hexdigest()[:16]}")
    if os.path.exists(target):
        return target
    with open(os.path.join(build_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers build once
        if not os.path.exists(target):
            compiler = os.environ.get("CXX", "g++")
            command = [compiler, "-std=c++17", "-O2", "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0", "-DPTV2_SIM", f"-I{CSRC}", f"-I{HERE}",
                       f"-I{cuda_include_dir()}", "-Wno-unknown-pragmas", "-x", "c++"]
            command += [os.path.join(CSRC, name) for name in KERNEL_SOURCES]
            command += ["-x", "none"] + [os.path.join(CSRC, name) for name in HOST_SOURCES]
            command += [os.path.join(HERE, "sim_main.cpp"), "-o", target + ".tmp"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError("building the CUDA host simulation failed:\n" + result.stderr[-6000:])
            os.replace(target + ".tmp", target)
    return target


def _span(t: torch.Tensor) -> int:
    """Elements of storage from element 0 of the view to its last element."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def _storage_view(t: torch.Tensor) -> torch.Tensor:
    return torch.as_strided(t, (_span(t),), (1,))


def _write(directory: str, lines: list, name: str, t: Optional[torch.Tensor], out: bool = False) -> None:
    if t is None:
        return
    t = t.detach()
    assert t.device.type == "cpu" and t.dtype in _DTYPE_CODES, (name, t.device, t.dtype)
    flat = _storage_view(t).contiguous()
    if t.dtype in _BITS_VIEW:
        flat = flat.view(_BITS_VIEW[t.dtype])
    path = f"{name}.bin"
    with open(os.path.join(directory, path), "wb") as f:
        f.write(flat.numpy().tobytes())
    sizes = " ".join(str(s) for s in t.shape)
    strides = " ".join(str(s) for s in t.stride())
    lines.append(f"tensor {name} {_DTYPE_CODES[t.dtype]} {t.dim()} {sizes} {strides} {_span(t)} {path}"
                 + (" out" if out else ""))


def _read_back(directory: str, name: str, t: torch.Tensor) -> None:
    with open(os.path.join(directory, f"{name}.bin"), "rb") as f:
        data = bytearray(f.read())
    if not data:
        return
    bits = _BITS_VIEW.get(t.dtype, t.dtype)
    loaded = torch.frombuffer(data, dtype=bits).view(t.dtype)
    _storage_view(t).copy_(loaded)


def run(op: str, tensors: dict, outputs: dict, scalars: dict, timeout: float = 1800.0) -> str:
    """Run one call in the simulation; output tensors are filled in place. Returns the program's report line."""
    with tempfile.TemporaryDirectory(prefix="ptv2-sim-") as directory:
        lines = [f"op {op}"]
        lines += [f"scalar {name} {float(value)!r}" for name, value in scalars.items()]
        for name, t in tensors.items():
            _write(directory, lines, name, t)
        for name, t in outputs.items():
            _write(directory, lines, name, t, out=True)
        with open(os.path.join(directory, "problem.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        result = subprocess.run([binary(), directory], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"ptv2_sim {op} failed (exit {result.returncode}): {result.stderr.strip()[-4000:]}")
        for name, t in outputs.items():
            _read_back(directory, name, t)
        return result.stdout.strip()


def _index(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Index tensors as the binding passes them: int32/int64, contiguous."""
    if t is None:
        return None
    if t.dtype not in (torch.int32, torch.int64):
        t = t.long()
    return t.contiguous()


def _inputs(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed):
    return dict(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, prefix_index=_index(prefix_index),
                prefix_lengths=_index(prefix_lengths),
                attn_mask=None if attn_mask is None else attn_mask.view(torch.uint8), seed=seed)


class SimBackend:
    """The CUDA backend's kernels on CPU tensors, behind the interface of ``ptv2_kernels.backends``.

    ``algo``: 0 automatic (the decode kernel for Nq <= 16 in float16/bfloat16), 1 the tiled forward kernel,
    2 the decode kernel. ``num_sms`` steers the decode kernel's split count like a GPU's multiprocessor count."""

    algo = 0
    num_sms = 4
    max_shared_memory = 227 * 1024

    @classmethod
    def forward(cls, call):
        cuda_backend.reject_unserved(call)
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, _, seed, causal, scale, dropout_p = \
            call[:13]
        batch, heads, length, dim = q.shape
        out = q.new_empty(batch, length, heads, dim).transpose(1, 2)
        lse = q.new_empty(batch, heads, length, dtype=torch.float32)
        run("forward", _inputs(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed),
            dict(out=out, lse=lse),
            dict(causal=causal, scale=scale, dropout_p=dropout_p, algo=cls.algo, num_sms=cls.num_sms,
                 max_shared_memory=cls.max_shared_memory))
        return out, lse

    @classmethod
    def backward(cls, grad_out, grad_lse, call, out, lse, *, grad_bias=None):
        cuda_backend.reject_unserved(call)
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, _, seed, causal, scale, dropout_p = \
            call[:13]
        deterministic = call.deterministic
        grads = dict(dq=torch.empty_like(q), dk=torch.empty_like(k), dv=torch.empty_like(v),
                     dprefix_k=torch.empty_like(prefix_k), dprefix_v=torch.empty_like(prefix_v))
        tensors = _inputs(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed)
        tensors.update(grad_out=grad_out.to(q.dtype), grad_lse=None if grad_lse is None else grad_lse.float(),
                       out=out, lse=lse.contiguous())
        run("backward", tensors, grads,
            dict(causal=causal, scale=scale, dropout_p=dropout_p, deterministic=deterministic,
                 num_sms=cls.num_sms, max_shared_memory=cls.max_shared_memory))
        return grads["dq"], grads["dk"], grads["dv"], grads["dprefix_k"], grads["dprefix_v"]

    @staticmethod
    def dropout_keep_mask(seed, batch, q_heads, q_len, prefix_len, k_len, dropout_p):
        """The mask of the simulated CUDA dropout kernel (the signature of cuda_backend.dropout_keep_mask)."""
        return dropout_mask(int(seed), batch, q_heads, q_len, prefix_len + k_len, dropout_p)


def dropout_mask(seed: int, batch: int, q_heads: int, q_len: int, cols: int, dropout_p: float,
                 host: bool = False) -> torch.Tensor:
    """The keep mask [B, Hq, Nq, cols] from the simulated CUDA kernel, or from the host Philox (``host``)."""
    keep = torch.zeros(batch, q_heads, q_len, cols, dtype=torch.uint8)
    run("host_dropout_mask" if host else "dropout_mask", dict(seed=torch.tensor(seed, dtype=torch.int64)),
        dict(keep=keep), dict(batch=batch, q_heads=q_heads, q_len=q_len, cols=cols, dropout_p=dropout_p))
    return keep.bool()
