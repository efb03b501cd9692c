#!/usr/bin/env python3
"""Write the hostile-input corpus under tests/fixtures/hostile/ (numpy only).

Run:  python3 tools/make_hostile_fixtures.py

Each file attacks one class of defect in the .pt / .npz / zip readers; tests/hostile.rs says
what each must produce (a one-line error naming the file, or a clean load) and the CLI and
the worker are run over all of them. Output is byte-for-byte deterministic.
"""

import struct
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import PickleWriter, ZIP_EPOCH  # noqa: E402,F401

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hostile"


class Writer(PickleWriter):
    """PickleWriter plus LONG1 (torch writes it for sizes past 2^31)."""

    def int_(self, v):
        if -(2**31) <= v < 2**31:
            return super().int_(v)
        n = (v.bit_length() + 8) // 8
        self.out += b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)


def raw_zip(members, declared=None, method=None, flags=0, count=None, cd_offset_delta=0):
    """A zip written field by field. members: [(name, stored_bytes)]; `declared` overrides the
    uncompressed size per name (ZIP64 extra when ≥ 2^32), `method` the method per name."""
    declared = declared or {}
    method = method or {}
    out, cd = bytearray(), bytearray()
    for name, data in members:
        nb = name.encode()
        size = declared.get(name, len(data))
        m = method.get(name, 0)
        zip64 = size >= 0xFFFFFFFF
        usize32 = 0xFFFFFFFF if zip64 else size
        extra = struct.pack("<HHQ", 1, 8, size) if zip64 else b""
        crc = zlib.crc32(data) & 0xFFFFFFFF
        off = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, flags, m, 0, 0x21, crc,
                           len(data), usize32, len(nb), len(extra)) + nb + extra + data
        cd += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, flags, m, 0, 0x21, crc,
                          len(data), usize32, len(nb), len(extra), 0, 0, 0, 0, off) + nb + extra
    cd_off = len(out) + cd_offset_delta
    out += cd
    n = len(members) if count is None else count
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(cd), cd_off, 0)
    return bytes(out)


