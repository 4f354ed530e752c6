"""GGUF files (v2 and v3, little-endian) read directly: metadata, the tensor table, and the
tensors as views of one read-only memory map of the file.

Why not the ``gguf`` package's ``GGUFReader``: it parses every metadata value into NumPy views,
element by element, so a vocabulary of 49,152 pieces and 48,900 merges (SmolLM2-135M's Q4_1
file, 98 MB) takes it 2.0-2.2 s, eight times the 0.25 s a 64-token generation takes (the
command line's whole run was 2.8 s). Here a string array is one loop of ``struct.unpack_from``
and a numeric array one ``np.frombuffer``: the same file parses in 0.04-0.08 s, and
``Model.load`` of it takes 0.22-0.25 s in all (2.5 s before). The package stays the source of the format's constants (tensor
type names and their block sizes) and dequantizes the types the engine does not store.

Layout (all little-endian): magic ``GGUF``, version u32, tensor count u64, metadata count u64;
each metadata entry a key (u64 length + UTF-8 bytes), a value type u32 and the value (scalars,
a string as u64 length + bytes, an array as element type u32 + count u64 + elements); each tensor
info a name, n_dims u32, the dims u64 (fastest first), a type u32 and an offset u64 into the data
section, which starts at the next multiple of ``general.alignment`` (default 32) after the table.

Every malformed file raises :class:`GGUFError` (a ValueError) saying where; a metadata string that
is not UTF-8 does not fail the file, only a later read of its key (:meth:`GGUFFile.value`).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_DEPTH = 8  # arrays of arrays are allowed; deeper nesting only comes from corrupt files

# value type id -> (struct format, NumPy dtype) of the scalar types
SCALARS = {0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
           5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
           12: ("<d", "<f8")}
STRING, ARRAY = 8, 9
UINT32 = 4
U32, U64 = struct.Struct("<I"), struct.Struct("<Q")
INT64_MAX = 2**63 - 1

# tensor element types the reader hands out as arrays of their element type (the rest as raw
# bytes, one row of blocks per row of the tensor)
ELEMENT_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I8": "<i1", "I16": "<i2",
                  "I32": "<i4", "I64": "<i8"}


class GGUFError(ValueError):
    """A file that is not a well-formed GGUF v2/v3 file."""


@dataclass(frozen=True)
class Unreadable:
    """A metadata value that could not be decoded (a string that is not UTF-8)."""
    error: str


@dataclass
class GGUFTensor:
    name: str
    type_name: str      # GGML's name of the element type: "F32", "Q8_0", ...
    dims: tuple         # as the file lists them, fastest-varying first
    offset: int         # of its first byte in the file
    data: np.ndarray    # read-only view of the file: elements, shape reversed(dims); quantized
                        # types as uint8, shape (*reversed(dims[1:]), bytes of a row)


@dataclass
class GGUFFile:
    version: int
    metadata: dict = field(default_factory=dict)   # key -> int, float, bool, str, list or Unreadable
    tensors: list = field(default_factory=list)    # GGUFTensor, in file order
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0                            # where the data section starts

    def value(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key (default when absent); GGUFError if it is unreadable."""
        value = self.metadata.get(key, default)
        if isinstance(value, Unreadable):
            raise GGUFError(f"GGUF metadata {key!r} is unreadable ({value.error})")
        return value

    def tokenizer_metadata(self) -> dict:
        """The tokenizer.* values (what Tokenizer.from_gguf_metadata reads); GGUFError if one is
        unreadable."""
        return {key: self.value(key) for key in self.metadata if key.startswith("tokenizer.")}


