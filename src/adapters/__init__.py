"""Adapters: Bone (row/col, ablations), LoRA and PiSSA; injection, adapter files and merging."""
