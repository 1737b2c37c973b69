"""Tests for src/wkv.py: the torch backend against the float64 oracle (also under autocast and with bf16
inputs), backend selection, the CUDA kernel's gradient derivation (on CPU), the fla backend's handling of each
fla / rwkv-fla API (with fake modules), compiling cuda/wkv6.cu, and the CUDA/fla backends on a GPU."""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import shutil
import subprocess
import sys
import types
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
    for name, x, x_ref in zip(NAMES[: len(got)], got, ref, strict=True):
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
    for name, x, x_ref in zip(NAMES, got, ref, strict=True):
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


def forward_under(autocast: torch.dtype | None, fn, inputs: list[torch.Tensor], gy: torch.Tensor, gs: torch.Tensor):
    """outputs_and_grads with the forward pass and the loss under CPU autocast (None: no autocast) and the
    backward pass outside it, as Lightning and DeepSpeed run a training step."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    context = torch.autocast("cpu", autocast) if autocast is not None else contextlib.nullcontext()
    with context:
        y, s = fn(*leaves)
        loss = (y * gy.to(y.dtype)).sum() + (s * gs.to(s.dtype)).sum()
    return [y, s, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_torch_backend_keeps_full_precision_under_autocast(
    autocast: torch.dtype, dtype: torch.dtype, tol: float
) -> None:
    # With the matmuls left to autocast, y, the state and every gradient were off by 3e-3 to 6e-3 (bf16 autocast)
    # or ~5e-4 (fp16 autocast) instead of ~1e-7.
    inputs = make_inputs(2, 45, 2, 16, dtype)
    g = torch.Generator().manual_seed(1)
    gy, gs = torch.randn(2, 45, 2, 16, generator=g), torch.randn(2, 2, 16, 16, generator=g)
    got = forward_under(autocast, lambda *a: wkv6(*a, backend="torch"), inputs, gy, gs)
    ref = oracle(inputs, gy, gs)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for name, x, x_ref, inp in zip(NAMES, got, ref, [None, None, *inputs], strict=True):
        assert inp is None or x.dtype == inp.dtype, name
        assert rel_err(x, x_ref) <= tol, (name, rel_err(x, x_ref))


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["no_autocast", "bf16_autocast"])
def test_bf16_inputs_compute_in_float32(autocast: torch.dtype | None) -> None:
    # DeepSpeed bf16 (every tensor bf16, no autocast) and bf16 activations under autocast: the only error left
    # is the rounding of the inputs and of the bf16 outputs. The state (and its gradient) never go through bf16;
    # y and the bf16 inputs' gradients are the float64 result on the same rounded inputs, rounded to bf16.
    inputs = make_inputs(2, 45, 2, 16, torch.bfloat16)  # r, k, v, w, u bf16; state float32
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(2, 45, 2, 16, generator=g).bfloat16()
    gs = torch.randn(2, 2, 16, 16, generator=g)
    got = forward_under(autocast, lambda *a: wkv6(*a, backend="torch"), inputs, gy, gs)
    ref = oracle(inputs, gy, gs)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for name, x, x_ref, inp in zip(NAMES, got, ref, [None, None, *inputs], strict=True):
        assert inp is None or x.dtype == inp.dtype, name
        # bf16 results: a few elements may round the other way (computing y in bf16 gives ~3e-3)
        tol = 2e-4 if x.dtype == torch.bfloat16 else 1e-5
        assert rel_err(x, x_ref.to(x.dtype)) <= tol, (name, rel_err(x, x_ref.to(x.dtype)))


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
    for name, x, x_ref in zip(NAMES[2:], manual, ref, strict=True):
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
# The fla backend's version resolution, against fake fla / rwkv-fla modules (no GPU, no triton)
# ----------------------------------------------------------------------------------------------
# Each fake chunk_rwkv6 has the signature of a released version (parameter names and defaults as published) and
# computes WKV6 with the float64 oracle in the layout that version expects, so a wrong layout, a missing
# scale=1.0 or a wrong decay convention changes the result. Calls are recorded in FLA_CALLS.

FLA_CALLS: list[dict] = []


def fake_wkv(bhtn: bool, options: dict, r, k, v, g, u, scale, initial_state, output_final_state):
    """WKV6 as fla computes it: g is the log-decay, r is multiplied by `scale`, state (B, H, K, V); r, k, v, g
    in (B, H, T, K) if `bhtn` else (B, T, H, K). `options`: the head_first value or extra kwargs it got."""
    FLA_CALLS.append({"shape": tuple(r.shape), "g": g.detach().clone(), "scale": scale, "options": options,
                      "initial_state": initial_state})
    rr, kk, vv, gg = (x.transpose(1, 2) if bhtn else x for x in (r, k, v, g))  # (B, T, H, N)
    assert rr.shape[2] == u.shape[0], "tensors reached chunk_rwkv6 in the wrong layout"
    y, s = wkv6_loop(rr * scale, kk, vv, torch.log(-gg), u, initial_state)
    y = y.transpose(1, 2) if bhtn else y
    return y.to(r.dtype), (s.float() if output_final_state else None)


def fla_0_1(q, k, v, g, u, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
            head_first=True):
    """flash-linear-attention 0.1.x and rwkv-fla 0.7 before 2025-04: (B, H, T, K) unless head_first=False."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return fake_wkv(head_first, {"head_first": head_first}, q, k, v, g, u, scale, initial_state, output_final_state)


