"""State tuning: the trainable initial WKV state (`--peft state`, `--train_parts state`). The layout is checked
against the `rwkv` package itself; merge writes it where that package reads it; the state form starts from it."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import merge_bone
from src.adapters.config import AdapterConfig
from src.adapters.inject import adapter_parameters, inject_adapters, parameter_table, save_adapter
from src.adapters.merge import merge_state_dict, unmerge_state_dict
from src.model import RWKV6
from tests.test_model import TOKENS, official_logits
from tests.tiny import tiny_config, tiny_state_dict

CFG = tiny_config(n_layer=2, n_embd=128, vocab_size=256)


def _with_random_state(sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {**sd, **{f"blocks.{i}.att.time_state": torch.randn(CFG.n_head, 64, 64, generator=g) * 0.5
                     for i in range(CFG.n_layer)}}


def _logits(model: RWKV6) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([TOKENS]))[0]


def test_checkpoint_state_matches_the_rwkv_package(tmp_path: Path) -> None:
    sd = _with_random_state(tiny_state_dict(CFG, seed=1))
    torch.save(sd, tmp_path / "state.pth")
    ours = RWKV6.from_checkpoint(tmp_path / "state.pth", wkv_backend="torch")
    assert ours.cfg.time_state and "blocks.1.att.time_state" in ours.base_keys
    ref = official_logits(sd, tmp_path)
    got = _logits(ours)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    # the state changes the output, and the transposed layout would not match: the test can fail
    without = RWKV6.from_checkpoint(_save(tmp_path / "plain.pth", tiny_state_dict(CFG, seed=1)), wkv_backend="torch")
    assert (_logits(without) - ref).abs().max() / ref.abs().max() > 1e-2
    flipped = {k: v.transpose(1, 2).contiguous() if k.endswith("time_state") else v for k, v in sd.items()}
    wrong = RWKV6.from_checkpoint(_save(tmp_path / "flipped.pth", flipped), wkv_backend="torch")
    assert (_logits(wrong) - ref).abs().max() / ref.abs().max() > 1e-2


def _save(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    torch.save(sd, path)
    return path


def test_state_form_starts_from_the_trained_state(tmp_path: Path) -> None:
    model = RWKV6.from_checkpoint(_save(tmp_path / "s.pth", _with_random_state(tiny_state_dict(CFG, seed=2))),
                                  wkv_backend="torch")
    idx = torch.tensor([TOKENS[:7], TOKENS[7:14]])
    with torch.no_grad():
        full = model(idx)
        stepped, state = model(idx[:, :3], model.init_state(2))
        rest, _ = model(idx[:, 3:], state)
    torch.testing.assert_close(torch.cat([stepped, rest], 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, parts", [("state", ()), ("bone", ("state",))])
def test_state_tuning_trains_only_the_state(method: str, parts: tuple[str, ...]) -> None:
    model = RWKV6(CFG)
    model.load_base_state_dict(tiny_state_dict(CFG, seed=3))
    acfg = AdapterConfig(method=method, b=32, train_parts=parts)
    inject_adapters(model, acfg)
    trainable = adapter_parameters(model, acfg)
    states = {n for n in trainable if n.endswith(".time_state")}
    assert states == {f"blocks.{i}.att.time_state" for i in range(CFG.n_layer)}
    assert all(float(trainable[n].abs().max()) == 0 for n in states)  # zero: starts equal to the base
    others = set(trainable) - states
    assert (others == set()) if method == "state" else all(n.endswith(".bone") for n in others) and others
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)
    assert "initial state (time_state)" in parameter_table(model)
    idx = torch.tensor([TOKENS])
    model(idx).float().pow(2).mean().backward()
    assert all(trainable[n].grad is not None and trainable[n].grad.abs().max() > 0 for n in states)


def test_state_gradient_equals_float64_autograd_on_the_naive_formula() -> None:
    """d loss / d time_state through the whole model, against the same model in float64 with the WKV state
    built by a naive loop of the official recurrence (tests/wkv_reference.py)."""
    from tests.wkv_reference import wkv6_loop

    sd = _with_random_state(tiny_state_dict(CFG, seed=4), seed=5)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        model = RWKV6(replace(CFG, time_state=True))
        model.load_base_state_dict({k: v.to(dtype) for k, v in sd.items()})
        model = model.to(dtype)
        if dtype == torch.float64:
            import src.rwkv6 as arch

            original = arch.wkv6
            arch.wkv6 = lambda r, k, v, w, u, s, backend: wkv6_loop(r, k, v, w, u, s)  # noqa: E731
        try:
            model(torch.tensor([TOKENS])).sum().backward()
        finally:
            if dtype == torch.float64:
                arch.wkv6 = original
        grads[dtype] = {n: p.grad for n, p in model.named_parameters() if n.endswith("time_state")}
    for name, ref in grads[torch.float64].items():
        err = (grads[torch.float32][name].double() - ref).norm() / ref.norm()
        assert err < 1e-5, (name, float(err))


def test_merge_writes_the_state_where_the_rwkv_package_reads_it(tmp_path: Path) -> None:
    base_sd = tiny_state_dict(CFG, seed=6)
    base_path = _save(tmp_path / "base.pth", base_sd)
    model = RWKV6.from_checkpoint(base_path, wkv_backend="torch")
    acfg = AdapterConfig(method="state")
    inject_adapters(model, acfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _n, p in adapter_parameters(model, acfg).items():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # a trained-looking state
    adapter_path = tmp_path / "state.safetensors"
    save_adapter(model, acfg, adapter_path)
    with safe_open(str(adapter_path), "pt") as f:
        assert set(f.keys()) == {"blocks.0.att.time_state", "blocks.1.att.time_state"}
        assert f.metadata()["method"] == "state" and "base_fingerprint" in f.metadata()
    merged_path = tmp_path / "merged.pth"
    assert merge_bone.main(["--base_model", str(base_path), "--bone", str(adapter_path), "--output",
                            str(merged_path)]) == 0
    merged = torch.load(merged_path, weights_only=True)
    assert set(merged) == set(base_sd) | {"blocks.0.att.time_state", "blocks.1.att.time_state"}
    ref = official_logits(merged, tmp_path)
    got = _logits(model)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    only = tmp_path / "state_only.safetensors"
    assert merge_bone.main(["--base_model", str(base_path), "--bone", str(adapter_path), "--output", str(only),
                            "--state_only"]) == 0
    assert set(load_file(only)) == {"blocks.0.att.time_state", "blocks.1.att.time_state"}
    back = unmerge_state_dict(merged, load_file(adapter_path), acfg)
    assert set(back) == set(base_sd) and all(torch.equal(back[k], base_sd[k]) for k in base_sd)
    assert set(merge_state_dict(base_sd, load_file(adapter_path), acfg)) == set(merged)
