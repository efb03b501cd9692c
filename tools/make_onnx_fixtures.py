#!/usr/bin/env python3
"""ONNX fixtures exported by PyTorch, and hostile variants of them.

Run:  python3 tools/make_onnx_fixtures.py      (needs torch, onnx, onnxruntime)

Writes tests/fixtures/onnx/: an MLP at opsets 13 and 17, a CNN with BatchNorm and a residual
block (opset 17, training=PRESERVE so BatchNorm keeps its own tensors), the MLP with its
weights in an external data file, and malformed files. Beside each model, NAME.json holds every
initializer's name, dims and values as onnx's own numpy_helper reads them, and the outputs
onnxruntime gives on a fixed input, so tests compare against the libraries, not against us.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "onnx"


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 32)
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn2(self.conv2(h)))
        return self.fc(h.mean(dim=(2, 3)))


def describe(path, x):
    m = onnx.load(str(path))
    inits = {}
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t, base_dir=str(path.parent))
        inits[t.name] = {"dims": list(t.dims), "dtype": str(a.dtype),
                         "values": a.astype(np.float64).flatten().tolist()}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    path.with_suffix(".json").write_text(json.dumps(
        {"initializers": inits, "input": x.flatten().tolist(), "input_shape": list(x.shape),
         "output": y.flatten().tolist()}))


def export(model, x, name, opset, **kw):
    path = OUT / name
    torch.onnx.export(model, (torch.from_numpy(x),), str(path), opset_version=opset,
                      dynamo=False, do_constant_folding=False, input_names=["x"],
                      output_names=["y"], **kw)
    describe(path, x)
    return path


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    mlp = MLP().eval()
    x = rng.standard_normal((4, 64)).astype(np.float32)
    export(mlp, x, "mlp_opset13.onnx", 13)
    p17 = export(mlp, x, "mlp_opset17.onnx", 17)
    cnn = CNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for bn in (cnn.bn1, cnn.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    cnn.eval()
    xi = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    export(cnn, xi, "cnn_bn_residual_opset17.onnx", 17,
           training=torch.onnx.TrainingMode.PRESERVE)

    # The MLP with every initializer in one external data file.
    m = onnx.load(str(p17))
    ext = OUT / "mlp_external.onnx"
    # onnx appends to an existing data file: start from none, or a rerun doubles it.
    (OUT / "mlp_external.onnx.data").unlink(missing_ok=True)
    onnx.save_model(m, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="mlp_external.onnx.data", size_threshold=0)
    describe(ext, x)

    # Malformed files.
    good = p17.read_bytes()
    (OUT / "bad_truncated.onnx").write_bytes(good[: len(good) // 2])
    (OUT / "bad_garbage.onnx").write_bytes(bytes(range(256)) * 4)
    m = onnx.load(str(p17))
    m.graph.initializer[0].dims[0] = 2**40  # raw_data length no longer matches
    onnx.save_model(m, str(OUT / "bad_dims_lie.onnx"))
    m = onnx.load(str(p17))
    m.graph.initializer.append(m.graph.initializer[0])
    (OUT / "bad_duplicate_initializer.onnx").write_bytes(m.SerializeToString())
    for name, key, value in [
        ("bad_external_missing.onnx", "location", "missing.onnx.data"),
        ("bad_external_escapes.onnx", "location", "../outside.data"),
        ("bad_external_short.onnx", "offset", str(10**9)),
    ]:
        m = onnx.load(str(ext), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == key:
                    e.value = value
        (OUT / name).write_bytes(m.SerializeToString())
    print("wrote", OUT, "with torch", torch.__version__, "onnx", onnx.__version__,
          "onnxruntime", ort.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
