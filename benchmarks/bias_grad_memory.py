"""Peak memory of the backward of a broadcast attn_bias that requires grad (T5's relative position bias).

The bias is ``[1, H, N, N]`` and broadcasts over the batch. Its gradient is the sum over the batch of the dense
``[B, H, N, N]`` score gradient; the op builds that sum in chunks of samples whose dense buffer is about the bias's
own size. This script measures, in one run and for each configuration in a fresh process, the peak memory of the op's
backward with the chunking as shipped against one pass over the whole batch (the chunk budget raised so that
everything fits one chunk: what the op did before it chunked).

    python benchmarks/bias_grad_memory.py            # CPU: peak resident memory; GPU: torch's peak allocation
    python benchmarks/bias_grad_memory.py --quick    # a small shape (a functional check)

On a CPU the op runs its reference backend, whose own score matrices are chunked with the bias gradient, so the
saving there is larger than on a GPU, where the fused kernels materialize no scores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys
import torch
import ptv2_kernels
from ptv2_kernels import backends, ops

config = json.loads(sys.argv[1])
if not config["chunked"]:
    ops.BIAS_GRAD_CHUNK_BYTES = 2**62  # one pass over the batch: the dense [B, H, N, N] buffer at once
device = "cuda" if torch.cuda.is_available() else "cpu"
B, H, N, D, P = config["batch"], config["heads"], config["seq_len"], config["head_dim"], config["prefix_len"]
gen = torch.Generator().manual_seed(0)
dtype = torch.bfloat16 if device == "cuda" else torch.float32
q, k, v = (torch.randn(B, H, N, D, generator=gen).to(device, dtype) for _ in range(3))
prefix_k, prefix_v = (torch.randn(1, H, P, D, generator=gen).to(device, dtype) for _ in range(2))
bias = torch.randn(1, H, N, N, generator=gen).to(device)
backend = backends.choose("auto", q, k, prefix_k, 0.0, bias, bias_grad=True)
if backend == "reference" and device == "cuda":
    raise SystemExit("no fused kernel can serve this call here")

# The forward one sample at a time (its peak stays small), then the backward op alone is measured.
out = torch.empty(B, N, H, D, dtype=dtype, device=device).transpose(1, 2)
lse = torch.empty(B, H, N, dtype=torch.float32, device=device)
with torch.no_grad():
    for b in range(B):
        out[b:b + 1], lse[b:b + 1] = ptv2_kernels.prefix_attention(
            q[b:b + 1], k[b:b + 1], v[b:b + 1], prefix_k, prefix_v, attn_bias=bias, scale=1.0, return_lse=True,
            backend=backend)
grad_out = torch.randn(out.shape, generator=gen).to(device, dtype)

def backward():
    return torch.ops.ptv2_kernels.prefix_attention_backward(
        grad_out, None, q, k, v, prefix_k, prefix_v, None, None, None, bias, None, out, lse, False, 1.0, 0.0,
        backend, False, True)

if device == "cuda":
    backward()  # warm up: kernels compiled, allocator pools filled
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
else:  # a process's resident-set high-water mark cannot be reset: the measured call is the first
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
print(json.dumps(dict(device=device, backend=backend, peak_bytes=int(peak))))
"""


def measure(config: dict) -> dict:
    """Run one configuration in a fresh process (peak memory is a per-process high-water mark)."""
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(config)], check=True, capture_output=True,
                          text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small shape: a functional check only")
    args = parser.parse_args(argv)
    shape = (dict(batch=4, heads=2, seq_len=32, head_dim=16, prefix_len=4) if args.quick
             else dict(batch=16, heads=12, seq_len=256, head_dim=64, prefix_len=16))
    dense = shape["batch"] * shape["heads"] * shape["seq_len"] ** 2 * 4
    bias = shape["heads"] * shape["seq_len"] ** 2 * 4
    print(f"attn_bias [1, {shape['heads']}, {shape['seq_len']}, {shape['seq_len']}] float32 ({bias / 2**20:.1f} MiB) "
          f"over B={shape['batch']}: the dense float32 bias gradient would be {dense / 2**20:.1f} MiB")
    results = {}
    for chunked in (False, True):
        result = measure(dict(shape, chunked=chunked))
        results["chunked" if chunked else "one pass"] = result
        label = "chunked (as shipped)" if chunked else "one pass (before)"
        print(f"  {label:<22} backward peak {result['peak_bytes'] / 2**20:9.1f} MiB ({result['backend']} backend "
              f"on {result['device']})")
    ratio = results["chunked"]["peak_bytes"] / max(1, results["one pass"]["peak_bytes"])
    print(f"  chunked / one pass: {ratio:.2f}x the peak memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
