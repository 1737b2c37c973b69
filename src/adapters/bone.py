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

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.adapters.config import AdapterConfig
from src.adapters.layer import AdapterLayer, math_dtype
from src.errors import AdapterError
from src.quant import QuantWeight, dense


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
    dtype = math_dtype(weight.dtype)
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


CPU_GRAD_CHUNK_BYTES = 1 << 18  # Bone-row backward on CPU: bytes of the gradient of u formed at a time


def _grad_chunk_rows(n: int, in_f: int, g: Tensor) -> int:
    """Tokens per step of Bone-row's backward loop: all of them on accelerators; on CPU about
    CPU_GRAD_CHUNK_BYTES of (rows, in), at least 64 rows. A fresh (N, in) buffer on CPU costs page faults and
    cache misses that exceed the b×b products done with it; a small reused one stays in cache."""
    if g.device.type != "cpu":
        return n
    return min(n, max(64, CPU_GRAD_CHUNK_BYTES // (in_f * g.element_size())))


class BoneRowFunction(torch.autograd.Function):
    """Bone with row grouping, factored: y = (x + u)·Wᵀ + tile_{out/b}(s), u_c = x_c·bone[c]ᵀ, s = Σ_c u_c.
    Saves only x, W and bone; W' is never built. Adapter work is one (N, in)·b product each for u, dx and
    dbone, LoRA's at equal parameters.

    Backward: with gx = dy·W and gs = Σ_a dy_a, the gradient of u is gu_c = gx_c + gs and
    dx_c = gx_c + gu_c·bone[c], formed from gx directly: |gs| is about sqrt(in/b) times |gx|, so writing dx as
    gu + gu·bone − gs would cancel and carry a rounding error of gs's size in bf16. gu is formed a block of
    tokens at a time (see _grad_chunk_rows) in one reused buffer; dx overwrites gx in place."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, bone: Tensor) -> Tensor:
        dtype = _compute_dtype(x)
        out_f, in_f = weight.shape
        groups, b, _ = bone.shape
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, in_f).to(dtype).contiguous()  # (N, in)
            n = x2.shape[0]
            xu = torch.empty_like(x2)  # (N, in): u, then x + u, written block by block without a layout copy
            xug = xu.view(n, groups, b).transpose(0, 1)  # (in/b, N, b) strided view
            xug.baddbmm_(x2.view(n, groups, b).transpose(0, 1), bone.to(dtype).transpose(1, 2), beta=0)  # u_c
            s = xu.view(n, groups, b).sum(1)  # (N, b) = Σ_c u_c, accumulated in fp32 for bf16/fp16
            y = s.unsqueeze(1).expand(n, out_f // b, b).reshape(n, out_f)  # (N, out) = tile(s)
            if isinstance(weight, QuantWeight):
                y.add_(weight.matmul(xu.add_(x2)))  # += (x + u)·Wᵀ on the quantised weight
            else:
                y.addmm_(xu.add_(x2), weight.to(dtype).t())  # += (x + u)·Wᵀ, rounded once
            del xu
        quantized = isinstance(weight, QuantWeight)
        ctx.save_for_backward(x, None if quantized else weight, bone)
        ctx.quant_weight = weight if quantized else None
        ctx.compute_dtype = dtype
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        x, weight, bone = ctx.saved_tensors
        weight = ctx.quant_weight if weight is None else weight
        dtype = ctx.compute_dtype
        out_f, in_f = weight.shape
        groups, b, _ = bone.shape
        need_x, need_bone = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        with torch.autocast(x.device.type, enabled=False):
            g = dy.reshape(-1, out_f).to(dtype)  # (N, out)
            n = g.shape[0]
            gs = g.view(n, out_f // b, b).sum(1)  # (N, b): gradient of s
            # (N, in): gradient of x + u; becomes dx in place
            gx = weight.matmul_t(g) if isinstance(weight, QuantWeight) else g @ weight.to(dtype)
            m = bone.to(dtype)
            x2 = x.reshape(-1, in_f).to(dtype) if need_bone else None  # (N, in)
            rows = _grad_chunk_rows(n, in_f, gx)
            gu_buf = gx.new_empty(groups, rows, b)  # (in/b, rows, b): gradient of u for a block of tokens
            part = dtype if rows == n else math_dtype(dtype)  # several blocks: dbone's parts in fp32
            dbone = torch.zeros(groups, b, b, dtype=part, device=gx.device) if need_bone else None
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                gxg = gx[start:stop].view(-1, groups, b).transpose(0, 1)  # (in/b, rows, b) view
                gu = torch.add(gxg, gs[start:stop], out=gu_buf[:, :stop - start])
                if x2 is not None:
                    xg = x2[start:stop].view(-1, groups, b).transpose(0, 1)  # (in/b, rows, b) view
                    dbone.baddbmm_(gu.transpose(1, 2).to(part), xg.to(part))  # dbone[c] += gu_cᵀ·x_c
                if need_x:
                    gxg.baddbmm_(gu, m)  # dx_c = gx_c + gu_c·bone[c]
        dx = gx.view(x.shape).to(x.dtype) if need_x else None
        return dx, None, dbone.to(bone.dtype) if dbone is not None else None


class RebuiltWeightFunction(torch.autograd.Function):
    """y = x·W'ᵀ for any Bone variant: builds W' (fp32 math) in forward and frees it, saves only x, W and
    the adapter tensors, rebuilds W' in backward. Parameter gradients come from autograd through
    `bone_merged` with dW' = dyᵀ·x."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, method: str, grouping: str,
                names: tuple[str, ...], *params: Tensor) -> Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            tensors = dict(zip(names, params, strict=True))
            merged = merge_bone(dense(weight), tensors, method, grouping).to(dtype)  # (out, in)
            y = F.linear(x.to(dtype), merged)
            del merged
        quantized = isinstance(weight, QuantWeight)  # dequantised here and again in backward, never saved
        ctx.save_for_backward(x, None if quantized else weight, *params)
        ctx.quant_weight = weight if quantized else None
        ctx.spec = (method, grouping, names, dtype)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, *params = ctx.saved_tensors
        weight = ctx.quant_weight if weight is None else weight
        method, grouping, names, dtype = ctx.spec
        out_f, in_f = weight.shape
        compute = math_dtype(weight.dtype)
        with torch.autocast(x.device.type, enabled=False):
            with torch.enable_grad():
                leaves = [p.detach().to(compute).requires_grad_() for p in params]
                tensors = dict(zip(names, leaves, strict=True))
                merged = bone_merged(dense(weight).detach().to(compute), tensors, method, grouping)
            g = dy.reshape(-1, out_f).to(dtype)  # (N, out)
            dx = None
            if ctx.needs_input_grad[0]:
                dx = (g @ merged.detach().to(dtype)).view(x.shape).to(x.dtype)
            x2 = x.reshape(-1, in_f).to(dtype)  # (N, in)
            dmerged = (g.t() @ x2).to(compute)  # (out, in)
            grads = torch.autograd.grad(merged, leaves, dmerged)
        return (dx, None, None, None, None, *(gr.to(p.dtype) for gr, p in zip(grads, params, strict=True)))


class BoneLinear(AdapterLayer):
    """Bone and its ablations: frozen `weight` (out, in) plus `bone` (G, b, b), or `bone_A`/`bone_B` for the
    unconstrained ablation, zero-initialised (the layer starts equal to the base)."""

    methods = ("bone", "bone_unconstrained", "bone_hadamard")
    every_name = ("bone", "bone_A", "bone_B")

    def __init__(self, weight: nn.Parameter | QuantWeight, cfg: AdapterConfig):
        super().__init__(weight, cfg)
        b = cfg.b
        groups = self.in_features // b if cfg.grouping == "row" else self.out_features // b
        for name in self.trainable_names(cfg):
            setattr(self, name, nn.Parameter(torch.zeros(groups, b, b, **self.tensor_kwargs())))

    @classmethod
    def trainable_names(cls, cfg: AdapterConfig) -> tuple[str, ...]:
        return ("bone_A", "bone_B") if cfg.method == "bone_unconstrained" else ("bone",)

    @classmethod
    def check_targets(cls, shapes: Mapping[str, tuple[int, int]], cfg: AdapterConfig) -> None:
        """Every targeted (out, in) must be a multiple of b; the error lists the block sizes that would fit."""
        b = cfg.b
        bad = [f"{name} ({o}x{i})" for name, (o, i) in shapes.items() if o % b or i % b]
        if bad:
            common = math.gcd(*(d for shape in shapes.values() for d in shape))
            valid = [d for d in range(common, 0, -1) if common % d == 0][:8]
            raise AdapterError(f"Bone block size b={b} does not divide the (out x in) sizes of {len(bad)} layer(s): "
                               f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. Block sizes that divide every "
                               f"targeted layer: {', '.join(map(str, valid))}.")

    @classmethod
    def merge(cls, weight: Tensor, tensors: Mapping[str, Tensor], cfg: AdapterConfig) -> Tensor:
        return merge_bone(weight, dict(tensors), cfg.method, cfg.grouping)

    @classmethod
    def unmerge(cls, merged: Tensor, tensors: Mapping[str, Tensor], cfg: AdapterConfig) -> Tensor:
        return unmerge_bone(merged, dict(tensors), cfg.method, cfg.grouping)

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.method == "bone" and self.cfg.grouping == "row":
            return BoneRowFunction.apply(x, self.weight, self.bone)
        tensors = self.adapter_tensors()
        return RebuiltWeightFunction.apply(x, self.weight, self.cfg.method, self.cfg.grouping, tuple(tensors),
                                           *tensors.values())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.cfg.method}, "
                f"b={self.cfg.b}, grouping={self.cfg.grouping}")
