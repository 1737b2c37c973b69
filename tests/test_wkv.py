"""Tests for src/wkv.py: the torch backend against the float64 oracle, backend selection, the CUDA
kernel's gradient derivation (on CPU), compiling cuda/wkv6.cu, and the CUDA/fla backends on a GPU."""
from __future__ import annotations

import logging
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from src import wkv
from src.errors import ConfigError
from src.wkv import available_backends, resolve_backend, wkv6
from tests.wkv_reference import wkv6_loop, wkv6_loop_backward

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_inputs(
    B: int, T: int, H: int, N: int, dtype: torch.dtype = torch.float64, seed: int = 0, device: str = "cpu"
) -> list[torch.Tensor]:
    """r, k, v, w, u, state with raw decays from U(-8, 3): decays from ~1 (w=-8) to ~2e-9 (w=3)."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.empty(B, T, H, N, dtype=torch.float64).uniform_(-8.0, 3.0, generator=g)
    u = torch.randn(H, N, generator=g, dtype=torch.float64)
    state = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return [x.to(device=device, dtype=dtype) for x in (r, k, v, w, u)] + [state.to(device=device, dtype=state_dtype)]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def outputs_and_grads(fn, inputs: list[torch.Tensor], gy: torch.Tensor, gs: torch.Tensor) -> list[torch.Tensor]:
    """[y, final state, dr, dk, dv, dw, du, dstate] for the loss <y, gy> + <state, gs>."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    y, s = fn(*leaves)
    grads = torch.autograd.grad((y * gy.to(y.dtype)).sum() + (s * gs.to(s.dtype)).sum(), leaves)
    return [y, s, *grads]


def oracle(inputs: list[torch.Tensor], gy: torch.Tensor, gs: torch.Tensor) -> list[torch.Tensor]:
    return outputs_and_grads(wkv6_loop, [x.detach().double() for x in inputs], gy.double(), gs.double())


NAMES = ["y", "state", "dr", "dk", "dv", "dw", "du", "dstate"]


# ----------------------------------------------------------------------------------------------
# The oracle itself
# ----------------------------------------------------------------------------------------------


def hand_case() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """B = H = 1, N = 2, T = 2, decays 1/2 (key 0) and 1/4 (key 1), worked out by hand below."""
    w = torch.tensor([math.log(math.log(2.0)), math.log(math.log(4.0))], dtype=torch.float64)  # d = 1/2, 1/4
    r = torch.tensor([[1.0, 10.0], [2.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[2.0, 3.0], [1.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[5.0, 7.0], [1.0, -1.0]], dtype=torch.float64)
    u = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    state = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)  # S[i=key, j=value]
    inputs = [x.view(1, 2, 1, 2) for x in (r, k, v)] + [w.expand(2, 2).reshape(1, 2, 1, 2), u, state]
    # t = 0: y0[j] = sum_i r[i] S0[i, j] + (sum_i r[i] u[i] k[i]) v[j] = [31, 42] + (2 + 15) * [5, 7]
    #        S1 = diag(1/2, 1/4) S0 + k v^T = [[0.5, 1], [0.75, 1]] + [[10, 14], [15, 21]]
    # t = 1: y1[j] = 2 * S1[0, j] + (2 * 1 * 1) * v[j] = 2 * [10.5, 15] + 2 * [1, -1]
    #        S2 = diag(1/2, 1/4) S1 + [[1, -1], [1, -1]]
    y = torch.tensor([[31.0 + 85.0, 42.0 + 119.0], [21.0 + 2.0, 30.0 - 2.0]], dtype=torch.float64).view(1, 2, 1, 2)
    s_final = torch.tensor([[[[5.25 + 1.0, 7.5 - 1.0], [3.9375 + 1.0, 5.5 - 1.0]]]], dtype=torch.float64)
    return inputs, y, s_final


@pytest.mark.parametrize("backend", ["oracle", "torch"])
def test_hand_computed_case(backend: str) -> None:
    inputs, y_ref, s_ref = hand_case()
    y, s = wkv6_loop(*inputs) if backend == "oracle" else wkv6(*inputs, backend="torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# torch backend against the oracle
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize(
    "B, T, H, N, with_state",
    [
        (2, 37, 3, 8, True),  # T not a multiple of the chunk, B > 1, H > 1
        (1, 1, 2, 4, True),  # a single step
        (2, 64, 2, 8, False),  # exactly one chunk, zero initial state
        (1, 150, 2, 16, True),  # several chunks plus a padded tail
    ],
)
def test_torch_backend_matches_oracle(
    B: int, T: int, H: int, N: int, with_state: bool, dtype: torch.dtype, tol: float
) -> None:
    inputs = make_inputs(B, T, H, N, dtype)[: 6 if with_state else 5]  # without: state None (zeros)
    g = torch.Generator().manual_seed(1)
    gy, gs = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    got = outputs_and_grads(lambda *a: wkv6(*a, backend="torch"), inputs, gy, gs)
    ref = oracle(inputs, gy, gs)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for name, x, x_ref in zip(NAMES, got, ref):
        assert torch.isfinite(x).all(), name
        assert rel_err(x, x_ref) <= tol, (name, rel_err(x, x_ref))


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 140),
    H=st.integers(1, 2),
    N=st.sampled_from([1, 3, 4]),
    seed=st.integers(0, 2**16),
)
def test_torch_backend_matches_oracle_any_shape(B: int, T: int, H: int, N: int, seed: int) -> None:
    inputs = make_inputs(B, T, H, N, torch.float64, seed=seed)
    y, s = wkv6(*inputs, backend="torch")
    y_ref, s_ref = wkv6_loop(*inputs)
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(s, s_ref) <= 1e-10


