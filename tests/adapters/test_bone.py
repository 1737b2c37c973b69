"""Bone layers and math against the naive per-block formula in float64 + autograd; memory, autocast,
bf16 bases, bf16 rounding error against a plain bf16 linear's, activation checkpointing; exact unmerge."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from src.adapters import bone as bone_module
from src.adapters.bone import BoneLinear, BoneRowFunction, merge_bone, unmerge_bone
from src.adapters.config import AdapterConfig
from src.errors import AdapterError
from tests.adapters.reference import naive_block_affine, rel_err

BONE_CASES = [(m, g) for m in ("bone", "bone_unconstrained", "bone_hadamard") for g in ("row", "col")]
SHAPES = [(12, 8, 4), (8, 24, 4), (16, 16, 8), (6, 6, 3), (32, 16, 16)]  # (out, in, b)


def make_layer(out_f: int, in_f: int, b: int, method: str, grouping: str, dtype: torch.dtype = torch.float64,
               seed: int = 0) -> BoneLinear:
    gen = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(torch.randn(out_f, in_f, generator=gen, dtype=torch.float64).to(dtype), requires_grad=False)
    layer = BoneLinear(weight, AdapterConfig(method=method, b=b, grouping=grouping))
    with torch.no_grad():
        for p in layer.adapter_tensors().values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return layer


@pytest.mark.parametrize("method, grouping", BONE_CASES)
@pytest.mark.parametrize("out_f, in_f, b", SHAPES)
def test_layer_matches_naive_formula_float64(method: str, grouping: str, out_f: int, in_f: int, b: int) -> None:
    layer = make_layer(out_f, in_f, b, method, grouping)
    params = layer.adapter_tensors()
    x = torch.randn(3, 5, in_f, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    expected_fn = "BoneRowFunction" if (method, grouping) == ("bone", "row") else "RebuiltWeightFunction"
    assert expected_fn in type(y.grad_fn).__name__
    dy = torch.randn_like(y)
    dx, *dparams = torch.autograd.grad(y, [x, *params.values()], dy)

    ref_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ naive_block_affine(layer.weight, ref_params, method, grouping).t()
    dx_ref, *dparams_ref = torch.autograd.grad(y_ref, [x_ref, *ref_params.values()], dy)

    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(dx, dx_ref) < 1e-12
    for got, ref in zip(dparams, dparams_ref, strict=True):
        assert rel_err(got, ref) < 1e-12


@pytest.mark.parametrize("method, grouping", BONE_CASES)
def test_merge_matches_naive_and_unmerge_restores(method: str, grouping: str) -> None:
    layer = make_layer(24, 16, 8, method, grouping)
    tensors = {k: v.detach() for k, v in layer.adapter_tensors().items()}
    merged = merge_bone(layer.weight, tensors, method, grouping)
    assert rel_err(merged, naive_block_affine(layer.weight, tensors, method, grouping)) < 1e-13
    assert rel_err(unmerge_bone(merged, tensors, method, grouping), layer.weight) < 1e-12
    assert torch.equal(layer.merged_weight(), merged)
    # fp32 storage: the round trip is still close; the result keeps the base dtype
    w32 = layer.weight.float()
    t32 = {k: v.float() for k, v in tensors.items()}
    back = unmerge_bone(merge_bone(w32, t32, method, grouping), t32, method, grouping)
    assert back.dtype == torch.float32 and rel_err(back, w32) < 1e-5


@pytest.mark.parametrize("method", ["bone", "bone_unconstrained"])
@pytest.mark.parametrize("grouping", ["row", "col"])
def test_unmerge_of_singular_block_raises(method: str, grouping: str) -> None:
    layer = make_layer(8, 8, 4, method, grouping)
    tensors = {k: v.detach().clone() for k, v in layer.adapter_tensors().items()}
    key = "bone" if method == "bone" else "bone_A"
    tensors[key][1] = -torch.eye(4, dtype=torch.float64)  # I + bone[1] = 0
    merged = merge_bone(layer.weight, tensors, method, grouping)
    with pytest.raises(AdapterError, match="singular"):
        unmerge_bone(merged, tensors, method, grouping)


def test_unmerge_hadamard_with_minus_one_raises() -> None:
    layer = make_layer(8, 8, 4, "bone_hadamard", "row")
    tensors = {"bone": layer.bone.detach().clone()}
    tensors["bone"][0, 1, 2] = -1.0
    with pytest.raises(AdapterError, match="1 \\+ bone"):
        unmerge_bone(merge_bone(layer.weight, tensors, "bone_hadamard", "row"), tensors, "bone_hadamard", "row")


def saved_storages(fn) -> list[tuple[int, int]]:
    """(data_ptr, nbytes) of every distinct storage autograd saves while fn() runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(seen.items())


