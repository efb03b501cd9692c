#!/usr/bin/env python3
"""ONNX fixtures exported by PyTorch, and hostile variants of them.

Run:  python3 tools/make_onnx_fixtures.py      (needs torch, onnx, onnxruntime)

Writes tests/fixtures/onnx/: models trained on the digits (an MLP and a BatchNorm/residual
CNN, each at opsets 13 and 17) with the test split as digits_test.npz and, in digits_eval.json,
what onnxruntime scores on it dense and with 50 % global magnitude pruning done in NumPy; a
two-input encoder (input_ids, attention_mask) with unlabelled data; an untrained MLP at opsets 13 and 17, a CNN with BatchNorm and a residual
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


ROOT = Path(__file__).resolve().parent.parent


def digits():
    """The UCI digits exactly as prunescope bundles them (scikit-learn's own file)."""
    import gzip
    rows = np.loadtxt(gzip.open(ROOT / "assets" / "digits" / "digits.csv.gz", "rt"),
                      delimiter=",")
    return (rows[:, :64] / 16.0).astype(np.float32), rows[:, 64].astype(np.int64)


def train(model, x, y, epochs, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def scores(logits, y):
    logits = logits.astype(np.float64)
    m = logits.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
    loss = float(np.mean(lse - logits[np.arange(len(y)), y]))
    acc = float(np.mean(logits.argmax(axis=1) == y))
    higher = (logits > logits[np.arange(len(y)), y][:, None]).sum(axis=1)
    top5 = float(np.mean(higher < 5)) if logits.shape[1] > 5 else None
    return {"accuracy": acc, "top5": top5, "loss": loss}


def fidelity(pruned, dense):
    p = pruned.reshape(-1, pruned.shape[-1]).astype(np.float64)
    d = dense.reshape(-1, dense.shape[-1]).astype(np.float64)
    cos = (p * d).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(d, axis=1))
    return {"cosine": float(cos.mean()),
            "rel_l2": float(np.linalg.norm(p - d) / np.linalg.norm(d)),
            "top1_agreement": float(np.mean(p.argmax(1) == d.argmax(1)))}


def prune_global_magnitude(path, out, sparsity):
    """Zeroes the round(s·N) smallest-magnitude weights over all float initializers of >= 2
    dimensions, as prunescope's default global magnitude pruning does, in NumPy."""
    m = onnx.load(str(path))
    prunable = [t for t in m.graph.initializer
                if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    arrays = [numpy_helper.to_array(t) for t in prunable]
    flat = np.concatenate([np.abs(a).ravel() for a in arrays])
    k = int(np.floor(sparsity * flat.size + 0.5))
    order = np.argsort(flat, kind="stable")
    kill = np.zeros(flat.size, dtype=bool)
    kill[order[:k]] = True
    at = 0
    for t, a in zip(prunable, arrays):
        part = kill[at:at + a.size].reshape(a.shape)
        at += a.size
        t.CopyFrom(numpy_helper.from_array(np.where(part, 0, a).astype(np.float32), t.name))
    onnx.save_model(m, str(out))


def run_ort(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def trained_fixtures():
    x, y = digits()
    test = np.arange(len(y)) % 5 == 0
    xtr, ytr, xte, yte = x[~test], y[~test], x[test], y[test]
    np.savez_compressed(OUT / "digits_test.npz", x=xte, y=yte)
    report = {}
    torch.manual_seed(1)
    mlp = train(MLP(), xtr, ytr, epochs=30, lr=3e-3)
    torch.manual_seed(2)
    cnn = train(CNN(), xtr.reshape(-1, 1, 8, 8), ytr, epochs=80, lr=1e-2)
    for name, model, shape, kw in [
        ("digits_mlp", mlp, (-1, 64), {}),
        ("digits_cnn", cnn, (-1, 1, 8, 8), {"training": torch.onnx.TrainingMode.PRESERVE}),
    ]:
        for opset in (13, 17):
            path = OUT / f"{name}_opset{opset}.onnx"
            torch.onnx.export(model, (torch.from_numpy(xte[:2].reshape(shape)),), str(path),
                              opset_version=opset, dynamo=False, do_constant_folding=False,
                              input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, **kw)
            feeds = {"x": xte.reshape(shape)}
            dense = run_ort(path, feeds)
            pruned_path = OUT / "_pruned.onnx"
            prune_global_magnitude(path, pruned_path, 0.5)
            pruned = run_ort(pruned_path, feeds)
            pruned_path.unlink()
            report[path.name] = {"dense": scores(dense, yte),
                                 "pruned50": {**scores(pruned, yte),
                                              "fidelity": fidelity(pruned, dense)}}
    # Two integer inputs and no labels: fidelity is all there is to measure.
    torch.manual_seed(3)
    enc = Encoder().eval()
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 50, size=(40, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    for i, n in enumerate(rng.integers(4, 13, size=40)):
        mask[i, n:] = 0
        ids[i, n:] = 0
    path = OUT / "encoder_two_inputs.onnx"
    torch.onnx.export(enc, (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])), str(path),
                      opset_version=17, dynamo=False, do_constant_folding=False,
                      input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                      dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                    "embedding": {0: "batch"}})
    np.savez_compressed(OUT / "encoder_data.npz", input_ids=ids, attention_mask=mask)
    feeds = {"input_ids": ids, "attention_mask": mask}
    dense = run_ort(path, feeds)
    pruned_path = OUT / "_pruned.onnx"
    prune_global_magnitude(path, pruned_path, 0.5)
    pruned = run_ort(pruned_path, feeds)
    pruned_path.unlink()
    report[path.name] = {"pruned50": {"fidelity": fidelity(pruned, dense)},
                         "dense_output_first_row": dense[0].tolist()}
    (OUT / "digits_eval.json").write_text(json.dumps(report, indent=1, sort_keys=True))

    # Graphs tract must refuse: a cycle, and an operator no runtime knows.
    from onnx import helper
    m = onnx.load(str(OUT / "digits_mlp_opset17.onnx"))
    nodes = list(m.graph.node)
    # The first node now reads the last node's output: a cycle.
    nodes[0].input[0] = nodes[-1].output[0]
    (OUT / "bad_cycle.onnx").write_bytes(m.SerializeToString())
    m = onnx.load(str(OUT / "digits_mlp_opset17.onnx"))
    m.graph.node[1].op_type = "NoSuchOperator"
    (OUT / "bad_unknown_op.onnx").write_bytes(m.SerializeToString())


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, input_ids, attention_mask):
        h = self.norm(torch.nn.functional.gelu(self.proj(self.embed(input_ids))))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