class _Cursor:
    """Bounds-checked reads from the start of a buffer."""

    def __init__(self, buffer: memoryview):
        self.buffer, self.at, self.size = buffer, 0, len(buffer)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.at + n > self.size:
            raise GGUFError(f"the file ends inside {what} (byte {self.at} of {self.size}, {n} more wanted)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        value = U32.unpack_from(self.buffer, self.at)[0]
        self.at += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        value = U64.unpack_from(self.buffer, self.at)[0]
        self.at += 8
        return value

    def raw_string(self, what: str) -> bytes:
        n = self.u64(what)
        self.need(n, what)
        value = bytes(self.buffer[self.at:self.at + n])
        self.at += n
        return value

    def text(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{what} is not UTF-8 ({e})") from None


def _read_value(cur: _Cursor, type_id: int, what: str, depth: int = 0) -> Any:
    """One metadata value; an Unreadable for strings that are not UTF-8."""
    if type_id in SCALARS:
        fmt = SCALARS[type_id][0]
        size = struct.calcsize(fmt)
        cur.need(size, what)
        value = struct.unpack_from(fmt, cur.buffer, cur.at)[0]
        cur.at += size
        return value
    if type_id == STRING:
        raw = cur.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return Unreadable(f"UnicodeDecodeError: {e}")
    if type_id == ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFError(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        element_type, count = cur.u32(what), cur.u64(what)
        if element_type in SCALARS:
            dtype = np.dtype(SCALARS[element_type][1])
            cur.need(count * dtype.itemsize, what)
            values = np.frombuffer(cur.buffer, dtype=dtype, count=count, offset=cur.at).tolist()
            cur.at += count * dtype.itemsize
            return values
        if element_type == STRING:
            cur.need(count * 8, what)  # each string takes at least its length field
            buffer, at, size, unpack = cur.buffer, cur.at, cur.size, U64.unpack_from
            raw = []
            for _ in range(count):
                n = unpack(buffer, at)[0] if at + 8 <= size else -1
                if n < 0 or at + 8 + n > size:
                    cur.at = at
                    raise GGUFError(f"the file ends inside {what} (byte {at} of {size})")
                raw.append(bytes(buffer[at + 8:at + 8 + n]))
                at += 8 + n
            cur.at = at
            try:
                return [r.decode("utf-8") for r in raw]
            except UnicodeDecodeError as e:
                return Unreadable(f"UnicodeDecodeError: {e}")
        if element_type == ARRAY:
            cur.need(count * 12, what)  # each inner array takes at least its type and count
            values = [_read_value(cur, ARRAY, what, depth + 1) for _ in range(count)]
            return next((v for v in values if isinstance(v, Unreadable)), values)
        raise GGUFError(f"{what} is an array of unknown value type {element_type}")
    raise GGUFError(f"{what} has unknown value type {type_id}")


def _ggml_types() -> dict:
    """GGML type id -> (name, elements per block, bytes per block), from the gguf package."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


def read_gguf_file(path: str | Path) -> GGUFFile:
    """Parse a GGUF file (the tensors stay in the file: views of a read-only np.memmap)."""
    path = Path(path)
    if path.stat().st_size < 24:
        raise GGUFError(f"{path.stat().st_size} bytes are too few for a GGUF header")
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mapped))
    cur.need(4, "the magic")
    if bytes(cur.buffer[:4]) != MAGIC:
        raise GGUFError(f"magic {bytes(cur.buffer[:4])!r} is not {MAGIC!r}")
    cur.at = 4
    version = cur.u32("the version")
    if version not in VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
            raise GGUFError("big-endian GGUF files are not supported")
        raise GGUFError(f"GGUF version {version} is not supported (2 or 3)")
    gguf = GGUFFile(version=version)
    n_tensors, n_metadata = cur.u64("the tensor count"), cur.u64("the metadata count")
    # every entry takes at least 8 + 4 bytes, every tensor info 8 + 4 + 4 + 8: counts beyond the
    # file are corrupt (and must not make the loops below run for ever)
    if n_metadata * 12 > cur.size or n_tensors * 24 > cur.size:
        raise GGUFError(f"{n_metadata} metadata entries and {n_tensors} tensors cannot fit in {cur.size} bytes")
    gguf.metadata["GGUF.version"] = version
    for i in range(n_metadata):
        key = cur.text(f"metadata key {i}")
        type_id = cur.u32(f"the type of metadata {key!r}")
        if key in gguf.metadata:
            raise GGUFError(f"metadata {key!r} appears twice")
        gguf.metadata[key] = _read_value(cur, type_id, f"metadata {key!r}")
        if key == "general.alignment":
            alignment = gguf.metadata[key]
            if type_id != UINT32 or alignment == 0 or alignment & (alignment - 1):
                raise GGUFError(f"general.alignment (={alignment!r}) must be a UINT32 power of two")
            gguf.alignment = alignment
    types = _ggml_types()
    infos = []
    for i in range(n_tensors):
        name = cur.text(f"the name of tensor {i}")
        n_dims = cur.u32(f"tensor {name!r}")
        if not 1 <= n_dims <= 4:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions (1 to 4)")
        dims = tuple(cur.u64(f"tensor {name!r}") for _ in range(n_dims))
        type_id, offset = cur.u32(f"tensor {name!r}"), cur.u64(f"tensor {name!r}")
        infos.append((name, dims, type_id, offset))
    gguf.data_offset = -(-cur.at // gguf.alignment) * gguf.alignment
    names = set()
    for name, dims, type_id, offset in infos:
        if name in names:
            raise GGUFError(f"tensor {name!r} appears twice")
        names.add(name)
        if type_id not in types:
            raise GGUFError(f"tensor {name!r} has unknown type {type_id}")
        type_name, block, block_bytes = types[type_id]
        shape = tuple(reversed(dims))
        elements = int(np.prod(dims, dtype=object))
        # ggml holds dimensions, element and byte counts in 64 bits; with a zero among the
        # dimensions the byte count below is 0 whatever the others say, and NumPy refuses the
        # shape (a dimension of 2^63) with a message that names neither the file nor the tensor
        if int(np.prod([max(d, 1) for d in dims], dtype=object)) * block_bytes > INT64_MAX:
            raise GGUFError(f"tensor {name!r} has dimensions {list(dims)}: more {type_name} elements than "
                            f"64-bit sizes count")
        if dims[0] % block:
            raise GGUFError(f"tensor {name!r} has rows of {dims[0]} elements, not whole {type_name} blocks of {block}")
        n_bytes = elements // block * block_bytes
        start = gguf.data_offset + offset
        if start + n_bytes > cur.size:
            raise GGUFError(f"tensor {name!r} ({n_bytes} bytes at byte {start}) runs past the end of the "
                            f"file ({cur.size} bytes)")
        if offset % gguf.alignment:
            # GGUF places every tensor at a multiple of general.alignment: one that is not marks a
            # corrupt file (and would be a misaligned float array the engine could not read)
            raise GGUFError(f"tensor {name!r} starts at byte {start}, off the file's {gguf.alignment}-byte alignment")
        raw = mapped[start:start + n_bytes]
        if type_name in ELEMENT_DTYPES:
            data = raw.view(ELEMENT_DTYPES[type_name]).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], dims[0] // block * block_bytes)
        gguf.tensors.append(GGUFTensor(name, type_name, dims, start, data))
    return gguf
