#!/usr/bin/env python3
"""What `prunescope bench eval` is measured against: onnxruntime on the same model and data.

Run:  python3 tools/bench_onnxruntime.py MODEL.onnx DATA.npz [--threads 2] [--runs 50]

Prints JSON: the median time of one run over all of DATA's samples (inputs named after the
model's inputs, or `x` for a one-input model), as `prunescope bench eval` times one evaluation.
"""

import argparse
import json
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    a = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(a.model, opts, providers=["CPUExecutionProvider"])
    data = np.load(a.data)
    inputs = sess.get_inputs()
    feeds = {}
    for i in inputs:
        arr = data[i.name] if i.name in data else data["x"]
        shape = [d if isinstance(d, int) else -1 for d in i.shape]
        if len(shape) == arr.ndim + 2 or (len(shape) != arr.ndim and -1 not in shape[1:]):
            arr = arr.reshape([arr.shape[0]] + shape[1:])
        feeds[i.name] = arr.astype(np.float32 if "float" in i.type else np.int64)
    sess.run(None, feeds)
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"model": a.model, "threads": a.threads, "runs": a.runs,
                      "samples": int(next(iter(feeds.values())).shape[0]),
                      "onnxruntime_ms": float(np.median(times)),
                      "onnxruntime_version": ort.__version__}, indent=2))


if __name__ == "__main__":
    main()
