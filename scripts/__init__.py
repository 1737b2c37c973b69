"""Command-line scripts. Every Python script here is a short CLI over library code in src/, run as a module
from the repository root, which puts the root on sys.path so that `src` imports without any path setup:

    python -m scripts.eval --model BASE.pth --problems test.jsonl
    python -m scripts.prepare_data --input data.jsonl --output_prefix data/mydata
    python -m scripts.make_demo_data --out runs/demo/data
    python -m scripts.compare_methods --micro
    python -m scripts.gpu_check --dry-run
    python -m scripts.bench.bone --quick

The shell scripts (train_bone.sh, merge_bone.sh, compare_methods.sh, gpu_check.sh) change to the root first and
may be run from anywhere.
"""
