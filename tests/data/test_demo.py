"""The demo data (src/data/demo.py): seeded and reproducible, answers that are right, no test question in the
training set, problems that fit the demo's ctx_len, and the demo configs that train on them."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from src.config import TrainConfig, load_config
from src.data import demo
from src.data.tokenizer import WorldTokenizer
from src.evaluation.evaluate import PROMPT_FORMAT, exact_match

ROOT = Path(__file__).resolve().parents[2]
EQUATION = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)\n#### (\d+)$")


def test_every_answer_is_right_and_in_range() -> None:
    rng = random.Random(0)
    kinds = set()
    for _ in range(2000):
        question, worked, answer = demo.word_problem(rng)
        a, op, b, result, final = EQUATION.match(worked).groups()  # type: ignore[union-attr]
        a, b = int(a), int(b)
        assert int(result) == int(final) == answer == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert f" {a} " in question and f" {b} " in question  # the operands are read from the question
        low, high = (2, demo.MUL_HIGH) if op == "*" else (demo.LOW, demo.HIGH)
        assert low <= b <= high and (low <= a <= high if op != "-" else answer >= demo.LOW)
        equation = worked.splitlines()[0]  # no '####': scored by its last number, the result
        assert exact_match(equation, worked) and not exact_match(worked.replace(f"#### {answer}", "#### 99"), worked)
        kinds.add(op)
    assert kinds == {"+", "-", "*"}


def test_files_are_reproducible_disjoint_and_fit_the_demo_ctx_len(tmp_path: Path) -> None:
    one = demo.write_demo_data(tmp_path / "a", corpus_docs=50, train=300, test=100)
    two = demo.write_demo_data(tmp_path / "b", corpus_docs=50, train=300, test=100)
    for name in one:
        assert one[name].read_bytes() == two[name].read_bytes()
    train = [json.loads(line) for line in one["train"].read_text().splitlines()]
    test = [json.loads(line) for line in one["test"].read_text().splitlines()]
    assert len(train) == 300 and len(test) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    tok = WorldTokenizer()
    ctx_len = shipped("demo_bone.yaml").ctx_len
    longest = max(len(tok.encode(PROMPT_FORMAT.format(prompt=r["prompt"]) + " " + r["response"] + "\n\n"))
                  for r in train + test)
    assert longest + 1 <= ctx_len  # every problem is trained whole, with its end
    stories = [json.loads(line)["text"] for line in one["corpus"].read_text().splitlines()]
    assert all(s.startswith("Question: ") and "The answer is" in s and "####" not in s for s in stories)


def shipped(name: str) -> TrainConfig:
    """A shipped config as train.py reads it, with the model and data a user adds."""
    model = [] if name == "demo_pretrain.yaml" else ["--load_model", "base.pth"]
    return load_config(["--config", str(ROOT / "configs" / name), *model, "--data_file", "data.jsonl"])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(name: str) -> None:
    cfg = shipped(name)
    if name.startswith("demo_"):
        assert cfg.accelerator == "cpu" and cfg.precision == "fp32"