def fla_0_2(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
            head_first=False):
    """flash-linear-attention 0.2 to 0.4 and rwkv-fla 0.7 since 2025-04: (B, T, H, K); head_first deprecated."""
    if head_first:
        raise DeprecationWarning("head_first is deprecated")
    scale = r.shape[-1] ** -0.5 if scale is None else scale
    return fake_wkv(False, {"head_first": head_first}, r, k, v, w, u, scale, initial_state, output_final_state)


def fla_0_5(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
            cu_seqlens_cpu=None, **kwargs):
    """flash-linear-attention / fla-core 0.5 and 0.6: (B, T, H, K), head_first removed."""
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed")
    scale = r.shape[-1] ** -0.5 if scale is None else scale
    return fake_wkv(False, kwargs, r, k, v, w, u, scale, initial_state, output_final_state)


def rwkv_fla_0_1(r, k, v, g, u, scale=1.0, initial_state=None, output_final_state=False, head_first=True,
                 checkpoint_level=0, training=True, use_tf32=None, chunk_size=32):
    """rwkv-fla 0.1 (2024-11/12): (B, H, T, K); its head_first=False path raises NameError."""
    if not head_first:
        raise NameError("name 'w' is not defined")
    scale = r.shape[-1] ** -0.5 if scale == -1.0 else scale
    return fake_wkv(True, {"head_first": head_first}, r, k, v, g, u, scale, initial_state, output_final_state)


def fla_2024(r, k, v, g, u, scale=-1.0, initial_state=None, output_final_state=False, checkpoint_level=0,
             training=True, use_tf32=None):
    """fla from git before head_first (2024) and rwkv-fla 0.1 (2024-09/10): (B, H, T, K) only."""
    scale = r.shape[-1] ** -0.5 if scale == -1.0 else scale
    return fake_wkv(True, {}, r, k, v, g, u, scale, initial_state, output_final_state)


def fla_unknown(q, k, v, g, initial_state=None):
    """A signature no release has had: no bonus u, no scale."""
    raise AssertionError("an unrecognised chunk_rwkv6 must not be called")


def install_fake_fla(monkeypatch, module: str, chunk_rwkv6, version: str) -> None:
    """Make `module` (fla or rwkvfla) importable with fla.ops.rwkv6.chunk_rwkv6 = chunk_rwkv6."""
    package = types.ModuleType(module)
    package.__version__ = version
    ops = types.ModuleType(f"{module}.ops")
    rwkv6 = types.ModuleType(f"{module}.ops.rwkv6")
    rwkv6.chunk_rwkv6 = chunk_rwkv6
    package.ops, ops.rwkv6 = ops, rwkv6
    for mod in (package, ops, rwkv6):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)


