"""Hostile and broken inputs: pickles that would run code are refused by every loader; wrong architectures,
corrupt or truncated files, NaN/Inf weights, mismatched adapters, broken data, bad sizes and output paths that
are inputs all end in one clear error (exit code 2, our error type), never a traceback, a hang or silent
garbage. Hypothesis fuzzes the adapter loader and the trainer's dataset building."""
from __future__ import annotations

import ast
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge_bone
import train
from src.adapters.config import AdapterConfig
from src.adapters.inject import inject_adapters, load_adapter_into, save_adapter
from src.checkpoint import save_tensors
from src.data.binidx import BinIdxWriter
from src.data.dataset import build_datasets
from src.data.tokenizer import WorldTokenizer
from src.errors import AdapterError, CheckpointError, RWKVBoneError
from src.model import RWKV6, base_state_dict
from src.training.states import SafeAtomicCheckpointIO
from tests.tiny import tiny_config, tiny_state_dict

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 65536  # the World tokenizer's ids need the full vocabulary


# ---------------------------------------------------------------------------------------------- assets
@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile_assets")
    torch.save(tiny_state_dict(tiny_config(n_layer=2, n_embd=64, vocab_size=VOCAB), seed=5), d / "base.pth")
    lines = [json.dumps({"prompt": f"What is {a} plus {b}?", "response": f"{a + b}."})
             for a in range(4) for b in range(2)]
    (d / "sft.jsonl").write_text("\n".join(lines) + "\n")
    return {"base": d / "base.pth", "sft": d / "sft.jsonl", "dir": d}


def train_args(assets: dict[str, Path], proj: Path, **over: object) -> list[str]:
    args = {"load_model": assets["base"], "data_file": assets["sft"], "data_type": "sft", "proj_dir": proj,
            "peft": "bone", "bone_b": 32, "ctx_len": 32, "micro_bsz": 2, "epoch_count": 1, "accelerator": "cpu",
            "precision": "fp32", "wkv_backend": "torch", "val_fraction": 0.0, "seed": 7}
    args.update(over)
    return [item for k, v in args.items() if v is not None for item in (f"--{k}", str(v))]


def refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run train.main in this process: it must return 2 with one `error:` message; returns the message.
    Any exception other than ours escapes main and fails the test (a raw traceback for the user)."""
    code = train.main(args)
    err = capsys.readouterr().err
    assert code == 2, f"train.py accepted the input (exit {code}); stderr: {err[-2000:]}"
    message = err[err.index("error: "):]
    assert "Traceback" not in message
    return message


# ---------------------------------------------------------------------------------------------- pickles that run code
class RunsCommand:
    """Unpickling calls os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (os.system, (self.command,))


