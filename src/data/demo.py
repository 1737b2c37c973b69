"""The demo data sets, generated deterministically from a seed: a small English corpus of arithmetic stories for
pretraining a tiny RWKV6 base, and GSM8K-like math word problems (question, worked answer, `#### number`) for
fine-tuning and exact-match evaluation. Used by the CPU demo and the method comparison."""
from __future__ import annotations

import json
import random
from pathlib import Path

from src.atomic import atomic_write_text

NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Leo", "Emma", "Max", "Zoe", "Jack", "Nora"]
ITEMS = ["apples", "pencils", "books", "cookies", "marbles", "stickers", "coins", "cards", "shells", "toys"]


def word_problem(rng: random.Random) -> tuple[str, str, int]:
    """One problem: (question, worked answer ending in '#### n', n). One or two steps, small numbers."""
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    kind = rng.choice(["add", "sub", "mul", "two_step"])
    if kind == "add":
        q = f"{name} has {a} {item}. {other} gives {name} {b} more {item}. How many {item} does {name} have now?"
        ans = a + b
        work = f"{name} starts with {a} {item} and gets {b} more, so {a} + {b} = {ans}."
    elif kind == "sub":
        a = a + b
        q = f"{name} has {a} {item}. {name} gives {b} {item} to {other}. How many {item} does {name} have left?"
        ans = a - b
        work = f"{name} starts with {a} {item} and gives away {b}, so {a} - {b} = {ans}."
    elif kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have?"
        ans = a * b
        work = f"There are {a} bags of {b} {item}, so {a} * {b} = {ans}."
    else:
        c = rng.randint(1, a + b - 1)
        q = (f"{name} has {a} {item} and buys {b} more. Then {name} gives {c} {item} to {other}. "
             f"How many {item} does {name} have now?")
        ans = a + b - c
        work = f"First {a} + {b} = {a + b}. Then {a + b} - {c} = {ans}."
    return q, f"{work}\n#### {ans}", ans


def story(rng: random.Random) -> str:
    """Pretraining text: a few word problems told as prose with their solutions."""
    parts = []
    for _ in range(rng.randint(2, 4)):
        q, worked, _ = word_problem(rng)
        parts.append(f"Question: {q}\nAnswer: {worked.replace(chr(10) + '#### ', ' The answer is ')}.")
    return "\n\n".join(parts)


def write_demo_data(out: str | Path, corpus_docs: int = 4000, train: int = 480, test: int = 100,
                    seed: int = 1234) -> dict[str, Path]:
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
