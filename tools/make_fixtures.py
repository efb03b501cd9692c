#!/usr/bin/env python3
"""Generate the small model-file fixtures under tests/fixtures/.

Run from anywhere:  python3 tools/make_fixtures.py
Requires numpy only. PyTorch is deliberately NOT required: the .pt files are
written by hand so that the fixtures can be rebuilt on machines without torch,
and so that the pickle stream contains only opcodes that candle-core's minimal
unpickler (candle_core::pickle) understands.

Every output is byte-for-byte deterministic: zip timestamps are pinned and the
"random" bytes come from a hash, so regenerating produces no spurious diffs.
If the `safetensors` Python package is installed, the valid .safetensors files
are additionally cross-checked against the reference implementation.
"""

import collections
import hashlib
import io
import json
import pickle
import pickletools
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

# Pinned zip timestamp (the earliest a zip can encode) so reruns are identical.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


# ---------------------------------------------------------------------------
# Shared tensor contents
# ---------------------------------------------------------------------------

def state_dict_tensors():
    """The tensors stored in both .pt fixtures, in insertion order."""
    return collections.OrderedDict(
        [
            ("fc1.weight", (np.arange(24, dtype=np.float32) * np.float32(0.1) - np.float32(1.2)).reshape(4, 6)),
            ("fc1.bias", np.array([0.5, -0.5, 0.25, -0.25], dtype=np.float32)),
            ("fc2.weight", (np.arange(8, dtype=np.float16) * np.float16(0.5) - np.float16(2.0)).reshape(2, 4)),
            ("steps", np.array([1, 2, 3], dtype=np.int64)),
        ]
    )


# ---------------------------------------------------------------------------
# PyTorch zip checkpoint writer (no torch needed)
# ---------------------------------------------------------------------------

# numpy dtype -> torch legacy storage class name. These are the names that
# torch.save emits for typed storages and the ones candle maps back to dtypes.
STORAGE_CLASS = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.uint8): "ByteStorage",
}


class Tensor:
    """Marker: a value to be pickled as a torch tensor backed by storage `key`."""

    def __init__(self, array, key):
        self.array = np.ascontiguousarray(array)
        self.key = key


