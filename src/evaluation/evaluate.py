"""Evaluation: generation with the recurrent state form, GSM8K-style exact match, held-out loss, and reading
problem sets."""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
from torch import Tensor

from src.data.jsonl import iter_jsonl
from src.data.tokenizer import Tokenizer
from src.errors import DataError
from src.loss import masked_token_loss_sum
from src.rwkv6 import RWKV6

PROMPT_FORMAT = "User: {prompt}\n\nAssistant:"  # the RWKV World chat format the SFT data is rendered in
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '-07' -> '-7', '3.0' -> '3', '.5' -> '0.5'; None if not a finite number.
    Exact (decimal arithmetic): long integers are not rounded through float."""
    t = text.strip().replace(",", "").rstrip(".")
    try:
        value = Decimal(t)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The number after the last '####' if there is one, else the last number in the text; normalised."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        m = _NUMBER.search(tail)
        if m:
            return normalize_number(m.group())
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def exact_match(prediction: str, gold: str) -> bool:
    """True when both texts yield the same normalised answer (and the prediction yields one at all)."""
    p, g = extract_answer(prediction), extract_answer(gold)
    return p is not None and p == g


@torch.no_grad()
def generate(model: RWKV6, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, stop: Iterable[str] = ("\n\n",), generator: torch.Generator | None = None) -> str:
    """Continue `prompt`: the prompt is read in one parallel pass that returns the state, then one token at a
    time. temperature 0 is greedy. Stops at token 0 or when the text ends with any `stop` string."""
    model.eval()
    device = model.emb.weight.device
    ids = tokenizer.encode(prompt)
    logits, state = model(torch.tensor([ids], device=device), model.init_state(1, device))
    out: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        last = logits[0, -1].float()  # (V,)
        if temperature <= 0:
            token = int(last.argmax())
        else:
            probs = torch.softmax(last / temperature, -1)
            if top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            token = int(torch.multinomial(probs, 1, generator=generator))
        if token == 0:
            break
        out.append(token)
        text = tokenizer.decode(out)
        if any(text.endswith(s) for s in stop):
            break
        logits, state = model(torch.tensor([[token]], device=device), state)
    return text


@dataclass
class ExactMatchResult:
    accuracy: float
    correct: int
    total: int
    samples: list[dict[str, str | bool]]


def evaluate_exact_match(model: RWKV6, tokenizer: Tokenizer, problems: list[tuple[str, str]], prompt_format: str,
                         max_new_tokens: int = 64, progress: bool = True) -> ExactMatchResult:
    """Greedy-generate an answer for each (question, gold answer) and score exact match."""
    from tqdm import tqdm

    samples: list[dict[str, str | bool]] = []
    correct = 0
    for question, gold in tqdm(problems, desc="exact match", disable=not progress):
        pred = generate(model, tokenizer, prompt_format.format(prompt=question), max_new_tokens=max_new_tokens)
        ok = exact_match(pred, gold)
        correct += ok
        samples.append({"question": question, "gold": gold, "prediction": pred, "correct": ok})
    total = len(problems)
    return ExactMatchResult(correct / max(total, 1), correct, total, samples)


@torch.no_grad()
def evaluate_loss(model: RWKV6, batches: Iterable[dict[str, Tensor]]) -> float:
    """Token-weighted mean loss over the masked tokens of `batches` (dicts with input/target/mask)."""
    model.eval()
    device = model.emb.weight.device
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for b in batches:
        s, n = masked_token_loss_sum(model(b["input"].to(device)), b["target"].to(device), b["mask"].to(device))
        total += s.double().cpu()
        count += n.double().cpu()
    return float(total / count.clamp(min=1))


def read_problems(path: str | Path) -> list[tuple[str, str]]:
    """(question, gold answer) of each {"prompt", "response"} record of a jsonl file; the response ends in
    '#### answer' (GSM8K style). DataError for a record of another shape or an empty file."""
    problems = []
    for line_no, record in iter_jsonl(path):
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
            raise DataError(f"{path}:{line_no}: expected {{'prompt': str, 'response': str}} with '#### answer'.")
        problems.append((record["prompt"], record["response"]))
    if not problems:
        raise DataError(f"{path}: no problems.")
    return problems


def held_out_loss(model: RWKV6, path: str | Path, ctx_len: int, batch_size: int) -> float:
    """Token-weighted mean loss of `model` on a held-out file (jsonl text or sft, or a binidx prefix), read as
    consecutive ctx_len windows (documents for sft) with the World tokenizer."""
    from torch.utils.data import DataLoader

    from src.data.dataset import build_eval_dataset
    from src.data.tokenizer import WorldTokenizer

    dataset = build_eval_dataset(str(path), ctx_len, WorldTokenizer(), model.cfg.vocab_size)
    return evaluate_loss(model, DataLoader(dataset, batch_size=batch_size))