def npy(descr, shape, data, fortran=False):
    h = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (
        descr, "True" if fortran else "False", repr(tuple(shape)))
    h = h.encode()
    h += b" " * (-(10 + len(h) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + data


def deflate(data):
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def pt(stem, pickle_bytes, storages):
    members = [(f"{stem}/data.pkl", pickle_bytes), (f"{stem}/byteorder", b"little")]
    members += [(f"{stem}/data/{k}", v) for k, v in storages.items()]
    return raw_zip(members)


def tensor_pickle(entries, proto_extra=b""):
    """entries: [(name, storage_class, key, storage_numel, offset, size, stride)]."""
    w = Writer()
    w.global_("collections", "OrderedDict")
    w.out += b")R("
    for name, cls, key, numel, offset, size, stride in entries:
        w.str_(name)
        w.global_("torch._utils", "_rebuild_tensor_v2")
        w.out += b"(("
        w.str_("storage")
        w.global_("torch", cls)
        w.str_(key)
        w.str_("cpu")
        w.int_(numel)
        w.out += b"tQ"
        w.int_(offset)
        w.tuple_(list(size))
        w.tuple_(list(stride))
        w.out += b"\x89"
        w.global_("collections", "OrderedDict")
        w.out += b")R"
        w.out += b"tR"
    w.out += b"u" + proto_extra
    return w.finish()


F16 = struct.pack("<4f", 1.0, -2.0, 3.0, -4.0)


def write(name, data):
    (OUT / name).write_bytes(data)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    ok = [("fc.weight", "FloatStorage", "0", 4, 0, (2, 2), (2, 1))]

    # Sizes that promise more bytes than exist: allocation would be petabytes.
    write("pt_huge_shape.pt", pt("pt_huge_shape", tensor_pickle(
        [("w", "FloatStorage", "0", 2**40 * 1024, 0, (2**40, 1024), (1024, 1))]), {"0": F16}))
    write("npz_huge_shape.npz", raw_zip([("w.npy", npy("<f4", (2**40, 1024), F16))]))
    # Element counts that wrap around 2^64.
    write("npz_shape_wrap_a.npz", raw_zip([("w.npy", npy("<f4", (2**63 + 1, 2), F16))]))
    write("npz_shape_wrap_b.npz", raw_zip([("w.npy", npy("<f4", (2**32, 2**32), F16))]))
    write("npz_header_lies.npz", raw_zip([("w.npy", npy("<f4", (10, 10), F16))]))
    write("npz_object_array.npz", raw_zip([("w.npy", npy("|O", (2,), b"\0" * 16))]))

    # Pickles: 2·10^5 nested tuples; a memo "billion laughs"; garbage opcodes.
    deep = b"\x80\x02}(X\x01\x00\x00\x00wN" + b"\x85" * 200_000 + b"u."
    write("pt_deep_nesting.pt", pt("pt_deep_nesting", deep, {}))
    deep_marks = b"\x80\x02}(X\x01\x00\x00\x00w" + b"(" * 100_000 + b"t" * 100_000 + b"u."
    write("pt_deep_marks.pt", pt("pt_deep_marks", deep_marks, {}))
    bomb = bytearray(b"\x80\x02X\x03\x00\x00\x00lolq\x00")
    for level in range(1, 40):
        bomb += b"(" + b"h" + bytes([level - 1]) + (b"h" + bytes([level - 1])) * 9 + b"l"
        bomb += b"q" + bytes([level])
    bomb += b"0"  # drop the bomb from the stack; the memo keeps it
    # The real state dict without its SETITEMS and STOP, then the bomb under "meta".
    state = tensor_pickle(ok)[:-1]
    state = state[:-1] + b"X\x04\x00\x00\x00metah" + bytes([39]) + b"u."
    write("pt_memo_bomb.pt", pt("pt_memo_bomb", bytes(bomb) + state[2:], {"0": F16}))
    write("pt_bad_opcode.pt", pt("pt_bad_opcode", b"\x80\x02}\xff.", {}))
    write("pt_stack_underflow.pt", pt("pt_stack_underflow", b"\x80\x02u.", {}))
    write("pt_memo_missing.pt", pt("pt_memo_missing", b"\x80\x02h\x07.", {}))
    write("pt_truncated_pickle.pt", pt("pt_truncated_pickle", tensor_pickle(ok)[:40], {"0": F16}))

    # Storage records that lie.
    write("pt_storage_missing.pt", pt("pt_storage_missing", tensor_pickle(
        [("w", "FloatStorage", "7", 4, 0, (2, 2), (2, 1))]), {"0": F16}))
    write("pt_view_past_storage.pt", pt("pt_view_past_storage", tensor_pickle(
        [("w", "FloatStorage", "0", 4, 3, (2, 2), (2, 1))]), {"0": F16}))
    write("pt_negative_stride.pt", pt("pt_negative_stride", tensor_pickle(
        [("w", "FloatStorage", "0", 4, 0, (2, 2), (-2, 1))]), {"0": F16}))
    write("pt_storage_key_path.pt", pt("pt_storage_key_path", tensor_pickle(
        [("w", "FloatStorage", "../../etc/passwd", 4, 0, (2, 2), (2, 1))]), {"0": F16}))
    write("pt_unknown_storage.pt", pt("pt_unknown_storage", tensor_pickle(
        [("w", "QUInt4x2Storage", "0", 4, 0, (2, 2), (2, 1))]), {"0": F16}))
    # 1,200 transposed views of one 256 kB storage: 300 MB of copies from a small file.
    views = [(f"v{i}", "FloatStorage", "0", 65536, 0, (256, 256), (1, 256)) for i in range(1200)]
    write("pt_view_copy_bomb.pt", pt("pt_view_copy_bomb", tensor_pickle(views),
                                     {"0": b"\0" * (65536 * 4)}))
    # Review findings: a zero-stride view of 2^62 elements, a tensor of 100 dimensions, a
    # global whose name is a megabyte reused through the memo.
    write("pt_zero_stride_huge.pt", pt("pt_zero_stride_huge", tensor_pickle(
        [("w", "FloatStorage", "0", 4, 0, (2**62,), (0,))]), {"0": F16}))
    write("pt_many_dims.pt", pt("pt_many_dims", tensor_pickle(
        [("w", "FloatStorage", "0", 4, 0, (1,) * 100, (1,) * 100)]), {"0": F16}))
    long = b"\x80\x02X" + struct.pack("<I", 1 << 20) + b"m" * (1 << 20) + b"q\x00"
    long += b"h\x00h\x00\x93" * 1000 + b"."
    write("pt_long_global.pt", pt("pt_long_global", long, {}))

    # Not a state dict: a pickled module object, a quantized tensor, a legacy file.
    w = Writer()
    w.global_("__main__", "Net")
    w.out += b")\x81}b"
    write("pt_module_object.pt", pt("pt_module_object", w.finish(), {}))
    w = Writer()
    w.out += b"}(X\x01\x00\x00\x00w"
    w.global_("torch._utils", "_rebuild_qtensor")
    w.out += b")Ru"
    write("pt_quantized.pt", pt("pt_quantized", w.finish(), {}))
    write("pt_legacy.pt", b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19." + b"\0" * 64)
    # A tensor name that tries to drive the terminal.
    write("pt_control_chars.pt", pt("pt_control_chars", tensor_pickle(
        [("evil\x1b[2J\x1b[31m\nerror: forged line\r", "FloatStorage", "0", 4, 0, (2, 2), (2, 1))]),
        {"0": F16}))

    # Zip containers that lie.
    big = 4 * 2**30
    body = deflate(b"\0" * (1 << 20))
    write("npz_deflate_bomb.npz", raw_zip([("w.npy", body)], declared={"w.npy": big},
                                          method={"w.npy": 8}))
    arr = npy("<f4", (2500,), b"\0" * 10000)
    write("npz_inflates_past.npz", raw_zip([("w.npy", deflate(arr))], declared={"w.npy": 100},
                                           method={"w.npy": 8}))
    write("npz_inflates_short.npz", raw_zip([("w.npy", deflate(arr))],
                                            declared={"w.npy": len(arr) + 50},
                                            method={"w.npy": 8}))
    write("npz_deflate_garbage.npz", raw_zip([("w.npy", b"\xff" * 64)],
                                             declared={"w.npy": 1000}, method={"w.npy": 8}))
    write("npz_method_bzip2.npz", raw_zip([("w.npy", arr)], method={"w.npy": 12}))
    write("npz_encrypted.npz", raw_zip([("w.npy", arr)], flags=1))
    write("npz_duplicate_member.npz", raw_zip([("w.npy", arr), ("w.npy", arr)]))
    write("npz_cd_outside.npz", raw_zip([("w.npy", arr)], cd_offset_delta=10**6))
    write("npz_count_lies.npz", raw_zip([("w.npy", arr)], count=60000))
    write("npz_empty_archive.npz", raw_zip([]))
    print("hostile corpus written to", OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
