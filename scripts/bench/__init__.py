"""Benchmarks, run as modules from the repository root (see scripts/__init__.py):

    python -m scripts.bench.bone [--quick]         Bone vs LoRA forward+backward, single layers and one block
    python -m scripts.bench.train_step [--quick]   full training steps of Bone-row, Bone-col and LoRA
    python -m scripts.bench.wkv                    the torch WKV6 backend against the naive per-step loop
"""
