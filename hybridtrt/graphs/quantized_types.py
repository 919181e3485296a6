"""Initializers of the quantized ONNX types (float8e4m3fn, int4, float4e2m1) from ml_dtypes arrays.

ONNX stores 4-bit tensors two elements a byte, the first in the low nibble, an odd count ending in a
half-used byte (onnx/docs/docs/technical/int4.md, "Packing and Unpacking"); TensorRT's packing is
the same ("Explicit Quantization", Quantized Weights: "The first element is stored in the 4 least
significant bits").
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import ml_dtypes
import numpy as np
from onnx import TensorProto, helper

#: ONNX element types of the quantized ml_dtypes dtypes.
QUANTIZED_TYPES = {
    np.dtype(ml_dtypes.float8_e4m3fn): TensorProto.FLOAT8E4M3FN,
    np.dtype(ml_dtypes.int4): TensorProto.INT4,
    np.dtype(ml_dtypes.float4_e2m1fn): TensorProto.FLOAT4E2M1,
}
FOUR_BIT = (TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1)


def onnx_type(dtype: np.dtype) -> int:
    """The ONNX element type of a numpy (or ml_dtypes) dtype."""
    dtype = np.dtype(dtype)
    return QUANTIZED_TYPES.get(dtype) or helper.np_dtype_to_tensor_dtype(dtype)


def packed_bytes(arr: np.ndarray) -> np.ndarray:
    """An array's bytes as an ONNX initializer stores them (uint8): 4-bit types packed two a byte."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    if onnx_type(arr.dtype) not in FOUR_BIT:
        return flat.view(np.uint8)
    nibbles = flat.view(np.uint8) & 0x0F
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def stored_nbytes(elem_type: int, dims: Iterable[int]) -> int:
    """Bytes of a tensor of this type and shape as ONNX stores it."""
    n = math.prod(dims)
    if elem_type in FOUR_BIT:
        return (n + 1) // 2
    return n * helper.tensor_dtype_to_np_dtype(elem_type).itemsize


def quantized_tensor(name: str, arr: np.ndarray) -> TensorProto:
    """An initializer of ``arr``'s (ml_dtypes) type and shape."""
    return helper.make_tensor(name, onnx_type(arr.dtype), arr.shape, packed_bytes(arr).tobytes(), raw=True)


__all__ = ["FOUR_BIT", "QUANTIZED_TYPES", "onnx_type", "packed_bytes", "quantized_tensor", "stored_nbytes"]
