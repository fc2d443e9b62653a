"""The speed table on one GPU, the day one is lent: the embedded model and a Llama-3.1-8B-shaped one.

    python benchmarks/gpu_check.py            # one GPU, under 8 minutes: both models, all backends
    python benchmarks/gpu_check.py --tiny     # a CPU (CI): the same steps on a tiny random Llama

Runs `bench_serving.measure` (server through HTTP, the vLLM engine in process, hooks, NNsight;
1, 4, 16, 64 concurrent; steered and unsteered) on the embedded SmolLM2-135M-Instruct, then on a
model with Llama-3.1-8B-Instruct's shape (32 layers, hidden 4096, 32 heads, 8 KV heads, MLP 14336;
the embedded model's tokenizer, so its vocabulary is 49152, not 128256) and random bfloat16
weights built from a config (no download), with random unit steering vectors on four layers.
Prints one Markdown table. `--tiny` skips the embedded model and the in-process vLLM engine,
and shrinks the shaped model to 4 layers of 256 (a minute or two of engine start on a CPU).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from llm_steering import models
from llm_steering.vectors import SteeringVector, SteeringVectorSet

import bench_serving
import torch

LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8}
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # head_dim 64: vLLM's CPU attention needs it


def build_shaped_model(path: Path, shape: dict, dtype: torch.dtype) -> int:
    """A random-weight Llama of `shape` with the embedded model's tokenizer, saved to `path`; its layer count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    source = models.embedded_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=4096, rope_theta=500000.0, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    del model
    return shape["num_hidden_layers"]


def random_vectors(path: Path, model_id: str, hidden: int, n_layers: int) -> Path:
    """Unit vectors on four layers, 'random_<layer>', norm 8 (strength = fraction x 8)."""
    g = torch.Generator().manual_seed(1)
    layers = sorted({n_layers // 4, n_layers // 2, 3 * n_layers // 4, n_layers - 1})
    vecs = []
    for layer in layers:
        v = torch.randn(hidden, generator=g)
        vecs.append(SteeringVector(name=f"random_{layer}", layer=layer, vector=v / v.norm()))
    out = path / "random_vectors.pt"
    SteeringVectorSet(model_id, hidden, vecs, {layer: 8.0 for layer in layers}).save(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (CI)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per answer (default 64, tiny 8)")
    opts = parser.parse_args(argv)
    if not opts.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no GPU here: run it with --tiny on a CPU")
    start, rows = time.monotonic(), {}
    common = ["--tokens", str(opts.tokens or (8 if opts.tiny else 64))]
    if opts.tiny:
        common += ["--concurrency", "1", "2", "--backends", "server", "hooks", "nnsight"]
    else:
        bench_serving.measure(parse(common + ["--label", "SmolLM2-135M"]), rows)
    with tempfile.TemporaryDirectory(prefix="llama8b-shaped-") as tmp:
        path = Path(tmp)
        shape = TINY if opts.tiny else LLAMA_8B
        n_layers = build_shaped_model(path, shape, torch.float32 if opts.tiny else torch.bfloat16)
        vectors = random_vectors(path, str(path), shape["hidden_size"], n_layers)
        label = "tiny Llama (random)" if opts.tiny else "Llama-3.1-8B shape (random)"
        bench_serving.measure(parse(common + ["--model", str(path), "--vectors", str(vectors), "--label", label]), rows)
    print(f"\n`python benchmarks/gpu_check.py{' --tiny' if opts.tiny else ''}` ({time.monotonic() - start:.0f} s, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'})\n")
    print(bench_serving.table(rows))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_serving.add_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