def test_padded_steps_leave_the_final_state_exact() -> None:
    # T = 37 is padded to whole chunks (27 padded steps with 32- or 64-step chunks); a padded raw w of 0
    # (decay 1/e) instead of -inf (decay 1) would shrink the state 27 times over.
    inputs = make_inputs(2, 37, 2, 8, torch.float64)
    _, s = wkv6(*inputs, backend="torch")
    _, s_ref = wkv6_loop(*inputs)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, tol, huge", [(torch.float64, 1e-10, 50.0), (torch.float32, 1e-4, 100.0)])
def test_extreme_decays_stay_finite_and_exact(dtype: torch.dtype, tol: float, huge: float) -> None:
    inputs = make_inputs(1, 40, 2, 8, dtype)
    w = inputs[3]
    w[:, ::5] = huge  # decay exactly 0 (a reset); exp(100) overflows float32
    w[:, 1::5] = -30.0  # decay 1 - 1e-13
    w[:, 2::5] = 7.5  # just above the clamp
    g = torch.Generator().manual_seed(2)
    gy, gs = torch.randn(1, 40, 2, 8, generator=g), torch.randn(1, 2, 8, 8, generator=g)
    got = outputs_and_grads(lambda *a: wkv6(*a, backend="torch"), inputs, gy, gs)
    ref = oracle(inputs, gy, gs)
    for name, x, x_ref in zip(NAMES, got, ref):
        assert torch.isfinite(x).all(), name
        assert rel_err(x, x_ref) <= tol, (name, rel_err(x, x_ref))


def test_state_chaining_equals_one_run() -> None:
    r, k, v, w, u, s0 = make_inputs(2, 90, 2, 8, torch.float64)
    y, s = wkv6(r, k, v, w, u, s0, backend="torch")
    cut = 41
    y1, s1 = wkv6(r[:, :cut], k[:, :cut], v[:, :cut], w[:, :cut], u, s0, backend="torch")
    y2, s2 = wkv6(r[:, cut:], k[:, cut:], v[:, cut:], w[:, cut:], u, s1, backend="torch")
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, s, rtol=1e-12, atol=1e-12)


def test_bf16_inputs_compute_in_float32() -> None:
    inputs = make_inputs(2, 45, 2, 16, torch.bfloat16)
    y, s = wkv6(*inputs, backend="torch")
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y_ref, s_ref = wkv6_loop(*inputs)  # same bf16-rounded inputs, float64 arithmetic
    assert rel_err(y, y_ref) <= 1e-2  # bf16 rounding of y only
    assert rel_err(s, s_ref) <= 1e-5  # the state never goes through bf16


# ----------------------------------------------------------------------------------------------
# The CUDA kernel's backward derivation, checked on CPU
# ----------------------------------------------------------------------------------------------


def test_kernel_backward_recurrences_match_autograd() -> None:
    inputs = make_inputs(2, 23, 2, 6, torch.float64)
    g = torch.Generator().manual_seed(3)
    gy = torch.randn(2, 23, 2, 6, generator=g, dtype=torch.float64)
    gs = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64)
    manual = wkv6_loop_backward(*inputs, gy, gs)
    ref = oracle(inputs, gy, gs)[2:]
    for name, x, x_ref in zip(NAMES[2:], manual, ref):
        assert rel_err(x, x_ref) <= 1e-10, (name, rel_err(x, x_ref))


