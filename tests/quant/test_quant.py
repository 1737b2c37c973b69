"""A frozen base in int8 / nf4 (src/quant): the quantised matmuls against bitsandbytes' own dequantisation,
loading layer by layer, every adapter method's gradients against the same method on the dequantised fp32 base,
adapter files (shape fingerprint, quant metadata), merging onto the dequantised base, and the loading peak."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from src.adapters.config import PROJECTIONS, AdapterConfig
from src.adapters.inject import adapter_parameters, inject_adapters, model_base_shapes, save_adapter
from src.adapters.merge import merge_weight
from src.checkpoint import save_tensors
from src.model import RWKV6, base_state_dict
from src.quant import QuantLinear, QuantWeight, quant_linear, quantize_dequantize
from tests.tiny import tiny_config, tiny_state_dict

bnbf = pytest.importorskip("bitsandbytes.functional")
QUANTS = ("int8", "nf4")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quant") / "base.pth"
    save_tensors(path, tiny_state_dict(tiny_config(n_layer=2, n_embd=128)))
    return path


def bnb_dequantized(w: torch.Tensor, quant: str) -> torch.Tensor:
    """bitsandbytes' own round trip, independent of QuantWeight.dequantize."""
    if quant == "int8":
        cb, scb, _ = bnbf.int8_vectorwise_quant(w.float().contiguous())
        return bnbf.int8_vectorwise_dequant(cb, scb)
    packed, state = bnbf.quantize_4bit(w.float().contiguous(), blocksize=64, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state)


@pytest.mark.parametrize("quant", QUANTS)
def test_matmuls_equal_bitsandbytes_dequantized_weight(quant: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(192, 128)
    qw = QuantWeight.from_weight(w, quant)
    deq = bnb_dequantized(w, quant)
    assert torch.equal(qw.dequantize(torch.float32), deq)
    x = torch.randn(3, 7, 128, requires_grad=True)
    g = torch.randn(3, 7, 192)
    torch.testing.assert_close(qw.matmul(x.detach()), x.detach() @ deq.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qw.matmul_t(g), g @ deq, rtol=1e-5, atol=1e-5)
    quant_linear(x, qw).backward(g)
    torch.testing.assert_close(x.grad, g @ deq, rtol=1e-5, atol=1e-5)
    # quantised size incl. state: int8 ≈ 0.5x, nf4 ≈ 0.28x of bf16
    ratio = qw.nbytes() / (w.numel() * 2)
    assert ratio < (0.52 if quant == "int8" else 0.3)


def dense_dequantized_model(path: Path, quant: str) -> RWKV6:
    """The fp32 base whose projection weights are deq(Q(W)): what a quantised model computes with."""
    model = RWKV6.from_checkpoint(path, dtype=torch.float32)
    with torch.no_grad():
        for name, t in base_state_dict(model).items():
            if name.rpartition(".")[0].split(".", 2)[-1] in PROJECTIONS:
                t.copy_(quantize_dequantize(t, quant))
    return model


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("quant", QUANTS)
def test_quantised_loading_matches_dequantised_base(ckpt: Path, tmp_path: Path, quant: str, suffix: str) -> None:
    path = ckpt
    if suffix == ".safetensors":
        path = tmp_path / "base.safetensors"
        save_tensors(path, tiny_state_dict(tiny_config(n_layer=2, n_embd=128)))
    model = RWKV6.from_checkpoint(path, dtype=torch.float32, quant=quant)
    quantised = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantised) == 2 * len(PROJECTIONS)
    assert not any(isinstance(m, torch.nn.Linear) and n != "head" for n, m in model.named_modules())
    assert model.emb.weight.dtype == torch.float32 and model.head.weight.dtype == torch.float32
    assert model_base_shapes(model) == model_base_shapes(RWKV6.from_checkpoint(path))
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), dense_dequantized_model(path, quant)(idx), rtol=1e-4, atol=1e-4)


