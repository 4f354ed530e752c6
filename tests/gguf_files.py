"""Small GGUF files for the tests, written with the gguf package's GGUFWriter."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType


def write_gguf(path, arch: str, meta: Mapping[str, Any], tensors: Mapping[str, Any],
               more: Callable[[gguf.GGUFWriter], None] | None = None) -> None:
    """Writes a GGUF file of architecture `arch`.

    meta: key -> value, floats as float32, strings as strings, the rest as uint32; None leaves
    the key out. The normalization epsilon llama.cpp requires ({arch}.attention.
    layer_norm_rms_epsilon, gpt2's layer_norm_epsilon) is 1e-5 unless given (or None).
    tensors: name -> a float32 or float16 array, written as it is, or (array, GGML type name):
    float values converted to F32 or F16 or quantized by gguf.quants to that type, or uint8
    rows of that type's blocks, written unchanged.
    more: a function given the writer before anything is written (token lists, merges).
    """
    w = gguf.GGUFWriter(str(path), arch)
    eps_key = f"{arch}.attention.layer_norm_epsilon" if arch == "gpt2" else f"{arch}.attention.layer_norm_rms_epsilon"
    meta = {eps_key: 1e-5, **meta}
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    if more is not None:
        more(w)
    for name, value in tensors.items():
        arr, kind = value if isinstance(value, tuple) else (value, None)
        qtype = Q[kind] if kind is not None else None
        if qtype is None:
            w.add_tensor(name, arr)
        elif qtype == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, np.asarray(arr).astype(np.float16))
        elif arr.dtype == np.uint8:
            w.add_tensor(name, arr, raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
