"""The demo data sets, generated deterministically from a seed: a small English corpus of arithmetic stories for
pretraining a tiny RWKV6 base, and GSM8K-like math word problems (question, worked answer, `#### number`) for
fine-tuning and exact-match evaluation. Used by the CPU demo and the method comparison.

The problems are one-step (add, take away, multiply) with small numbers, so that a 4 x 128 model trained for a
few minutes on 2 CPU cores can learn them. The corpus tells problems of the same kinds as "Question: ... Answer:
... The answer is n." prose; the fine-tuning set asks them in the RWKV World chat format and answers with the
equation and `#### n`. The base therefore starts with some of the arithmetic but not the task's format or its
accuracy, and the fine-tune has something to teach. No test question is in the training set."""
from __future__ import annotations

import json
import random
from pathlib import Path

from src.atomic import atomic_write_text

NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Leo", "Emma", "Max", "Zoe", "Jack", "Nora"]
ITEMS = ["apples", "pencils", "books", "cookies", "marbles", "stickers", "coins", "cards", "shells", "toys"]
LOW, HIGH = 2, 9  # the operands of adding and taking away
MUL_HIGH = 5  # the operands of multiplying: 2..5
CORPUS_DOCS, TRAIN_PROBLEMS, TEST_PROBLEMS, SEED = 3000, 1000, 100, 1234  # the demo's sizes


def word_problem(rng: random.Random) -> tuple[str, str, int]:
    """One problem: (question, worked answer 'a op b = n' then '#### n', n)."""
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        q = f"{name} has {a} {item}. {other} gives {name} {b} more {item}. How many {item} does {name} have now?"
        ans, work = a + b, f"{a} + {b} = {a + b}"
    elif kind == "sub":
        a = a + b
        q = f"{name} has {a} {item}. {name} gives {b} {item} to {other}. How many {item} does {name} have left?"
        ans, work = a - b, f"{a} - {b} = {a - b}"
    else:
        a, b = rng.randint(2, MUL_HIGH), rng.randint(2, MUL_HIGH)
        q = f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have?"
        ans, work = a * b, f"{a} * {b} = {a * b}"
    return q, f"{work}\n#### {ans}", ans


def story(rng: random.Random) -> str:
    """Pretraining text: a few word problems told as prose with their solutions."""
    parts = []
    for _ in range(rng.randint(2, 4)):
        q, worked, ans = word_problem(rng)
        parts.append(f"Question: {q}\nAnswer: {worked.splitlines()[0]}. The answer is {ans}.")
    return "\n\n".join(parts)


def write_demo_data(out: str | Path, corpus_docs: int = CORPUS_DOCS, train: int = TRAIN_PROBLEMS,
                    test: int = TEST_PROBLEMS, seed: int = SEED) -> dict[str, Path]:
    """Write corpus.jsonl ({"text"}), math_train.jsonl and math_test.jsonl ({"prompt", "response"}; no question is
    in both) into `out`; returns their paths by name ("corpus", "train", "test")."""
    out = Path(out)
    rng = random.Random(seed)
    corpus = [json.dumps({"text": story(rng)}) for _ in range(corpus_docs)]
    seen: set[str] = set()
    problems: list[str] = []
    while len(problems) < train + test:
        q, worked, _ = word_problem(rng)
        if q in seen:
            continue
        seen.add(q)
        problems.append(json.dumps({"prompt": q, "response": worked}))
    paths = {"corpus": out / "corpus.jsonl", "train": out / "math_train.jsonl", "test": out / "math_test.jsonl"}
    atomic_write_text(paths["corpus"], "\n".join(corpus) + "\n")
    atomic_write_text(paths["train"], "\n".join(problems[:train]) + "\n")
    atomic_write_text(paths["test"], "\n".join(problems[train:]) + "\n")
    return paths
