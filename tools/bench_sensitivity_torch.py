#!/usr/bin/env python3
"""What `prunescope bench sensitivity` is measured against: the same sweep written in PyTorch.

Run:  /work/pyenv/bin/python tools/bench_sensitivity_torch.py [--threads 2] [--runs 20]

The sample MLP (sample_models/digits_mlp.safetensors, 64-128-64-10) on the 360 digits test
images of prunescope's fixed split (assets/digits/digits.csv.gz, permuted by the same seeded
SplitMix64 Fisher–Yates shuffle as src/data.rs), each of its 3 layers pruned alone by magnitude at
0, .1 … .9, .95, .99, accuracy and loss measured at every point, two ways:

- `prune_api_ms`: the way a PyTorch user writes it — `torch.nn.utils.prune.l1_unstructured`,
  evaluate the model, `prune.remove`, put the original weight back;
- `hand_ms`: masked copies of the one weight, raw `F.linear` calls, no hooks.

Prints JSON with the medians and the accuracies of both, which must agree with prunescope's.
"""

import argparse
import gzip
import json
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.utils import prune

ROOT = pathlib.Path(__file__).resolve().parent.parent
M64 = (1 << 64) - 1


def splitmix(seed):
    state = seed
    while True:
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        yield z ^ (z >> 31)


def digits_split():
    """prunescope's digits split (data::digits_split), pixels / 16: ((x, y) train, (x, y) test)."""
    rows = [
        [float(v) for v in line.split(",")]
        for line in gzip.open(ROOT / "assets/digits/digits.csv.gz", "rt").read().splitlines()
        if line.strip()
    ]
    a = np.array(rows, dtype=np.float32)
    perm = list(range(len(a)))
    rng = splitmix(20_240_601)
    for i in range(len(perm) - 1, 0, -1):
        j = (next(rng) * (i + 1)) >> 64
        perm[i], perm[j] = perm[j], perm[i]
    test, train = a[perm[:360]], a[perm[360:]]
    xy = lambda t: ((t[:, :64] / 16.0).astype(np.float32), t[:, 64].astype(np.int64))
    return xy(train), xy(test)


def digits_test():
    """prunescope's digits test split."""
    return digits_split()[1]


GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    w = load_file(str(ROOT / "sample_models/digits_mlp.safetensors"))
    xt, yt = digits_test()
    x = torch.from_numpy(xt.astype(np.float32))
    y = torch.from_numpy(yt)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
    names = ["fc1", "fc2", "fc3"]
    layers = [model[0], model[2], model[4]]
    with torch.no_grad():
        for n, l in zip(names, layers):
            l.weight.copy_(w[f"{n}.weight"])
            l.bias.copy_(w[f"{n}.bias"])
    model.eval()

    def score(logits):
        return ((logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item())

    def prune_api():
        out = []
        for l in layers:
            orig = l.weight.detach().clone()
            row = []
            for s in GRID:
                prune.l1_unstructured(l, "weight", amount=s)
                with torch.no_grad():
                    row.append(score(model(x)))
                prune.remove(l, "weight")
                with torch.no_grad():
                    l.weight.copy_(orig)
            out.append(row)
        return out

    ws = [l.weight.detach() for l in layers]
    bs = [l.bias.detach() for l in layers]

    def hand():
        out = []
        with torch.no_grad():
            for k in range(3):
                row = []
                flat = ws[k].abs().flatten()
                order = flat.argsort(stable=True)
                for s in GRID:
                    n = int(round(s * flat.numel()))
                    mask = torch.ones_like(flat)
                    mask[order[:n]] = 0
                    wk = ws[k] * mask.view_as(ws[k])
                    h = x
                    for j in range(3):
                        h = F.linear(h, wk if j == k else ws[j], bs[j])
                        if j < 2:
                            h = F.relu(h)
                    row.append(score(h))
                out.append(row)
        return out

    def median_ms(f):
        f()
        t = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            r = f()
            t.append((time.perf_counter() - t0) * 1e3)
        return float(np.median(t)), r

    api_ms, api = median_ms(prune_api)
    hand_ms, hd = median_ms(hand)
    print(json.dumps({
        "threads": a.threads,
        "runs": a.runs,
        "grid": GRID,
        "prune_api_ms": api_ms,
        "hand_ms": hand_ms,
        "accuracy_prune_api": [[r[0] for r in row] for row in api],
        "accuracy_hand": [[r[0] for r in row] for row in hd],
    }, indent=1))


if __name__ == "__main__":
    main()
