"""Build script: pure Python always; the CUDA extension ``ptv2_kernels._C`` too when it can be built here.

The package metadata lives in pyproject.toml. This file only decides whether to compile ``csrc/`` into the
extension module ``ptv2_kernels._C`` (a ``torch.utils.cpp_extension.CUDAExtension`` built with ninja). That needs
torch at build time, so install with ``pip install --no-build-isolation`` after installing torch: pip's default
isolated build environment has no torch (and torch is deliberately not a build requirement: an isolated build
would fetch a different, multi-GB torch whose ABI need not match the one the extension later runs with).

The extension is built when all of these hold, else one line says why not and the install is pure Python:

* ``PTV2_SKIP_CUDA_BUILD`` is unset or 0;
* ``csrc/`` has sources (``*.cu``, ``*.cpp``);
* torch is importable and is a CUDA build (``torch.version.cuda``);
* a CUDA toolkit is found whose major version matches torch's: ``CUDA_HOME``/``CUDA_PATH`` if they point at one,
  else the toolkit behind ``nvcc`` on PATH (following a wrapper script), else ``/usr/local/cuda*``. A toolkit is
  a folder holding ``bin/nvcc`` and ``lib64/libcudart.so``.

A compile error also leaves a pure-Python install (with a line saying so) unless ``PTV2_REQUIRE_CUDA_BUILD=1``,
which turns every reason not to build the extension, when ``csrc/`` has sources, into a failed install (CI sets it).

Environment: ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0"), ``MAX_JOBS`` (parallel compile jobs, read by torch),
``PTV2_SKIP_CUDA_BUILD``, ``PTV2_REQUIRE_CUDA_BUILD``, ``CUDA_HOME``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
EXTENSION_NAME = "ptv2_kernels._C"
DEFAULT_ARCH_LIST = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _say(message: str) -> None:
    print(f"ptv2_kernels setup: {message}", file=sys.stderr, flush=True)


class _NotBuilt(Exception):
    """The CUDA extension is not built; the message says why."""


def _sources() -> list[str]:
    found = glob.glob(os.path.join(HERE, CSRC, "*.cu")) + glob.glob(os.path.join(HERE, CSRC, "*.cpp"))
    return sorted(os.path.relpath(path, HERE) for path in found)


def _is_toolkit(folder: str | None) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(folder, "bin", "nvcc")) and os.path.isfile(
        os.path.join(folder, "lib64", "libcudart.so"))


def _wrapped_nvcc_homes(nvcc: str) -> list[str]:
    """Toolkits named inside an nvcc wrapper script (e.g. ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``)."""
    try:
        with open(nvcc, "rb") as script:
            head = script.read(65536)
    except OSError:
        return []
    if not head.startswith(b"#!"):
        return []
    text = head.decode("utf-8", "replace")
    return [os.path.dirname(os.path.dirname(path)) for path in re.findall(r"(/[^\s'\"`;|&()]*/bin/nvcc)\b", text)]


def _candidate_homes() -> list[str]:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        candidates.extend(_wrapped_nvcc_homes(real))
    candidates.append("/usr/local/cuda")
    candidates.extend(sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    return [c for c in candidates if c]


def find_cuda_home() -> str | None:
    """The CUDA toolkit to build with: the first candidate folder that holds bin/nvcc and lib64/libcudart.so."""
    for candidate in _candidate_homes():
        if _is_toolkit(candidate):
            return os.path.realpath(candidate)
    return None


def _toolkit_version(cuda_home: str) -> str | None:
    try:
        text = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                              text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", text)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def _cuda_extension_setup() -> dict:
    """``ext_modules``/``cmdclass`` for the CUDA extension; raises _NotBuilt saying why it cannot be built."""
    if _flag("PTV2_SKIP_CUDA_BUILD"):
        raise _NotBuilt("PTV2_SKIP_CUDA_BUILD is set")
    sources = _sources()
    if not sources:
        raise _NotBuilt(f"{CSRC}/ has no *.cu or *.cpp sources yet")
    try:
        import torch
    except ImportError:
        raise _NotBuilt("torch is not importable at build time (install torch first, then install this package "
                        "with pip's --no-build-isolation)") from None
    if not torch.version.cuda:
        raise _NotBuilt(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise _NotBuilt("no CUDA toolkit found (no folder with bin/nvcc and lib64/libcudart.so in CUDA_HOME, "
                        "CUDA_PATH, behind nvcc on PATH or in /usr/local/cuda*)")
    version = _toolkit_version(cuda_home)
    if version is None:
        raise _NotBuilt(f"{cuda_home}/bin/nvcc --version does not run or says no release")
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise _NotBuilt(f"the CUDA toolkit at {cuda_home} is CUDA {version} but torch is built with CUDA "
                        f"{torch.version.cuda} (the major versions must match)")

    # torch.utils.cpp_extension reads CUDA_HOME when it is first imported; torch's own guess (the parent of the
    # folder holding nvcc) is wrong when nvcc is a wrapper script, so set it first and correct it afterwards too.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja), with a failed compile reported instead of failing the install."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # noqa: BLE001 - any failure leaves a working pure-Python install
                if _flag("PTV2_REQUIRE_CUDA_BUILD"):
                    raise
                _say(f"the CUDA extension {EXTENSION_NAME} failed to build ({type(error).__name__}: {error}); "
                     "installing pure Python without it (PTV2_REQUIRE_CUDA_BUILD=1 makes this an error)")
                # Nothing was built: later steps (in-place copy, wheel contents) must not look for it.
                self.extensions = []

    extension = cpp_extension.CUDAExtension(
        name=EXTENSION_NAME,
        sources=sources,
        include_dirs=[os.path.join(HERE, CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},  # torch picks the C++ standard
    )
    _say(f"building the CUDA extension {EXTENSION_NAME} from {len(sources)} source(s) with CUDA {version} at "
         f"{cuda_home} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r}"
         + (f", MAX_JOBS={os.environ['MAX_JOBS']}" if os.environ.get("MAX_JOBS") else ""))
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


def _setup_kwargs() -> dict:
    try:
        return _cuda_extension_setup()
    except _NotBuilt as reason:
        if _flag("PTV2_REQUIRE_CUDA_BUILD") and _sources() and not _flag("PTV2_SKIP_CUDA_BUILD"):
            raise SystemExit(f"ptv2_kernels setup: PTV2_REQUIRE_CUDA_BUILD=1 but the CUDA extension cannot be "
                             f"built: {reason}")
        _say(f"not building the CUDA extension {EXTENSION_NAME}: {reason}; installing pure Python")
        return {}


setup(**_setup_kwargs())