class PickleWriter:
    """Emits protocol-2 pickle opcodes by hand.

    The stdlib Pickler cannot be used directly because GLOBAL requires the
    referenced object (torch.FloatStorage, ...) to be importable. Writing the
    opcodes ourselves also guarantees we stay inside the subset candle parses:
    BINUNICODE (not SHORT_BINUNICODE), BININT*, EMPTY_DICT+SETITEMS (candle
    mis-decodes the DICT opcode 'd' as EMPTY_DICT), TUPLE*, NEWFALSE, BINPUT/
    BINGET, BINPERSID, REDUCE. Like CPython, each GLOBAL is memoised and
    re-used via BINGET, so the reader's memo path is exercised as it is with
    real torch checkpoints.
    """

    def __init__(self):
        self.out = bytearray(b"\x80\x02")  # PROTO 2, torch's DEFAULT_PROTOCOL
        self.memo = {}

    def _put(self, key):
        idx = len(self.memo)
        assert idx < 256, "fixtures are small; BINPUT's one-byte index suffices"
        self.memo[key] = idx
        self.out += b"q" + bytes([idx])

    def global_(self, module, name):
        key = ("global", module, name)
        if key in self.memo:
            self.out += b"h" + bytes([self.memo[key]])
        else:
            self.out += b"c" + f"{module}\n{name}\n".encode()
            self._put(key)

    def int_(self, v):
        # Same width choice as CPython's save_long for protocol 2. Sizes and
        # strides must fit in i32: candle only accepts BININT* for them.
        if 0 <= v < 0x100:
            self.out += b"K" + struct.pack("<B", v)
        elif 0 <= v < 0x10000:
            self.out += b"M" + struct.pack("<H", v)
        elif -(2**31) <= v < 2**31:
            self.out += b"J" + struct.pack("<i", v)
        else:
            raise ValueError("LONG1 not needed for these fixtures")

    def str_(self, s):
        b = s.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(b)) + b

    def tuple_(self, items):
        n = len(items)
        if n == 0:
            self.out += b")"
            return
        if n > 3:
            self.out += b"("
        for it in items:
            self.value(it)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(n, b"t")

    def ordered_dict(self, items):
        # OrderedDict pickles as GLOBAL + () + REDUCE, then SETITEMS; candle
        # turns `collections.OrderedDict()` into an empty dict, like this.
        self.global_("collections", "OrderedDict")
        self.out += b")R"
        self._setitems(items)

    def dict_(self, items):
        self.out += b"}"
        self._setitems(items)

    def _setitems(self, items):
        if items:
            self.out += b"("
            for k, v in items:
                self.value(k)
                self.value(v)
            self.out += b"u"

    def tensor(self, t):
        a = t.array
        cls = STORAGE_CLASS[a.dtype]
        strides = tuple(s // a.itemsize for s in a.strides)
        # torch._utils._rebuild_tensor_v2(storage, storage_offset, size,
        #                                 stride, requires_grad, backward_hooks)
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("
        # Storage is a persistent id: ('storage', <class>, key, location, numel).
        self.out += b"("
        self.str_("storage")
        self.global_("torch", cls)
        self.str_(t.key)
        self.str_("cpu")
        self.int_(a.size)
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.int_(0)  # storage_offset
        self.tuple_(list(a.shape))
        self.tuple_(list(strides))
        self.out += b"\x89"  # requires_grad=False (NEWFALSE)
        self.ordered_dict([])  # backward_hooks
        self.out += b"tR"  # TUPLE, REDUCE

    def value(self, v):
        if isinstance(v, Tensor):
            self.tensor(v)
        elif isinstance(v, str):
            self.str_(v)
        elif isinstance(v, bool):
            self.out += b"\x88" if v else b"\x89"
        elif isinstance(v, int):
            self.int_(v)
        elif isinstance(v, (list, tuple)):
            self.tuple_(list(v))
        elif isinstance(v, collections.OrderedDict):
            self.ordered_dict(list(v.items()))
        elif isinstance(v, dict):
            self.dict_(list(v.items()))
        else:
            raise TypeError(f"cannot pickle {type(v)}")

    def finish(self):
        return bytes(self.out + b".")


def tensors_to_pickle_tree(tensors, storages):
    """Wrap arrays as Tensor markers, assigning storage keys "0", "1", ..."""
    od = collections.OrderedDict()
    for name, arr in tensors.items():
        key = str(len(storages))
        storages[key] = np.ascontiguousarray(arr)
        od[name] = Tensor(arr, key)
    return od


def write_torch_zip(path, obj, storages):
    """Write the torch.save zip layout: <stem>/data.pkl, <stem>/data/<key>, ...

    Entries are STORED (uncompressed) as torch does, so that readers may in
    principle mmap tensor bytes. torch additionally pads entries to 64-byte
    alignment; candle does not rely on that, so we skip it.
    """
    stem = path.stem
    w = PickleWriter()
    w.value(obj)
    pkl = w.finish()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        def add(name, data):
            zf.writestr(zipfile.ZipInfo(f"{stem}/{name}", ZIP_EPOCH), data)

        add("data.pkl", pkl)
        add("byteorder", b"little")
        for key, arr in storages.items():
            add(f"data/{key}", arr.astype(arr.dtype.newbyteorder("<")).tobytes())
        add("version", b"3\n")
    return pkl


# ---------------------------------------------------------------------------
# safetensors writer
# ---------------------------------------------------------------------------

ST_DTYPE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8}


def safetensors_bytes(tensors):
    """tensors: list of (name, dtype_str, shape, raw_bytes), laid out in order."""
    header, data, off = {}, bytearray(), 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    return safetensors_raw(header, bytes(data))


def safetensors_raw(header, data):
    """Serialise an arbitrary (possibly lying) header followed by `data`."""
    h = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces so the data section starts 8-byte aligned, as the
    # reference writer does.
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def f32(values):
    return np.asarray(values, dtype="<f4").tobytes()


def bf16(values):
    # bfloat16 is the top half of an IEEE float32; the fixture values are
    # exactly representable, so truncation is exact.
    bits = np.asarray(values, dtype="<f4").view("<u4") >> 16
    return bits.astype("<u2").tobytes()


# ---------------------------------------------------------------------------
# Misc helpers
# ---------------------------------------------------------------------------

def pseudo_random_bytes(n, seed):
    """Stable across Python/numpy versions (unlike random.randbytes)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def write(name, data):
    (FIXTURES / name).write_bytes(data)


# ---------------------------------------------------------------------------
# Fixture generation
# ---------------------------------------------------------------------------

def make_pt():
    storages = {}
    sd = tensors_to_pickle_tree(state_dict_tensors(), storages)
    write_torch_zip(FIXTURES / "tiny_state_dict.pt", sd, storages)

    # Training checkpoints commonly wrap the weights; loaders must either be
    # told the key or find the nested dict themselves.
    storages = {}
    sd = tensors_to_pickle_tree(state_dict_tensors(), storages)
    write_torch_zip(FIXTURES / "nested_state_dict.pt", {"state_dict": sd, "epoch": 3}, storages)


def make_npz():
    # Plain numpy.savez, so the fixture is exactly what users produce. It is
    # deterministic: savez adds members via ZipFile.open(name, "w"), which
    # stamps the fixed 1980 default date rather than the current time.
    np.savez(
        FIXTURES / "tiny.npz",
        **{
            "dense.weight": (np.arange(15, dtype=np.float32) * np.float32(0.2) - np.float32(1.4)).reshape(3, 5),
            "dense.bias": np.zeros(3, dtype=np.float32),
            "emb": (np.arange(8, dtype=np.float64) * 1.0).reshape(4, 2),
        },
    )


def make_safetensors():
    nan, inf = float("nan"), float("inf")
    write(
        "nan_inf.safetensors",
        safetensors_bytes(
            [
                ("a.weight", "F32", [2, 4], f32([1.0, nan, -3.0, inf, 0.5, -inf, 2.0, nan])),
                ("a.bias", "F32", [2], f32([0.1, 0.2])),
            ]
        ),
    )
    # Contiguous header-order layout puts d.weight (F64) at data offset 20,
    # i.e. NOT 8-byte aligned: readers must not assume aligned slices.
    write(
        "mixed_dtypes.safetensors",
        safetensors_bytes(
            [
                ("h.weight", "F16", [2, 3], np.asarray([1, -2, 3, -4, 5, -6], dtype="<f2").tobytes()),
                ("b.weight", "BF16", [2, 2], bf16([0.5, -0.25, 2, -8])),
                ("d.weight", "F64", [2, 2], np.asarray([1, 2, 3, 4], dtype="<f8").tobytes()),
                ("i.index", "I64", [3], np.asarray([7, 8, 9], dtype="<i8").tobytes()),
                ("empty.weight", "F32", [0, 4], b""),
            ]
        ),
    )

    data64 = f32(np.arange(16))
    valid = safetensors_bytes([("w", "F32", [4, 4], data64)])
    write("truncated.safetensors", valid[: len(valid) // 2])
    write(
        "lying_offsets.safetensors",
        safetensors_raw({"w": {"dtype": "F32", "shape": [32, 32], "data_offsets": [0, 4096]}}, data64),
    )
    write(
        "bad_shape.safetensors",
        safetensors_raw({"w": {"dtype": "F32", "shape": [5, 5], "data_offsets": [0, 64]}}, data64),
    )
    # A reader that trusts the length prefix would try to allocate 4 EiB.
    write("huge_header.safetensors", struct.pack("<Q", 2**62) + b"{}      ")
    write("not_a_model.safetensors", b"hello, this is not a model\n")


def make_corrupt_containers():
    garbage = pseudo_random_bytes(300, "garbage.pt")
    # Guarantee no zip local-header / end-of-central-directory signature, so
    # a zip reader cannot latch onto anything.
    assert b"PK\x03\x04" not in garbage and b"PK\x05\x06" not in garbage
    write("garbage.pt", garbage)

    pt = (FIXTURES / "tiny_state_dict.pt").read_bytes()
    write("truncated.pt", pt[: len(pt) * 6 // 10])

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(zipfile.ZipInfo("x.npy", ZIP_EPOCH), b"not an npy file")
    write("garbage.npz", buf.getvalue())


# ---------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------

# Opcodes candle_core::pickle::Stack::read accepts (its OpCode enum).
# 'd' (DICT) is excluded on purpose: candle decodes it as EMPTY_DICT.
CANDLE_OPCODES = set(b"\x80c" b"qr)R(XJtQKM\x85\x86\x87\x88\x89Nhjsu}b.\x81]Gae\x8a")


class FakeStorageType:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"torch.{self.name}"


class FakeTensor:
    def __init__(self, storage, offset, size, stride, requires_grad, hooks):
        (tag, stype, key, location, numel) = storage
        assert tag == "storage" and location == "cpu" and offset == 0
        assert isinstance(hooks, collections.OrderedDict) and not hooks
        assert requires_grad is False
        self.dtype, self.key, self.numel = stype.name, key, numel
        self.size, self.stride = tuple(size), tuple(stride)

    def __repr__(self):
        return f"Tensor({self.dtype}, size={self.size}, stride={self.stride}, key={self.key!r})"


class StandInUnpickler(pickle.Unpickler):
    """Reconstructs the pickle with stand-ins; refuses any unexpected GLOBAL."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return FakeTensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_CLASS.values():
            return FakeStorageType(name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        return pid


def verify_pt(name, expect_nested):
    path = FIXTURES / name
    stem = path.stem
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        pkl = zf.read(f"{stem}/data.pkl")
        assert zf.read(f"{stem}/version") == b"3\n"
        used = {op.code.encode("latin-1")[0] for op, _, _ in pickletools.genops(pkl)}
        bad = used - CANDLE_OPCODES
        assert not bad, f"opcodes candle cannot read: {[bytes([b]) for b in bad]}"

        obj = StandInUnpickler(io.BytesIO(pkl)).load()
        print(f"{name}: {obj!r}")
        sd = obj["state_dict"] if expect_nested else obj
        if expect_nested:
            assert obj["epoch"] == 3
        expected = state_dict_tensors()
        assert list(sd) == list(expected)
        for k, arr in expected.items():
            t = sd[k]
            assert t.dtype == STORAGE_CLASS[arr.dtype] and t.size == arr.shape and t.numel == arr.size
            raw = zf.read(f"{stem}/data/{t.key}")
            got = np.frombuffer(raw, dtype=arr.dtype.newbyteorder("<")).reshape(t.size)
            assert np.array_equal(got, arr), k


def verify_npz():
    with np.load(FIXTURES / "tiny.npz", allow_pickle=False) as z:
        print("tiny.npz:", {k: (z[k].dtype.name, z[k].shape) for k in z.files})
        assert z.files == ["dense.weight", "dense.bias", "emb"]
        assert np.allclose(z["dense.weight"].ravel(), np.arange(15) * 0.2 - 1.4)
        assert z["dense.bias"].dtype == np.float32 and not z["dense.bias"].any()
        assert z["emb"].dtype == np.float64 and z["emb"][3, 1] == 7.0
    # numpy.load does not reject a member lacking the npy magic: it hands back
    # the raw bytes. A Rust npz reader must therefore check the magic itself.
    with np.load(FIXTURES / "garbage.npz") as z:
        assert z["x"] == b"not an npy file", "garbage.npz must not parse as an array"
    with zipfile.ZipFile(FIXTURES / "garbage.npz") as zf, zf.open("x.npy") as f:
        try:
            np.lib.format.read_magic(f)
        except ValueError as e:
            print("garbage.npz member rejected by npy parser:", e)
        else:
            raise AssertionError("garbage.npz member has npy magic")


def verify_safetensors():
    try:
        import safetensors
    except ImportError:
        print("safetensors package not installed; skipping reference checks")
        return
    # deserialize() returns raw bytes per tensor, so BF16 works without a
    # bfloat16-capable numpy.
    for name in ["nan_inf.safetensors", "mixed_dtypes.safetensors"]:
        tensors = dict(safetensors.deserialize((FIXTURES / name).read_bytes()))
        print(f"{name}:", {k: (v["dtype"], v["shape"], len(v["data"])) for k, v in tensors.items()})
    t = dict(safetensors.deserialize((FIXTURES / "mixed_dtypes.safetensors").read_bytes()))
    assert np.frombuffer(bytes(t["h.weight"]["data"]), "<f2").tolist() == [1, -2, 3, -4, 5, -6]
    bf = np.frombuffer(bytes(t["b.weight"]["data"]), "<u2").astype("<u4") << 16
    assert bf.view("<f4").tolist() == [0.5, -0.25, 2, -8]
    assert np.frombuffer(bytes(t["i.index"]["data"]), "<i8").tolist() == [7, 8, 9]
    t = dict(safetensors.deserialize((FIXTURES / "nan_inf.safetensors").read_bytes()))
    a = np.frombuffer(bytes(t["a.weight"]["data"]), "<f4")
    assert np.isnan(a[[1, 7]]).all() and a[3] == np.inf and a[5] == -np.inf

    for name in [
        "truncated.safetensors",
        "lying_offsets.safetensors",
        "bad_shape.safetensors",
        "huge_header.safetensors",
        "not_a_model.safetensors",
    ]:
        try:
            safetensors.deserialize((FIXTURES / name).read_bytes())
        except Exception as e:  # SafetensorError; exact type varies by version
            print(f"{name} rejected by safetensors: {e}")
        else:
            raise AssertionError(f"{name} unexpectedly loaded")


def verify_corrupt_pt():
    for name in ["garbage.pt", "truncated.pt"]:
        try:
            zipfile.ZipFile(FIXTURES / name)
        except zipfile.BadZipFile as e:
            print(f"{name} rejected by zipfile: {e}")
        else:
            raise AssertionError(f"{name} opened as zip")


def main():
    FIXTURES.mkdir(parents=True, exist_ok=True)
    make_pt()
    make_npz()
    make_safetensors()
    make_corrupt_containers()

    verify_pt("tiny_state_dict.pt", expect_nested=False)
    verify_pt("nested_state_dict.pt", expect_nested=True)
    verify_npz()
    verify_safetensors()
    verify_corrupt_pt()
    print("all fixtures written to", FIXTURES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
