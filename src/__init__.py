"""RWKV6 x Bone: a trainer for fine-tuning RWKV6 ("x060") language models with Bone adapters."""
