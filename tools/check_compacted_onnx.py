"""Runs a masked ONNX model and its compacted counterpart in onnxruntime on the same random
inputs and checks that their outputs agree and that the compacted one is smaller. Prints one
JSON line. Used by tests/structured.rs.
    python tools/check_compacted_onnx.py MASKED.onnx COMPACTED.onnx
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort

masked, small = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
feeds = None
outs, params = [], []
for path in (masked, small):
    m = onnx.load(path)
    onnx.checker.check_model(m)
    params.append(int(sum(np.prod(i.dims) for i in m.graph.initializer)))
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    if feeds is None:
        feeds = {}
        for i in s.get_inputs():
            shape = [d if isinstance(d, int) else 4 for d in i.shape]
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    outs.append(s.run(None, feeds)[0])
diff = float(np.abs(outs[0] - outs[1]).max())
scale = float(np.abs(outs[0]).max())
ok = diff <= 1e-4 * max(1.0, scale) and params[1] < params[0]
print(json.dumps({"ok": ok, "max_abs_diff": diff, "params_masked": params[0], "params_compacted": params[1]}))
sys.exit(0 if ok else 1)
