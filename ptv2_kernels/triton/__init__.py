"""Triton kernels of the prefix-attention op (imported lazily: ``import ptv2_kernels`` does not import triton)."""