class CreatesFile:
    """Unpickling calls Path.touch(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[Path]]:
        return (Path.touch, (self.marker,))


def evil_file(path: Path, content: dict[str, object], marker: Path) -> Path:
    """torch.save of `content` plus two payloads: one runs `touch marker`, one creates marker.file."""
    torch.save({**content, "payload": RunsCommand(f"touch {marker}"),
                "payload2": CreatesFile(marker.with_suffix(".file"))}, path)
    return path


def nothing_ran(marker: Path) -> bool:
    return not marker.exists() and not marker.with_suffix(".file").exists()


def test_control_the_crafted_pickle_really_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = evil_file(tmp_path / "evil.pth", {"emb.weight": torch.zeros(2)}, marker)
    assert nothing_ran(marker)
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.exists() and marker.with_suffix(".file").exists()


def test_train_py_refuses_a_code_running_base_model(assets: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    evil = evil_file(tmp_path / "evil.pth", torch.load(assets["base"], weights_only=True), marker)
    for extra in ({}, {"dry_run": 1}):
        message = refused(train_args(assets, tmp_path / "p", load_model=evil, **extra), capsys)
        assert "refused to load" in message and "run code" in message
    assert nothing_ran(marker)


def test_resume_refuses_a_code_running_training_state(assets: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    state = {"state_dict": {}, "epoch": 0, "global_step": 0, "rwkv_bone": {}}
    explicit = evil_file(tmp_path / "evil.ckpt", state, marker)
    message = refused(train_args(assets, tmp_path / "p", resume=explicit), capsys)
    assert "refused to load" in message and "could run code" in message
    proj = tmp_path / "auto"
    (proj / "checkpoints").mkdir(parents=True)
    evil_file(proj / "checkpoints" / "state-epoch000001.ckpt", state, marker)
    message = refused(train_args(assets, proj, resume="auto"), capsys)
    assert "state-epoch000001.ckpt" in message and "refused to load" in message
    with pytest.raises(CheckpointError, match="refused to load"):
        SafeAtomicCheckpointIO().load_checkpoint(explicit)
    assert nothing_ran(marker)


def _adapter_and_model(tmp_path: Path) -> tuple[Path, Path]:
    """A valid adapter file (random bones) and its base checkpoint, on a tiny vocabulary."""
    cfg = tiny_config(n_layer=2, n_embd=64, vocab_size=256)
    sd = tiny_state_dict(cfg, seed=1)
    base = tmp_path / "small_base.pth"
    torch.save(sd, base)
    model = RWKV6(cfg)
    model.load_base_state_dict(sd)
    acfg = AdapterConfig(b=32)
    inject_adapters(model, acfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bone"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(model, acfg, adapter)
    return adapter, base


def test_adapter_loading_and_merge_refuse_code_running_files(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    adapter, base = _adapter_and_model(tmp_path)
    tensors = dict(torch.load(base, weights_only=True))
    evil_base = evil_file(tmp_path / "evil_base.pth", tensors, marker)
    evil_adapters = [evil_file(tmp_path / f"evil_adapter{s}", {"blocks.0.att.key.bone": torch.zeros(2, 32, 32)}, marker)
                     for s in (".safetensors", ".pth")]
    for evil in evil_adapters:
        with pytest.raises(AdapterError, match=r"not a readable safetensors file|adapter files are \.safetensors"):
            load_adapter_into(RWKV6.from_checkpoint(base), evil)
        with pytest.raises(AdapterError):
            RWKV6.from_checkpoint(base, adapter=evil)
    with pytest.raises(CheckpointError, match="refused to load"):
        RWKV6.from_checkpoint(evil_base, adapter=adapter)
    out = tmp_path / "merged.pth"
    for base_arg, adapter_arg in [(evil_base, adapter)] + [(base, a) for a in evil_adapters]:
        assert merge_bone.main(["--base_model", str(base_arg), "--bone", str(adapter_arg), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("merge_bone.py: error:") and err.count("\n") == 1, err
    assert not out.exists()
    assert nothing_ran(marker)


PICKLE_LOADERS = ("pickle.load", "pickle.loads", "dill.load", "cloudpickle.load", "marshal.load", "eval", "exec")


def unsafe_loads(source: str) -> list[str]:
    """Calls in `source` that could run code from a file: torch.load without weights_only=True, pickle-style
    loaders, np.load(allow_pickle=True), yaml.load (not safe_load), eval/exec."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        true = {k.arg for k in node.keywords if isinstance(k.value, ast.Constant) and k.value.value is True}
        if ((name.endswith("torch.load") and "weights_only" not in true) or name in PICKLE_LOADERS
                or (name in ("np.load", "numpy.load") and "allow_pickle" in true)
                or name in ("yaml.load", "yaml.unsafe_load")):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_unsafe_load_anywhere_in_the_code() -> None:
    controls = ["torch.load(p)", "torch.load(p, weights_only=False)", "pickle.load(f)", "np.load(p, allow_pickle=True)",
                "yaml.load(s)", "eval(s)"]
    assert all(unsafe_loads(c) for c in controls), "the scanner misses an unsafe call"
    assert not unsafe_loads("torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(s)\nnp.load(p)")
    files = [ROOT / "train.py", ROOT / "merge_bone.py", *sorted((ROOT / "src").rglob("*.py")),
             *sorted((ROOT / "scripts").rglob("*.py"))]
    problems = {str(f.relative_to(ROOT)): found for f in files if (found := unsafe_loads(f.read_text()))}
    assert not problems, problems


