"""Bytes of a stored value and of a stored table row by precision (torch-free: reports read it)."""

from __future__ import annotations

BYTES_PER_VALUE = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
# Row-wise quantized rows carry a scale and a bias: fp32 pairs for int8, fp16 pairs for int4.
ROW_OVERHEAD_BYTES = {"int8": 8, "int4": 4}


def stored_row_bytes(dim: float, precision: str) -> float:
    """Bytes of one table row of dim values at a precision, quantization parameters included."""
    return dim * BYTES_PER_VALUE[precision] + ROW_OVERHEAD_BYTES.get(precision, 0)
