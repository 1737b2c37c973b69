"""Which adapter layer implements which --peft method: the one registry injection, merging and the adapter
file consult. Methods without a layer: "state" (trains the initial WKV state, see src/rwkv6.py) and "none"
(full training)."""
from __future__ import annotations

from src.adapters.bone import BoneLinear
from src.adapters.config import METHODS
from src.adapters.layer import AdapterLayer
from src.adapters.lora import LoRALinear
from src.adapters.miss import MiSSLinear
from src.errors import AdapterError

LAYER_CLASSES: tuple[type[AdapterLayer], ...] = (BoneLinear, MiSSLinear, LoRALinear)
LAYERS: dict[str, type[AdapterLayer]] = {m: cls for cls in LAYER_CLASSES for m in cls.methods}
LAYERLESS = ("state", "none")
assert set(LAYERS) | set(LAYERLESS) == set(METHODS), "every --peft method needs a layer class or none"
# Every name an adapter layer may give a tensor: "<linear prefix>.<name>" in adapter files.
LAYER_TENSOR_NAMES: tuple[str, ...] = tuple(n for cls in LAYER_CLASSES for n in cls.every_name)
STATE_TENSOR_NAME = "time_state"


def layer_class(method: str) -> type[AdapterLayer] | None:
    """The layer class of `method`, or None for "state" and "none"."""
    if method in LAYERLESS:
        return None
    if method not in LAYERS:
        raise AdapterError(f"adapter method {method!r} has no layer; use one of {', '.join(LAYERS)}.")
    return LAYERS[method]
