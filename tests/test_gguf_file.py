"""lmdecode's GGUF reader (lmdecode.gguf_file) against the gguf package's GGUFReader, which it
replaces for speed: the same metadata values and tensor bytes for every value type, nested
arrays, tensor types and a custom alignment, and for the shared model files; malformed files
raise GGUFError saying where, whatever byte the file ends at."""
import struct
from pathlib import Path

import numpy as np
import pytest

from lmdecode import gguf_file
from lmdecode.gguf_file import GGUFError, Unreadable, read_gguf_file

gguf = pytest.importorskip("gguf")  # a runtime dependency of lmdecode, always installed with it
V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
SHARED_GGUF = [MODELS / "stories260K.gguf", MODELS / "llama-2-tiny-random.gguf"]


def _every_kind(path, alignment=None):
    """A GGUF file with a value of every type, arrays of each, an array of arrays, and tensors of
    float, bf16, integer and quantized types (1 to 4 dimensions)."""
    rng = np.random.default_rng(3)
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    scalars = [(V.UINT8, 250), (V.INT8, -100), (V.UINT16, 65000), (V.INT16, -32000), (V.UINT32, 4_000_000_000),
               (V.INT32, -2_000_000_000), (V.FLOAT32, 0.1), (V.BOOL, True), (V.STRING, "grüße ✓"),
               (V.UINT64, 2**63 + 5), (V.INT64, -(2**62)), (V.FLOAT64, 1e-300)]
    for vtype, value in scalars:
        w.add_key_value(f"test.scalar.{vtype.name.lower()}", value, vtype)
    arrays = {V.UINT8: [0, 1, 255], V.INT16: [-1, 2], V.UINT32: [7], V.INT32: list(range(-5, 5)),
              V.FLOAT32: [0.5, -2.25, 1e30], V.BOOL: [True, False, True], V.UINT64: [2**64 - 1],
              V.INT64: [-1], V.FLOAT64: [3.5], V.STRING: ["", "a", "b c", "é" * 300]}
    for vtype, values in arrays.items():
        w.add_key_value(f"test.array.{vtype.name.lower()}", values, V.ARRAY, sub_type=vtype)
    w.add_key_value("test.array.nested", [[1, 2], [3]], V.ARRAY)
    w.add_tensor("f32", rng.normal(size=(3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.normal(size=(2, 3, 4)).astype(np.float16))
    w.add_tensor("bf16", rng.integers(0, 2**16, size=(2, 6), dtype=np.uint16).view(np.uint8), raw_dtype=Q.BF16)
    w.add_tensor("i32", rng.integers(-9, 9, size=(7,), dtype=np.int32))
    w.add_tensor("q8_0", gguf.quants.quantize(rng.normal(size=(4, 64)).astype(np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("q4_k", rng.integers(0, 256, size=(2, 144), dtype=np.uint8), raw_dtype=Q.Q4_K)
    w.add_tensor("f32.4d", rng.normal(size=(2, 1, 3, 2)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _assert_same_as_gguf_package(path):
    ours, theirs = read_gguf_file(path), gguf.GGUFReader(str(path))
    their_keys = [k for k in theirs.fields if k not in ("GGUF.tensor_count", "GGUF.kv_count")]
    assert list(ours.metadata) == their_keys
    for key in their_keys:
        if key != "test.array.nested":  # the package's contents() flattens arrays of arrays
            assert ours.value(key) == theirs.fields[key].contents(), key
    assert (ours.alignment, ours.data_offset) == (theirs.alignment, theirs.data_offset)
    assert len(ours.tensors) == len(theirs.tensors)
    for t, u in zip(ours.tensors, theirs.tensors):
        assert (t.name, t.type_name, t.dims, t.offset) == (u.name, u.tensor_type.name, tuple(u.shape.tolist()),
                                                          u.data_offset)
        assert t.data.tobytes() == u.data.tobytes(), t.name
        want_shape = u.data.shape if t.type_name != "BF16" else u.data.view(np.uint16).shape
        assert t.data.shape == want_shape, t.name
        assert not t.data.flags.writeable
    return ours


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_and_tensor_kind_as_the_gguf_package_reads_it(alignment, tmp_path):
    path = tmp_path / "kinds.gguf"
    _every_kind(path, alignment)
    ours = _assert_same_as_gguf_package(path)
    # and by hand: the values as written, tensors where the table says
    assert ours.value("test.scalar.string") == "grüße ✓"
    assert ours.value("test.scalar.uint64") == 2**63 + 5
    assert ours.value("test.array.nested") == [[1, 2], [3]]
    assert ours.value("test.missing", "default") == "default"
    assert ours.alignment == (alignment or 32) and ours.data_offset % ours.alignment == 0
    for t in ours.tensors:
        assert t.offset % ours.alignment == 0
    f16 = next(t for t in ours.tensors if t.name == "f16")
    assert f16.dims == (4, 3, 2) and f16.data.dtype == np.float16 and f16.data.shape == (2, 3, 4)
    q4k = next(t for t in ours.tensors if t.name == "q4_k")
    assert q4k.type_name == "Q4_K" and q4k.dims == (256, 2) and q4k.data.shape == (2, 144)


@pytest.mark.parametrize("path", SHARED_GGUF, ids=lambda p: p.name)
def test_shared_files_as_the_gguf_package_reads_them(path):
    ours = _assert_same_as_gguf_package(path)
    embedding = next(t for t in ours.tensors if t.name == "token_embd.weight")
    assert len(ours.value("tokenizer.ggml.tokens")) == embedding.dims[1] == embedding.data.shape[0]


def test_every_truncation_of_the_header_is_an_error_saying_where(tmp_path):
    """Cut at every byte up to the data section (and a few inside it): GGUFError, never another
    exception; past the header, the tensor that runs off the end is named."""
    _every_kind(tmp_path / "kinds.gguf")
    data = (tmp_path / "kinds.gguf").read_bytes()
    whole = read_gguf_file(tmp_path / "kinds.gguf")
    header, last = whole.data_offset, whole.tensors[-1]
    cut_path = tmp_path / "cut.gguf"
    for cut in list(range(header)) + [header + 1, last.offset + last.data.nbytes - 1]:
        cut_path.write_bytes(data[:cut])
        with pytest.raises(GGUFError) as info:
            read_gguf_file(cut_path)
        message = str(info.value)
        if cut >= header:
            assert "runs past the end of the file" in message, (cut, message)
        elif cut >= 24:  # inside the metadata or the tensor table, or in the padding after it
            assert any(m in message for m in ("the file ends inside", "cannot fit", "runs past the end")), \
                (cut, message)


def _patched(data: bytes, at: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def test_malformed_files_are_named_errors(tmp_path):
    _every_kind(tmp_path / "kinds.gguf")
    data = (tmp_path / "kinds.gguf").read_bytes()
    path = tmp_path / "bad.gguf"

    def error_of(content):
        path.write_bytes(content)
        with pytest.raises(GGUFError) as info:
            read_gguf_file(path)
        return str(info.value)

    assert "magic b'GGUX'" in error_of(b"GGUX" + data[4:])
    assert "too few" in error_of(data[:10])
    assert "version 1 is not supported" in error_of(_patched(data, 4, "<I", 1))
    assert "big-endian" in error_of(_patched(data, 4, ">I", 3))
    assert "cannot fit" in error_of(_patched(data, 8, "<Q", 2**62))  # tensor count
    assert "cannot fit" in error_of(_patched(data, 16, "<Q", 2**40))  # metadata count
    key = b"test.scalar.uint8"
    type_at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert "unknown value type 77" in error_of(_patched(data, type_at, "<I", 77))
    key = b"test.array.int32"
    count_at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4 + 4
    assert "ends inside metadata 'test.array.int32'" in error_of(_patched(data, count_at, "<Q", 2**61))
    key = b"test.array.string"
    count_at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4 + 4
    assert "ends inside metadata 'test.array.string'" in error_of(_patched(data, count_at + 8, "<Q", 2**63))
    assert "ends inside metadata 'test.array.string'" in error_of(_patched(data, count_at, "<Q", 10**9))
    name = b"q8_0"
    info_at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    assert "tensor 'q8_0' has 9 dimensions" in error_of(_patched(data, info_at, "<I", 9))
    assert "has rows of 65 elements, not whole Q8_0 blocks of 32" in error_of(_patched(data, info_at + 4, "<Q", 65))
    assert "tensor 'q8_0' has unknown type 1000" in error_of(_patched(data, info_at + 4 + 16, "<I", 1000))
    offset = struct.unpack_from("<Q", data, info_at + 4 + 16 + 4)[0]
    assert "tensor 'q8_0' starts at byte" in error_of(_patched(data, info_at + 4 + 16 + 4, "<Q", offset + 2))
    assert "runs past the end" in error_of(_patched(data, info_at + 4 + 16 + 4, "<Q", 2**40))
    # a key twice: 'test.scalar.int16' renamed to 'test.scalar.int32' (the same length)
    assert "metadata 'test.scalar.int32' appears twice" in error_of(
        data.replace(b"test.scalar.int16", b"test.scalar.int32", 1))
    # a tensor name twice: the tensor 'i32' (the first "i32" in the file) renamed 'f32'
    assert "tensor 'f32' appears twice" in error_of(data.replace(b"i32", b"f32", 1))
    # alignment not a UINT32 power of two
    aligned = tmp_path / "aligned.gguf"
    _every_kind(aligned, 64)
    adata = aligned.read_bytes()
    key = b"general.alignment"
    value_at = adata.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4
    assert "general.alignment (=48)" in error_of(_patched(adata, value_at, "<I", 48))
    assert "general.alignment (=0)" in error_of(_patched(adata, value_at, "<I", 0))


def test_strings_that_are_not_utf8_fail_when_read(tmp_path):
    """As the gguf package decodes strings only when asked: a corrupt value fails its key's
    read (naming it), not the file; a corrupt key or tensor name fails the file."""
    _every_kind(tmp_path / "kinds.gguf")
    data = bytearray((tmp_path / "kinds.gguf").read_bytes())
    at = data.index("grüße".encode())
    data[at] = 0xFF
    pieces = data.index(b"b c")
    data[pieces] = 0xFE
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    f = read_gguf_file(path)
    assert isinstance(f.metadata["test.scalar.string"], Unreadable)
    with pytest.raises(GGUFError, match=r"GGUF metadata 'test\.scalar\.string' is unreadable \(UnicodeDecodeError"):
        f.value("test.scalar.string")
    with pytest.raises(GGUFError, match=r"'test\.array\.string' is unreadable"):
        f.value("test.array.string")
    assert f.value("test.scalar.int8") == -100
    data[data.index(b"test.scalar.bool")] = 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"metadata key \d+ is not UTF-8"):
        read_gguf_file(path)


def test_nesting_beyond_the_limit_is_refused(tmp_path, monkeypatch):
    _every_kind(tmp_path / "kinds.gguf")
    monkeypatch.setattr(gguf_file, "MAX_ARRAY_DEPTH", 1)
    with pytest.raises(GGUFError, match=r"metadata 'test\.array\.nested' nests arrays more than 1 deep"):
        read_gguf_file(tmp_path / "kinds.gguf")


def test_dimensions_beyond_an_int64_are_named_errors(tmp_path):
    """A zero among a tensor's dimensions makes its byte count 0 whatever the others say: a
    dimension of 2^63 then reached NumPy, whose "Maximum allowed dimension exceeded" named neither
    the file nor the tensor. Dimensions, element and byte counts must fit 64 bits, as in ggml."""
    _every_kind(tmp_path / "kinds.gguf")
    data = (tmp_path / "kinds.gguf").read_bytes()
    name = b"f32"  # 2-D, dims (5, 3)
    dims_at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4
    assert struct.unpack_from("<QQ", data, dims_at) == (5, 3)
    path = tmp_path / "bad.gguf"
    for dims in [(0, 2**63), (2**63, 0), (2**64 - 1, 0), (0, 2**40), (2**62, 0)]:
        path.write_bytes(_patched(_patched(data, dims_at, "<Q", dims[0]), dims_at + 8, "<Q", dims[1]))
        if dims in [(0, 2**40)]:  # representable: an empty tensor, as the gguf package reads it
            assert read_gguf_file(path).tensors[0].data.shape == (2**40, 0)
            continue
        with pytest.raises(GGUFError, match=rf"^tensor 'f32' has dimensions \[{dims[0]}, {dims[1]}\]: more F32 elements "
                                            r"than 64-bit sizes count$"):
            read_gguf_file(path)
    path.write_bytes(_patched(_patched(data, dims_at, "<Q", 2**32), dims_at + 8, "<Q", 2**32))
    with pytest.raises(GGUFError, match=r"tensor 'f32' has dimensions \[4294967296, 4294967296\]: more F32 elements"):
        read_gguf_file(path)
