"""What the device can do at all, measured in the same run: copy bandwidth and matmul throughput.

The targets (docs/design.md §6) are fractions of these (P4: 80 % of measured HBM bandwidth); the report prints them next
to the attention numbers. Provider name: ``torch``.

* ``copy-<size>`` — ``dst.copy_(src)``; bytes counted as read plus written (~3.0 TB/s on an H100, docs/design.md §6).
* ``matmul-<n>`` — an ``n × n × n`` product in the workload's dtype on random data.
"""

from __future__ import annotations

import math
import re

from . import env  # first: sets TRITON_INTERPRET before anything imports triton

import torch  # noqa: E402

from . import check  # noqa: E402
from .harness import Case, Unavailable  # noqa: E402
from .workloads import Workload  # noqa: E402

PROVIDER = "torch"


def _size(note: str) -> int:
    found = re.search(r"(\d+)(MiB|GiB)?$", note)
    if not found:
        raise ValueError(f"cannot read a size from ceiling {note!r}")
    scale = {"MiB": 2**20, "GiB": 2**30, None: 1}[found.group(2)]
    return int(found.group(1)) * scale


def ceiling_case(w: Workload, provider: str) -> Case:
    if provider != PROVIDER:
        raise Unavailable(f"ceilings are measured by the {PROVIDER!r} provider only")
    dtype = w.torch_dtype
    if w.note.startswith("copy"):
        size = _size(w.note)
        element = torch.finfo(dtype).bits // 8
        src = torch.randn(size // element, device=env.DEVICE).to(dtype)
        dst = torch.empty_like(src)

        def copy():
            return dst.copy_(src)

        def run_check():
            copy()
            return check.compare({"copy": dst}, {"copy": src}, {"copy": src}, dtype)

        return Case([copy], run_check, flops=math.nan, bytes=2.0 * size)
    if w.note.startswith("matmul"):
        if not env.ON_GPU:
            raise Unavailable("the matmul ceiling is measured on a GPU only")
        n = _size(w.note)
        gen = torch.Generator(device=env.DEVICE).manual_seed(0)
        a = torch.randn(n, n, device=env.DEVICE, generator=gen).to(dtype)
        b = torch.randn(n, n, device=env.DEVICE, generator=gen).to(dtype)

        def matmul():
            return a @ b

        def run_check():
            got = matmul()[:64, :64]
            ref = a[:64].double() @ b[:, :64].double()
            same = (a[:64] @ b[:, :64]).double()
            return check.compare({"matmul": got}, {"matmul": ref}, {"matmul": same}, dtype)

        return Case([matmul], run_check, flops=2.0 * n**3, bytes=math.nan)
    raise ValueError(f"unknown ceiling {w.note!r}")
