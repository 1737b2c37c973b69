"""AdapterConfig validation, injection into RWKV6, the adapter-parameter definition, training behaviour,
parameter counts and the parameter table."""
from __future__ import annotations

import pytest
import torch

from src.adapters.bone import BoneLinear
from src.adapters.config import PROJECTIONS, AdapterConfig
from src.adapters.inject import adapter_parameters, count_adapter_parameters, inject_adapters, parameter_table
from src.adapters.lora import LoRALinear
from src.errors import AdapterError, ConfigError
from src.model import RWKV6, RWKV6Config, base_state_dict
from tests.adapters.reference import ALL_METHOD_CONFIGS, adapted_model, config_id, rel_err, tiny_model

IDX = torch.tensor([[5, 17, 200, 3, 99, 42, 0, 7, 130, 255, 1, 64]])


@pytest.mark.parametrize("kw, match", [
    (dict(method="dora"), "method"),
    (dict(grouping="diag"), "grouping"),
    (dict(b=0), "b "),
    (dict(b=-64), "b "),
    (dict(lora_r=0), "lora_r"),
    (dict(lora_alpha=0), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(targets=("att", "mlp")), "mlp"),
    (dict(targets=("att.query",)), "att.query"),
    (dict(targets=()), "target"),
    (dict(train_parts=("emb",)), "emb"),
])
def test_config_validation(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AdapterConfig(**kw)


def test_config_targets_by_part_and_name() -> None:
    assert AdapterConfig().projections() == PROJECTIONS
    assert AdapterConfig(targets=["ffn"]).projections() == ("ffn.key", "ffn.receptance", "ffn.value")
    assert AdapterConfig(targets=("ffn.value", "att.key", "att")).projections() == PROJECTIONS[:5] + ("ffn.value",)
    assert AdapterConfig(method="none", targets=()).projections() == ()
    cfg = AdapterConfig(method="lora", targets=["att.key"], train_parts=["ln"])
    assert AdapterConfig.from_metadata(cfg.to_metadata()) == cfg


@pytest.mark.parametrize("cfg", [AdapterConfig(b=32), AdapterConfig(method="lora", lora_r=4)], ids=["bone", "lora"])
def test_inject_replaces_targets_and_freezes_everything_else(cfg: AdapterConfig) -> None:
    model = tiny_model()
    names = inject_adapters(model, cfg)
    assert names == [f"blocks.{i}.{p}" for i in range(2) for p in PROJECTIONS]
    layer_type = BoneLinear if cfg.method == "bone" else LoRALinear
    assert all(isinstance(model.get_submodule(n), layer_type) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model, cfg))
    suffixes = (".bone",) if cfg.method == "bone" else (".lora_A", ".lora_B")
    assert trainable and all(n.endswith(suffixes) for n in trainable)
    assert len(trainable) == len(names) * len(suffixes)
    # the base keys are unchanged, so a base checkpoint still loads strictly
    assert set(base_state_dict(model)) == set(base_state_dict(tiny_model()))


