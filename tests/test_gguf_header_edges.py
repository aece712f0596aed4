"""gguf_header.py's bounds at their edges, on GGUF bytes built here field by field: the smallest
entries the counts are checked against, the caps on tensors, metadata entries and array items
(the cap itself accepted, one past refused), string arrays that end exactly at the file's end,
dimension counts, magic and short files. tests/test_gguf_header.py holds the oracle tests."""

import dataclasses
import struct

import pytest

from awq_ref.loaders import gguf_header
from awq_ref.loaders.gguf_header import read_header

U8, U32, STRING, ARRAY = 0, 4, 8, 9


def header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", vtype) + payload


def tensor_info(name: str, dims: list[int], type_id: int = 0, offset: int = 0) -> bytes:
    return (string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", type_id, offset))


def read(tmp_path, data: bytes):
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    return read_header(path)


def test_header_objects_are_frozen(tmp_path):
    h = read(tmp_path, header(1, 0) + tensor_info("t", [8]) + bytes(8) + bytes(32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.tensors = []
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.tensors[0].offset = 0


@pytest.mark.parametrize("n_tensors, n_kv, smallest", [(0, 1, 24 + 13), (1, 0, 24 + 32),
                                                       (2, 3, 24 + 64 + 39)])
def test_counts_are_checked_against_the_smallest_entries(tmp_path, n_tensors, n_kv, smallest):
    """The smallest metadata entry is 13 bytes (empty key, type, one byte), the smallest tensor
    info 32 (empty name, one dimension): a file of exactly that size passes the count check
    (whatever it fails later), one byte less cannot hold the entries."""
    def outcome(size):
        try:
            read(tmp_path, header(n_tensors, n_kv) + bytes(size - 24))
        except ValueError as e:
            return str(e)
        return "read"

    assert "cannot fit" not in outcome(smallest)
    assert f"cannot fit in {smallest - 1} bytes" in outcome(smallest - 1)


@pytest.mark.parametrize("n_tensors, n_kv", [(gguf_header.MAX_TENSORS + 1, 0),
                                             (0, gguf_header.MAX_KV + 1)])
def test_counts_past_the_caps_are_refused_and_the_caps_are_not(tmp_path, n_tensors, n_kv):
    with pytest.raises(ValueError, match="is not supported"):
        read(tmp_path, header(n_tensors, n_kv))
    with pytest.raises(ValueError, match="cannot fit"):  # the cap itself: only the size refuses
        read(tmp_path, header(max(n_tensors - 1, 0), max(n_kv - 1, 0)))
    assert (gguf_header.MAX_TENSORS, gguf_header.MAX_KV) == (1 << 14, 1 << 16)


def test_array_items_up_to_the_cap_are_read(tmp_path):
    cap = gguf_header.MAX_ARRAY_ITEMS
    assert cap == 1 << 21

    def u8_array(count):
        return kv("a", ARRAY, struct.pack("<IQ", U8, count) + bytes(count))

    assert len(read(tmp_path, header(0, 1) + u8_array(cap)).metadata["a"]) == cap
    with pytest.raises(ValueError, match=f"past {cap} array items in the file"):
        read(tmp_path, header(0, 1) + u8_array(cap + 1))
    # the cap counts every array of the file together
    with pytest.raises(ValueError, match=f"claims 2 items, past {cap}"):
        read(tmp_path, header(0, 2) + u8_array(cap - 1) + kv("b", ARRAY, struct.pack(
            "<IQ", U8, 2) + bytes(2)))


def test_a_string_array_ending_at_the_end_of_the_file_is_read(tmp_path):
    strings = kv("s", ARRAY, struct.pack("<IQ", STRING, 3) + bytes(24))  # three empty strings
    assert read(tmp_path, header(0, 1) + strings).metadata["s"] == ["", "", ""]
    claims = kv("s", ARRAY, struct.pack("<IQ", STRING, 1000) + bytes(24))
    with pytest.raises(ValueError, match=r"metadata entry 's' \(1000 items of at least 8 "
                                         r"bytes\) of 8000 bytes"):
        read(tmp_path, header(0, 1) + claims)


@pytest.mark.parametrize("n_dims, ok", [(1, True), (4, True), (0, False), (5, False)])
def test_tensor_dimension_counts(tmp_path, n_dims, ok):
    dims = [32] + [1] * (n_dims - 1) if n_dims else []
    data = header(1, 0) + tensor_info("t", dims)
    data += bytes(-len(data) % 32) + bytes(4 * 32)
    if ok:
        assert read(tmp_path, data).tensors[0].shape == tuple(reversed(dims))
    else:
        with pytest.raises(ValueError, match=f"tensor info 0 has {n_dims} dimensions"):
            read(tmp_path, data)


@pytest.mark.parametrize("data", [b"GGUF" + bytes(6), b"GGUX" + header(0, 0)[4:] + bytes(8),
                                  b""], ids=["short", "magic", "empty"])
def test_not_a_gguf_file(tmp_path, data):
    with pytest.raises(ValueError, match="not a GGUF file .bad magic or shorter than its header"):
        read(tmp_path, data)


@pytest.mark.parametrize("version", [2, 3])
def test_big_endian_files_of_either_version_are_named_so(tmp_path, version):
    data = b"GGUF" + struct.pack(">IQQ", version, 0, 0)
    with pytest.raises(ValueError, match=f"a big-endian GGUF file .version {version}.: not "
                                         "supported"):
        read(tmp_path, data)
    with pytest.raises(ValueError, match="GGUF version 4 is not supported"):
        read(tmp_path, b"GGUF" + struct.pack("<IQQ", 4, 0, 0))


@pytest.mark.parametrize("align, ok", [(1, True), (2, True), (64, True), (0, False), (3, False),
                                       (6, False)])
def test_alignment_edges(tmp_path, align, ok):
    data = header(0, 1) + kv("general.alignment", U32, struct.pack("<I", align))
    if ok:
        assert read(tmp_path, data).metadata["general.alignment"] == align
    else:
        with pytest.raises(ValueError, match=f"general.alignment {align} is not a power of two"):
            read(tmp_path, data)


def test_a_shape_is_checked_against_eight_weights_per_file_byte(tmp_path):
    """No GGML type stores more than 8 weights per byte: a shape of 8 x (file size) weights
    passes that check (the tensor then runs past the end), one more does not."""
    def data(columns):
        return header(1, 0) + tensor_info("t", [columns, 1]) + bytes(40)

    size = len(data(0))
    with pytest.raises(ValueError, match="truncated"):
        read(tmp_path, data(8 * size))
    with pytest.raises(ValueError, match=f"more weights than a {size}-byte file can hold"):
        read(tmp_path, data(8 * size + 1))
