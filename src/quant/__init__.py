"""Quantised frozen base weights (bitsandbytes int8 / nf4): `QuantWeight`, `QuantLinear` and the helpers the
adapter layers use to compute with a dense or a quantised weight alike. Loading a quantised model layer by
layer is `src.model.RWKV6.from_checkpoint(..., quant=...)`."""
from src.quant.weight import (
    QUANTS,
    QuantLinear,
    QuantWeight,
    check_quant,
    dense,
    is_quantized,
    linear,
    quant_linear,
    quantize_dequantize,
    quantized_bytes,
)

__all__ = ["QUANTS", "QuantLinear", "QuantWeight", "check_quant", "dense", "is_quantized", "linear", "quant_linear",
           "quantize_dequantize", "quantized_bytes"]
