#!/usr/bin/env python3
"""Write fixtures with the real libraries: torch.save checkpoints and NumPy archives.

Run:  python3 tools/make_real_fixtures.py        (needs torch and numpy)

The loaders are tested against these files and against the values recorded beside them in
JSON (written from the tensors with .tolist(), so the expected numbers never pass through our
reader). Unlike tools/make_fixtures.py, the output is not byte-for-byte stable across torch
versions; the files are committed, so rerun this only to refresh them.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "real"


def describe(tensors):
    """name -> {dtype, shape, values}: the expectation, computed by the library itself."""
    out = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            dtype = str(t.dtype).replace("torch.", "")
            values = t.detach().to(torch.float64).flatten().tolist() if t.is_floating_point() \
                else t.detach().flatten().to(torch.int64).tolist()
            out[name] = {"dtype": dtype, "shape": list(t.shape), "values": values}
        else:
            a = np.asarray(t)
            values = a.astype(np.float64).flatten(order="C").tolist() if a.dtype.kind == "f" \
                else a.astype(np.int64).flatten(order="C").tolist()
            out[name] = {"dtype": a.dtype.name, "shape": list(a.shape), "values": values}
    return out


def torch_dtypes():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    shared = torch.arange(24, dtype=torch.float32)
    sd = {
        "f32.weight": torch.randn(4, 5, generator=g),
        "f16.weight": torch.randn(3, 4, generator=g).half(),
        "bf16.weight": torch.randn(3, 4, generator=g).bfloat16(),
        "f64.weight": torch.randn(2, 3, generator=g).double(),
        "i8.index": torch.tensor([-128, -1, 0, 1, 127], dtype=torch.int8),
        "i16.index": torch.tensor([[-32768, 7], [8, 32767]], dtype=torch.int16),
        "i32.index": torch.tensor([-2**31, 0, 2**31 - 1], dtype=torch.int32),
        "i64.steps": torch.tensor([2**40, -5], dtype=torch.int64),
        "u8.mask": torch.tensor([0, 1, 255], dtype=torch.uint8),
        "bool.mask": torch.tensor([[True, False], [False, True]]),
        "scalar.temperature": torch.tensor(0.5),
        "empty.weight": torch.zeros(0, 4),
        # Views: transposed (non-contiguous), sliced with a storage offset, and two tensors
        # sharing one storage (tied weights).
        "transposed.weight": base.t(),
        "sliced.weight": base[2:5, 1:4],
        "tied_a.weight": shared.view(4, 6),
        "tied_b.weight": shared.view(6, 4),
        "param.weight": torch.nn.Parameter(torch.randn(3, 3, generator=g)),
    }
    torch.save(sd, OUT / "torch_dtypes.pt")
    (OUT / "torch_dtypes.json").write_text(json.dumps(describe(sd)))
    # The same weights as a training checkpoint, and saved with pickle protocol 4.
    torch.save({"epoch": 7, "model_state_dict": sd, "lr": 0.1}, OUT / "torch_checkpoint.pt")
    torch.save(sd, OUT / "torch_protocol4.pt", pickle_protocol=4)


def torch_names():
    # The inner folder of a torch.save zip is the stem of the file name it was saved under;
    # readers once failed on exactly 21 characters. One file per stem length.
    sd = {"w": torch.tensor([[1.0, -2.0], [3.0, -4.0]]), "n": torch.tensor([5], dtype=torch.int32)}
    for n in range(1, 41):
        torch.save(sd, OUT / "names" / f"{'n' * n}.pt")


def numpy_archives():
    rng = np.random.default_rng(0)
    arrays = {
        "dense.weight": rng.standard_normal((16, 32)).astype(np.float32),
        "zeros.weight": np.zeros((64, 64), dtype=np.float32),
        "f16.weight": rng.standard_normal((4, 4)).astype(np.float16),
        "f64.weight": rng.standard_normal((3, 2)),
        "i8.index": np.array([-3, 0, 3], dtype=np.int8),
        "bool.mask": np.array([True, False, True]),
    }
    np.savez_compressed(OUT / "np_compressed.npz", **arrays)
    (OUT / "np_compressed.json").write_text(json.dumps(describe(arrays)))
    # A member far larger than one inflate buffer (64 kB): 256 kB of 95%-sparse weights.
    big = rng.standard_normal((256, 256)).astype(np.float32)
    big[rng.random(big.shape) < 0.95] = 0
    np.savez_compressed(OUT / "np_compressed_large.npz", big=big)
    (OUT / "np_compressed_large.json").write_text(json.dumps(describe({"big": big})))
    base = rng.standard_normal((3, 5)).astype(np.float32)
    layouts = {
        "fortran.weight": np.asfortranarray(base),
        "bigendian.weight": base.astype(">f4"),
        "bigendian_i32.index": np.array([1, -2, 300000], dtype=">i4"),
        "c.weight": base,
    }
    np.savez(OUT / "np_layouts.npz", **layouts)
    (OUT / "np_layouts.json").write_text(json.dumps(describe(layouts)))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "names").mkdir(exist_ok=True)
    torch_dtypes()
    torch_names()
    numpy_archives()
    print("wrote", OUT, "with torch", torch.__version__, "and numpy", np.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
