"""WKV6 operator: one API (`wkv6`), three backends (cuda, fla, torch), and the choice between them.

Conventions: r, k, v, w are (B, T, H, N); w is the *raw* decay parameter, the per-step decay is
d = exp(-exp(w)); u (the bonus, ``time_faaaa``) is (H, N); the state S is (B, H, N, N) float32
indexed [key i, value j]:
    y_t[j] = sum_i r_t[i] * (S_{t-1}[i, j] + u[i] * k_t[i] * v_t[j])
    S_t[i, j] = d_t[i] * S_{t-1}[i, j] + k_t[i] * v_t[j]

Backends:
- ``torch``: chunked pure PyTorch, differentiated by autograd, any device. Every decay factor is
  exp(sum of log-decays over an explicit range of steps), so every exponent is <= 0 and no
  cumulative sum is ever subtracted from another (see `_wkv6_torch`).
- ``cuda``: our kernel in ``cuda/`` (bf16 I/O, fp32 state), JIT-built on first use, one build per
  head size.
- ``fla``: ``chunk_rwkv6`` from flash-linear-attention (module ``fla``) or rwkv-fla (module ``rwkvfla``);
  the calling convention (token layout, ``head_first``) is read from the installed version's signature
  on first use (`fla_api`).

Under autocast the torch backend still computes in float32 (see `_wkv6_torch`).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from src.errors import ConfigError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "fla", "torch")
CUDA_SOURCE_DIR = Path(__file__).resolve().parent.parent / "cuda"

# exp(-exp(7)) = exp(-1097) is exactly 0 in float64 and float32, and so is its w-derivative: clamping raw
# decays here changes no value but keeps log-decays finite (a -inf would turn 0 * -inf into NaN in the
# range-sum matmul, and 0 * inf into NaN in the w-gradient).
_RAW_DECAY_MAX = 7.0
_MAX_CHUNK = 32

_logged_choices: set[tuple[str, str]] = set()


def wkv6(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Run WKV6 over a sequence.

    Args: r, k, v, w (B, T, H, N) with w the raw decay; u (H, N); state (B, H, N, N) [key, value]
    or None for zeros; backend one of BACKENDS.
    Returns y (B, T, H, N) in r's dtype and the final state (B, H, N, N), float32 (float64 when r is
    float64). Differentiable wrt r, k, v, w, u and state.
    """
    _check_shapes(r, k, v, w, u, state)
    chosen = resolve_backend(backend, r.device)
    if chosen == "cuda" and backend == "auto":
        failure = cuda_kernel_error(r.shape[-1])
        if failure is not None:  # the build failed: fla or torch instead, with one warning
            chosen = resolve_backend(backend, r.device)
            logger.warning("WKV6 backend auto: the CUDA kernel could not be built (%s); using %s instead", failure,
                           chosen)
    _log_choice(chosen, r.device)
    if chosen == "torch":
        return _wkv6_torch(r, k, v, w, u, state)
    if chosen == "cuda":
        return _wkv6_cuda(r, k, v, w, u, state)
    return _wkv6_fla(r, k, v, w, u, state)


def available_backends(device: torch.device | str = "cuda") -> list[str]:
    """Backends (not "auto") that can run on `device` in this environment."""
    device = torch.device(device)
    return [b for b in ("torch", "cuda", "fla") if _usable(b, device)]


def _usable(backend: str, device: torch.device) -> bool:
    """Whether `backend` can run on `device`; checks (and imports) only what that backend needs."""
    if backend == "torch":
        return True
    if device.type != "cuda":
        return False
    if backend == "cuda":
        return _cuda_build_failure is None and _cuda_kernel_buildable()
    return _fla_importable()


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map a backend request to the backend that will run: "auto" prefers cuda, then fla, then torch."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ConfigError(f"unknown WKV backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    if name == "auto":
        return next(b for b in ("cuda", "fla", "torch") if _usable(b, device))
    if _usable(name, device):
        return name
    if device.type != "cuda":
        why = f"it needs tensors on a CUDA device, got {device}"
    elif name == "cuda" and _cuda_build_failure is not None:
        why = f"building the kernel failed: {_cuda_build_failure}"
    elif name == "cuda":
        why = "it needs a CUDA build of torch and the CUDA toolkit (nvcc, CUDA_HOME) to compile cuda/wkv6.cu"
    elif not torch.cuda.is_available():
        why = "it needs a CUDA build of torch and a CUDA GPU"
    else:
        why = str(_fla_resolution())
    raise _unavailable(name, why)


