"""Rehearse the reference deployment at full size: a Llama-3.1-8B-shaped model with random weights
and andyrdt-layout SAE files of the real size, run through the real entry points (issue 14).

    nice -n 5 .venv/bin/python benchmarks/rehearse_llama31_8b.py          # full size: 16 GB model, 2 x 4 GB SAEs
    .venv/bin/python benchmarks/rehearse_llama31_8b.py --small            # the identical path, small sizes (~1 min)
    .venv/bin/python benchmarks/rehearse_llama31_8b.py --build-only       # only build (or check) the files

What it builds, once, under $STEERING_CACHE_DIR/rehearsal (else ~/.cache/llm-steering/rehearsal;
parts that exist are kept):
* `llama31-8b-random/`: the real Llama-3.1-8B-Instruct config.json (32 layers, hidden 4096,
  intermediate 14336, 32 heads, 8 KV heads, rope theta 500000 with llama3 rope scaling, 131072
  positions, vocabulary 128256, bfloat16), random bfloat16 weights written one tensor at a time
  into ~2 GiB safetensors shards with model.safetensors.index.json, the real generation_config.json,
  and a stand-in tokenizer: a byte-level BPE trained here on the project's own text (3,000 entries),
  padded with unreachable filler entries to the real 128,000 regular ids, plus Llama 3.1's 256
  special tokens at their real ids (128000 <|begin_of_text|> ... 128009 <|eot_id|> ...) and the
  real Llama 3.1 Instruct chat template (benchmarks/llama31_chat_template.jinja).
* `saes/resid_post_layer_{15,19}/trainer_1/ae.pt` + `config.json`: BatchTopK state dicts as
  dictionary_learning saves them (encoder.weight [131072, 4096], encoder.bias, decoder.weight
  [4096, 131072] with unit columns, b_dec, k, threshold; float32, 4 GiB each).

Then it runs (benchmarks/rehearsal_steps.py), each in a child process whose resident memory is sampled every 0.1 s:
1. extract_steering_vectors.py --sae-source <saes> --features 15:21576 19:93 --model <model> --output <file>
2. app.py with STEERING_PROFILE=llama31_8b and STEERING_MODEL / STEERING_SAE_SOURCE / STEERING_VECTORS
   pointing at the files above (demo.yaml untouched): start-up, one streamed /chat answer through
   gradio_client, then compare mode and Stop in a headless Chromium (as tests/test_app.py does);
3. demo.py --profile llama31_8b --prompt ... --steer 15:21576 0.5 --max-new-tokens N, same variables.
and prints a table of times, peak memory and tokens/s. Before each full-size step it waits
(up to --wait-minutes) until `--min-free-gb` of memory is available.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).resolve().parent / "llama31_chat_template.jinja"

LLAMA31_8B = {  # meta-llama/Llama-3.1-8B-Instruct's config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
GENERATION_CONFIG = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
                     "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.43.0.dev0"}
# --small: the same path at a reduced size. The llama31_8b profile's features sit at layers 15 and 19
# and feature 21576 must exist, so it keeps 20 layers and d_sae 32768; the vocabulary stays real.
SMALL = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 20, "num_attention_heads": 4,
         "num_key_value_heads": 2}
D_SAE = {"full": 131072, "small": 32768}
SAE_LAYERS = (15, 19)
SHARD_BYTES = 2 << 30
BPE_ENTRIES = 3000
N_REGULAR = 128000  # Llama 3's regular vocabulary; its 256 special tokens follow
SPECIAL = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
           128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>",
           128009: "<|eot_id|>", 128010: "<|python_tag|>"}


# ---------------------------------------------------------------------------
# Building the files
# ---------------------------------------------------------------------------


def default_root() -> Path:
    from llm_steering.models import cache_dir

    return cache_dir() / "rehearsal"


def model_config(small: bool) -> dict:
    return {**LLAMA31_8B, **(SMALL if small else {})}


def weight_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LlamaForCausalLM, in the order transformers saves them."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def shard_plan(shapes: list[tuple[str, tuple[int, ...]]], limit: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list] = [[]]
    size = 0
    for name, shape in shapes:
        n = 2
        for x in shape:
            n *= x
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def build_model(folder: Path, cfg: dict, shard_bytes: int = SHARD_BYTES, log=print) -> None:
    """config, generation config, tokenizer and bf16 shards; a shard that exists is kept.

    Each shard's tensors are made, saved and dropped before the next: the peak is one shard
    (plus safetensors' serialised copy of it), never the model.
    """
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    build_tokenizer(folder)
    plan = shard_plan(weight_shapes(cfg), shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    weight_map, total = {}, 0
    for k, (fname, shard) in enumerate(zip(names, plan, strict=True)):
        for name, shape in shard:
            weight_map[name] = fname
            total += 2 * torch.Size(shape).numel()
        path = folder / fname
        if path.is_file():
            continue
        t0 = time.time()
        gen = torch.Generator().manual_seed(1000 + k)
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)  # RMSNorm weights
            else:
                tensors[name] = torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        del tensors
        tmp.rename(path)
        log(f"  wrote {fname} ({path.stat().st_size / 2**30:.2f} GiB, {time.time() - t0:.0f} s)")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def build_tokenizer(folder: Path) -> None:
    """A byte-level BPE stand-in with Llama 3.1's special tokens at their real ids and its chat template."""
    if (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [p.read_text(encoding="utf-8") for p in sorted(ROOT.glob("*.md")) + sorted(ROOT.glob("*.yaml"))]
    texts += [p.read_text(encoding="utf-8") for p in sorted((ROOT / "benchmarks").glob("prompts_*.txt"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=BPE_ENTRIES, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), N_REGULAR):  # unreachable by encoding; decodes as " w<id>"
        vocab[f"Ġw{i}"] = i
    special = {i: SPECIAL.get(i) for i in range(N_REGULAR, N_REGULAR + 256)}
    reserved = 0
    for i in special:
        if special[i] is None:
            special[i] = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
    data["added_tokens"] = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, s in special.items()]
    data["post_processor"] = json.loads(processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 128000)]).__getstate__())
    tok = Tokenizer.from_str(json.dumps(data))
    assert tok.token_to_id("<|eot_id|>") == 128009 and tok.get_vocab_size() == 128256, tok.get_vocab_size()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE.read_text(encoding="utf-8"),
    }, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, indent=2))


