"""All of Bone's math: the block-affine weight update (Bone, Bone-Unconstrained, Bone-Hadamard; row or col
grouping), its exact inverse, the autograd Functions the layers train with, and the BoneLinear layer.

Torch layout: W is (out, in) and y = x·Wᵀ. Blocks W[a, c] are b×b, a over out/b, c over in/b.
A "group" tensor is (G, b, b): G = in/b for row grouping (one per input block c), G = out/b for col
grouping (one per output block a). With g = c (row) or a (col):
  bone                W'[a,c] = W[a,c] + W[a,c]·bone[g] + bone[g]
  bone_unconstrained  W'[a,c] = W[a,c] + W[a,c]·A[g] + B[g]
  bone_hadamard       W'[a,c] = W[a,c] + W[a,c] ⊙ bone[g] + bone[g]

Training paths. Bone-row uses the exact factored form y = (x + u)·Wᵀ + tile_{out/b}(Σ_c u_c) with
u_c = x_c·bone[c]ᵀ: W' is never built, backward costs dy·W plus O(T·in·b), and only x is saved (LoRA's
cost at equal parameters). Every other variant uses a Function that builds W' in forward, frees it, saves
only x and the parameters, and rebuilds W' in backward: no weight-sized tensor lives between the passes.

Dtypes: the merge math runs in fp32 (fp64 stays fp64) and returns the base dtype. The Functions compute
their matmuls in the autocast dtype when autocast is on for the input's device, else in the input's dtype,
and return gradients in each input's own dtype (adapter parameters are fp32 on a bf16 base).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.adapters.config import AdapterConfig
from src.errors import AdapterError


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _blocks(weight: Tensor, b: int) -> Tensor:
    """(out, in) -> (out/b, b, in/b, b) view: W[a, c] = blocks[a, :, c, :]."""
    out_f, in_f = weight.shape
    return weight.view(out_f // b, b, in_f // b, b)


def _per_block(groups: Tensor, grouping: str) -> Tensor:
    """(G, b, b) group tensors broadcast against (out/b, b, in/b, b) blocks."""
    if grouping == "row":
        return groups.permute(1, 0, 2).unsqueeze(0)  # (1, b, in/b, b)
    return groups.unsqueeze(2)  # (out/b, b, 1, b)


def _group_major(weight: Tensor, b: int, grouping: str) -> Tensor:
    """(out, in) -> (G, rows, b) view whose [g] stacks every block of group g vertically, so that
    `_group_major(W) @ M` multiplies each block W[a, c] by M[g] from the right."""
    out_f, in_f = weight.shape
    if grouping == "row":
        return weight.view(out_f, in_f // b, b).transpose(0, 1)  # (in/b, out, b): input block c
    return weight.view(out_f // b, b * (in_f // b), b)  # (out/b, b·in/b, b): output block a's row


def _from_group_major(groups: Tensor, out_f: int, in_f: int, grouping: str) -> Tensor:
    """Inverse of _group_major, as (out/b, b, in/b, b) blocks (a view where possible)."""
    b = groups.shape[-1]
    if grouping == "row":
        return groups.transpose(0, 1).view(out_f // b, b, in_f // b, b)
    return groups.view(out_f // b, b, in_f // b, b)


def _affine_parts(tensors: dict[str, Tensor], method: str) -> tuple[Tensor, Tensor]:
    """(multiplier, additive) group tensors of a block-affine method."""
    if method in ("bone", "bone_hadamard"):
        return tensors["bone"], tensors["bone"]
    if method == "bone_unconstrained":
        return tensors["bone_A"], tensors["bone_B"]
    raise AdapterError(f"{method!r} is not a Bone method.")


def bone_merged(weight: Tensor, tensors: dict[str, Tensor], method: str, grouping: str) -> Tensor:
    """W' for a Bone method, differentiable, computed in the dtype of the given tensors. weight (out, in);
    tensors {"bone": (G, b, b)} or {"bone_A", "bone_B"}."""
    mult, add = _affine_parts(tensors, method)
    out_f, in_f = weight.shape
    b = mult.shape[-1]
    blocks = _blocks(weight, b)  # (out/b, b, in/b, b)
    if method == "bone_hadamard":
        times = blocks * _per_block(mult, grouping)
    else:
        times = _from_group_major(torch.matmul(_group_major(weight, b, grouping), mult), out_f, in_f, grouping)
    return (blocks + times).add_(_per_block(add, grouping)).reshape(out_f, in_f)


def merge_bone(weight: Tensor, tensors: dict[str, Tensor], method: str, grouping: str) -> Tensor:
    """W' = W + ΔW, computed in fp32 (fp64 stays fp64), returned in W's dtype. No autograd."""
    dtype = _math_dtype(weight.dtype)
    with torch.no_grad():
        merged = bone_merged(weight.to(dtype), {k: v.to(dtype) for k, v in tensors.items()}, method, grouping)
    return merged.to(weight.dtype)


def unmerge_bone(merged: Tensor, tensors: dict[str, Tensor], method: str, grouping: str) -> Tensor:
    """The exact inverse of merge_bone, solved per block in fp64: W[a,c] = (W'[a,c] − B[g])·(I + A[g])⁻¹
    (elementwise division by 1 + bone for Hadamard). AdapterError when a block is singular."""
    mult, add = (t.to(torch.float64) for t in _affine_parts(tensors, method))
    out_f, in_f = merged.shape
    b = mult.shape[-1]
    with torch.no_grad():
        rest = _blocks(merged.to(torch.float64), b) - _per_block(add, grouping)  # (out/b, b, in/b, b)
        if method == "bone_hadamard":
            divisor = 1.0 + _per_block(mult, grouping)
            if (divisor == 0).any():
                raise AdapterError(f"cannot unmerge: some entries of bone equal -1, so 1 + bone has zeros "
                                   f"({(divisor == 0).sum().item()} of them) and W cannot be recovered.")
            weight = (rest / divisor).reshape(out_f, in_f)
        else:
            eye = torch.eye(b, dtype=torch.float64, device=mult.device)
            rest = rest.reshape(out_f, in_f)
            solved, info = torch.linalg.solve_ex(eye + mult, _group_major(rest, b, grouping), left=False)
            if (info != 0).any() or not torch.isfinite(solved).all():
                bad = torch.nonzero(info).flatten().tolist() or "some"
                raise AdapterError(f"cannot unmerge: I + bone is singular for {grouping} group(s) {bad} "
                                   f"(b={b}), so W cannot be recovered from the merged weight.")
            weight = _from_group_major(solved, out_f, in_f, grouping).reshape(out_f, in_f)
    return weight.to(merged.dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


class BoneRowFunction(torch.autograd.Function):
    """Bone with row grouping, factored: y = (x + u)·Wᵀ + tile_{out/b}(Σ_c u_c), u_c = x_c·bone[c]ᵀ.
    Saves only x, W and bone; W' is never built."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, bone: Tensor) -> Tensor:
        dtype = _compute_dtype(x)
        out_f, in_f = weight.shape
        groups, b, _ = bone.shape
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, in_f).to(dtype).contiguous()  # (N, in)
            m = bone.to(dtype)  # (in/b, b, b)
            n = x2.shape[0]
            xg = x2.view(n, groups, b).transpose(0, 1)  # (in/b, N, b) view
            xu = torch.empty_like(x2)  # (N, in): x + u, written block by block without a layout copy
            torch.baddbmm(xg, xg, m.transpose(1, 2), out=xu.view(n, groups, b).transpose(0, 1))
            s = x2 @ m.transpose(1, 2).reshape(in_f, b)  # (N, b) = Σ_c x_c·bone[c]ᵀ
            y = F.linear(xu, weight.to(dtype))  # (N, out)
            del xu
            y.view(n, out_f // b, b).add_(s.unsqueeze(1))
        ctx.save_for_backward(x, weight, bone)
        ctx.compute_dtype = dtype
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        x, weight, bone = ctx.saved_tensors
        dtype = ctx.compute_dtype
        out_f, in_f = weight.shape
        groups, b, _ = bone.shape
        dx = dbone = None
        with torch.autocast(x.device.type, enabled=False):
            g = dy.reshape(-1, out_f).to(dtype)  # (N, out)
            n = g.shape[0]
            m = bone.to(dtype)
            gs = g.view(n, out_f // b, b).sum(1)  # (N, b): gradient of Σ_c u_c
            gu = g @ weight.to(dtype)  # (N, in): gradient of x + u
            gu.view(n, groups, b).add_(gs.unsqueeze(1))  # now the gradient of u
            gug = gu.view(n, groups, b).transpose(0, 1)  # (in/b, N, b) view
            if ctx.needs_input_grad[2]:
                x2 = x.reshape(-1, in_f).to(dtype)
                dbone = torch.bmm(gug.transpose(1, 2), x2.view(n, groups, b).transpose(0, 1)).to(bone.dtype)
            if ctx.needs_input_grad[0]:
                dx = torch.empty_like(gu)  # (N, in) = (gu − gs) + gu·bone, block by block
                torch.baddbmm(gug, gug, m, out=dx.view(n, groups, b).transpose(0, 1))
                dx.view(n, groups, b).sub_(gs.unsqueeze(1))
                dx = dx.view(x.shape).to(x.dtype)
        return dx, None, dbone


class RebuiltWeightFunction(torch.autograd.Function):
    """y = x·W'ᵀ for any Bone variant: builds W' (fp32 math) in forward and frees it, saves only x, W and
    the adapter tensors, rebuilds W' in backward. Parameter gradients come from autograd through
    `bone_merged` with dW' = dyᵀ·x."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, method: str, grouping: str,
                names: tuple[str, ...], *params: Tensor) -> Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            merged = merge_bone(weight, dict(zip(names, params)), method, grouping).to(dtype)  # (out, in)
            y = F.linear(x.to(dtype), merged)
        ctx.save_for_backward(x, weight, *params)
        ctx.spec = (method, grouping, names, dtype)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, *params = ctx.saved_tensors
        method, grouping, names, dtype = ctx.spec
        out_f, in_f = weight.shape
        math_dtype = _math_dtype(weight.dtype)
        with torch.autocast(x.device.type, enabled=False):
            with torch.enable_grad():
                leaves = [p.detach().to(math_dtype).requires_grad_() for p in params]
                merged = bone_merged(weight.detach().to(math_dtype), dict(zip(names, leaves)), method, grouping)
            g = dy.reshape(-1, out_f).to(dtype)  # (N, out)
            dx = None
            if ctx.needs_input_grad[0]:
                dx = (g @ merged.detach().to(dtype)).view(x.shape).to(x.dtype)
            x2 = x.reshape(-1, in_f).to(dtype)  # (N, in)
            dmerged = (g.t() @ x2).to(math_dtype)  # (out, in)
            grads = torch.autograd.grad(merged, leaves, dmerged)
        return (dx, None, None, None, None, *(gr.to(p.dtype) for gr, p in zip(grads, params)))


class BoneLinear(nn.Module):
    """nn.Linear(bias=False) replacement: frozen `weight` (out, in) under nn.Linear's name, plus `bone`
    (G, b, b) or `bone_A`/`bone_B`, zero-initialised (the layer starts equal to the base)."""

    def __init__(self, weight: nn.Parameter, cfg: AdapterConfig):
        super().__init__()
        out_f, in_f = weight.shape
        b = cfg.b
        self.cfg = cfg
        self.in_features, self.out_features = in_f, out_f
        self.weight = weight
        groups = in_f // b if cfg.grouping == "row" else out_f // b
        kw = dict(device=weight.device, dtype=_math_dtype(weight.dtype))
        if cfg.method == "bone_unconstrained":
            self.bone_A = nn.Parameter(torch.zeros(groups, b, b, **kw))
            self.bone_B = nn.Parameter(torch.zeros(groups, b, b, **kw))
        else:
            self.bone = nn.Parameter(torch.zeros(groups, b, b, **kw))

    def adapter_tensors(self) -> dict[str, Tensor]:
        """{suffix: tensor} as used by the merge math."""
        if self.cfg.method == "bone_unconstrained":
            return {"bone_A": self.bone_A, "bone_B": self.bone_B}
        return {"bone": self.bone}

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.method == "bone" and self.cfg.grouping == "row":
            return BoneRowFunction.apply(x, self.weight, self.bone)
        tensors = self.adapter_tensors()
        return RebuiltWeightFunction.apply(x, self.weight, self.cfg.method, self.cfg.grouping, tuple(tensors),
                                           *tensors.values())

    def merged_weight(self) -> Tensor:
        """W' in the base dtype (what this layer applies)."""
        return merge_bone(self.weight, self.adapter_tensors(), self.cfg.method, self.cfg.grouping)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.cfg.method}, "
                f"b={self.cfg.b}, grouping={self.cfg.grouping}")