# ----------------------------------------------------------------------------------------------
# Backend selection and input checks
# ----------------------------------------------------------------------------------------------


def test_auto_resolves_to_torch_on_cpu() -> None:
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    assert available_backends("cpu") == ["torch"]


@pytest.mark.parametrize("name", ["cuda", "fla"])
def test_unavailable_backend_raises_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match=f"'{name}' is not available"):
        resolve_backend(name, "cpu")
    with pytest.raises(ConfigError):
        wkv6(*make_inputs(1, 3, 1, 4, torch.float32), backend=name)


def test_unknown_backend_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown WKV backend"):
        resolve_backend("triton", "cpu")


def test_choice_is_logged_once_per_backend_and_device(monkeypatch, caplog) -> None:
    monkeypatch.setattr(wkv, "_logged_choices", set())
    inputs = make_inputs(1, 3, 1, 4, torch.float32)
    with caplog.at_level(logging.INFO, logger="src.wkv"):
        wkv6(*inputs, backend="torch")
        wkv6(*inputs, backend="auto")
    assert [rec.getMessage() for rec in caplog.records] == ["WKV6 backend torch on cpu"]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.__setitem__(1, a[1][:, :-1]), "k has shape"),
        (lambda a: a.__setitem__(4, a[4][:1]), "u must have shape"),
        (lambda a: a.__setitem__(5, a[5][:, :, :-1]), "state must have shape"),
        (lambda a: [a.__setitem__(i, a[i][:, :0]) for i in range(4)], "T >= 1"),
    ],
)
def test_bad_shapes_raise(change, match: str) -> None:
    inputs = make_inputs(2, 5, 2, 4, torch.float32)
    change(inputs)
    with pytest.raises(ValueError, match=match):
        wkv6(*inputs, backend="torch")


# ----------------------------------------------------------------------------------------------
# CUDA sources and GPU backends
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_kernel_compiles(tmp_path: Path) -> None:
    cmd = [
        "nvcc", "-c", str(REPO_ROOT / "cuda" / "wkv6.cu"), "-o", str(tmp_path / "wkv6.o"),
        "-gencode=arch=compute_89,code=sm_89", "-DWKV6_HEAD_SIZE=64", "-O3", "--use_fast_math",
        # what torch.utils.cpp_extension passes
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "wkv6.o").stat().st_size > 0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check_gpu_backend(backend: str, B: int, T: int, H: int, N: int, with_state: bool) -> None:
    """backend vs the torch backend on the same bf16-rounded inputs: outputs and all gradients."""
    inputs = make_inputs(B, T, H, N, torch.bfloat16, device="cuda")
    inputs[3] = inputs[3].clamp(max=1.0)  # decays down to exp(-e), as in trained models
    inputs = inputs[: 6 if with_state else 5]  # without: state None (zeros)
    g = torch.Generator().manual_seed(4)
    gy = torch.randn(B, T, H, N, generator=g).cuda().bfloat16()
    gs = torch.randn(B, H, N, N, generator=g).cuda()
    got = outputs_and_grads(lambda *a: wkv6(*a, backend=backend), inputs, gy, gs)
    ref = outputs_and_grads(lambda *a: wkv6(*a, backend="torch"), [x.float() for x in inputs], gy.float(), gs)
    for name, x, x_ref in zip(NAMES, got, ref):
        assert torch.isfinite(x).all(), name
        assert rel_err(x, x_ref) <= 1e-2, (name, rel_err(x, x_ref))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("B, T, H, with_state", [(2, 67, 3, True), (1, 1, 2, True), (3, 300, 2, False)])
def test_cuda_backend_matches_torch_backend(B: int, T: int, H: int, with_state: bool) -> None:
    check_gpu_backend("cuda", B, T, H, 64, with_state)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not wkv._fla_importable(), reason="fla not installed")
@pytest.mark.parametrize("B, T, H, with_state", [(2, 67, 3, True), (1, 130, 2, False)])
def test_fla_backend_matches_torch_backend(B: int, T: int, H: int, with_state: bool) -> None:
    check_gpu_backend("fla", B, T, H, 64, with_state)
