"""Tests for src/evaluation/evaluate.py: the exact-match scorer on hand-written cases, greedy generation from a merged
checkpoint against base + adapter, state-form generation against re-running the whole sequence, the exact-match
loop and the token-weighted held-out loss."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from src.adapters import AdapterConfig, inject_adapters, merge_checkpoint_file, save_adapter
from src.evaluation.evaluate import (
    PROMPT_FORMAT,
    evaluate_exact_match,
    evaluate_loss,
    exact_match,
    extract_answer,
    generate,
    normalize_number,
)
from src.loss import masked_token_loss_sum
from src.model import RWKV6
from tests.tiny import tiny_config, tiny_state_dict

VOCAB = 256


class IdTokenizer:
    """A reversible stand-in for the World tokenizer on a tiny vocabulary: each character of the prompt is a
    token id, and token i decodes to "<i>", so the decoded text names every generated token exactly."""

    vocab_size = VOCAB
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return [1 + ord(ch) % (VOCAB - 1) for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def tokens_of(text: str) -> list[int]:
    """Inverse of IdTokenizer.decode."""
    return [int(part) for part in text.replace("<", " ").replace(">", " ").split()]


# ----------------------------------------------------------------------------------------------- scorer
@pytest.mark.parametrize("text, expected", [
    ("42", "42"), ("1,234", "1234"), ("1,234,567.50", "1234567.5"), ("-7", "-7"), ("-07", "-7"),
    ("3.0", "3"), ("3.50", "3.5"), ("0.25", "0.25"), (".5", "0.5"), ("-0", "0"), ("12.", "12"),
    ("0.00000000025", "0.00000000025"), ("12345678901234567891", "12345678901234567891"),
    ("abc", None), ("", None), ("-", None), ("inf", None), ("nan", None),
])
def test_normalize_number(text: str, expected: str | None) -> None:
    assert normalize_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("First 3 + 4 = 7.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("It costs $1,250.00 in total.", "1250"),
    ("The temperature fell to -12 degrees.", "-12"),
    ("She ran 2.5 km, then 3.75 km.", "3.75"),
    ("5 + 6 = 11 #### 12 and later 99", "12"),  # the number after the last '####' wins over the last number
    ("#### 3 ... #### 8", "8"),
    ("The total is 9 ####", "9"),  # nothing after '####': the last number of the text
    ("I do not know the answer.", None),
    ("", None),
])
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize("prediction, gold, match", [
    ("So the answer is 3.0", "#### 3", True),
    ("3", "Total: 1 + 2 = 3\n#### 3.00", True),
    ("The answer is 1,000.", "#### 1000", True),
    ("#### -4", "#### -4", True),
    ("#### 4", "#### -4", False),
    ("2 + 2 = 4, so 5", "#### 4", False),  # the last number is what counts
    ("#### 0.5", "#### .5", True),
    ("I cannot solve this.", "#### 7", False),  # no answer at all: never a match
    ("", "#### 0", False),
    ("no number", "no number either", False),  # neither side has an answer: not a match
])
def test_exact_match(prediction: str, gold: str, match: bool) -> None:
    assert exact_match(prediction, gold) is match


# ----------------------------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def base_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("evaluate") / "base.pth"
    torch.save(tiny_state_dict(tiny_config(n_layer=2, n_embd=128, vocab_size=VOCAB), seed=3), path)
    return path


def full_rerun_greedy(model: RWKV6, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence through the parallel forward at every step."""
    ids = list(prompt_ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token == 0:
                break
            out.append(token)
            ids.append(token)
    return out


def test_generate_with_state_equals_full_rerun(base_file: Path) -> None:
    model = RWKV6.from_checkpoint(base_file, wkv_backend="torch").eval()
    tok = IdTokenizer()
    prompt = PROMPT_FORMAT.format(prompt="How many apples?")
    got = tokens_of(generate(model, tok, prompt, max_new_tokens=24, stop=()))
    want = full_rerun_greedy(model, tok.encode(prompt), 24)
    assert len(want) >= 8, "the reference stopped early: the comparison would prove little"
    assert got == want


def test_generate_top_p_tiny_is_greedy(base_file: Path) -> None:
    model = RWKV6.from_checkpoint(base_file, wkv_backend="torch").eval()
    tok = IdTokenizer()
    greedy = generate(model, tok, "abc", max_new_tokens=10, stop=())
    sampled = generate(model, tok, "abc", max_new_tokens=10, temperature=1.0, top_p=1e-9, stop=(),
                       generator=torch.Generator().manual_seed(0))
    assert sampled == greedy
    wide = [generate(model, tok, "abc", max_new_tokens=10, temperature=5.0, stop=(),
                     generator=torch.Generator().manual_seed(s)) for s in range(3)]
    assert any(w != greedy for w in wide), "sampling at a high temperature never left the greedy path"


def test_generate_stops_at_stop_string(base_file: Path) -> None:
    model = RWKV6.from_checkpoint(base_file, wkv_backend="torch").eval()
    tok = IdTokenizer()
    full = generate(model, tok, "abc", max_new_tokens=12, stop=())
    first = full[: full.index(">") + 1]  # "<t0>"
    assert generate(model, tok, "abc", max_new_tokens=12, stop=(first,)) == first


def randomise_adapter(model: RWKV6, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("acfg", [
    AdapterConfig(method="bone", b=32, grouping="row"),
    AdapterConfig(method="bone", b=32, grouping="col"),
    AdapterConfig(method="bone_hadamard", b=64, grouping="row"),
    AdapterConfig(method="pissa", lora_r=8, lora_alpha=8.0),
], ids=["bone-row", "bone-col", "bone-hadamard", "pissa"])
def test_greedy_generation_merged_equals_base_plus_adapter(base_file: Path, tmp_path: Path,
                                                           acfg: AdapterConfig) -> None:
    trained = RWKV6.from_checkpoint(base_file, wkv_backend="torch")
    torch.manual_seed(0)
    inject_adapters(trained, acfg)
    randomise_adapter(trained, seed=11)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(trained, acfg, adapter)
    merged_file = tmp_path / "merged.safetensors"
    merge_checkpoint_file(base_file, adapter, merged_file)

    tok = IdTokenizer()
    prompt = PROMPT_FORMAT.format(prompt="Tom has 3 apples and buys 4 more. How many apples?")
    base = RWKV6.from_checkpoint(base_file, wkv_backend="torch").eval()
    unmerged = RWKV6.from_checkpoint(base_file, adapter=adapter, wkv_backend="torch").eval()
    merged = RWKV6.from_checkpoint(merged_file, wkv_backend="torch").eval()
    idx = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        l_base, l_unmerged, l_merged = base(idx), unmerged(idx), merged(idx)
    assert (l_unmerged - l_base).abs().max() > 1e-2, "the adapter does not change the model: the test proves nothing"
    assert torch.allclose(l_merged, l_unmerged, atol=1e-4, rtol=1e-4), (l_merged - l_unmerged).abs().max()

    from_merged = generate(merged, tok, prompt, max_new_tokens=16, stop=())
    from_unmerged = generate(unmerged, tok, prompt, max_new_tokens=16, stop=())
    assert len(tokens_of(from_merged)) >= 8
    assert from_merged == from_unmerged
    assert from_merged != generate(base, tok, prompt, max_new_tokens=16, stop=())


# ----------------------------------------------------------------------------------------------- loops
def test_evaluate_exact_match_counts(base_file: Path) -> None:
    model = RWKV6.from_checkpoint(base_file, wkv_backend="torch").eval()
    tok = IdTokenizer()
    questions = ["What is 2+2?", "What is 3+3?"]
    predictions = [generate(model, tok, PROMPT_FORMAT.format(prompt=q), max_new_tokens=6) for q in questions]
    right = extract_answer(predictions[0])  # IdTokenizer text "<17><203>" ends in a number: the last token id
    assert right is not None
    problems = [(questions[0], f"worked answer\n#### {right}"), (questions[1], "#### -1")]
    result = evaluate_exact_match(model, tok, problems, PROMPT_FORMAT, max_new_tokens=6, progress=False)
    assert (result.correct, result.total, result.accuracy) == (1, 2, 0.5)
    assert [s["correct"] for s in result.samples] == [True, False]
    assert [s["prediction"] for s in result.samples] == predictions


def test_evaluate_loss_is_token_weighted(base_file: Path) -> None:
    model = RWKV6.from_checkpoint(base_file, wkv_backend="torch").eval()
    gen = torch.Generator().manual_seed(5)
    batches = []
    for n_loss in (1, 15):  # very different token counts: a mean of batch means would differ
        inp = torch.randint(1, VOCAB, (2, 16), generator=gen)
        mask = torch.zeros(2, 16)
        mask[0, :n_loss] = 1.0
        batches.append({"input": inp, "target": torch.roll(inp, -1, 1), "mask": mask})
    total, count, batch_means = 0.0, 0.0, []
    with torch.no_grad():
        for b in batches:
            s, n = masked_token_loss_sum(model(b["input"]), b["target"], b["mask"])
            total, count = total + float(s), count + float(n)
            batch_means.append(float(s / n))
    got = evaluate_loss(model, batches)
    assert got == pytest.approx(total / count, rel=1e-6)
    assert got != pytest.approx(sum(batch_means) / 2, rel=1e-3)
