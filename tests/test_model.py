"""RWKV6 model: parity with the official `rwkv` inference package, recurrent == parallel, strict loading."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from src.checkpoint import save_tensors
from src.errors import CheckpointError, ConfigError
from src.model import RWKV6, RWKV6Config
from tests.tiny import tiny_config, tiny_state_dict

TOKENS = [5, 17, 200, 3, 99, 42, 0, 7, 130, 255, 1, 64, 12, 88, 31, 9, 250, 77, 4]


def official_logits(sd_fp32: dict[str, torch.Tensor], tmp_path: Path) -> torch.Tensor:
    """All-position logits from BlinkDL's `rwkv` package (pure-torch CPU fp32 path)."""
    os.environ["RWKV_JIT_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "0"
    os.environ["RWKV_V7_ON"] = "0"
    from rwkv.model import RWKV as OfficialRWKV

    path = tmp_path / "official.pth"
    torch.save({k: v.clone() for k, v in sd_fp32.items()}, path)
    model = OfficialRWKV(model=str(path), strategy="cpu fp32", verbose=False)
    out, _ = model.forward(TOKENS, None, full_output=True)
    return out.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dims", [(32, 64), (64, 128)], ids=["mix32_decay64", "mix64_decay128"])
def test_logits_match_official_rwkv_package(tmp_path: Path, dtype: torch.dtype, dims: tuple[int, int]) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(n_layer=3, n_embd=128, vocab_size=256, d_mix=dims[0], d_decay=dims[1])
    sd = tiny_state_dict(cfg, seed=3, dtype=dtype)
    # The file in its own dtype goes to our loader; the rwkv package gets an fp32 copy of the same values,
    # because it folds ln0 into the embedding in the file's dtype (lossy for bf16).
    ours_path = tmp_path / f"tiny_{dtype}.pth"
    torch.save(sd, ours_path)
    ref = official_logits({k: v.float() for k, v in sd.items()}, tmp_path)

    model = RWKV6.from_checkpoint(ours_path, wkv_backend="torch").eval()
    assert model.cfg.d_mix == dims[0] and model.cfg.d_decay == dims[1] and model.cfg.n_layer == 3
    with torch.no_grad():
        ours = model(torch.tensor([TOKENS]))[0]
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert torch.isfinite(ours).all()
    assert rel < 1e-4, f"relative error {rel:.2e} vs the rwkv package"


def test_recurrent_state_form_equals_parallel() -> None:
    torch.manual_seed(0)
    model = RWKV6(tiny_config())
    model.load_base_state_dict(tiny_state_dict(tiny_config(), seed=1))
    model.eval()
    idx = torch.randint(0, 256, (2, 21))
    with torch.no_grad():
        full = model(idx)
        state = model.init_state(2)
        step = []
        for t in range(21):
            out, state = model(idx[:, t : t + 1], state)
            step.append(out)
        # chunked with state: 8 + 13 tokens
        a, st = model(idx[:, :8], model.init_state(2))
        b, _ = model(idx[:, 8:], st)
    scale = full.abs().max()
    assert (torch.cat(step, 1) - full).abs().max() / scale < 1e-5
    assert (torch.cat([a, b], 1) - full).abs().max() / scale < 1e-5


def test_grad_checkpointing_gives_same_gradients() -> None:
    cfg = tiny_config()
    sd = tiny_state_dict(cfg, seed=2)
    idx = torch.randint(0, 256, (2, 9))
    grads = []
    for grad_cp in (False, True):
        model = RWKV6(cfg).with_runtime(grad_cp=grad_cp)
        model.load_base_state_dict(sd)
        model.train()
        model(idx).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


def test_sizes_inferred_from_shapes(tmp_path: Path) -> None:
    cfg = RWKV6Config(n_layer=2, n_embd=128, vocab_size=300, dim_ffn=416, head_size=32, d_mix=64, d_decay=128)
    path = tmp_path / "m.safetensors"
    save_tensors(path, tiny_state_dict(cfg))
    model = RWKV6.from_checkpoint(path)
    c = model.cfg
    assert (c.n_layer, c.n_embd, c.vocab_size, c.dim_att, c.dim_ffn, c.head_size, c.d_mix, c.d_decay) == (
        2, 128, 300, 128, 416, 32, 64, 128)


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(sd, path)
    return path


def test_missing_unexpected_and_misshaped_are_listed_together(tmp_path: Path) -> None:
    sd = tiny_state_dict()
    del sd["blocks.1.att.gate.weight"]
    sd["blocks.1.att.extra"] = torch.zeros(3)
    sd["blocks.0.ffn.time_maa_k"] = torch.zeros(1, 1, 64)
    with pytest.raises(CheckpointError) as e:
        RWKV6.from_checkpoint(_save(sd, tmp_path / "bad.pth"))
    msg = str(e.value)
    assert "blocks.1.att.gate.weight" in msg and "blocks.1.att.extra" in msg and "blocks.0.ffn.time_maa_k" in msg
    assert "missing (1)" in msg and "unexpected (1)" in msg and "wrong shape (1)" in msg


@pytest.mark.parametrize(
    "keys, expect",
    [
        ({"emb.weight": (256, 64), "blocks.0.att.w0": (1, 1, 64), "blocks.0.att.a0": (1, 1, 64)}, "RWKV-7"),
        ({"emb.weight": (256, 64), "blocks.0.att.time_mix_k": (1, 1, 64), "blocks.0.att.time_faaaa": (4, 16)},
         "RWKV-5"),
        ({"emb.weight": (256, 64), "blocks.0.att.time_first": (64,)}, "RWKV-4"),
        ({"transformer.wte.weight": (256, 64), "lm_head.weight": (256, 64)}, "not an RWKV checkpoint"),
        ({"model.emb.weight": (256, 64), "model.blocks.0.ln1.weight": (64,)}, "'model.'"),
    ],
    ids=["rwkv7", "rwkv5", "rwkv4", "not_rwkv", "wrapped"],
)
def test_wrong_architecture_is_named(tmp_path: Path, keys: dict[str, tuple[int, ...]], expect: str) -> None:
    sd = {k: torch.zeros(s) for k, s in keys.items()}
    with pytest.raises(CheckpointError, match=expect):
        RWKV6.from_checkpoint(_save(sd, tmp_path / "x.pth"))


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    good = _save(tiny_state_dict(), tmp_path / "good.pth")
    data = good.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        RWKV6.from_checkpoint(tmp_path / "cut.pth")
    st = tmp_path / "good.safetensors"
    save_tensors(st, tiny_state_dict())
    (tmp_path / "cut.safetensors").write_bytes(st.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        RWKV6.from_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        RWKV6.from_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        RWKV6.from_checkpoint(tmp_path / "empty.pth")


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    sd = dict(tiny_state_dict())
    sd["evil"] = _Evil(str(marker))  # type: ignore[assignment]
    path = tmp_path / "evil.pth"
    torch.save(sd, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="could run code"):
        RWKV6.from_checkpoint(path)
    assert not marker.exists()
    # the crafted file really does run code when loaded unsafely, so the test above can fail
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_nonpositive_sizes_rejected() -> None:
    with pytest.raises(ConfigError):
        RWKV6Config(n_layer=0, n_embd=64, vocab_size=10)
    with pytest.raises(ConfigError, match="head_size"):
        RWKV6Config(n_layer=1, n_embd=96, vocab_size=10, head_size=64)


def _official_x060_init(cfg: RWKV6Config) -> dict[str, torch.Tensor]:
    """The deterministic tensors of the official x060 from-scratch init (BlinkDL/RWKV-LM RWKV-v5/src/model.py,
    RWKV_Tmix_x060 / RWKV_CMix_x060 `__init__` and generate_init_weight), written out in float64 loops."""
    C, A, L = cfg.n_embd, cfg.dim_att, cfg.n_layer
    out: dict[str, torch.Tensor] = {}
    for i in range(L):
        r01, r10 = i / (L - 1), 1.0 - i / L
        ddd = [c / C for c in range(C)]

        def vec(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float64).view(1, 1, -1)

        p = f"blocks.{i}."
        for name in ("x", "w", "k"):
            out[p + f"att.time_maa_{name}"] = vec([1 - d**r10 for d in ddd])
        out[p + "att.time_maa_v"] = vec([1 - (d**r10 + 0.3 * r01) for d in ddd])
        for name in ("r", "g"):
            out[p + f"att.time_maa_{name}"] = vec([1 - d ** (0.5 * r10) for d in ddd])
        out[p + "att.time_decay"] = vec([-6 + 5 * (n / (A - 1)) ** (0.7 + 1.3 * r01) for n in range(A)])
        out[p + "att.time_faaaa"] = torch.tensor(
            [r01 * (1 - n / (A - 1)) + ((n + 1) % 3 - 1) * 0.1 for n in range(A)], dtype=torch.float64
        ).view(cfg.n_head, cfg.head_size)
        out[p + "att.ln_x.weight"] = torch.full((A,), ((1 + i) / L) ** 0.7, dtype=torch.float64)
        for name in ("k", "r"):
            out[p + f"ffn.time_maa_{name}"] = vec([1 - d ** (r10**3) for d in ddd])
    return out


def test_from_scratch_init_matches_official_x060() -> None:
    cfg = tiny_config(n_layer=4, n_embd=128, vocab_size=256)
    model = RWKV6(cfg)
    model.init_weights(seed=0)
    sd = dict(model.state_dict())

    # closed forms of every deterministic tensor
    for name, want in _official_x060_init(cfg).items():
        torch.testing.assert_close(sd[name].double(), want, rtol=0, atol=1e-6, msg=name)
    # pinned channel-mix values: layer 2 of 4 (r10 = 1/2), layer 3 (r10 = 1/4); exponent r10**3
    assert abs(sd["blocks.2.ffn.time_maa_k"][0, 0, 64].item() - 0.08299595679532878) < 1e-6  # 1 - 0.5**0.125
    assert abs(sd["blocks.3.ffn.time_maa_r"][0, 0, 96].item() - 0.004484944844264205) < 1e-6  # 1 - 0.75**(1/64)
    assert abs(sd["blocks.1.ffn.time_maa_k"][0, 0, 32].item() - 0.4428066287020538) < 1e-6  # 1 - 0.25**0.421875

    # orthogonal with gain g <=> every singular value equals g
    gains = {"att.receptance": 1.0, "att.key": 0.1, "att.value": 1.0, "att.gate": 0.1, "ffn.key": 1.0}
    for i in range(cfg.n_layer):
        for part, gain in gains.items():
            sv = torch.linalg.svdvals(sd[f"blocks.{i}.{part}.weight"].double())
            torch.testing.assert_close(sv, torch.full_like(sv, gain), rtol=0, atol=1e-5, msg=f"{i}.{part}")
        for part in ("att.output.weight", "ffn.receptance.weight", "ffn.value.weight", "att.time_maa_w1",
                     "att.time_decay_w1", "att.ln_x.bias", "ln1.bias", "ln2.bias"):
            assert not sd[f"blocks.{i}.{part}"].any(), f"blocks.{i}.{part} should be zero"
        for part in ("att.time_maa_w2", "att.time_decay_w2"):
            t = sd[f"blocks.{i}.{part}"]
            assert t.abs().max() <= 0.01 and t.abs().max() > 0.009 and t.std() > 0.005, part
        assert (sd[f"blocks.{i}.ln1.weight"] == 1).all() and (sd[f"blocks.{i}.ln2.weight"] == 1).all()
    sv = torch.linalg.svdvals(sd["head.weight"].double())
    torch.testing.assert_close(sv, torch.full_like(sv, 0.5 * (256 / 128) ** 0.5), rtol=0, atol=1e-5)
    emb = sd["emb.weight"]
    assert emb.abs().max() <= 1e-4 and emb.abs().max() > 0.9e-4
    assert (sd["blocks.0.ln0.weight"] == 1).all() and (sd["ln_out.weight"] == 1).all() and not sd["ln_out.bias"].any()

    # deterministic given the seed, different for another seed
    again = RWKV6(cfg)
    again.init_weights(seed=0)
    assert all(torch.equal(t, again.state_dict()[k]) for k, t in sd.items())
    other = RWKV6(cfg)
    other.init_weights(seed=1)
    assert not torch.equal(other.state_dict()["blocks.0.att.key.weight"], sd["blocks.0.att.key.weight"])
