"""Compile the Triton kernels ahead of time for GPU targets, on a machine that needs no GPU.

Triton's CPU interpreter runs the kernels' Python but never lowers them, so it cannot see what only the compiler
rejects (a non-constexpr global, a type mismatch between branches, a shape the hardware dot cannot take). This
script runs the whole lowering to PTX and cubin (Triton ships its own ptxas) for the given compute capabilities.

    python tests/compile_triton_kernels.py 80 90

It must run with TRITON_INTERPRET unset (the interpreter replaces the kernels before they can be compiled).
"""

from __future__ import annotations

import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ptv2_kernels.triton import prefix_attention as kernels

FLOAT_ARGS = {"qk_scale", "cap_log2", "sm_scale", "dropout_p"}


def _signature(fn, pointers: dict, constants: dict):
    signature = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr or name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constants]
    assert not missing, f"{fn.__name__}: no value for constexpr {missing}"
    return signature


def compile_kernel(fn, pointers, constants, capability, num_warps=4, num_stages=2):
    names = [p.name for p in fn.params]
    source = ASTSource(fn=fn, signature=_signature(fn, pointers, constants),
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _flags(everything: bool, head_dim: int, value_dim: int):
    d_pad = max(16, triton.next_power_of_2(head_dim))
    dv_pad = max(16, triton.next_power_of_2(value_dim))
    return dict(HEAD_DIM=head_dim, D_PAD=d_pad, PAD_D=d_pad != head_dim, HEAD_DIM_V=value_dim, DV_PAD=dv_pad,
                PAD_DV=dv_pad != value_dim, HAS_INDEX=everything,
                HAS_LENGTHS=everything, HAS_KEY_PAD=everything, HAS_DENSE=everything, HAS_BIAS=everything,
                CAUSAL=everything,
                HAS_DROPOUT=everything, DOT_PRECISION="tf32", VARLEN=False, HAS_SOFTCAP=everything,
                HAS_PREFIX_BIAS=everything, HAS_WINDOW=everything)


def _optional_pointers(flags, dtype):
    """Pointer types of the arguments a call passes; optional ones are None (a constexpr) when their flag is off."""
    pointers = {"Q": dtype, "K": dtype, "V": dtype, "Out": dtype, "DOut": dtype, "DQ": dtype, "DK": dtype,
                "DV": dtype, "PK": "*fp32", "PV": "*fp32", "Lse": "*fp32", "Delta": "*fp32",
                "PrefixGradK": "*fp32", "PrefixGradV": "*fp32"}
    constants = {}
    for name, flag, kind in (("PrefixIndex", "HAS_INDEX", "*i64"), ("PrefixLengths", "HAS_LENGTHS", "*i64"),
                             ("KeyPad", "HAS_KEY_PAD", "*u8"), ("Dense", "HAS_DENSE", "*u8"),
                             ("Bias", "HAS_BIAS", "*fp32"),
                             ("Seed", "HAS_DROPOUT", "*i64"), ("CuSeqQ", "VARLEN", "*i32"),
                             ("CuSeqK", "VARLEN", "*i32"), ("Sinks", "HAS_SINKS", "*fp32"),
                             ("PrefixBias", "HAS_PREFIX_BIAS", "*fp32")):
        if flag not in flags:  # HAS_SINKS: the forward's alone
            continue
        if flags[flag]:
            pointers[name] = kind
        else:
            constants[name] = None
    return pointers, constants


def cases(capability: int = 90):
    """(name, kernel, pointer types, constants, launch options) of every kernel in the configurations that matter:
    all features on (bf16 inputs with a float32 prefix, a padded head dim, softcap, sinks and a window; the forward
    also in its decode form, GQA-packed and split, with the merge of its splits), all off (fp16, head dim 128), and
    all off with DeepSeek-V3's head dims (keys 192, values 128: multi-head latent attention) in bf16."""
    for everything, dtype, head_dim, value_dim in ((True, "*bf16", 80, 80), (False, "*fp16", 128, 128),
                                                   (False, "*bf16", 192, 128)):
        flags = _flags(everything, head_dim, value_dim)
        pointers, optional = _optional_pointers(flags, dtype)
        forward_pointers, forward_optional = _optional_pointers({**flags, "HAS_SINKS": everything}, dtype)
        sinks = {**forward_optional, "HAS_SINKS": everything}
        blocks = dict(BLOCK_M=128, BLOCK_N=64)
        yield ("forward", kernels._forward_kernel, forward_pointers,
               {**sinks, **flags, **blocks, "PACK_GQA": False, "SPLIT_KV": False, "USE_TMA": False}, (8, 3))
        if capability >= 90:  # the TMA variant, offered to the autotuner on Hopper
            yield ("forward_tma", kernels._forward_kernel, forward_pointers,
                   {**sinks, **flags, "BLOCK_M": 128, "BLOCK_N": 64, "PACK_GQA": False, "SPLIT_KV": False,
                    "USE_TMA": True}, (8, 3))
        if everything:  # the decode form: query heads of a GQA group packed into one small block, keys split
            yield ("forward_decode", kernels._forward_kernel, {**forward_pointers, "Out": "*fp32"},
                   {**sinks, **flags, "BLOCK_M": 16, "BLOCK_N": 128, "PACK_GQA": True, "SPLIT_KV": True,
                    "USE_TMA": False}, (4, 2))
            yield ("combine_splits", kernels._combine_splits_kernel,
                   {"PartialOut": "*fp32", "PartialLse": "*fp32", "Out": dtype, "Lse": "*fp32", "Sinks": "*fp32"},
                   {"HEAD_DIM_V": value_dim, "DV_PAD": flags["DV_PAD"], "HAS_SINKS": True, "BLOCK_M": 64}, (4, 1))
        yield ("backward_keys", kernels._backward_key_kernel, pointers,
               {**optional, **flags, "DETERMINISTIC": everything, "BLOCK_M": 64, "BLOCK_N": 128}, (8, 2))
        yield ("backward_queries", kernels._backward_query_kernel,
               {**pointers, "DBias": "*fp32", "DPrefixBias": "*fp32"},
               {**optional, **flags, **blocks, "BIAS_GRAD": everything, "PREFIX_BIAS_GRAD": everything,
                **({} if everything else {"DBias": None, "DPrefixBias": None})}, (8, 3))
        yield ("backward_preprocess", kernels._backward_preprocess_kernel,
               {"Out": dtype, "DOut": dtype, "Delta": "*fp32", **({"DLse": "*fp32"} if everything else {})},
               {"HEAD_DIM_V": value_dim, "DV_PAD": flags["DV_PAD"], "HAS_DLSE": everything, "BLOCK_M": 64,
                **({} if everything else {"DLse": None})}, (4, 1))
        yield ("prefix_grad_finalize", kernels._prefix_grad_finalize_kernel,
               {"PartialK": "*fp32", "PartialV": "*fp32", "GradK": "*fp32" if everything else "*fp16",
                "GradV": "*fp32" if everything else "*fp16", **({"PrefixIndex": "*i64"} if everything else {})},
               {"HEAD_DIM": head_dim, "D_PAD": flags["D_PAD"], "HEAD_DIM_V": value_dim, "DV_PAD": flags["DV_PAD"],
                "HAS_INDEX": everything, "SUM_SAMPLES": everything, "BLOCK_N": 64, **({} if everything else {"PrefixIndex": None})}, (4, 1))
    # packed sequences: no masks nor bias (the variable-length op takes none), everything else on
    flags = {**_flags(True, 80, 80), "HAS_KEY_PAD": False, "HAS_DENSE": False, "HAS_BIAS": False, "VARLEN": True,
             "HAS_PREFIX_BIAS": False}
    pointers, optional = _optional_pointers(flags, "*bf16")
    forward_pointers, forward_optional = _optional_pointers({**flags, "HAS_SINKS": True}, "*bf16")
    yield ("forward_varlen", kernels._forward_kernel, forward_pointers,
           {**forward_optional, **flags, "HAS_SINKS": True, "BLOCK_M": 128, "BLOCK_N": 64, "PACK_GQA": False,
            "SPLIT_KV": False, "USE_TMA": False}, (8, 3))
    yield ("backward_keys_varlen", kernels._backward_key_kernel, pointers,
           {**optional, **flags, "DETERMINISTIC": True, "BLOCK_M": 64, "BLOCK_N": 128}, (8, 2))
    yield ("backward_queries_varlen", kernels._backward_query_kernel, pointers,
           {**optional, **flags, "BLOCK_M": 128, "BLOCK_N": 64, "BIAS_GRAD": False, "DBias": None,
            "PREFIX_BIAS_GRAD": False, "DPrefixBias": None}, (8, 3))
    yield ("dropout_mask", kernels._dropout_mask_kernel, {"Keep": "*i8", "Seed": "*i64"},
           {"BLOCK_M": 16, "BLOCK_N": 128}, (4, 1))


def main(capabilities):
    for capability in capabilities:
        for name, fn, pointers, constants, (warps, stages) in cases(capability):
            start = time.perf_counter()
            compiled = compile_kernel(fn, pointers, constants, capability, warps, stages)
            print(f"sm_{capability} {name}: compiled in {time.perf_counter() - start:.1f} s, "
                  f"{compiled.metadata.shared} B shared memory", flush=True)


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]] or [90])
