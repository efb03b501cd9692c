#!/usr/bin/env python3
"""What `prunescope bench kernels` is measured against: NumPy, SciPy and PyTorch on the same
shapes (one 4096×4096 f32 layer at batch 1), medians in ms.

Run:  /work/pyenv/bin/python tools/bench_kernels_ref.py [--size 4096] [--runs 50] [--threads 2]
"""

import argparse
import json
import os
import time

import numpy as np


def med(f, runs):
    for _ in range(3):
        f()
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        t.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(t))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    rng = np.random.default_rng(0)
    n = a.size
    w = rng.standard_normal((n, n), dtype=np.float32)
    x = rng.standard_normal(n, dtype=np.float32)
    out = {"size": n, "threads": a.threads, "numpy_dense_ms": med(lambda: w @ x, a.runs)}
    mags = np.abs(w)
    try:
        import scipy.sparse as sp

        for s in (90, 95):
            t = np.quantile(mags, s / 100)
            m = sp.csr_matrix(np.where(mags >= t, w, 0).astype(np.float32))
            out[f"scipy_csr_{s}_ms"] = med(lambda: m @ x, a.runs)
    except ImportError:
        out["scipy"] = "not installed"
    try:
        import torch

        torch.set_num_threads(a.threads)
        tw, tx = torch.from_numpy(w), torch.from_numpy(x)
        out["torch_dense_ms"] = med(lambda: tw @ tx, a.runs)
        for s in (90, 95):
            t = np.quantile(mags, s / 100)
            c = torch.from_numpy(np.where(mags >= t, w, 0).astype(np.float32)).to_sparse_csr()
            out[f"torch_csr_{s}_ms"] = med(lambda: c @ tx, a.runs)
        half = torch.from_numpy(w[::2].copy())
        out["torch_rows_50_ms"] = med(lambda: half @ tx, a.runs)
    except ImportError:
        out["torch"] = "not installed"
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
