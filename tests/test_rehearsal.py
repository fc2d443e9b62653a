"""What broke when the reference deployment (Llama-3.1-8B-Instruct, bf16, 4 GB SAE files) was rehearsed
at full size with benchmarks/rehearse_llama31_8b.py, each reproduced here on a tiny model in seconds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from llm_steering import models, steering

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 20, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def _rehearsal():
    spec = importlib.util.spec_from_file_location("rehearse_llama31_8b", ROOT / "benchmarks" / "rehearse_llama31_8b.py")
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rehearsal_dirs(tmp_path_factory):
    """A Llama-3.1-shaped model (bf16 shards, the real vocabulary and chat template) and andyrdt SAEs, tiny."""
    r = _rehearsal()
    root = tmp_path_factory.mktemp("rehearsal")
    cfg = {**r.LLAMA31_8B, **TINY}
    r.build_model(root / "model", cfg, shard_bytes=8 << 20, log=lambda _: None)
    for layer in r.SAE_LAYERS:
        r.build_sae(root / "saes", layer, TINY["hidden_size"], 32768, log=lambda _: None)
    return r, root / "model", root / "saes"


def test_rehearsal_model_has_llama31_tokens_template_and_shards(rehearsal_dirs):
    """The stand-in tokenizer keeps Llama 3.1's special ids and chat template; the shards load as one model."""
    import json

    from transformers import AutoTokenizer

    r, model_dir, _ = rehearsal_dirs
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) > 1 and all((model_dir / f).is_file() for f in shards)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert {t: tok.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                                      "<|eot_id|>")} == {
        "<|begin_of_text|>": 128000, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eot_id|>": 128009}
    text = tok.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."},
                                    {"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                    "Today Date: 26 Jul 2024\n\nYou are a helpful assistant.<|eot_id|><|start_header_id|>user"
                    "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = models.chat_input_ids(tok, [{"role": "user", "content": "Hi"}])
    assert ids[0] == 128000 and ids.count(128000) == 1 and ids.count(128009) == 2
    assert tok.decode(ids).endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert len(tok) == 128256 and tok.eos_token_id == 128009


def test_cpu_load_keeps_bfloat16_when_float32_would_not_fit(rehearsal_dirs, monkeypatch):
    """Full size: load_model on the CPU upcast the 16 GB bf16 checkpoint to float32 (32 GB) on a 24 GB
    machine. A 16-bit checkpoint whose float32 copy needs more than half the available memory now
    keeps its dtype; one that fits still loads in float32, as before."""
    _, model_dir, _ = rehearsal_dirs
    n_params = 0
    monkeypatch.setattr(models, "available_memory", lambda: 1 << 40)
    model, _ = steering.load_model(str(model_dir))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    n_params = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(models, "available_memory", lambda: 2 * 4 * n_params - 1)  # float32 needs just over half
    model, _ = steering.load_model(str(model_dir))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert models.cpu_dtype(str(model_dir)) == torch.bfloat16
    monkeypatch.setattr(models, "available_memory", lambda: 2 * 4 * n_params)
    assert models.cpu_dtype(str(model_dir)) == torch.float32


def test_bfloat16_clamp_lands_on_its_strength():
    """Full size: with bf16 weights, the float32 unit vector was rounded to bf16 and the projection
    taken in bf16, so a clamp missed its strength by up to 2% (0.16 of 8.55 at hidden 4096).
    Steering a 16-bit state in float32 and rounding once puts it within bf16's last bit of the state."""
    from conftest import build_tiny_llama

    model = build_tiny_llama(num_layers=2, hidden=1024).to(torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])
    _, layers = models.decoder_layers(model)
    seen = {}

    def watch():
        return layers[0].register_forward_hook(lambda m, a, out: seen.__setitem__("h", models.layer_hidden(out).float()))

    handle = watch()
    model(input_ids=ids)
    handle.remove()
    h = seen["h"][0]  # [seq, d_model]
    g = torch.Generator().manual_seed(3)
    v = h[-1] / h[-1].norm() + 0.3 * torch.randn(h.shape[1], generator=g) / h.shape[1] ** 0.5
    v = v / v.norm()  # a direction the state has a large component along, as an active feature does
    strength = 0.1 * float((h @ v).abs().max())
    comp = steering.SteeringComponent(layer=0, vector=v, strength=strength, op="clamp")
    with steering.steer(model, [comp]):
        handle = watch()  # registered after the steering hook: sees the steered state
        try:
            model(input_ids=ids)
        finally:
            handle.remove()
    after = seen["h"][0] @ comp.vector  # [seq]: the hook above runs after the steering hook
    assert float((after - strength).abs().max()) < 2e-3 * strength, (after, strength)


def test_unsteered_stream_stops_at_the_next_layer(rehearsal_dirs, monkeypatch):
    """Full size: in compare mode, Stop took 8.8 s to end the generations: the unsteered answer had no
    hook, so it ran to the end of its token (32 layers and a 128256-word head, ~2.5 s a token on 2
    cores). An unsteered stream now stops at the next layer, like a steered one."""
    import threading

    _, model_dir, _ = rehearsal_dirs
    monkeypatch.setattr(models, "available_memory", lambda: 1 << 40)
    model, tok = steering.load_model(str(model_dir))
    _, layers = models.decoder_layers(model)
    cancel, calls, last = threading.Event(), {"after": 0}, len(layers) - 1
    forwards = {i: layer.forward for i, layer in enumerate(layers)}

    def counting(i):
        def forward(*args, **kwargs):
            out = forwards[i](*args, **kwargs)
            if i == 2 and calls.get("tokens", 0) >= 3:
                cancel.set()  # Stop arrives while layer 2 of the 4th forward pass runs
            if i == last:
                calls["tokens"] = calls.get("tokens", 0) + 1
                calls["after"] += cancel.is_set()
            return out
        return forward

    for i, layer in enumerate(layers):
        monkeypatch.setattr(layer, "forward", counting(i))
    chat = [{"role": "user", "content": "Hi"}]
    answer = "".join(steering.stream_steered_answer_hf(model, tok, chat, [], max_new_tokens=50, temperature=0.0,
                                                       cancel=cancel))
    assert cancel.is_set() and calls["tokens"] == 3, calls  # the 4th pass never reached the last layer
    assert calls["after"] == 0 and len(answer.split()) <= 3
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # the stop hooks are gone too
