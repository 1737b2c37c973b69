"""AdapterConfig (which method, its sizes, which projections, which extra parts train) and the names of
adapter tensors. Validation errors are ConfigError."""
from __future__ import annotations

from dataclasses import dataclass

from src.errors import ConfigError

METHODS = ("bone", "bone_unconstrained", "bone_hadamard", "miss", "lora", "pissa", "state", "none")
GROUPINGS = ("row", "col")
PARTS = ("att", "ffn")
# The eight nn.Linear projections of an RWKV6 block, as "<part>.<name>".
PROJECTIONS = (
    "att.receptance", "att.key", "att.value", "att.gate", "att.output",
    "ffn.key", "ffn.receptance", "ffn.value",
)
# Extra tensors that may be trained alongside the adapter (default: none, as in the paper's runs): LayerNorms,
# the time_* tensors, or the initial WKV state (state tuning; added as blocks.N.att.time_state when absent).
TRAIN_PARTS = ("ln", "time", "state")
# The frozen base's quantisation the adapter was trained on (src/quant): "none" or bitsandbytes int8 / nf4.
QUANT_CHOICES = ("none", "int8", "nf4")

@dataclass(frozen=True)
class AdapterConfig:
    """What to inject. `targets` entries are parts ("att", "ffn") or projections ("att.key"); `train_parts`
    names extra base parameters to train and save with the adapter ("ln": LayerNorm/GroupNorm, "time": time_*)."""

    method: str = "bone"
    b: int = 64
    grouping: str = "row"
    lora_r: int = 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    miss_r: int = 64
    targets: tuple[str, ...] = PARTS
    train_parts: tuple[str, ...] = ()
    quant: str = "none"  # the base quantisation trained on (recorded in the adapter file; merge target choice)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "train_parts", tuple(self.train_parts))
        if self.method not in METHODS:
            raise ConfigError(f"adapter method (--peft) {self.method!r} is unknown; "
                              f"use one of {', '.join(METHODS)}.")
        if self.grouping not in GROUPINGS:
            raise ConfigError(f"adapter grouping (--bone_grouping) {self.grouping!r} is unknown; use 'row' (one bone "
                              f"per input block) or 'col' (one bone per output block).")
        if not isinstance(self.b, int) or self.b <= 0:
            raise ConfigError(f"Bone block size b (--bone_b) must be a positive integer, got {self.b!r}; "
                              f"the paper uses 64.")
        if not isinstance(self.lora_r, int) or self.lora_r <= 0:
            raise ConfigError(f"--lora_r must be a positive integer, got {self.lora_r!r}; "
                              f"r=32 matches Bone b=64 on RWKV6.")
        if not isinstance(self.miss_r, int) or self.miss_r <= 0:
            raise ConfigError(f"--miss_r must be a positive integer, got {self.miss_r!r}; peft's default is 64.")
        if self.lora_alpha <= 0:
            raise ConfigError(f"--lora_alpha must be positive, got {self.lora_alpha!r}; "
                              f"lora_alpha = lora_r gives scaling 1.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        valid_targets = PARTS + PROJECTIONS
        bad = [t for t in self.targets if t not in valid_targets]
        if bad:
            raise ConfigError(f"adapter targets (--adapter_targets) {bad} are unknown; use parts {list(PARTS)} "
                              f"or projections {list(PROJECTIONS)}.")
        if self.method == "state" and "state" in self.train_parts:
            raise ConfigError("--peft state already trains the initial state; drop 'state' from --train_parts.")
        if self.method not in ("none", "state") and not self.targets:
            raise ConfigError(f"adapter method {self.method!r} needs at least one target; "
                              f"use e.g. targets: [att, ffn].")
        if self.method == "none" and self.train_parts:
            raise ConfigError("method 'none' already trains every parameter (full fine-tuning); train_parts only "
                              "applies with an adapter method.")
        if self.quant not in QUANT_CHOICES:
            raise ConfigError(f"--quant {self.quant!r} is unknown; use one of {', '.join(QUANT_CHOICES)}.")
        bad = [p for p in self.train_parts if p not in TRAIN_PARTS]
        if bad:
            raise ConfigError(f"--train_parts {bad} are unknown; use any of {list(TRAIN_PARTS)} or none.")

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_r

    def projections(self) -> tuple[str, ...]:
        """The targeted projections ("att.key", ...) in PROJECTIONS order; empty for "none" and "state"."""
        if self.method in ("none", "state"):
            return ()
        chosen = set()
        for t in self.targets:
            chosen.update(p for p in PROJECTIONS if p == t or p.startswith(t + "."))
        return tuple(p for p in PROJECTIONS if p in chosen)

    def to_metadata(self) -> dict[str, str]:
        """All fields as plain strings (safetensors metadata); lists are comma-separated."""
        return {
            "method": self.method, "b": str(self.b), "grouping": self.grouping, "lora_r": str(self.lora_r),
            "lora_alpha": repr(float(self.lora_alpha)), "lora_dropout": repr(float(self.lora_dropout)),
            "miss_r": str(self.miss_r),
            "targets": ",".join(self.targets), "train_parts": ",".join(self.train_parts), "quant": self.quant,
        }

    @staticmethod
    def from_metadata(meta: dict[str, str]) -> AdapterConfig:
        """Inverse of to_metadata. Raises KeyError/ValueError for a missing or malformed field and
        ConfigError for an invalid value."""
        return AdapterConfig(
            method=meta["method"], b=int(meta["b"]), grouping=meta["grouping"], lora_r=int(meta["lora_r"]),
            lora_alpha=float(meta["lora_alpha"]), lora_dropout=float(meta["lora_dropout"]),
            miss_r=int(meta.get("miss_r", "64")),  # absent in files written before MiSS existed
            targets=tuple(t for t in meta["targets"].split(",") if t),
            train_parts=tuple(t for t in meta["train_parts"].split(",") if t),
            quant=meta.get("quant", "none"),  # absent in files written before quantised bases
        )