# ---------------------------------------------------------------------------------------------- base checkpoints
def _tensors(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s) for k, s in keys.items()}


def _base(assets: dict[str, Path]) -> dict[str, torch.Tensor]:
    return dict(torch.load(assets["base"], weights_only=True))


def _poisoned(value: float, dtype: torch.dtype = torch.float32) -> Callable[[dict[str, Path]], dict[str, torch.Tensor]]:
    def build(assets: dict[str, Path]) -> dict[str, torch.Tensor]:
        sd = {k: v.to(dtype) for k, v in _base(assets).items()}
        sd["blocks.1.att.key.weight"][3, 5] = value
        return sd
    return build


def _int8(assets: dict[str, Path]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.int8) if k.endswith("key.weight") else v for k, v in _base(assets).items()}


BASES: dict[str, tuple[Callable[[dict[str, Path]], object], str, str]] = {
    # id: (content, file name, expected message)
    "rwkv5": (lambda a: _tensors({"emb.weight": (VOCAB, 64), "blocks.0.att.time_mix_k": (1, 1, 64),
                                  "blocks.0.att.time_faaaa": (1, 64)}), "m.pth", "RWKV-5"),
    "rwkv7": (lambda a: _tensors({"emb.weight": (VOCAB, 64), "blocks.0.att.w0": (1, 1, 64),
                                  "blocks.0.att.a0": (1, 1, 64)}), "m.pth", "RWKV-7"),
    "rwkv4": (lambda a: _tensors({"emb.weight": (VOCAB, 64), "blocks.0.att.time_first": (64,)}), "m.pth", "RWKV-4"),
    "gpt2": (lambda a: _tensors({"transformer.wte.weight": (VOCAB, 64),
                                 "transformer.h.0.attn.c_attn.weight": (64, 192)}), "m.safetensors",
             "not an RWKV checkpoint"),
    "lightning_ckpt": (lambda a: {"state_dict": _base(a), "epoch": 3}, "m.ckpt", "training checkpoint"),
    "wrapped_keys": (lambda a: {f"model.{k}": v for k, v in _base(a).items()}, "m.pth", "'model.'"),
    "not_a_dict": (lambda a: [torch.zeros(3)], "m.pth", "flat dict"),
    "nan_weight": (_poisoned(float("nan")), "m.pth", r"(?=.*blocks\.1\.att\.key\.weight)(?=.*NaN/Inf)"),
    "inf_weight": (_poisoned(float("inf"), torch.bfloat16), "m.safetensors",
                   r"(?=.*blocks\.1\.att\.key\.weight)(?=.*NaN/Inf)"),
    "int8_weights": (_int8, "m.pth", r"(?=.*key\.weight \(torch\.int8\))(?=.*not floating point)"),
}


