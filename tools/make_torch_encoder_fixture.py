#!/usr/bin/env python3
"""A PyTorch nn.TransformerEncoder (multi-head attention, erf GELU) exported to ONNX as users'
own code would export it, with data and onnxruntime's outputs: the fixture that checks
prunescope's ONNX interpreter on attention as torch.nn writes it (fused in-projection sliced
by Slice/Mod/Squeeze, the output projection as Gemm), against tract and onnxruntime.

Run:  python3 tools/make_torch_encoder_fixture.py      (needs torch, onnx, onnxruntime, numpy)

Writes tests/fixtures/onnx/torch_encoder.onnx, torch_encoder_data.npz (`ids`, `y`) and
torch_encoder.json (onnxruntime's dense outputs).
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/onnx"


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 32)
        layer = torch.nn.TransformerEncoderLayer(
            32, 2, 64, dropout=0.0, activation="gelu", batch_first=True
        )
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


def main():
    torch.manual_seed(0)
    model = Encoder().eval()
    ids = torch.randint(0, 50, (24, 10))
    path = OUT / "torch_encoder.onnx"
    torch.onnx.export(
        model, (ids,), str(path), dynamo=False, do_constant_folding=False, opset_version=17,
        input_names=["ids"], output_names=["y"], dynamic_axes={"ids": {0: "batch"}},
    )
    y = np.random.default_rng(0).integers(0, 5, 24)
    np.savez(OUT / "torch_encoder_data.npz", ids=ids.numpy(), y=y)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids.numpy()})[0]
    (OUT / "torch_encoder.json").write_text(json.dumps({"dense_outputs": out.tolist()}))
    print("wrote", path)


if __name__ == "__main__":
    main()
