"""llama.cpp itself runs our exports (through llama-cpp-python): the GGUF merge_bone.py writes directly, and the
Hugging Face folder converted by llama.cpp's own convert_hf_to_gguf.py, both fp32, on a tiny random model with the
65536-entry World vocabulary; their logits must equal ours within fp32 rounding.

Skipped unless llama-cpp-python is installed (it builds llama.cpp from source: about 5 minutes on 2 cores); the
converter part also needs LLAMA_CPP_DIR, the llama.cpp source folder with convert_hf_to_gguf.py (vendor/llama.cpp
of the llama-cpp-python sdist) and transformers. `bash scripts/check_llama_cpp.sh` installs all of it and runs
this file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from src.export.convert import export_model
from tests.export.conftest import TOKENS, World, logits_of

llama_cpp = pytest.importorskip("llama_cpp")
TOLERANCE = 1e-4  # max |difference| / max |logit|; fp32 rounding in a different operation order


def llama_cpp_logits(path: Path) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                          n_threads=1)
    llm.eval(TOKENS)
    scores = np.array(llm.scores[: len(TOKENS)], dtype=np.float64)
    llm.close()
    return scores


def our_logits(world: World) -> np.ndarray:
    # GGUF and HF have no place for an initial state: compare with the merged model without it
    return logits_of({k: v for k, v in world.merged.items() if not k.endswith("time_state")}).double().numpy()


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_llama_cpp_runs_our_gguf(world: World, tmp_path: Path) -> None:
    export_model(world.base, world.adapter, tmp_path / "merged.gguf", dtype="fp32")
    err = relative_error(llama_cpp_logits(tmp_path / "merged.gguf"), our_logits(world))
    print(f"llama.cpp on our fp32 GGUF: max |logit difference| / max |logit| = {err:.2e}")
    assert err < TOLERANCE


def test_llama_cpp_converter_takes_our_hf_folder(world: World, tmp_path: Path) -> None:
    source = os.environ.get("LLAMA_CPP_DIR")
    converter = Path(source) / "convert_hf_to_gguf.py" if source else None
    if converter is None or not converter.is_file():
        pytest.skip("set LLAMA_CPP_DIR to llama.cpp's source folder (convert_hf_to_gguf.py) to run this")
    pytest.importorskip("transformers")
    export_model(world.base, world.adapter, tmp_path / "hf", dtype="fp32")
    out = tmp_path / "converted.gguf"
    done = subprocess.run([sys.executable, str(converter), str(tmp_path / "hf"), "--outfile", str(out),
                           "--outtype", "f32"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    err = relative_error(llama_cpp_logits(out), our_logits(world))
    print(f"llama.cpp on the converted HF folder: max |logit difference| / max |logit| = {err:.2e}")
    assert err < TOLERANCE
