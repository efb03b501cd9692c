#!/usr/bin/env python3
"""The bundled CNN samples as PyTorch modules, loaded from their safetensors and exported to ONNX,
so that `prunescope bench eval` and onnxruntime can be compared on the same models and data.

Run:  python3 tools/export_samples_onnx.py OUT_DIR      (needs torch, safetensors, numpy)

Writes OUT_DIR/digits_{cnn,rescnn}.onnx. `prunescope eval` on them gives the same figures as
on the safetensors samples (a check that the export and prunescope's graph agree).
"""

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


class Cnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(512, 10)

    def forward(self, x):
        h = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        return self.fc(torch.relu(self.conv2(h)).flatten(1))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(16)


class ResCnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.block = Block()
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        r = torch.relu(self.bn1(self.conv1(x)))
        b = self.block
        h = b.bn2(b.conv2(torch.relu(b.bn1(b.conv1(r)))))
        return self.fc(torch.relu(r + h).mean(dim=(2, 3)))


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, model in [("cnn", Cnn()), ("rescnn", ResCnn())]:
        state = load_file(str(ROOT / "sample_models" / f"digits_{name}.safetensors"))
        model.load_state_dict(state, strict=False)
        model.eval()
        x = torch.zeros(2, 1, 8, 8)
        torch.onnx.export(model, (x,), str(out / f"digits_{name}.onnx"), opset_version=17,
                          dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    print("wrote", out)


if __name__ == "__main__":
    main()