@pytest.mark.parametrize("case", sorted(BASES))
def test_bad_base_checkpoints_are_refused(assets: dict[str, Path], tmp_path: Path, case: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    build, name, expected = BASES[case]
    path = tmp_path / name
    content = build(assets)
    if name.endswith(".safetensors"):
        save_tensors(path, content)  # type: ignore[arg-type]
    else:
        torch.save(content, path)
    message = refused(train_args(assets, tmp_path / "p", load_model=path), capsys)
    assert re.search(expected, message, flags=re.DOTALL), message


@pytest.mark.parametrize("case", ["truncated_pth", "truncated_safetensors", "garbage_pth", "empty", "folder",
                                  "safetensors_header_lies", "missing"])
def test_broken_base_files_are_refused(assets: dict[str, Path], tmp_path: Path, case: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = assets["base"].read_bytes()
    st = tmp_path / "good.safetensors"
    save_tensors(st, _base(assets))
    path = tmp_path / f"{case}.pth"
    if case == "truncated_pth":
        path.write_bytes(data[: len(data) // 3])
    elif case == "truncated_safetensors":
        path = tmp_path / "cut.safetensors"
        path.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif case == "garbage_pth":
        path.write_bytes(np.random.default_rng(0).bytes(10_000))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "folder":
        path.mkdir()
    elif case == "safetensors_header_lies":  # a header claiming 1 TB of data
        header = json.dumps({"emb.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 18], "data_offsets": [0, 1 << 40]}})
        path = tmp_path / "lies.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 64)
    message = refused(train_args(assets, tmp_path / "p", load_model=path), capsys)
    assert str(path.name) in message
    assert any(w in message for w in ("truncated", "corrupt", "empty", "folder", "no such file")), message


# ---------------------------------------------------------------------------------------------- adapters
ADAPTER_CASES = {  # id: (how to spoil the adapter file or pick the base, expected message)
    "other_base": ("base with 3 layers", "different base model"),
    "block_size_16_in_metadata": ({"b": "16"}, "does not fit"),
    "block_size_0": ({"b": "0"}, "positive integer"),
    "block_size_negative": ({"b": "-32"}, "positive integer"),
    "unknown_method": ({"method": "dora"}, "unknown"),
    "newer_format": ({"format_version": "9"}, "newer"),
    "nan": ("NaN in one bone", r"NaN/Inf"),
    "inf": ("Inf in one bone", r"NaN/Inf"),
    "truncated": ("last 1000 bytes cut", "truncated or corrupt"),
    "base_as_adapter": ("the base model saved as .safetensors", "not an adapter file"),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_mismatched_and_poisoned_adapters_are_refused(tmp_path: Path, case: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    adapter, base = _adapter_and_model(tmp_path)
    with safe_open(str(adapter), framework="pt") as f:
        meta = dict(f.metadata())
    bones = load_file(str(adapter))
    first = min(bones)
    spoil, expected = ADAPTER_CASES[case]
    if isinstance(spoil, dict):
        adapter = _rewrite(tmp_path, case, bones, {**meta, **spoil})
    elif case == "other_base":
        base = tmp_path / "other_base.pth"
        torch.save(tiny_state_dict(tiny_config(n_layer=3, n_embd=64, vocab_size=256), seed=1), base)
    elif case in ("nan", "inf"):
        bones[first][0, 1, 2] = float(case)
        adapter = _rewrite(tmp_path, case, bones, meta)
    elif case == "truncated":
        adapter = _cut(adapter, tmp_path / "cut.safetensors")
    else:
        adapter = _as_safetensors(dict(torch.load(base, weights_only=True)), tmp_path / "base_as.safetensors")
    with pytest.raises(AdapterError, match=expected):
        load_adapter_into(RWKV6.from_checkpoint(base), adapter)
    out = tmp_path / "merged.pth"
    code = merge_bone.main(["--base_model", str(base), "--bone", str(adapter), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and re.search(expected, err) and not out.exists(), err


def _rewrite(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    path = tmp_path / f"adapter_{name}.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _cut(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size - 1000])
    return dst


def _as_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(tensors, str(path))
    return path


@st.composite
def mutated_adapter(draw: st.DrawFn, source: Path) -> bytes:
    """The valid adapter file `source` with its header JSON edited (shapes, dtypes, offsets, metadata) and/or
    bytes flipped, cut or appended."""
    valid = source.read_bytes()
    (n,) = struct.unpack("<Q", valid[:8])
    header = json.loads(valid[8: 8 + n])
    body = valid[8 + n:]
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(header)))
        if key == "__metadata__":
            field = draw(st.sampled_from(sorted(header[key])))
            header[key][field] = draw(st.sampled_from(["0", "-32", "16", "64", "", "x", "bone", "lora", "9", "row,col"])
                                      | st.text(max_size=6))
        else:
            part = draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete"]))
            if part == "delete":
                del header[key]
            elif part == "dtype":
                header[key]["dtype"] = draw(
                    st.sampled_from(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X"]))
            elif part == "shape":
                header[key]["shape"] = draw(st.lists(st.integers(0, 70), max_size=4))
            else:
                header[key]["data_offsets"] = sorted(
                    draw(st.lists(st.integers(0, len(body) + 64), min_size=2, max_size=2)))
    raw = json.dumps(header).encode()
    data = bytearray(struct.pack("<Q", len(raw)) + raw + body)
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["flip", "cut", "append"]))
        if action == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[draw(st.integers(0, len(data))):]
        else:
            data.extend(draw(st.binary(max_size=32)))
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RWKV6]:
    adapter, base = _adapter_and_model(tmp_path_factory.mktemp("fuzz_adapter"))
    return adapter, RWKV6.from_checkpoint(base)


def test_fuzz_adapter_loader_loads_faithfully_or_raises_adapter_error(fuzz_adapter: tuple[Path, RWKV6]) -> None:
    valid, base_model = fuzz_adapter
    base_sd = {k: v.clone() for k, v in base_state_dict(base_model).items()}

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mutated_adapter(valid))
    def check(data: bytes) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "a.safetensors"
            path.write_bytes(data)
            model = RWKV6(base_model.cfg)
            model.load_base_state_dict(base_sd)
            try:
                load_adapter_into(model, path)
            except AdapterError:
                return
            loaded = load_file(str(path))
            params = dict(model.named_parameters())
            assert loaded and all(torch.equal(params[k].detach(), v.to(params[k].dtype)) for k, v in loaded.items())
            assert all(torch.isfinite(v).all() for v in loaded.values()), "an adapter with NaN/Inf was accepted"
            # Finite but huge values (a flipped exponent bit) load faithfully and may overflow the logits:
            # the loader's contract is "exactly what the file holds, or AdapterError", not "a good adapter".
            assert model(torch.tensor([[1, 2, 3, 4]])).shape == (1, 4, model.cfg.vocab_size)

    check()


# ---------------------------------------------------------------------------------------------- data
def _binidx(prefix: Path, docs: list[list[int]], dtype: type = np.uint16) -> Path:
    with BinIdxWriter(prefix, dtype=dtype) as w:
        for doc in docs:
            w.add_document(doc)
    return prefix


def _data_case(case: str, tmp_path: Path) -> tuple[dict[str, object], str]:
    """(train.py flags, expected message) for one broken data input."""
    docs = [[int(t) for t in np.arange(1, 200) + i] for i in range(4)]
    if case == "binidx_truncated_bin":
        p = _binidx(tmp_path / "d", docs)
        Path(f"{p}.bin").write_bytes(Path(f"{p}.bin").read_bytes()[:-10])
        return {"data_file": p, "data_type": "binidx"}, "truncated"
    if case == "binidx_inconsistent_idx":
        p = _binidx(tmp_path / "d", docs)
        idx = bytearray(Path(f"{p}.idx").read_bytes())
        idx[34 + 16 + 8] ^= 0x01  # the second document's pointer
        Path(f"{p}.idx").write_bytes(bytes(idx))
        return {"data_file": p, "data_type": "binidx"}, "pointer"
    if case == "binidx_missing_idx":
        p = _binidx(tmp_path / "d", docs)
        Path(f"{p}.idx").unlink()
        return {"data_file": p, "data_type": "binidx"}, "not found"
    if case == "binidx_token_out_of_range":
        p = _binidx(tmp_path / "d", [*docs, [5, 70_000, 6]], dtype=np.int32)
        return {"data_file": p, "data_type": "binidx"}, "70000"
    if case == "binidx_empty":
        p = _binidx(tmp_path / "d", [])
        return {"data_file": p, "data_type": "binidx"}, "no documents"
    if case == "jsonl_malformed":
        (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp\n')
        return {"data_file": tmp_path / "d.jsonl"}, r"d\.jsonl:2"
    if case == "jsonl_empty":
        (tmp_path / "d.jsonl").write_text("")
        return {"data_file": tmp_path / "d.jsonl"}, "empty"
    if case == "jsonl_blank_lines":
        (tmp_path / "d.jsonl").write_text("\n  \n\n")
        return {"data_file": tmp_path / "d.jsonl"}, "no records"
    if case == "jsonl_text_records_for_sft":
        (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
        return {"data_file": tmp_path / "d.jsonl"}, "SFT"
    if case == "jsonl_invalid_utf8":
        (tmp_path / "d.jsonl").write_bytes(b'{"prompt": "a", "response": "\xff\xfe"}\n')
        return {"data_file": tmp_path / "d.jsonl"}, r"d\.jsonl:1"
    if case == "jsonl_binary_garbage":
        (tmp_path / "d.jsonl").write_bytes(np.random.default_rng(1).bytes(3000))
        return {"data_file": tmp_path / "d.jsonl"}, r"d\.jsonl:\d"
    if case == "sft_nothing_to_learn_within_ctx_len":
        long = " ".join(["word"] * 100)
        (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"prompt": long, "response": "ok"}) for _ in range(4)))
        return {"data_file": tmp_path / "d.jsonl"}, "ctx_len"
    if case == "data_file_missing":
        return {"data_file": tmp_path / "nope.jsonl"}, "nope"
    if case == "data_file_is_a_folder":
        return {"data_file": tmp_path}, str(tmp_path.name)
    raise AssertionError(case)


DATA_CASES = ["binidx_truncated_bin", "binidx_inconsistent_idx", "binidx_missing_idx", "binidx_token_out_of_range",
              "binidx_empty", "jsonl_malformed", "jsonl_empty", "jsonl_blank_lines", "jsonl_text_records_for_sft",
              "jsonl_invalid_utf8", "jsonl_binary_garbage", "sft_nothing_to_learn_within_ctx_len", "data_file_missing",
              "data_file_is_a_folder"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_broken_data_is_refused(assets: dict[str, Path], tmp_path: Path, case: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    flags, expected = _data_case(case, tmp_path)
    message = refused(train_args(assets, tmp_path / "p", **flags), capsys)
    assert re.search(expected, message), message


@pytest.fixture(scope="module")
def tokenizer() -> WorldTokenizer:
    return WorldTokenizer()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["binidx", "jsonl", "sft"]), data=st.data(), ctx_len=st.integers(1, 9),
       val_fraction=st.sampled_from([0.0, 0.3]))
def test_fuzz_dataset_building_gives_valid_samples_or_data_error(tokenizer: WorldTokenizer, kind: str,
                                                                 data: st.DataObject, ctx_len: int,
                                                                 val_fraction: float) -> None:
    """Beyond the reader fuzzers in tests/data: what the trainer builds from odd but readable files (tiny,
    one-token, empty-response, huge-id documents) is a set of well-formed samples, or our error."""
    with tempfile.TemporaryDirectory() as folder:
        if kind == "binidx":
            docs = data.draw(st.lists(st.lists(st.integers(0, 70_000), max_size=6), max_size=5))
            path: Path = _binidx(Path(folder) / "d", docs, dtype=np.int32)
        else:
            texts = st.text(max_size=12)
            record = (st.builds(lambda t: {"text": t}, texts) if kind == "jsonl"
                      else st.builds(lambda p, r: {"prompt": p, "response": r}, texts, texts))
            path = Path(folder) / "d.jsonl"
            path.write_text("\n".join(json.dumps(r) for r in data.draw(st.lists(record, max_size=5))))
        try:
            built = build_datasets(path, kind, ctx_len, tokenizer, seed=1, val_fraction=val_fraction,
                                   num_samples=3, vocab_size=VOCAB)
        except RWKVBoneError:
            return
        for dataset in (built.train, built.val):
            for i in range(len(dataset) if dataset is not None else 0):
                sample = dataset[i]
                assert sample["input"].shape == sample["target"].shape == sample["mask"].shape == (ctx_len,)
                assert int(sample["input"].max()) < VOCAB and int(sample["input"].min()) >= 0
                assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}


# ---------------------------------------------------------------------------------------------- sizes and paths
@pytest.mark.parametrize("flag, value", [("ctx_len", 0), ("ctx_len", -5), ("micro_bsz", 0), ("micro_bsz", -1),
                                         ("bone_b", 0), ("bone_b", -32), ("bone_b", 48), ("accumulate_grad_batches", 0),
                                         ("epoch_count", -1), ("lr_init", -1e-3), ("val_fraction", 1.0),
                                         ("skip_nonfinite", -1)])
def test_nonpositive_and_invalid_sizes_are_refused(assets: dict[str, Path], tmp_path: Path, flag: str, value: object,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    message = refused(train_args(assets, tmp_path / "p", **{flag: value}), capsys)
    assert flag in message or str(value) in message, message


def test_output_paths_that_are_inputs_are_refused(assets: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    base_bytes = assets["base"].read_bytes()
    message = refused(train_args(assets, assets["base"]), capsys)  # --proj_dir is the base model file
    assert "proj_dir" in message
    proj = tmp_path / "p"
    proj.mkdir()
    data = proj / "metrics.jsonl"  # the data file is one the run writes
    data.write_bytes(assets["sft"].read_bytes())
    message = refused(train_args(assets, proj, data_file=data), capsys)
    assert "metrics.jsonl" in message and data.read_bytes() == assets["sft"].read_bytes()
    model = proj / "model-final.safetensors"  # full training would overwrite its own base at the end
    save_tensors(model, _base(assets))
    message = refused(train_args(assets, proj, load_model=model, peft="none"), capsys)
    assert "model-final.safetensors" in message
    assert assets["base"].read_bytes() == base_bytes

    adapter, base = _adapter_and_model(tmp_path)
    for output in (base, adapter):
        assert merge_bone.main(["--base_model", str(base), "--bone", str(adapter), "--output", str(output)]) == 2
        assert "same file" in capsys.readouterr().err


def test_prepare_data_refuses_to_overwrite_its_input(tmp_path: Path) -> None:
    source = tmp_path / "d.bin"  # a jsonl file under the name the output would take
    source.write_text('{"text": "hello"}\n')
    before = source.read_bytes()
    res = subprocess.run([sys.executable, "-m", "scripts.prepare_data", "--input", str(source), "--output_prefix",
                          str(tmp_path / "d"), "--quiet"], check=False, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr and "d.bin" in res.stderr
    assert source.read_bytes() == before


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("case", ["base_model_as_state", "truncated_state", "empty_state", "garbage_state"])
def test_bad_training_states_are_refused(assets: dict[str, Path], tmp_path: Path, case: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    proj = tmp_path / "p"
    state = proj / "checkpoints" / "state-epoch000001.ckpt"
    state.parent.mkdir(parents=True)
    if case == "base_model_as_state":
        state.write_bytes(assets["base"].read_bytes())
    elif case == "truncated_state":
        state.write_bytes(assets["base"].read_bytes()[:5000])
    elif case == "empty_state":
        state.write_bytes(b"")
    else:
        state.write_bytes(np.random.default_rng(2).bytes(5000))
    message = refused(train_args(assets, proj, resume="auto"), capsys)
    assert "state-epoch000001.ckpt" in message or "training state" in message, message