def test_bf16_quantised_model_runs(ckpt: Path) -> None:
    model = RWKV6.from_checkpoint(ckpt, dtype=torch.bfloat16, quant="nf4")
    assert model.blocks[0].att.key.weight.dtype == torch.bfloat16
    logits = model(torch.randint(0, 256, (1, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


METHOD_CFGS = {
    "bone-row": AdapterConfig(method="bone", b=32, grouping="row"),
    "bone-col": AdapterConfig(method="bone", b=32, grouping="col"),
    "bone_unconstrained": AdapterConfig(method="bone_unconstrained", b=32),
    "bone_hadamard": AdapterConfig(method="bone_hadamard", b=32),
    "lora": AdapterConfig(method="lora", lora_r=8, lora_alpha=16.0),
    "pissa": AdapterConfig(method="pissa", lora_r=8, lora_alpha=8.0),
    "lora-att-only": AdapterConfig(method="lora", lora_r=8, targets=("att",)),
    "miss": AdapterConfig(method="miss", miss_r=32),
}


def _trained_like(model: RWKV6, cfg: AdapterConfig, seed: int = 1) -> None:
    torch.manual_seed(0)  # PiSSA's randomised SVD
    inject_adapters(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, cfg).values():  # trainable only (PiSSA's A0, B0 stay)
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def _loss_and_grads(model: RWKV6, cfg: AdapterConfig, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
    logits = model(idx)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in adapter_parameters(model, cfg).items()}


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("name", list(METHOD_CFGS))
def test_every_method_trains_on_a_quantised_base(ckpt: Path, quant: str, name: str) -> None:
    """Gradients on the quantised base equal the same method's on the dequantised fp32 base, and no dense
    projection weight is saved for backward."""
    cfg = METHOD_CFGS[name]
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    qmodel = RWKV6.from_checkpoint(ckpt, dtype=torch.float32, quant=quant)
    _trained_like(qmodel, cfg)
    weight_shapes = {tuple(m.shape) for m in qmodel.modules() if isinstance(m, QuantWeight)}
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        qloss, qgrads = _loss_and_grads(qmodel, cfg, idx)
    dense_saved = [s for s, dt in saved if s in weight_shapes and dt.is_floating_point]
    assert not dense_saved, f"dense projection weights saved for backward: {dense_saved}"
    dmodel = dense_dequantized_model(ckpt, quant)
    _trained_like(dmodel, cfg)
    dloss, dgrads = _loss_and_grads(dmodel, cfg, idx)
    torch.testing.assert_close(qloss, dloss, rtol=1e-5, atol=1e-5)
    assert qgrads.keys() == dgrads.keys() and qgrads
    for k in qgrads:
        torch.testing.assert_close(qgrads[k], dgrads[k], rtol=1e-4, atol=1e-6, msg=k)
    # the layers' merged weights are the dense ones
    dense_modules = dict(dmodel.named_modules())
    for n, m in qmodel.named_modules():
        if hasattr(m, "merged_weight"):
            torch.testing.assert_close(m.merged_weight(), dense_modules[n].merged_weight(), rtol=1e-5, atol=1e-5,
                                       msg=n)


@pytest.mark.parametrize("method", ["bone", "pissa"])
def test_save_load_and_merge_both_modes(ckpt: Path, tmp_path: Path, method: str) -> None:
    quant = "nf4"
    cfg = AdapterConfig(method=method, b=32, lora_r=8, quant=quant)
    model = RWKV6.from_checkpoint(ckpt, dtype=torch.float32, quant=quant)
    _trained_like(model, cfg)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, cfg, path)  # fingerprint of the dense shapes: fits the original base too
    from src.adapters.files import load_adapter_file

    tensors, loaded_cfg, meta = load_adapter_file(path)
    assert loaded_cfg.quant == quant and meta["quant"] == quant
    idx = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        want = model(idx)
        again = RWKV6.from_checkpoint(ckpt, dtype=torch.float32, quant=quant, adapter=path)
        torch.testing.assert_close(again(idx), want, rtol=1e-5, atol=1e-5)
        # merging onto the dequantised base gives the trained model exactly; onto the original it is close
        onto_deq = dense_dequantized_model(ckpt, quant)
        onto_orig = RWKV6.from_checkpoint(ckpt, dtype=torch.float32)
        for m in (onto_deq, onto_orig):
            for name, t in base_state_dict(m).items():
                prefix = name.rpartition(".")[0]
                per = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == prefix}
                if per:
                    t.copy_(merge_weight(t, per, loaded_cfg))
        torch.testing.assert_close(onto_deq(idx), want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(onto_orig(idx), want, rtol=1e-4, atol=1e-4)
        # the original-base merge still loads onto a plain dense base (same shape fingerprint)
        dense = RWKV6.from_checkpoint(ckpt, dtype=torch.float32, adapter=path)
        assert torch.isfinite(dense(idx)).all()


def test_quant_metadata_is_backward_compatible() -> None:
    meta = AdapterConfig(method="bone").to_metadata()
    assert meta["quant"] == "none"
    del meta["quant"]  # files written before the field existed
    assert AdapterConfig.from_metadata(meta).quant == "none"
    assert AdapterConfig.from_metadata(AdapterConfig(quant="int8").to_metadata()).quant == "int8"
    from src.errors import ConfigError

    with pytest.raises(ConfigError, match="quant"):
        AdapterConfig(quant="fp8")


def test_resume_fingerprint_covers_quant() -> None:
    from src.config import ADAPTER_SETTINGS, TrainConfig

    assert "quant" in ADAPTER_SETTINGS
    a = TrainConfig(n_layer=2, n_embd=64, vocab_size=256, peft="bone", dry_run=True)
    b = TrainConfig(n_layer=2, n_embd=64, vocab_size=256, peft="bone", dry_run=True, quant="nf4")
    assert a.adapter_fingerprint() != b.adapter_fingerprint()
    assert b.adapter.quant == "nf4"


PEAK_CHILD = r"""
import json, resource, sys, threading, time
import torch
torch.set_num_threads(1)
from src.model import RWKV6
from src.quant import QuantWeight
QuantWeight.from_weight(torch.randn(64, 64), sys.argv[2]).matmul(torch.randn(2, 64))  # imports, kernels
RWKV6.from_checkpoint(sys.argv[3], dtype=torch.bfloat16, quant=sys.argv[2])  # warm the code paths on a tiny model
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
peak = [0]; stop = [False]
def watch():
    while not stop[0]:
        peak[0] = max(peak[0], anon()); time.sleep(0.0005)
before = anon()
t = threading.Thread(target=watch); t.start()
model = RWKV6.from_checkpoint(sys.argv[1], dtype=torch.bfloat16, quant=sys.argv[2] if sys.argv[2] != "none" else None)
stop[0] = True; t.join()
peak[0] = max(peak[0], anon())
print(json.dumps({"peak_growth": peak[0] - before, "held": anon() - before}))
"""


def test_loading_peak_stays_below_the_bf16_model(tmp_path: Path) -> None:
    cfg = tiny_config(n_layer=6, n_embd=512, vocab_size=256)
    path, small = tmp_path / "base.pth", tmp_path / "small.pth"
    save_tensors(small, tiny_state_dict(tiny_config(n_layer=1, n_embd=64, vocab_size=256)))
    sd = tiny_state_dict(cfg, dtype=torch.bfloat16)
    save_tensors(path, sd)
    bf16_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    del sd
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(path), "nf4", str(small)], cwd=root, env=env,
                         check=True, capture_output=True, text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["peak_growth"] < 0.6 * bf16_bytes, (got, bf16_bytes)


def _saved_nf4_adapter(ckpt: Path, path: Path) -> tuple[RWKV6, AdapterConfig]:
    """A randomised (trained-like) Bone adapter on the nf4 base, saved to `path`."""
    cfg = AdapterConfig(method="bone", b=32, quant="nf4")
    model = RWKV6.from_checkpoint(ckpt, dtype=torch.float32, quant="nf4")
    _trained_like(model, cfg)
    save_adapter(model, cfg, path)
    return model, cfg


def test_open_merged_onto_the_dequantised_base(ckpt: Path, tmp_path: Path) -> None:
    from src.adapters.export import open_merged
    from src.checkpoint import load_tensors

    path = tmp_path / "adapter.safetensors"
    model, cfg = _saved_nf4_adapter(ckpt, path)
    base = load_tensors(ckpt)
    key = "blocks.1.ffn.key.weight"
    bone = {"bone": adapter_parameters(model, cfg)["blocks.1.ffn.key.bone"].detach()}
    onto_deq = open_merged(ckpt, path, quant="nf4").produce(key)
    onto_orig = open_merged(ckpt, path).produce(key)
    torch.testing.assert_close(onto_deq, merge_weight(quantize_dequantize(base[key], "nf4"), bone, cfg))
    torch.testing.assert_close(onto_orig, merge_weight(base[key], bone, cfg))


def test_merge_bone_cli_quant_merges_onto_the_dequantised_base(ckpt: Path, tmp_path: Path) -> None:
    """`merge_bone.py --quant nf4` writes what open_merged(quant="nf4") describes; without it the original base."""
    import merge_bone
    from src.adapters.export import open_merged
    from src.checkpoint import load_tensors

    adapter = tmp_path / "adapter.safetensors"
    _saved_nf4_adapter(ckpt, adapter)
    key = "blocks.1.ffn.key.weight"
    for extra, quant in (([], None), (["--quant", "nf4"], "nf4")):
        out = tmp_path / f"merged_{quant}.safetensors"
        assert merge_bone.main(["--base_model", str(ckpt), "--bone", str(adapter), "--output", str(out), *extra]) == 0
        expected = open_merged(ckpt, adapter, quant=quant).produce(key)
        torch.testing.assert_close(load_tensors(out)[key].float(), expected.float())
    a, b = load_tensors(tmp_path / "merged_None.safetensors"), load_tensors(tmp_path / "merged_nf4.safetensors")
    assert not torch.equal(a[key], b[key])  # the two modes differ, so the test can fail
    assert merge_bone.main(["--base_model", str(ckpt), "--bone", str(adapter), "--output",
                            str(tmp_path / "wrong.safetensors"), "--quant", "int8"]) == 2  # trained on nf4
    assert not (tmp_path / "wrong.safetensors").exists()
    assert merge_bone.main(["--base_model", str(ckpt), "--output", str(tmp_path / "x.pth"), "--quant", "nf4"]) == 2


def test_eval_script_loads_the_base_quantised(tmp_path: Path) -> None:
    """scripts/eval.py --quant scores a model as train.py --quant trained it: its held-out loss equals that of
    RWKV6.from_checkpoint(quant=...) and differs from the dense base's."""
    from scripts import eval as eval_script
    from src.evaluation.evaluate import held_out_loss

    path = tmp_path / "base.safetensors"
    save_tensors(path, tiny_state_dict(tiny_config(n_layer=1, n_embd=128, vocab_size=65536), noise=0.5))
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"text": f"Tom has {i} apples and {i + 3} pears."}) + "\n"
                            for i in range(6)))
    out = tmp_path / "eval.json"
    argv = ["--model", str(path), "--loss_file", str(data), "--ctx_len", "16", "--wkv_backend", "torch"]
    assert eval_script.main([*argv, "--quant", "nf4", "--json", str(out)]) == 0
    loss = json.loads(out.read_text())["loss"]
    quantised = RWKV6.from_checkpoint(path, quant="nf4", wkv_backend="torch").eval()
    dense = RWKV6.from_checkpoint(path, wkv_backend="torch").eval()
    assert loss == pytest.approx(held_out_loss(quantised, data, 16, 8), rel=1e-6)
    assert abs(loss - held_out_loss(dense, data, 16, 8)) > 1e-4