@pytest.fixture
def no_fla(monkeypatch):
    """Neither fla nor rwkvfla importable (None in sys.modules blocks the import), resolution not cached."""
    for name in ("fla", "rwkvfla"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(wkv, "_cuda_kernel_buildable", lambda: False)
    wkv._fla_resolution.cache_clear()
    FLA_CALLS.clear()
    yield monkeypatch
    wkv._fla_resolution.cache_clear()


FAKE_VERSIONS = [  # module, fake, version, layout (B, H, T, N), head_first to pass (None: none)
    ("fla", fla_0_1, "0.1.2", True, True),
    ("fla", fla_0_2, "0.4.2", False, False),
    ("fla", fla_0_5, "0.6.0", False, None),
    ("fla", fla_2024, "0.1", True, None),
    ("rwkvfla", fla_0_2, "0.7", False, False),
    ("rwkvfla", rwkv_fla_0_1, "0.7", True, True),
]


@pytest.mark.parametrize("module, fake, version, head_first, head_first_kwarg", FAKE_VERSIONS,
                         ids=[f"{m}-{f.__name__}" for m, f, *_ in FAKE_VERSIONS])
def test_fla_backend_calls_each_known_api_correctly(
    no_fla, module: str, fake, version: str, head_first: bool, head_first_kwarg: bool | None
) -> None:
    install_fake_fla(no_fla, module, fake, version)
    api = wkv.fla_api()
    assert (api.module, api.head_first, api.head_first_kwarg) == (module, head_first, head_first_kwarg)
    assert version in api.source

    B, T, H, N = 2, 37, 3, 8  # all different, so a transposed layout cannot go unnoticed
    inputs = make_inputs(B, T, H, N, torch.float32)
    g = torch.Generator().manual_seed(5)
    gy, gs = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    got = outputs_and_grads(wkv._wkv6_fla, inputs, gy, gs)
    ref = outputs_and_grads(lambda *a: wkv6(*a, backend="torch"), inputs, gy, gs)
    for name, x, x_ref in zip(NAMES, got, ref, strict=True):
        assert x.shape == x_ref.shape and x.dtype == x_ref.dtype, name
        assert rel_err(x, x_ref) <= 1e-5, (name, rel_err(x, x_ref))

    call = FLA_CALLS[0]
    assert call["shape"] == ((B, H, T, N) if head_first else (B, T, H, N))
    assert call["scale"] == 1.0
    assert call["options"] == ({} if head_first_kwarg is None else {"head_first": head_first_kwarg})
    assert call["initial_state"].shape == (B, H, N, N) and call["initial_state"].dtype == torch.float32
    log_decay = -torch.exp(inputs[3].clamp(max=7.0))  # (B, T, H, N)
    torch.testing.assert_close(call["g"], log_decay.transpose(1, 2) if head_first else log_decay)


def test_fla_without_initial_state_passes_none(no_fla) -> None:
    install_fake_fla(no_fla, "fla", fla_0_5, "0.6.0")
    inputs = make_inputs(1, 9, 2, 4, torch.float32)[:5]
    y, s = wkv._wkv6_fla(*inputs, None)
    y_ref, s_ref = wkv6(*inputs, backend="torch")
    assert FLA_CALLS[0]["initial_state"] is None
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5


def test_fla_is_preferred_over_rwkvfla(no_fla) -> None:
    install_fake_fla(no_fla, "fla", fla_0_5, "0.6.0")
    install_fake_fla(no_fla, "rwkvfla", fla_0_2, "0.7")
    assert wkv.fla_api().module == "fla"


def test_rwkvfla_is_used_when_fla_is_unrecognised(no_fla) -> None:
    install_fake_fla(no_fla, "fla", fla_unknown, "9.9")
    install_fake_fla(no_fla, "rwkvfla", fla_0_2, "0.7")
    assert wkv.fla_api().module == "rwkvfla"


def test_version_is_read_from_the_installed_distribution(no_fla) -> None:
    install_fake_fla(no_fla, "rwkvfla", fla_0_2, "0.7")
    no_fla.setattr(importlib.metadata, "packages_distributions", lambda: {"rwkvfla": ["rwkv-fla"]})
    no_fla.setattr(importlib.metadata, "version", {"rwkv-fla": "0.7.202508221413"}.__getitem__)
    assert wkv.fla_api().source == "rwkv-fla 0.7.202508221413"


def test_backend_selection_follows_the_fla_resolution(no_fla) -> None:
    no_fla.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="neither `fla` nor `rwkvfla` is installed"):
        resolve_backend("fla", "cuda")
    assert available_backends("cuda") == ["torch"] and resolve_backend("auto", "cuda") == "torch"

    install_fake_fla(no_fla, "fla", fla_0_5, "0.6.0")
    wkv._fla_resolution.cache_clear()
    assert available_backends("cuda") == ["torch", "fla"]
    assert resolve_backend("auto", "cuda") == "fla" and resolve_backend("fla", "cuda") == "fla"
    assert available_backends("cpu") == ["torch"] and resolve_backend("auto", "cpu") == "torch"


def test_unrecognised_fla_api_raises_config_error_naming_the_version(no_fla) -> None:
    no_fla.setattr(torch.cuda, "is_available", lambda: True)
    install_fake_fla(no_fla, "fla", fla_unknown, "9.9")
    assert available_backends("cuda") == ["torch"] and resolve_backend("auto", "cuda") == "torch"
    for call in (lambda: resolve_backend("fla", "cuda"), wkv.fla_api):
        with pytest.raises(ConfigError) as info:
            call()
        message = str(info.value)
        assert "'fla' is not available" in message and "fla 9.9" in message, message
        assert "missing: scale, output_final_state" in message, message
        assert "chunk_rwkv6(r, k, v, w, u, scale=..., initial_state=..., output_final_state=...)" in message


def test_broken_fla_install_is_reported(no_fla) -> None:
    install_fake_fla(no_fla, "fla", fla_0_5, "0.6.0")
    no_fla.setitem(sys.modules, "fla.ops.rwkv6", None)  # e.g. triton missing
    with pytest.raises(ConfigError, match="`fla` is installed but importing fla.ops.rwkv6.chunk_rwkv6 failed"):
        wkv.fla_api()


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
    for name, x, x_ref in zip(NAMES[: len(got)], got, ref, strict=True):
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
