"""Reads a pruned sharded export back with the `safetensors` package and checks it against the
original: the same shard files, tensor names, dtypes and shapes; every value either equal to the
original or zero; the index identical. Prints one JSON line. Used by tests/sharded.rs.
    python tools/check_sharded_export.py ORIGINAL_DIR EXPORT_DIR
"""
import json
import os
import sys

from safetensors.torch import load_file

orig, out = sys.argv[1], sys.argv[2]
files = sorted(f for f in os.listdir(orig) if f.endswith(".safetensors"))
assert files == sorted(f for f in os.listdir(out) if f.endswith(".safetensors")), "shard files differ"
with open(os.path.join(orig, "model.safetensors.index.json"), "rb") as a, open(
    os.path.join(out, "model.safetensors.index.json"), "rb"
) as b:
    assert a.read() == b.read(), "index differs"
zeros = identical = 0
for f in files:
    a, b = load_file(os.path.join(orig, f)), load_file(os.path.join(out, f))
    assert sorted(a) == sorted(b), f"{f}: tensor names differ"
    for name in a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, f"{name}: dtype or shape differs"
        assert bool(((y == x) | (y == 0)).all()), f"{name}: a value is neither kept nor zero"
        zeros += int(((y == 0) & (x != 0)).sum())
        identical += int(bool((x == y).all()))
print(json.dumps({"ok": True, "pruned_to_zero": zeros, "identical_tensors": identical}))