def test_inject_by_part_name_and_train_parts() -> None:
    model = tiny_model()
    cfg = AdapterConfig(b=32, targets=("ffn", "att.gate"), train_parts=("ln", "time"))
    names = inject_adapters(model, cfg)
    assert sorted(names) == sorted(f"blocks.{i}.{p}" for i in range(2)
                                   for p in ("att.gate", "ffn.key", "ffn.receptance", "ffn.value"))
    assert isinstance(model.blocks[0].att.key, torch.nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.ln0.weight" in trainable and "ln_out.bias" in trainable and "blocks.1.att.ln_x.weight" in trainable
    assert "blocks.1.att.time_maa_w1" in trainable and "blocks.0.ffn.time_maa_k" in trainable
    assert "emb.weight" not in trainable and "blocks.0.att.key.weight" not in trainable
    assert "blocks.0.att.gate.weight" not in trainable


def test_inject_twice_or_with_b_that_does_not_divide_raises() -> None:
    model = tiny_model()
    with pytest.raises(AdapterError) as e:
        inject_adapters(model, AdapterConfig(b=128))  # dim_ffn = 448 = 3.5 * 128
    msg = str(e.value)
    assert "b=128" in msg and "blocks.0.ffn.key (448x128)" in msg and "64, 32, 16" in msg
    assert not any(isinstance(m, BoneLinear) for m in model.modules())  # nothing replaced on error
    inject_adapters(model, AdapterConfig(b=64))
    with pytest.raises(AdapterError, match="already has adapters"):
        inject_adapters(model, AdapterConfig(b=64))


@pytest.mark.parametrize("cfg", ALL_METHOD_CONFIGS, ids=config_id)
def test_initial_adapter_leaves_logits_unchanged(cfg: AdapterConfig) -> None:
    with torch.no_grad():
        base = tiny_model()(IDX)
        adapted = adapted_model(cfg)(IDX)
    # PiSSA moves the principal part out of W into the adapter: equal up to fp32 rounding
    assert rel_err(adapted, base) < (1e-5 if cfg.method == "pissa" else 1e-6)


@pytest.mark.parametrize("cfg", ALL_METHOD_CONFIGS + [AdapterConfig(method="bone", b=32, train_parts=("ln",))],
                         ids=lambda c: config_id(c) + ("+ln" if c.train_parts else ""))
def test_one_optimizer_step_changes_only_adapter_tensors(cfg: AdapterConfig) -> None:
    model = adapted_model(cfg).train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = adapter_parameters(model, cfg)
    opt = torch.optim.AdamW(params.values(), lr=1e-3, weight_decay=0.0)
    torch.nn.functional.cross_entropy(model(IDX[:, :-1]).flatten(0, 1), IDX[0, 1:]).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(params)
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads <= set(params)


@pytest.mark.parametrize("cfg", [AdapterConfig(b=32), AdapterConfig(b=32, grouping="col"),
                                 AdapterConfig(method="lora", lora_r=4)], ids=["row", "col", "lora"])
def test_grad_checkpointing_gives_same_gradients(cfg: AdapterConfig) -> None:
    grads = []
    for grad_cp in (False, True):
        model = adapted_model(cfg, random_seed=3).train().with_runtime(grad_cp=grad_cp)
        model(IDX).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in adapter_parameters(model, cfg).items()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cfg", [AdapterConfig(b=32), AdapterConfig(b=32, grouping="col"),
                                 AdapterConfig(method="lora", lora_r=4)], ids=["row", "col", "lora"])
def test_bf16_base_and_autocast_training(cfg: AdapterConfig) -> None:
    model = adapted_model(cfg, random_seed=4, dtype=torch.bfloat16).train()
    params = adapter_parameters(model, cfg)
    assert all(p.dtype == torch.float32 for p in params.values())
    assert model.blocks[0].att.key.weight.dtype == torch.bfloat16
    model(IDX).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in params.values())
    fp32 = adapted_model(cfg, random_seed=4).train()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fp32(IDX)
    with torch.no_grad():
        ref = fp32(IDX)
    assert rel_err(mixed.float(), ref) < 5e-2


@pytest.mark.parametrize("grouping", ["row", "col"])
@pytest.mark.parametrize("n_layer, n_embd, extra, total", [
    (24, 2048, {}, 33_030_144),
    (32, 2560, {}, 55_050_240),
    (32, 4096, dict(d_mix=64, d_decay=128), 88_080_384),
], ids=["1.6B", "3B", "7B"])
def test_parameter_counts_of_official_sizes(grouping: str, n_layer: int, n_embd: int, extra: dict, total: int) -> None:
    model_cfg = RWKV6Config(n_layer=n_layer, n_embd=n_embd, vocab_size=65536, **extra)
    assert count_adapter_parameters(model_cfg, AdapterConfig(b=64, grouping=grouping)) == total
    assert count_adapter_parameters(model_cfg, AdapterConfig(method="lora", lora_r=32)) == total
    assert count_adapter_parameters(model_cfg, AdapterConfig(method="pissa", lora_r=32)) == total  # no SVD on meta


def test_parameter_table() -> None:
    model = tiny_model()
    inject_adapters(model, AdapterConfig(b=32, train_parts=("ln",)))
    table = parameter_table(model)
    lines = {line.rsplit("  ", 1)[0].strip(): line.split()[-1] for line in table.splitlines()}
    assert lines["att.key"] == f"{2 * 128 * 32:,}"
    assert lines["ffn.value"] == f"{2 * 448 * 32:,}"
    assert lines["att total"] == f"{5 * 2 * 128 * 32:,}"
    ln = 2 * 128 * (1 + 2 * 3 + 1)  # weight + bias of ln0, (ln1, ln2, att.ln_x) per layer, ln_out
    assert lines["other (base tensors)"] == f"{ln:,}"
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lines["total trainable"] == f"{total:,}" and "," in lines["total trainable"]


def test_inject_on_meta_device_uses_no_memory() -> None:
    with torch.device("meta"):
        model = RWKV6(RWKV6Config(n_layer=2, n_embd=4096, vocab_size=65536, d_mix=64, d_decay=128))
    inject_adapters(model, AdapterConfig(method="pissa", lora_r=32))
    assert all(p.is_meta for p in model.parameters())
