"""The RWKV6 ("x060") architecture: a plain nn.Module whose parameter names are the official checkpoint's key
names, sizes inferred from a checkpoint's tensor shapes, and strict loading. It knows nothing of adapters: its
base key set is the pristine model's, so tensors that adapter layers add are never base tensors.
Users import `RWKV6` from `src.model`, which adds adapter loading on top.

Shapes: B batch, T time, C n_embd, A dim_att, F dim_ffn, H heads, N head size, V vocab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from src.checkpoint import describe_state_dict, key_mismatch, load_tensors
from src.errors import CheckpointError, ConfigError
from src.wkv import wkv6

LN_X_EPS = 1e-5 * 8**2  # official head_size_divisor = 8


@dataclass(frozen=True)
class RWKV6Config:
    """Architecture sizes plus two runtime options (WKV backend, gradient checkpointing)."""

    n_layer: int
    n_embd: int
    vocab_size: int
    dim_att: int | None = None  # defaults to n_embd
    dim_ffn: int | None = None  # defaults to int(n_embd * 3.5) // 32 * 32
    head_size: int = 64
    d_mix: int = 32  # time_maa_w1 is (C, 5 * d_mix); 64 for 7B/14B
    d_decay: int = 64  # time_decay_w1 is (C, d_decay); 128 for 7B/14B
    time_state: bool = False  # the checkpoint holds a trained initial WKV state per layer (blocks.N.att.time_state)
    wkv_backend: str = "auto"
    grad_cp: bool = False

    def __post_init__(self) -> None:
        if self.dim_att is None:
            object.__setattr__(self, "dim_att", self.n_embd)
        if self.dim_ffn is None:
            object.__setattr__(self, "dim_ffn", int(self.n_embd * 3.5) // 32 * 32)
        for name in ("n_layer", "n_embd", "vocab_size", "dim_att", "dim_ffn", "head_size", "d_mix", "d_decay"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"RWKV6Config.{name} must be positive, got {getattr(self, name)}.")
        if self.dim_att % self.head_size:
            raise ConfigError(f"dim_att={self.dim_att} is not a multiple of head_size={self.head_size}.")

    @property
    def n_head(self) -> int:
        return self.dim_att // self.head_size

    @staticmethod
    def from_state_dict(sd: dict[str, Tensor], **runtime: object) -> RWKV6Config:
        """Infer every size from tensor shapes of an official x060 state dict."""
        needed = ["emb.weight", "blocks.0.att.time_maa_w1", "blocks.0.att.time_decay_w1", "blocks.0.att.time_faaaa",
                  "blocks.0.att.receptance.weight", "blocks.0.ffn.key.weight"]
        missing = [k for k in needed if k not in sd]
        if missing:
            raise CheckpointError(f"cannot infer RWKV6 sizes: missing {', '.join(missing)}; "
                                  f"{describe_state_dict(sd.keys())}.")
        layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
        n_layer = max(layers) + 1
        vocab_size, n_embd = sd["emb.weight"].shape
        return RWKV6Config(
            n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size,
            dim_att=sd["blocks.0.att.receptance.weight"].shape[0],
            dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0],
            head_size=sd["blocks.0.att.time_faaaa"].shape[-1],
            d_mix=sd["blocks.0.att.time_maa_w1"].shape[1] // 5,
            d_decay=sd["blocks.0.att.time_decay_w1"].shape[1],
            time_state="blocks.0.att.time_state" in sd,
            **runtime,  # type: ignore[arg-type]
        )


# Per-layer recurrent state: (time-mix previous x (B, C), WKV state (B, H, N, N) fp32, channel-mix previous x (B, C)).
LayerState = tuple[Tensor, Tensor, Tensor]


def token_shift(x: Tensor, x_prev: Tensor | None) -> Tensor:
    """x_{t-1} for every t: (B, T, C); x_prev (B, C) is the token before x[:, 0], zeros when None."""
    first = torch.zeros_like(x[:, :1]) if x_prev is None else x_prev.unsqueeze(1).to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


class TimeMix(nn.Module):
    """x060 attention: data-dependent token shift, data-dependent decay, WKV6, GroupNorm, silu gate."""

    def __init__(self, cfg: RWKV6Config):
        super().__init__()
        C, A, H, N = cfg.n_embd, cfg.dim_att, cfg.n_head, cfg.head_size
        self.cfg = cfg
        self.time_maa_x = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_w = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_v = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_g = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * cfg.d_mix))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, cfg.d_mix, C))
        self.time_decay = nn.Parameter(torch.zeros(1, 1, A))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, cfg.d_decay))
        self.time_decay_w2 = nn.Parameter(torch.zeros(cfg.d_decay, A))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.time_state: nn.Parameter | None = None
        if cfg.time_state:
            self.enable_time_state()
        self.receptance = nn.Linear(C, A, bias=False)
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.gate = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.ln_x = nn.GroupNorm(H, A, eps=LN_X_EPS)

    def enable_time_state(self) -> None:
        """Add `time_state` (H, N, N), zero: a trainable initial WKV state. It is stored as the official
        checkpoints (and the `rwkv` package, which transposes it on load) store it: [head, value, key]."""
        if self.time_state is None:
            H, N = self.cfg.n_head, self.cfg.head_size
            self.time_state = nn.Parameter(torch.zeros(H, N, N, device=self.time_faaaa.device,
                                                       dtype=self.time_faaaa.dtype))

    def initial_wkv_state(self, batch_size: int) -> Tensor | None:
        """(B, H, N, N) fp32 [key, value] from `time_state`, or None (zeros) without one."""
        if self.time_state is None:
            return None
        return self.time_state.float().transpose(1, 2).unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()

    def forward(self, x: Tensor, x_prev: Tensor | None, wkv_state: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        B, T, C = x.shape
        H, N = self.cfg.n_head, self.cfg.head_size
        if wkv_state is None:
            wkv_state = self.initial_wkv_state(B)
        xx = token_shift(x, x_prev) - x  # (B, T, C)
        xxx = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1)  # (B, T, 5 * D_mix)
        xxx = xxx.view(B * T, 5, -1).transpose(0, 1)  # (5, BT, D_mix)
        mw, mk, mv, mr, mg = torch.bmm(xxx, self.time_maa_w2).view(5, B, T, C).unbind(0)
        xw = x + xx * (self.time_maa_w + mw)
        xk = x + xx * (self.time_maa_k + mk)
        xv = x + xx * (self.time_maa_v + mv)
        xr = x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)
        r = self.receptance(xr)  # (B, T, A)
        k = self.key(xk)
        v = self.value(xv)
        g = F.silu(self.gate(xg))
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2  # (B, T, A) raw decay
        y, wkv_state = wkv6(
            r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N), w.view(B, T, H, N),
            self.time_faaaa, wkv_state, backend=self.cfg.wkv_backend,
        )
        y = self.ln_x(y.reshape(B * T, H * N)).view(B, T, H * N)
        return self.output(y * g), x[:, -1].clone(), wkv_state  # a copy: a view would keep x (B, T, C) alive


class ChannelMix(nn.Module):
    """x060 feed-forward: token shift, relu^2 key, sigmoid receptance."""

    def __init__(self, cfg: RWKV6Config):
        super().__init__()
        C, Fd = cfg.n_embd, cfg.dim_ffn
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, Fd, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fd, C, bias=False)

    def forward(self, x: Tensor, x_prev: Tensor | None) -> tuple[Tensor, Tensor]:
        xx = token_shift(x, x_prev) - x  # (B, T, C)
        k = torch.relu(self.key(x + xx * self.time_maa_k)) ** 2  # (B, T, F)
        return torch.sigmoid(self.receptance(x + xx * self.time_maa_r)) * self.value(k), x[:, -1].clone()


class Block(nn.Module):
    def __init__(self, cfg: RWKV6Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg)
        self.ffn = ChannelMix(cfg)

    def forward(self, x: Tensor, state: LayerState | None) -> tuple[Tensor, LayerState]:
        att_prev, wkv_state, ffn_prev = state if state is not None else (None, None, None)
        if self.layer_id == 0:
            x = self.ln0(x)
        dx, att_last, wkv_state = self.att(self.ln1(x), att_prev, wkv_state)
        x = x + dx
        dx, ffn_last = self.ffn(self.ln2(x), ffn_prev)
        return x + dx, (att_last, wkv_state, ffn_last)


class RWKV6(nn.Module):
    """RWKV6 x060. `model(idx)` -> logits (B, T, V); `model(idx, state)` -> (logits, state)."""

    def __init__(self, cfg: RWKV6Config):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.base_keys = frozenset(self.state_dict())  # the architecture's own tensors, before any adapter

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> list[LayerState]:
        """The state before the first token: zero token shifts, and the WKV state from each layer's `time_state`
        (a state-tuned model) or zeros. Equivalent to `model(idx)` without a state."""
        cfg = self.cfg
        device = device if device is not None else self.emb.weight.device
        dtype = self.emb.weight.dtype
        states = []
        for block in self.blocks:
            wkv = block.att.initial_wkv_state(batch_size)
            if wkv is None:
                wkv = torch.zeros(batch_size, cfg.n_head, cfg.head_size, cfg.head_size, dtype=torch.float32)
            states.append((torch.zeros(batch_size, cfg.n_embd, dtype=dtype, device=device), wkv.detach().to(device),
                           torch.zeros(batch_size, cfg.n_embd, dtype=dtype, device=device)))
        return states

    def enable_time_state(self) -> None:
        """Give every layer a trainable initial WKV state (`blocks.N.att.time_state`, zero) for state tuning.
        Added after construction, so unless the checkpoint already held them they are not base tensors."""
        for block in self.blocks:
            block.att.enable_time_state()

    def forward(self, idx: Tensor, state: list[LayerState] | None = None) -> Tensor | tuple[Tensor, list[LayerState]]:
        """`model(idx)` -> logits (B, T, V); `model(idx, state)` -> (logits, new state)."""
        logits, new_state = self.forward_state(idx, state)
        return logits if state is None else (logits, new_state)

    def forward_state(self, idx: Tensor, state: list[LayerState] | None) -> tuple[Tensor, list[LayerState]]:
        """(logits (B, T, V), state after the last token) from `state`, or from the initial state when None."""
        x, new_state = self.features(idx, state)
        return self.head(x), new_state

    def features(self, idx: Tensor, state: list[LayerState] | None) -> tuple[Tensor, list[LayerState]]:
        """(ln_out of the last block's output (B, T, C), new state): everything but the head."""
        x = self.emb(idx)  # (B, T, C)
        new_state: list[LayerState] = []
        for i, block in enumerate(self.blocks):
            layer_state = state[i] if state is not None else None
            if self.cfg.grad_cp and self.training and torch.is_grad_enabled():
                x, layer_state = checkpoint(block, x, layer_state, use_reentrant=False)
            else:
                x, layer_state = block(x, layer_state)
            new_state.append(layer_state)
        return self.ln_out(x), new_state

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise for training from scratch exactly as the official x060 trainer does (BlinkDL/RWKV-LM,
        RWKV-v5/src/model.py: RWKV_Tmix_x060 / RWKV_CMix_x060 `__init__` and RWKV.generate_init_weight).

        With r01 = i / (L - 1), r10 = 1 - i / L for layer i and ddd = c / C for channel c: time-mix
        time_maa_* = 1 - ddd^r10 (v also - 0.3 r01; r, g use 0.5 r10), channel-mix time_maa_k/r = 1 - ddd^(r10^3);
        layer-dependent decay speeds and bonus; the low-rank mixers' first matrices (w1) zero and second (w2)
        uniform(+-0.01); emb uniform(+-1e-4); head orthogonal with gain 0.5 sqrt(V / C) (0.5 when V <= C);
        att.key/att.gate orthogonal with gain 0.1, att.receptance/att.value/ffn.key gain 1; att.output,
        ffn.receptance, ffn.value zero; ln_x weight ((i + 1) / L)^0.7. Deterministic given `seed`.
        """
        gen = torch.Generator().manual_seed(seed)
        cfg = self.cfg
        C, A = cfg.n_embd, cfg.dim_att
        L = cfg.n_layer

        def uniform_(t: Tensor, a: float) -> None:
            t.copy_(torch.rand(t.shape, generator=gen) * 2 * a - a)

        def ortho_(t: Tensor, gain: float) -> None:
            q = torch.empty(t.shape)
            nn.init.orthogonal_(q, gain=gain, generator=gen)
            t.copy_(q)

        uniform_(self.emb.weight, 1e-4)
        ortho_(self.head.weight, 0.5 * math.sqrt(cfg.vocab_size / C) if cfg.vocab_size > C else 0.5)
        ddd = (torch.arange(C) / C).view(1, 1, C)  # fp32 powers, as the official code computes them
        n = torch.arange(A, dtype=torch.float64) / max(A - 1, 1)  # decay and bonus in float64, as official
        zigzag = ((torch.arange(A, dtype=torch.float64) + 1) % 3 - 1) * 0.1
        for i, blk in enumerate(self.blocks):
            r01 = i / max(L - 1, 1)
            r10 = 1.0 - i / L
            att, ffn = blk.att, blk.ffn
            att.time_maa_x.copy_(1 - ddd**r10)
            att.time_maa_w.copy_(1 - ddd**r10)
            att.time_maa_k.copy_(1 - ddd**r10)
            att.time_maa_v.copy_(1 - (ddd**r10 + 0.3 * r01))
            att.time_maa_r.copy_(1 - ddd ** (0.5 * r10))
            att.time_maa_g.copy_(1 - ddd ** (0.5 * r10))
            att.time_maa_w1.zero_()
            uniform_(att.time_maa_w2, 1e-2)
            att.time_decay.copy_((-6 + 5 * n ** (0.7 + 1.3 * r01)).view(1, 1, A))
            att.time_decay_w1.zero_()
            uniform_(att.time_decay_w2, 1e-2)
            att.time_faaaa.copy_((r01 * (1 - n) + zigzag).view(cfg.n_head, cfg.head_size))
            for lin, gain in ((att.receptance, 1.0), (att.key, 0.1), (att.value, 1.0), (att.gate, 0.1),
                              (ffn.key, 1.0)):
                ortho_(lin.weight, gain)
            for lin in (att.output, ffn.receptance, ffn.value):
                lin.weight.zero_()
            att.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
            att.ln_x.bias.zero_()
            ffn.time_maa_k.copy_(1 - ddd ** (r10**3))
            ffn.time_maa_r.copy_(1 - ddd ** (r10**3))
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()

    def load_base_state_dict(self, sd: dict[str, Tensor], source: str = "state dict") -> None:
        """Copy an official x060 state dict into the model, checking every key and shape strictly.

        Adapter tensors (anything not in the base model's key set) are ignored on the model side: the base
        checkpoint must contain exactly the base keys, no more and no fewer.
        """
        expected = {k: v.shape for k, v in base_state_dict(self).items()}
        report = key_mismatch(expected, {k: v.shape for k, v in sd.items()})
        if report:
            lines = [f"{source} does not match an RWKV6 x060 model with {self.cfg}:"] + [f"  {x}" for x in report]
            lines.append(f"  what the file looks like: {describe_state_dict(sd.keys())}.")
            raise CheckpointError("\n".join(lines))
        not_float = [f"{k} ({sd[k].dtype})" for k in sorted(sd) if not sd[k].is_floating_point()]
        if not_float:
            raise CheckpointError(f"{source}: tensors that are not floating point (quantized?): "
                                  f"{', '.join(not_float[:8])}. Use an fp32/bf16/fp16 x060 checkpoint.")
        not_finite = [k for k in sorted(sd) if not sd[k].is_meta and not bool(torch.isfinite(sd[k]).all())]
        if not_finite:
            raise CheckpointError(f"{source}: tensors with NaN/Inf values (not finite): {', '.join(not_finite[:8])}. "
                                  f"The checkpoint is corrupt or comes from a diverged run; use another one.")
        params = base_state_dict(self)
        with torch.no_grad():
            for k, t in params.items():
                t.copy_(sd[k])

    @classmethod
    def from_base_checkpoint(cls, path: str | Path, dtype: torch.dtype = torch.float32, **runtime: object) -> RWKV6:
        """Build a model sized from the checkpoint's tensor shapes and load it strictly.
        `runtime`: wkv_backend, grad_cp."""
        sd = load_tensors(path)
        cfg = RWKV6Config.from_state_dict(sd, **runtime)
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu").to(dtype)
        model.load_base_state_dict(sd, source=str(path))
        return model

    def with_runtime(self, **runtime: object) -> RWKV6:
        """Change runtime options (wkv_backend, grad_cp) in place; returns self."""
        self.cfg = replace(self.cfg, **runtime)  # type: ignore[arg-type]
        for m in self.modules():
            if isinstance(m, TimeMix):
                m.cfg = self.cfg
        return self


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors under official checkpoint names: exactly the architecture's own keys (`base_keys`),
    whatever adapter layers added. Adapter layers own the frozen `weight` under nn.Linear's name, so it stays."""
    keys = model.base_keys  # type: ignore[attr-defined]
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if k in keys}