def _unavailable(name: str, why: str) -> ConfigError:
    return ConfigError(f"WKV backend {name!r} is not available: {why}. Use backend='auto' or 'torch'.")


def _log_choice(backend: str, device: torch.device) -> None:
    key = (backend, str(device))
    if key not in _logged_choices:
        _logged_choices.add(key)
        if backend == "fla":
            logger.info("WKV6 backend fla on %s: %s", device, fla_api().describe())
        else:
            logger.info("WKV6 backend %s on %s", backend, device)


def _check_shapes(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None) -> None:
    if r.dim() != 4:
        raise ValueError(f"wkv6 expects r, k, v, w of shape (B, T, H, N); got r of shape {tuple(r.shape)}.")
    B, T, H, N = r.shape
    for name, x in (("k", k), ("v", v), ("w", w)):
        if x.shape != r.shape:
            raise ValueError(f"wkv6: {name} has shape {tuple(x.shape)} but r has {tuple(r.shape)}; they must match.")
    if T == 0:
        raise ValueError("wkv6 needs at least one time step (T >= 1); got T = 0.")
    if u.shape != (H, N):
        raise ValueError(f"wkv6: u must have shape (H, N) = {(H, N)}; got {tuple(u.shape)}.")
    if state is not None and state.shape != (B, H, N, N):
        raise ValueError(f"wkv6: state must have shape (B, H, N, N) = {(B, H, N, N)}; got {tuple(state.shape)}.")


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------


