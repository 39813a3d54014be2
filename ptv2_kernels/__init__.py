"""ptv2_kernels: fused attention over per-layer prefix keys/values (P-Tuning v2, prefix tuning) without copies."""

from .ops import prefix_attention
from .integrations.hf_transformers import PatchHandle, freeze_backbone, patch, unpatch
from .prefix import PrefixBank, PrefixEncoder
from .reference import attention_ref

__version__ = "0.1.0"

__all__ = ["prefix_attention", "attention_ref", "PrefixEncoder", "PrefixBank", "patch", "unpatch",
           "PatchHandle", "freeze_backbone", "__version__"]
