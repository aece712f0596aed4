"""awq_ref/loaders/gguf_header.py against the `gguf` package's own reader as the oracle: the same
metadata values and types, tensor names, shapes, types, offsets and bytes, on files gguf's writer
makes (every value type, string arrays, an odd alignment, quantized tensors) and on the default
model; and the header's own refusals."""

import struct

import numpy as np
import pytest

from awq_ref.loaders.gguf_header import read_header

gguf = pytest.importorskip("gguf")


def reader_view(path):
    """What GGUFReader reads: (metadata, [(name, torch shape, type, offset, n_bytes, bytes)])."""
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = [(t.name, tuple(reversed(t.shape.tolist())), t.tensor_type, t.data_offset, t.n_bytes,
                t.data.view(np.uint8).reshape(-1).tobytes()) for t in r.tensors]
    return meta, tensors


def our_view(path):
    h = read_header(path)
    return h.metadata, [(t.name, t.shape, t.ggml_type, t.offset, t.n_bytes, t.data.tobytes())
                        for t in h.tensors]


def assert_same(path):
    (meta, tensors), (ours, our_tensors) = reader_view(path), our_view(path)
    assert list(ours) == list(meta)
    for key, value in meta.items():
        assert ours[key] == value, key
        assert type(ours[key]) is type(value), key
        if isinstance(value, list) and value:
            assert {type(v) for v in ours[key]} == {type(v) for v in value}, key
    assert our_tensors == tensors


def write(path, alignment=None, tensors=()):
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    t = gguf.GGUFValueType
    w.add_uint8("u8", 200)
    w.add_int8("i8", -100)
    w.add_uint16("u16", 60000)
    w.add_int16("i16", -30000)
    w.add_uint32("u32", 2**32 - 1)
    w.add_int32("i32", -(2**31))
    w.add_float32("f32", 0.1)
    w.add_bool("b", True)
    w.add_uint64("u64", 2**64 - 1)
    w.add_int64("i64", -(2**63))
    w.add_float64("f64", 1e-300)
    w.add_string("s", "h\u00e9llo \u2581 \U0001F600")
    w.add_string("empty", "")
    w.add_array("strings", ["a", "", "\u0120the", "x" * 300])
    w.add_array("ints", [1, -2, 3])
    w.add_array("floats", [0.5, -1.25])
    w.add_array("bools", [True, False])
    w.add_key_value("u8s", [1, 2, 255], t.ARRAY, sub_type=t.UINT8)
    for name, arr, raw in tensors:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_type_and_tensor_kind(tmp_path):
    rng = np.random.default_rng(0)
    k = gguf.GGMLQuantizationType
    w = rng.standard_normal((3, 64)).astype(np.float32)
    tensors = [("f32", w, None), ("f16", w.astype(np.float16), None),
               ("q8", gguf.quants.quantize(w, k.Q8_0), k.Q8_0),
               ("q4k", rng.integers(0, 256, (2, 144), dtype=np.uint8), k.Q4_K),  # 2 blocks of 256
               ("vec", w[0], None),
               ("cube", rng.standard_normal((2, 3, 32)).astype(np.float32), None)]
    assert_same(write(tmp_path / "a.gguf", tensors=tensors))
    assert_same(write(tmp_path / "b.gguf", alignment=64, tensors=tensors))
    assert_same(write(tmp_path / "c.gguf"))  # no tensors


def test_version_2_reads_as_version_3(tmp_path):
    """GGUF v2 and v3 share one layout (v3 only allows big-endian files, which we refuse)."""
    v3 = write(tmp_path / "v3.gguf", tensors=[("t", np.ones((2, 32), np.float32), None)])
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(v3.read_bytes()[:4] + struct.pack("<I", 2) + v3.read_bytes()[8:])
    assert our_view(v2) == our_view(v3)
    assert_same(v2)


def test_default_model_matches_gguf_reader(default_gguf):
    assert_same(default_gguf)


def test_refusals(tmp_path):
    path = write(tmp_path / "m.gguf", tensors=[("t", np.ones((2, 32), np.float32), None)])
    data = path.read_bytes()
    bad = tmp_path / "bad.gguf"

    def refused(content, *words):
        bad.write_bytes(content)
        with pytest.raises(ValueError) as e:
            read_header(bad)
        assert str(bad) in str(e.value)
        for word in words:
            assert word in str(e.value)

    refused(data[:-4], "truncated")
    refused(data[:4] + struct.pack("<I", 1) + data[8:], "version 1")
    key = data.index(b"h\xc3\xa9llo")
    refused(data[:key] + b"\xff" + data[key + 1:], "not UTF-8")
    dup = data.replace(b"u16", b"u32", 1)
    refused(dup, "'u32' appears twice")
    t_type = data.rindex(b"\x01" + bytes(7) + b"t") + 9 + 4 + 16  # name, dimension count, dims
    refused(data[:t_type] + struct.pack("<I", 99) + data[t_type + 4:], "unknown type 99")
    refused(data[:4] + struct.pack(">I", 3) + data[8:], "big-endian")


def test_alignment_refusals(tmp_path):
    """general.alignment must be a uint32 power of two (as gguf's reader requires)."""
    def with_alignment(value, vtype):
        w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "llama")
        w.add_key_value("general.alignment", value, vtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return tmp_path / "a.gguf"

    t = gguf.GGUFValueType
    with pytest.raises(ValueError, match="general.alignment has value type 10, not uint32"):
        read_header(with_alignment(64, t.UINT64))
    with pytest.raises(ValueError, match="general.alignment 48 is not a power of two"):
        read_header(with_alignment(48, t.UINT32))
    assert read_header(with_alignment(64, t.UINT32)).metadata["general.alignment"] == 64