@functools.cache
def _chunk_plan(L: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Range-sum matrices G (n + 2, L, L) and query masks (n, L, 1) for a chunk of L = 2^n steps.

    `G[j] @ lw` sums the log-decays lw (L, N) over the exact step range each decay factor needs, so
    every sum is <= 0 and as precise as a sum of same-sign terms (no cumulative sum is subtracted):
    - G[j], level h = 2^j of the halving tree: in every block of 2h steps, a step t of the second
      half (a query, mask True) gets steps [block + h, t - 1], a step s of the first half (a key)
      gets [s + 1, block + h - 1]: query and key meet through the block midpoint;
    - G[n], chunk prefix (query t meets the incoming chunk state): [0, t - 1];
    - G[n + 1], chunk suffix (key s carried to the outgoing chunk state): [s + 1, L - 1].
    """
    n = L.bit_length() - 1
    G = torch.zeros(n + 2, L, L, dtype=dtype)
    is_query = torch.zeros(n, L, 1, dtype=torch.bool)
    for level in range(n):
        h = 1 << level
        for p in range(L):
            block = p - p % (2 * h)
            if p - block >= h:
                G[level, p, block + h : p] = 1
                is_query[level, p] = True
            else:
                G[level, p, p + 1 : block + h] = 1
    for p in range(L):
        G[n, p, :p] = 1
        G[n + 1, p, p + 1 :] = 1
    return G.to(device), is_query.to(device)


def _intra_chunk_scores(levels: list[Tensor], diag: Tensor) -> Tensor:
    """Assemble the intra-chunk score matrix A (..., L, L) from the halving tree.

    levels[j] (..., L, N) holds level h = 2^j's decayed keys (first half of each 2h-block) and queries
    (second half); diag (..., L) is the bonus term on the diagonal. A[t, s] for s < t is the score of
    the one level where t and s fall in different halves of the same block; 0 above the diagonal.
    """
    L = diag.shape[-1]
    lead = diag.shape[:-1]
    A = diag.reshape(lead + (L, 1, 1))  # (..., L/h, h, h) with h = 1
    h = 1
    for level in levels:
        nb = L // (2 * h)
        keys, queries = level.reshape(lead + (nb, 2, h, level.shape[-1])).unbind(-3)  # (..., nb, h, N)
        att = queries @ keys.transpose(-1, -2)  # (..., nb, h, h)
        A = A.reshape(lead + (nb, 2, h, h))
        top = torch.cat([A[..., 0, :, :], torch.zeros_like(att)], -1)  # (..., nb, h, 2h)
        bottom = torch.cat([att, A[..., 1, :, :]], -1)
        A = torch.cat([top, bottom], -2)  # (..., nb, 2h, 2h)
        h *= 2
    return A.reshape(lead + (L, L))


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for `device`'s type (a no-op for a type that has no autocast)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def _wkv6_torch(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """Chunked WKV6 in float32 (float64 for float64 r), whatever autocast is active around it.

    Under autocast the matmuls below would otherwise run in bf16/fp16 and lose three digits in y, the state
    and every gradient; lower-precision inputs are upcast instead. y comes back in r's dtype, each gradient in
    its input's dtype (autograd through the casts).
    """
    with _autocast_off(r.device):
        return _wkv6_torch_fp32(r, k, v, w, u, state)


def _wkv6_torch_fp32(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Chunked WKV6: intra-chunk pairs through the halving tree, chunks linked by a loop over chunk states."""
    B, T, H, N = r.shape
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    L = min(_MAX_CHUNK, 1 << (T - 1).bit_length())  # chunk length, a power of two
    nc = -(-T // L)
    pad = nc * L - T
    # Padded steps: r = k = v = 0 and raw w = -inf (decay exactly 1) leave y and the state exact.
    rr, kk, vv = (F.pad(x.to(dt), (0, 0, 0, 0, 0, pad)) for x in (r, k, v))
    ww = F.pad(w.to(dt).clamp(max=_RAW_DECAY_MAX), (0, 0, 0, 0, 0, pad), value=float("-inf"))
    rr, kk, vv, ww = (x.view(B, nc, L, H, N).permute(0, 3, 1, 2, 4).contiguous() for x in (rr, kk, vv, ww))
    # (B, H, nc, L, N) from here on

    G, is_query = _chunk_plan(L, dt, r.device)
    lw = -torch.exp(ww)  # log-decay <= 0
    # decayed queries / keys of each tree level, each (B, H, nc, L, N); every decay factor is <= 1
    levels = [torch.where(is_query[j], rr, kk) * (G[j] @ lw).exp_() for j in range(len(is_query))]
    r_in = rr * (G[-2] @ lw).exp_()  # decay from chunk start to t-1
    k_out = kk * (G[-1] @ lw).exp_()  # decay from s+1 to chunk end
    chunk_decay = lw.sum(-2, keepdim=True).exp_()  # (B, H, nc, 1, N)

    diag = (rr * u.to(dt).view(1, H, 1, 1, N) * kk).sum(-1)  # (B, H, nc, L) bonus term
    y = _intra_chunk_scores(levels, diag) @ vv  # (B, H, nc, L, N)

    chunk_kv = k_out.transpose(-1, -2) @ vv  # (B, H, nc, N, N)
    S = torch.zeros(B, H, N, N, dtype=dt, device=r.device) if state is None else state.to(dt)
    starts = []
    for kv_c, d_c in zip(chunk_kv.unbind(2), chunk_decay.transpose(-1, -2).unbind(2), strict=True):  # d_c (B, H, N, 1)
        starts.append(S)
        S = d_c * S + kv_c
    y = y + r_in @ torch.stack(starts, 2)  # (B, H, nc, L, N)
    y = y.permute(0, 2, 3, 1, 4).reshape(B, nc * L, H, N)[:, :T]
    return y.to(r.dtype), S


# --------------------------------------------------------------------------------------------
# cuda backend
# --------------------------------------------------------------------------------------------


@functools.cache
def _cuda_kernel_buildable() -> bool:
    """A CUDA device, a CUDA build of torch and a CUDA toolkit to compile cuda/wkv6.cu with."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


_cuda_build_failure: str | None = None  # why the kernel could not be built, once a build has failed


def cuda_kernel_error(head_size: int = 64) -> str | None:
    """Build the CUDA kernel for `head_size` now (or load it from torch's cache): None when it works, else why
    not. A failure is recorded and "auto" no longer picks cuda, so a run resolves its backend before it starts
    (the training preflight calls this) instead of failing at its first step."""
    global _cuda_build_failure
    if _cuda_build_failure is not None:
        return _cuda_build_failure
    if not _cuda_kernel_buildable():
        return "no CUDA device, CUDA build of torch or CUDA toolkit (CUDA_HOME) for the JIT build"
    try:
        _cuda_ops(head_size)
    except Exception as e:  # any build or load failure (nvcc, ninja, arch, linker) disables the backend
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        _cuda_build_failure = f"{type(e).__name__}: {lines[-1] if lines else ''}".strip().rstrip(":")
        return _cuda_build_failure
    return None


@functools.cache
def _cuda_ops(head_size: int) -> SimpleNamespace:
    """Build (first use per head size; torch caches the build on disk) and load the kernel ops."""
    from torch.utils.cpp_extension import load

    name = f"rwkv6bone_wkv6_h{head_size}"
    logger.info("loading the WKV6 CUDA kernel %s (compiled on first use, then cached by torch)", name)
    define = f"-DWKV6_HEAD_SIZE={head_size}"
    load(
        name=name,
        sources=[str(CUDA_SOURCE_DIR / "wkv6_op.cpp"), str(CUDA_SOURCE_DIR / "wkv6.cu")],
        extra_cflags=["-O3", "-std=c++20", define],
        extra_cuda_cflags=["-O3", "--use_fast_math", "-Xptxas", "-O3", define],
        is_python_module=False,
    )
    namespace = getattr(torch.ops, f"rwkv6bone_h{head_size}")
    return SimpleNamespace(forward=namespace.forward, backward=namespace.backward)


class _WKV6CUDA(torch.autograd.Function):
    """bf16 kernel I/O, fp32 state; gradients come back in each input's dtype."""

    @staticmethod
    def forward(ctx, r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        ops = _cuda_ops(r.shape[-1])
        r16, k16, v16, w16 = (x.to(torch.bfloat16).contiguous() for x in (r, k, v, w))
        u32, s32 = u.float().contiguous(), state.float().contiguous()
        y, s_out = ops.forward(r16, k16, v16, w16, u32, s32)
        ctx.save_for_backward(r16, k16, v16, w16, u32, s32)
        ctx.dtypes = (r.dtype, k.dtype, v.dtype, w.dtype, u.dtype, state.dtype)
        return y.to(r.dtype), s_out

    @staticmethod
    def backward(ctx, gy: Tensor, gs: Tensor) -> tuple[Tensor, ...]:
        r16, k16, v16, w16, u32, s32 = ctx.saved_tensors
        ops = _cuda_ops(r16.shape[-1])
        grads = ops.backward(
            r16, k16, v16, w16, u32, s32, gy.to(torch.bfloat16).contiguous(), gs.float().contiguous()
        )
        gr, gk, gv, gw, gu, gs0 = grads
        return tuple(g.to(dt) for g, dt in zip((gr, gk, gv, gw, gu.sum(0), gs0), ctx.dtypes, strict=True))


def _wkv6_cuda(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    B, _, H, N = r.shape
    if state is None:
        state = torch.zeros(B, H, N, N, dtype=torch.float32, device=r.device)
    return _WKV6CUDA.apply(r, k, v, w, u, state)


# --------------------------------------------------------------------------------------------
# fla backend
# --------------------------------------------------------------------------------------------


# Where each importable module may come from (distribution names for importlib.metadata).
_FLA_MODULES = {"fla": ("fla-core", "flash-linear-attention", "rwkv-fla"), "rwkvfla": ("rwkv-fla",)}
_FLA_NEEDED = (
    "chunk_rwkv6(r, k, v, w, u, scale=..., initial_state=..., output_final_state=...) from fla.ops.rwkv6 "
    "(flash-linear-attention / fla-core 0.1 to 0.6, or rwkv-fla, import name rwkvfla)"
)
_FLA_INSTALL = "pip install flash-linear-attention (or rwkv-fla) on a machine with triton and a CUDA GPU"


@dataclass(frozen=True)
class FlaAPI:
    """How to call the installed fla's ``chunk_rwkv6``.

    head_first: lay r, k, v, w and y out as (B, H, T, N) instead of (B, T, H, N). head_first_kwarg: the value
    to pass as ``head_first=``, or None for versions without that parameter.
    """

    module: str
    source: str  # e.g. "fla-core 0.6.0"
    chunk_rwkv6: Callable[..., tuple[Tensor, Tensor]]
    head_first: bool
    head_first_kwarg: bool | None

    def describe(self) -> str:
        layout = "(B, H, T, N)" if self.head_first else "(B, T, H, N)"
        return f"{self.source} (module {self.module}), chunk_rwkv6 layout {layout}"


def _module_source(name: str, module: ModuleType) -> str:
    """The distribution and version that installed module `name`, e.g. "rwkv-fla 0.7.202508221413"."""
    try:
        owners = importlib.metadata.packages_distributions().get(name, [])
    except Exception:  # broken metadata must not hide the backend
        owners = []
    for dist in [d for d in _FLA_MODULES[name] if d in owners] + list(owners):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"{name} {getattr(module, '__version__', 'of unknown version')}"


def _fla_call_convention(fn: Callable, source: str) -> tuple[bool, bool | None]:
    """(head_first, head_first_kwarg) for this chunk_rwkv6, from its signature; ConfigError if unrecognised.

    Known signatures, by release:
    - fla from git before 2024-11 and rwkv-fla 0.1 of 2024-09/10: no head_first, no cu_seqlens: (B, H, T, N);
    - fla 2024-11 to 0.1.2 and rwkv-fla 0.1 of 2024-11/12 to 0.7 of 2025-03: head_first=True by default,
      (B, H, T, N); we pass the default (rwkv-fla 0.1's head_first=False path raises NameError);
    - fla 0.2 to 0.4 and rwkv-fla 0.7 since 2025-04: head_first=False by default (True raises), (B, T, H, N);
    - fla / fla-core 0.5 and 0.6: head_first removed (passing it raises), cu_seqlens and **kwargs, (B, T, H, N).
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot read the signature of chunk_rwkv6 from {source} ({e}); "
                          f"this trainer needs {_FLA_NEEDED}") from e
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    missing = [n for n in ("scale", "initial_state", "output_final_state") if n not in params]
    if len(positional) < 5 or missing or list(params).index("scale") < 5:
        raise ConfigError(
            f"{source} has chunk_rwkv6{inspect.signature(fn)}, which this trainer does not recognise (missing: "
            f"{', '.join(missing) or 'five leading r, k, v, w, u parameters'}); it needs {_FLA_NEEDED}"
        )
    if "head_first" in params:
        default = params["head_first"].default
        if not isinstance(default, bool):
            raise ConfigError(f"{source} has chunk_rwkv6 with head_first={default!r} by default, expected True "
                              f"or False; this trainer needs {_FLA_NEEDED}")
        return default, default
    seq_first = "cu_seqlens" in params or "offsets" in params
    seq_first = seq_first or any(p.kind == p.VAR_KEYWORD for p in params.values())
    return not seq_first, None


@functools.cache
def _fla_resolution() -> FlaAPI | ConfigError:
    """The usable fla API, preferring module ``fla`` over ``rwkvfla``, or the error that says why there is none."""
    reasons = []
    for name in _FLA_MODULES:
        try:
            package = importlib.import_module(name)
            fn = importlib.import_module(f"{name}.ops.rwkv6").chunk_rwkv6
        except Exception as e:  # any import failure (triton, versions, no driver) disables the backend
            if not (isinstance(e, ModuleNotFoundError) and e.name == name):  # else: simply not installed
                reasons.append(f"`{name}` is installed but importing {name}.ops.rwkv6.chunk_rwkv6 failed ({e})")
            continue
        source = _module_source(name, package)
        try:
            head_first, kwarg = _fla_call_convention(fn, source)
        except ConfigError as e:
            reasons.append(str(e))
            continue
        return FlaAPI(name, source, fn, head_first, kwarg)
    if not reasons:
        reasons.append(f"neither `fla` nor `rwkvfla` is installed ({_FLA_INSTALL})")
    return ConfigError("; ".join(reasons))


def fla_api() -> FlaAPI:
    """The installed fla's calling convention; ConfigError naming the version and what is needed if unusable."""
    found = _fla_resolution()
    if isinstance(found, ConfigError):
        raise _unavailable("fla", str(found))
    return found


def _fla_importable() -> bool:
    """A CUDA device and an fla (or rwkv-fla) whose chunk_rwkv6 we know how to call."""
    return torch.cuda.is_available() and not isinstance(_fla_resolution(), ConfigError)


def _wkv6_fla(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """fla's chunk_rwkv6 takes the log-decay -exp(w), scales r by 1/sqrt(N) unless scale=1, and keeps its
    state as (B, H, N_key, N_value) like ours; the token layout depends on the version (see `FlaAPI`)."""
    api = fla_api()
    log_decay = -torch.exp(w.float().clamp(max=_RAW_DECAY_MAX))
    rr, kk, vv, ww = r, k, v, log_decay  # (B, T, H, N)
    if api.head_first:
        rr, kk, vv, ww = (x.transpose(1, 2).contiguous() for x in (rr, kk, vv, ww))  # (B, H, T, N)
    extra = {} if api.head_first_kwarg is None else {"head_first": api.head_first_kwarg}
    initial = None if state is None else state.float()
    y, s_out = api.chunk_rwkv6(
        rr, kk, vv, ww, u, scale=1.0, initial_state=initial, output_final_state=True, **extra
    )
    if api.head_first:
        y = y.transpose(1, 2)  # (B, T, H, N)
    return y.to(r.dtype), s_out.float()
