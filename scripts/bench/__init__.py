"""Benchmarks, run as modules from the repository root (see scripts/__init__.py):

    python -m scripts.bench.bone [--quick]          Bone vs LoRA forward+backward, single layers and one block
    python -m scripts.bench.train_step [--quick]    full training steps of Bone-row, Bone-col and LoRA
    python -m scripts.bench.wkv                     the torch WKV6 backend against the naive per-step loop
    python -m scripts.bench.long_context            peak memory against ctx_len, with and without --chunk_ctx
    python -m scripts.bench.head_chunk              peak memory of the head and loss, whole or in token chunks
    python -m scripts.bench.export                  merge_bone.py's memory for every output format
"""