@pytest.mark.parametrize("method, grouping", BONE_CASES)
def test_backward_saves_only_input_and_parameters(method: str, grouping: str) -> None:
    layer = make_layer(64, 32, 8, method, grouping, dtype=torch.float32)
    x = torch.randn(4, 16, 32, requires_grad=True)
    h = x * 2  # an intermediate activation as input, like inside the model
    allowed = {h.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = saved_storages(lambda: layer(h))
    assert {ptr for ptr, _ in saved} <= allowed


def test_naive_autograd_would_save_a_weight_sized_tensor() -> None:
    """The check above can fail: building W' with autograd saves it."""
    layer = make_layer(64, 32, 8, "bone", "row", dtype=torch.float32)
    h = torch.randn(4, 16, 32, requires_grad=True) * 2
    allowed = {h.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = saved_storages(lambda: h @ naive_block_affine(layer.weight, {"bone": layer.bone}, "bone", "row").t())
    assert {ptr for ptr, _ in saved} - allowed


@pytest.mark.parametrize("method, grouping", BONE_CASES)
def test_autocast_bf16_close_to_fp32(method: str, grouping: str) -> None:
    layer = make_layer(64, 128, 16, method, grouping, dtype=torch.float32)
    with torch.no_grad():
        for p in layer.adapter_tensors().values():
            p.mul_(0.1)
    x = torch.randn(2, 8, 128, requires_grad=True)
    params = list(layer.adapter_tensors().values())
    y32 = layer(x)
    g32 = torch.autograd.grad(y32.square().sum(), [x, *params])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    assert y16.dtype == torch.bfloat16
    g16 = torch.autograd.grad(y16.float().square().sum(), [x, *params])
    assert rel_err(y16.float(), y32) < 3e-2
    for a, b in zip(g16, g32, strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert rel_err(a, b) < 5e-2


@pytest.mark.parametrize("method, grouping", BONE_CASES)
def test_bf16_base_weight_trains_fp32_adapter(method: str, grouping: str) -> None:
    layer = make_layer(32, 64, 16, method, grouping, dtype=torch.bfloat16)
    params = list(layer.adapter_tensors().values())
    assert all(p.dtype == torch.float32 for p in params)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y.float().square().sum(), [x, *params])
    assert grads[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads[1:])
    ref = layer.merged_weight().float()
    assert rel_err(y.float(), x.detach().float() @ ref.t()) < 3e-2


@pytest.mark.parametrize("method, grouping", BONE_CASES)
def test_inside_non_reentrant_checkpoint(method: str, grouping: str) -> None:
    layer = make_layer(16, 16, 4, method, grouping)
    params = list(layer.adapter_tensors().values())
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    plain = torch.autograd.grad(layer(torch.tanh(x)).sin().sum(), [x, *params])
    ckpt = torch.autograd.grad(
        checkpoint(lambda t: layer(torch.tanh(t)), x, use_reentrant=False).sin().sum(), [x, *params])
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_input_without_grad_gets_no_input_gradient() -> None:
    layer = make_layer(16, 16, 4, "bone", "row")
    y = layer(torch.randn(3, 16, dtype=torch.float64))
    y.sum().backward()
    assert layer.bone.grad is not None and layer.weight.grad is None


def norm_err(got: Tensor, ref: Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ in float64."""
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("mode", ["bf16", "autocast"])
def test_bone_row_bf16_error_close_to_plain_linear(mode: str, chunked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """At a realistic in/b = 32, Bone-row's bf16 y, dx and dbone against float64 stay close to a plain bf16
    linear's error measured on the same data. mode "bf16": x, W and bone are bf16 and nothing autocasts
    (DeepSpeed bf16); "autocast": fp32 x and bone, bf16 W, under bf16 autocast. The floor is about sqrt(2)x
    (the adapter's sum adds one rounding, as LoRA's does); dx formed as gu + gu·bone − gs cancels the
    gradient of Σ_c u_c, which is sqrt(in/b)x larger than dy·W, and lands far above it. chunked: the
    backward runs over 64-token blocks (dbone summed over them)."""
    if chunked:
        monkeypatch.setattr(bone_module, "CPU_GRAD_CHUNK_BYTES", 1)
    out_f, in_f, b, n = 2048, 2048, 64, 256
    gen = torch.Generator().manual_seed(0)
    low = torch.bfloat16 if mode == "bf16" else torch.float32
    x = torch.randn(n, in_f, generator=gen).to(low)  # (N, in)
    weight = (torch.randn(out_f, in_f, generator=gen) * in_f**-0.5).bfloat16()  # (out, in)
    bone = (torch.randn(in_f // b, b, b, generator=gen) * 3e-3).to(low)  # entries of a fine-tuned bone's size
    dy = torch.randn(n, out_f, generator=gen).bfloat16()  # (N, out), as a bf16 output's gradient arrives

    x64, w64, bone64 = (t.double().requires_grad_() for t in (x, weight, bone))
    y64 = x64 @ naive_block_affine(w64.detach(), {"bone": bone64}, "bone", "row").t()
    dx64, dbone64 = torch.autograd.grad(y64, [x64, bone64], dy.double())
    lin64 = x64 @ w64.t()
    dx_lin64, dw_lin64 = torch.autograd.grad(lin64, [x64, w64], dy.double())

    def run(fn, *params: Tensor) -> tuple[Tensor, ...]:
        leaves = [t.clone().requires_grad_() for t in (x, *params)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            y = fn(*leaves)
        assert y.dtype == torch.bfloat16
        return (y, *torch.autograd.grad(y, leaves, dy))

    y_lin, dx_lin, dw_lin = run(F.linear, weight)
    y, dx, dbone = run(lambda xi, bi: BoneRowFunction.apply(xi, weight, bi), bone)
    assert dx.dtype == x.dtype and dbone.dtype == bone.dtype
    lin = {"y": norm_err(y_lin, lin64), "dx": norm_err(dx_lin, dx_lin64), "dW": norm_err(dw_lin, dw_lin64)}
    bone_row = {"y": norm_err(y, y64), "dx": norm_err(dx, dx64), "dbone": norm_err(dbone, dbone64)}
    assert bone_row["dx"] <= 1.5 * lin["dx"], (bone_row, lin)
    assert bone_row["y"] <= 1.5 * lin["y"], (bone_row, lin)
    assert bone_row["dbone"] <= 2.0 * lin["dW"], (bone_row, lin)  # rounded: gs, gu = dy·W + gs, the product


@pytest.mark.parametrize("input_grad", [True, False])
def test_bone_row_backward_in_token_chunks_matches_float64(input_grad: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU backward loop over blocks of 64 tokens (150 tokens: 64 + 64 + 22) is exact in float64."""
    monkeypatch.setattr(bone_module, "CPU_GRAD_CHUNK_BYTES", 1)
    layer = make_layer(48, 64, 16, "bone", "row")
    x = torch.randn(3, 50, 64, dtype=torch.float64, requires_grad=input_grad)
    y = layer(x)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, layer.bone] if input_grad else [layer.bone], dy)
    bone_ref = layer.bone.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ naive_block_affine(layer.weight, {"bone": bone_ref}, "bone", "row").t()
    refs = torch.autograd.grad(y_ref, [x_ref, bone_ref] if input_grad else [bone_ref], dy)
    assert rel_err(y, y_ref) < 1e-12
    for got, ref in zip(grads, refs, strict=True):
        assert rel_err(got, ref) < 1e-12
