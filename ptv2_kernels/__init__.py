"""ptv2_kernels: fused attention over per-layer prefix keys/values (P-Tuning v2, prefix tuning) without copies."""

from .ops import prefix_attention
from .varlen import prefix_attention_varlen
from .integrations.checkpoints import export_peft_adapter, import_chatglm_ptuning, import_ptuning_v2
from .integrations.hf_transformers import PatchHandle, freeze_backbone, patch, unpatch
from .prefix import PrefixBank, PrefixEncoder
from .reference import attention_ref

__version__ = "0.1.0"

__all__ = ["prefix_attention", "prefix_attention_varlen", "attention_ref", "PrefixEncoder", "PrefixBank", "patch",
           "unpatch", "PatchHandle", "freeze_backbone", "import_ptuning_v2", "import_chatglm_ptuning", "export_peft_adapter",
           "__version__"]