def build_sae(root: Path, layer: int, d_model: int, d_sae: int, log=print) -> None:
    """resid_post_layer_{layer}/trainer_1/{ae.pt, config.json} as dictionary_learning writes them."""
    import torch

    folder = root / f"resid_post_layer_{layer}" / "trainer_1"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "trainer": {"trainer_class": "BatchTopKTrainer", "dict_class": "BatchTopKSAE", "activation_dim": d_model,
                    "dict_size": d_sae, "k": 64, "layer": layer, "lm_name": "meta-llama/Llama-3.1-8B-Instruct",
                    "submodule_name": f"resid_post_layer_{layer}", "device": "cuda:0", "seed": 0},
        "buffer": {"d_submodule": d_model, "io": "out", "n_ctxs": 1024, "ctx_len": 1024},
    }, indent=4))
    path = folder / "ae.pt"
    if path.is_file():
        return
    t0 = time.time()
    gen = torch.Generator().manual_seed(layer)
    decoder = torch.randn(d_model, d_sae, generator=gen)  # [d_model, d_sae]
    decoder.div_(decoder.norm(dim=0, keepdim=True))  # unit columns, as BatchTopK keeps them
    state = {  # nn.Module.state_dict order: own parameters, own buffers, then submodules
        "b_dec": torch.randn(d_model, generator=gen).mul_(0.01),
        "k": torch.tensor(64, dtype=torch.int),
        "threshold": torch.tensor(0.5, dtype=torch.float32),
        "decoder.weight": decoder,
        "encoder.weight": torch.randn(d_sae, d_model, generator=gen).mul_(d_model ** -0.5),  # [d_sae, d_model]
        "encoder.bias": torch.zeros(d_sae),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)  # writes each storage from its own buffer: no second copy
    del state, decoder
    tmp.rename(path)
    log(f"  wrote {path.relative_to(root)} ({path.stat().st_size / 2**30:.2f} GiB, {time.time() - t0:.0f} s)")


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the same path at a reduced size (hidden 256, d_sae 32768)")
    parser.add_argument("--root", type=Path, help="where to build (default: $STEERING_CACHE_DIR/rehearsal)")
    parser.add_argument("--build-only", action="store_true", help="build the files, run nothing")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens for /chat and the console (default 8)")
    parser.add_argument("--stop-tokens", type=int, default=64, help="answer limit in the compare/Stop run (default 64)")
    parser.add_argument("--min-free-gb", type=float, default=19.0, help="memory to wait for before a full-size step")
    parser.add_argument("--wait-minutes", type=float, default=10.0, help="how long to wait for it")
    parser.add_argument("--skip", nargs="*", default=[], choices=("extract", "app", "console"), help="steps to leave out")
    args = parser.parse_args(argv)

    # Imported here, not at the top: tests/test_rehearsal.py loads this file by path (without benchmarks/
    # on sys.path) and uses only the builders above.
    from rehearsal_steps import LoadRows, run_app, run_console, run_extract, wait_for_memory

    def log(msg: str) -> None:
        print(msg, flush=True)

    size = "small" if args.small else "full"
    root = (args.root or default_root()) / size
    model_dir, sae_dir, vectors = root / "llama31-8b-random", root / "saes", root / "steering_vectors_llama31_8b.pt"
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    min_gb = 0.0 if args.small else args.min_free_gb
    rows = LoadRows()
    log(f"Building in {root} (kept between runs) ...")
    t0 = time.time()
    cfg = model_config(args.small)
    wait_for_memory(min(min_gb, 8.0), args.wait_minutes, log)
    build_model(model_dir, cfg, 64 << 20 if args.small else SHARD_BYTES, log)
    for layer in SAE_LAYERS:
        build_sae(sae_dir, layer, cfg["hidden_size"], D_SAE[size], log)
    du = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "logs" not in p.parts)
    log(f"  files ready: {du / 2**30:.1f} GiB on disk ({time.time() - t0:.0f} s)")
    if args.build_only:
        return 0

    env = {**os.environ, "STEERING_PROFILE": "llama31_8b", "STEERING_MODEL": str(model_dir),
           "STEERING_SAE_SOURCE": str(sae_dir), "STEERING_VECTORS": str(vectors), "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if "extract" not in args.skip:
        log(f"  {wait_for_memory(min_gb, args.wait_minutes, log):.1f} GiB available")
        run_extract(model_dir, sae_dir, vectors, env, logs, rows, log)
    if "app" not in args.skip:
        log(f"  {wait_for_memory(min_gb, args.wait_minutes, log):.1f} GiB available")
        run_app(model_dir, env, logs, rows, log, args.max_new_tokens, args.stop_tokens)
    for backend in ("hf", "nnsight"):
        if "console" not in args.skip:
            log(f"  {wait_for_memory(min_gb, args.wait_minutes, log):.1f} GiB available")
            run_console(env, logs, rows, log, args.max_new_tokens, backend)

    log(f"\nRehearsal ({size}): {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, vocabulary "
        f"{cfg['vocab_size']}, bfloat16 on disk; SAEs d_sae {D_SAE[size]} float32; {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB memory")
    header = ("step", "time", "peak RSS", "peak anon RSS", "tokens/s", "load avg")
    log("| " + " | ".join(header) + " |")
    log("|" + "---|" * len(header))
    for row in rows:
        log("| " + " | ".join(str(x) for x in row) + " |")
    (logs / "table.md").write_text("\n".join("| " + " | ".join(str(x) for x in r) + " |" for r in [header, *rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
