"""Build script: pure Python always; the extensions ``ptv2_kernels._native`` and ``ptv2_kernels._C`` too when they
can be built here.

The package metadata lives in pyproject.toml. This file only decides which compiled parts to build, with
``torch.utils.cpp_extension`` and ninja. Both need torch at build time, so install with ``pip install
--no-build-isolation`` after installing torch: pip's default isolated build environment has no torch (and torch is
deliberately not a build requirement: an isolated build would fetch a different, multi-GB torch whose ABI need not
match the one the extension later runs with).

* ``ptv2_kernels._native`` (``csrc/native/*.cpp``, a ``CppExtension``): the native backend's common calls in C++,
  for a CPU or a CUDA torch alike. Built when ``PTV2_SKIP_NATIVE_BUILD`` is unset or 0, the sources exist and torch
  is importable. Without it the native backend runs the same formulas from Python, with more per-call overhead.
* ``ptv2_kernels._C`` (``csrc/*.cu``, ``csrc/*.cpp``, a ``CUDAExtension``): the CUDA backend. Built when all of
  these hold, else one line says why not:

  * ``PTV2_SKIP_CUDA_BUILD`` is unset or 0;
  * ``csrc/`` has sources (``*.cu``, ``*.cpp``);
  * torch is importable and is a CUDA build (``torch.version.cuda``);
  * a CUDA toolkit is found whose major version matches torch's: ``CUDA_HOME``/``CUDA_PATH`` if they point at one,
    else the toolkit behind ``nvcc`` on PATH (following a wrapper script), else ``/usr/local/cuda*``. A toolkit is
    a folder holding ``bin/nvcc`` and ``lib64/libcudart.so``.

A reason not to build an extension, or its compile error, leaves the install without it (with a line saying so)
unless ``PTV2_REQUIRE_CUDA_BUILD=1`` (for ``_C``, when ``csrc/`` has sources) or ``PTV2_REQUIRE_NATIVE_BUILD=1``
(for ``_native``) makes it a failed install (CI sets both where they apply).

Environment: ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0"), ``MAX_JOBS`` (parallel compile jobs, read by torch),
``PTV2_SKIP_CUDA_BUILD``, ``PTV2_REQUIRE_CUDA_BUILD``, ``PTV2_SKIP_NATIVE_BUILD``, ``PTV2_REQUIRE_NATIVE_BUILD``,
``CUDA_HOME``.
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
NATIVE_EXTENSION_NAME = "ptv2_kernels._native"
NATIVE_SOURCES = os.path.join(CSRC, "native")
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


def _native_sources() -> list[str]:
    return sorted(os.path.relpath(path, HERE) for path in glob.glob(os.path.join(HERE, NATIVE_SOURCES, "*.cpp")))


def _importable_torch():
    try:
        import torch
    except ImportError:
        raise _NotBuilt("torch is not importable at build time (install torch first, then install this package "
                        "with pip's --no-build-isolation)") from None
    return torch


def _cuda_extension():
    """The CUDA extension; raises _NotBuilt saying why it cannot be built."""
    if _flag("PTV2_SKIP_CUDA_BUILD"):
        raise _NotBuilt("PTV2_SKIP_CUDA_BUILD is set")
    sources = _sources()
    if not sources:
        raise _NotBuilt(f"{CSRC}/ has no *.cu or *.cpp sources yet")
    torch = _importable_torch()
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
    extension = cpp_extension.CUDAExtension(
        name=EXTENSION_NAME,
        sources=sources,
        include_dirs=[os.path.join(HERE, CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},  # torch picks the C++ standard
    )
    _say(f"building the CUDA extension {EXTENSION_NAME} from {len(sources)} source(s) with CUDA {version} at "
         f"{cuda_home} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r}"
         + (f", MAX_JOBS={os.environ['MAX_JOBS']}" if os.environ.get("MAX_JOBS") else ""))
    return extension


def _native_extension():
    """The native backend's C++ extension (CPU code only, any torch); raises _NotBuilt saying why not."""
    if _flag("PTV2_SKIP_NATIVE_BUILD"):
        raise _NotBuilt("PTV2_SKIP_NATIVE_BUILD is set")
    sources = _native_sources()
    if not sources:
        raise _NotBuilt(f"{NATIVE_SOURCES}/ has no *.cpp sources")
    _importable_torch()
    from torch.utils import cpp_extension

    _say(f"building the native backend's extension {NATIVE_EXTENSION_NAME} from {len(sources)} source(s)")
    return cpp_extension.CppExtension(name=NATIVE_EXTENSION_NAME, sources=sources, extra_compile_args=["-O3"])


# Which variable makes a missing extension a failed install (and whether it applies).
def _required(name: str) -> bool:
    if name == EXTENSION_NAME:
        return _flag("PTV2_REQUIRE_CUDA_BUILD") and bool(_sources()) and not _flag("PTV2_SKIP_CUDA_BUILD")
    return _flag("PTV2_REQUIRE_NATIVE_BUILD") and not _flag("PTV2_SKIP_NATIVE_BUILD")


def _require_variable(name: str) -> str:
    return "PTV2_REQUIRE_CUDA_BUILD" if name == EXTENSION_NAME else "PTV2_REQUIRE_NATIVE_BUILD"


def _build_command():
    from torch.utils import cpp_extension

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja), with an extension that fails to compile reported and left out instead of
        failing the install (unless it is required)."""

        def build_extensions(self):
            self._failed = []
            super().build_extensions()
            # Nothing was built for these: later steps (in-place copy, wheel contents) must not look for them.
            self.extensions = [ext for ext in self.extensions if ext.name not in self._failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 - any failure leaves a working install without it
                if _required(ext.name):
                    raise
                _say(f"the extension {ext.name} failed to build ({type(error).__name__}: {error}); installing "
                     f"without it ({_require_variable(ext.name)}=1 makes this an error)")
                self._failed.append(ext.name)

    return BuildExtension.with_options(use_ninja=True)


def _setup_kwargs() -> dict:
    extensions = []
    for name, make in ((NATIVE_EXTENSION_NAME, _native_extension), (EXTENSION_NAME, _cuda_extension)):
        try:
            extensions.append(make())
        except _NotBuilt as reason:
            if _required(name):
                raise SystemExit(f"ptv2_kernels setup: {_require_variable(name)}=1 but the extension {name} cannot "
                                 f"be built: {reason}")
            what = "the CUDA extension" if name == EXTENSION_NAME else "the native backend's extension"
            _say(f"not building {what} {name}: {reason}")
    if not extensions:
        _say("installing pure Python")
        return {}
    return {"ext_modules": extensions, "cmdclass": {"build_ext": _build_command()}}


setup(**_setup_kwargs())
