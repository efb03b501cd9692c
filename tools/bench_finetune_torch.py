#!/usr/bin/env python3
"""What `prunescope bench finetune` is measured against: the same masked fine-tuning in PyTorch.

Run:  /work/pyenv/bin/python tools/bench_finetune_torch.py [--epochs 5] [--threads 2] [--runs 3]

The sample MLP (sample_models/digits_mlp.safetensors, 64-128-64-10) with 50 % per-layer
magnitude masks on its three weights, fine-tuned on prunescope's digits training split (the
1,437 images left after the 360-image test split of src/data.rs), batch 64, SGD lr 0.05
momentum 0.9, the masks re-applied after every optimiser step. Prints JSON: the median
`samples_per_s` of the training loop alone, and the test accuracy after.
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_sensitivity_torch import ROOT, digits_split  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    (xtr, ytr), (xte, yte) = digits_split()
    xtr, ytr = torch.from_numpy(xtr), torch.from_numpy(ytr)
    xte, yte = torch.from_numpy(xte), torch.from_numpy(yte)
    w = load_file(str(ROOT / "sample_models/digits_mlp.safetensors"))

    def run():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(),
            torch.nn.Linear(128, 64), torch.nn.ReLU(),
            torch.nn.Linear(64, 10),
        )
        layers = [model[0], model[2], model[4]]
        masks = []
        with torch.no_grad():
            for n, l in zip(["fc1", "fc2", "fc3"], layers):
                l.weight.copy_(w[f"{n}.weight"])
                l.bias.copy_(w[f"{n}.bias"])
                flat = l.weight.abs().flatten()
                k = int(round(0.5 * flat.numel()))
                m = torch.ones_like(flat)
                m[flat.argsort(stable=True)[:k]] = 0
                masks.append(m.view_as(l.weight))
                l.weight.mul_(masks[-1])
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        n = len(ytr)
        t = 0.0
        for _ in range(a.epochs):
            perm = torch.randperm(n)
            t0 = time.perf_counter()
            for i in range(0, n, 64):
                idx = perm[i:i + 64]
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for l, m in zip(layers, masks):
                        l.weight.mul_(m)
            t += time.perf_counter() - t0
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        return n * a.epochs / t, acc

    results = [run() for _ in range(a.runs)]
    print(json.dumps({
        "threads": a.threads,
        "epochs": a.epochs,
        "runs": a.runs,
        "samples_per_s": float(np.median([r[0] for r in results])),
        "test_accuracy": float(np.median([r[1] for r in results])),
    }, indent=1))


if __name__ == "__main__":
    main()
