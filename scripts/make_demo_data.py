"""Generate the demo data sets (deterministic, seeded; see src/data/demo.py): a small corpus of arithmetic
stories for pretraining a tiny RWKV6 base, and GSM8K-like math word problems for fine-tuning and exact match.

    python -m scripts.make_demo_data --out runs/demo/data

Writes corpus.jsonl ({"text": ...}), math_train.jsonl and math_test.jsonl ({"prompt": ..., "response": ...}).
"""
from __future__ import annotations

import argparse

from src.data.demo import CORPUS_DOCS, SEED, TEST_PROBLEMS, TRAIN_PROBLEMS, write_demo_data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--corpus_docs", type=int, default=CORPUS_DOCS)
    ap.add_argument("--train", type=int, default=TRAIN_PROBLEMS)
    ap.add_argument("--test", type=int, default=TEST_PROBLEMS)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    write_demo_data(args.out, args.corpus_docs, args.train, args.test, args.seed)
    print(f"wrote {args.corpus_docs} stories and {args.train}+{args.test} problems to {args.out}")


if __name__ == "__main__":
    main()