class Attention(torch.nn.Module):
    """One self-attention block written as Hugging Face's BERT writes it (separate query, key
    and value Linears, view(B, -1, H, D), softmax(QKᵀ/√D)V, heads merged, output Linear), then a
    mean over the tokens: what head pruning has to find in an exported transformer."""

    def __init__(self, e=8, h=4, flexible=False):
        super().__init__()
        self.h, self.d, self.flexible = h, e // h, flexible
        self.query = torch.nn.Linear(e, e)
        self.key = torch.nn.Linear(e, e)
        self.value = torch.nn.Linear(e, e)
        self.out = torch.nn.Linear(e, e)

    def forward(self, x):
        b = x.size(0)
        # Newer transformers write view(*shape, -1, D): the head count is left to the width,
        # so the graph runs with fewer heads; the older view(B, -1, H, D) fixes it.
        if self.flexible:
            split = lambda t: t.view(*t.shape[:-1], -1, self.d).transpose(1, 2)
        else:
            split = lambda t: t.view(b, -1, self.h, self.d).transpose(1, 2)
        q, k, v = (split(p(x)) for p in (self.query, self.key, self.value))
        s = torch.softmax(q @ k.transpose(-1, -2) / self.d ** 0.5, dim=-1)
        ctx = (s @ v).transpose(1, 2)
        if self.flexible:
            ctx = ctx.reshape(*ctx.shape[:2], -1)
        else:
            ctx = ctx.reshape(b, -1, self.h * self.d)
        return self.out(ctx).mean(1)


def attention_fixture():
    x = np.random.default_rng(3).standard_normal((5, 3, 8)).astype(np.float32)
    for name, flexible in [("attention_heads.onnx", False), ("attention_heads_flexible.onnx", True)]:
        torch.manual_seed(3)
        model = Attention(flexible=flexible).eval()
        torch.onnx.export(model, (torch.from_numpy(x),), str(OUT / name), opset_version=17,
                          dynamo=False, do_constant_folding=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    np.savez(OUT / "attention_data.npz", x=x)


def plain_matmul_encoder():
    """The encoder with its projection stored [in, out] and read by MatMul directly, as some
    exporters write it (no Transpose): Wanda must compare within its columns."""
    m = onnx.load(str(OUT / "encoder_two_inputs.onnx"))
    g = m.graph
    tr = next(n for n in g.node if n.op_type == "Transpose" and n.input[0] == "proj.weight")
    init = next(i for i in g.initializer if i.name == "proj.weight")
    w = onnx.numpy_helper.to_array(init).T.copy()
    init.CopyFrom(onnx.numpy_helper.from_array(w, "proj.weight"))
    for n in g.node:
        for k, name in enumerate(n.input):
            if name == tr.output[0]:
                n.input[k] = "proj.weight"
    g.node.remove(tr)
    onnx.checker.check_model(m)
    onnx.save_model(m, str(OUT / "encoder_plain_matmul.onnx"))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    trained_fixtures()
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

    plain_matmul_encoder()
    attention_fixture()

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
