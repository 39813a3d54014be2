"""Integrations with other libraries: Hugging Face transformers (``patch``/``unpatch``), PEFT (prefix import and
adapter export) and the official P-Tuning v2 and ChatGLM checkpoints (``checkpoints``).

They know nothing of the kernels: every attention call goes through :func:`ptv2_kernels.prefix_attention`.
transformers, peft and safetensors are imported only when a function that needs them is called.
"""

from .checkpoints import export_peft_adapter, import_chatglm_ptuning, import_ptuning_v2

__all__ = ["import_ptuning_v2", "import_chatglm_ptuning", "export_peft_adapter"]
