"""A small sharded checkpoint written the way Hugging Face writes them: safetensors shards by
the `safetensors` package plus a `model.safetensors.index.json` whose weight_map names each
tensor's shard. BF16 and F32 tensors, ties among the bf16 values, metadata in every shard.

Writes tests/fixtures/sharded/ and expected.json (per tensor: dtype, shape, sum of values as
float64, shard). Run with a Python that has torch and safetensors:
    python tools/make_sharded_fixture.py
"""
import json
import os

import torch
from safetensors.torch import save_file

out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "sharded")
os.makedirs(out, exist_ok=True)
g = torch.Generator().manual_seed(0)


def bf16_with_ties(*shape):
    # Rounded to a coarse grid so many weights share a magnitude.
    return (torch.randn(*shape, generator=g) * 4).round().div(4).to(torch.bfloat16)


shards = {
    "model-00001-of-00003.safetensors": {
        "embed.weight": bf16_with_ties(64, 16),
        "layers.0.attn.weight": bf16_with_ties(16, 16),
    },
    "model-00002-of-00003.safetensors": {
        "layers.0.mlp.up.weight": bf16_with_ties(32, 16),
        "layers.0.mlp.down.weight": bf16_with_ties(16, 32),
        "layers.0.norm.weight": torch.ones(16, dtype=torch.bfloat16),
    },
    "model-00003-of-00003.safetensors": {
        "head.weight": torch.randn(64, 16, generator=g),
        "head.bias": torch.zeros(64),
    },
}
weight_map = {}
expected = {}
total = 0
for name, tensors in shards.items():
    save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
    for t, v in tensors.items():
        weight_map[t] = name
        total += v.numel() * v.element_size()
        expected[t] = {
            "dtype": str(v.dtype).replace("torch.", ""),
            "shape": list(v.shape),
            "sum": float(v.double().sum()),
            "shard": name,
        }
with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
with open(os.path.join(out, "..", "sharded_expected.json"), "w") as f:
    json.dump(expected, f, indent=1, sort_keys=True)
print("wrote", out)
