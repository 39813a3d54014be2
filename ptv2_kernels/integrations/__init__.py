"""Integrations with other libraries: Hugging Face transformers (``patch``/``unpatch``) and PEFT (prefix import).

They know nothing of the kernels: every attention call goes through :func:`ptv2_kernels.prefix_attention`.
transformers and peft are imported only when these modules are.
"""
