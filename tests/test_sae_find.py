"""sae_find.py: features found from text match a plain encoder computation, layout by layout.

The reference activations come from the libraries' own encode code: sae_lens's `SAE.encode`
(installed), and for the others their `encode` mirrored from the public code named in
test_saes.py (dictionary_learning @ 60ec6bf, sparsify @ 9d3b136, the Goodfire model card).
"""

from __future__ import annotations

import math

from llm_steering import extract as esv
from llm_steering import saes, steering
from llm_steering.saes import find as sae_find

import pytest
import torch
from sae_lens import SAE
from test_saes import D, N, write_dictionary_learning, write_llamascope, write_saelens, write_sparsify

LAYER = 3
TEXT = "The Eiffel Tower stands in Paris, and we climbed it at night to see the city lights."


@pytest.fixture(scope="module")
def tiny():
    """A random 6-layer hidden-32 Llama with the embedded model's tokenizer, saved so the CLI can load it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(steering.embedded_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=D, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval(), tok


def hidden_at(model, tok, text: str, layer: int) -> torch.Tensor:
    """Output of model.model.layers[layer] at each token but the first: [tokens - 1, d_model]."""
    got = {}
    h = model.model.layers[layer].register_forward_hook(lambda m, a, o: got.update(h=(o[0] if isinstance(o, tuple) else o)[0, 1:]))
    try:
        with torch.inference_mode():
            model(input_ids=tok(text, return_tensors="pt")["input_ids"])
    finally:
        h.remove()
    return got["h"].float()


def expected(acts: torch.Tensor, k: int) -> list[tuple[int, float, float]]:
    """(index, mean, max) of the k features with the highest mean activation ([tokens, d_sae] in)."""
    mean, mx = acts.mean(0), acts.max(0).values
    order = sorted(range(acts.shape[1]), key=lambda i: (-mean[i].item(), -mx[i].item(), i))[:k]
    return [(i, mean[i].item(), mx[i].item()) for i in order if mean[i] > 0]


def assert_same(found, want, layer=LAYER):
    assert len(found) == len(want) > 0
    assert [f.index for f in found] == [i for i, _, _ in want]
    for f, (_, mean, mx) in zip(found, want, strict=True):
        assert f.layer == layer and f.mean == pytest.approx(mean, rel=1e-4, abs=1e-5) and f.max == pytest.approx(mx, rel=1e-4, abs=1e-5)


# the libraries' encode, mirrored
def dl_encode(ae, x, dict_class):
    if dict_class == "AutoEncoder":
        return torch.relu(ae.encoder(x - ae.bias))
    if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input False
        pre = x @ ae.W_enc + ae.b_enc
        return torch.relu(pre * (pre > ae.threshold))
    post = torch.relu((x - ae.b_dec) @ ae.W_enc + ae.b_enc if hasattr(ae, "W_enc") else ae.encoder(x - ae.b_dec))
    if dict_class == "AutoEncoderTopK":  # encode(use_threshold=False): per-token top k
        top = post.topk(int(ae.k), dim=-1)
        return torch.zeros_like(post).scatter_(-1, top.indices, top.values)
    return post * (post > ae.threshold)  # BatchTopKSAE / Matryoshka encode(use_threshold=True)


@pytest.mark.parametrize("kind", ["standard", "topk", "batchtopk", "jumprelu"])
def test_saelens_matches_sae_encode(tmp_path, tiny, kind):
    model, tok = tiny
    write_saelens(tmp_path / "sae", f"blocks.{LAYER}.hook_resid_post", kind, seed=4)
    with torch.no_grad():
        acts = SAE.load_from_disk(tmp_path / "sae").encode(hidden_at(model, tok, TEXT, LAYER))
    found = sae_find.find_features(str(tmp_path), LAYER, TEXT, model, tok, k=6, chunk_size=7)
    assert_same(found, expected(acts, 6))


@pytest.mark.parametrize("dict_class", ["BatchTopKSAE", "AutoEncoderTopK", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder", "AutoEncoder"])
def test_dictionary_learning_matches_its_encode(tmp_path, tiny, dict_class):
    model, tok = tiny
    ae = write_dictionary_learning(tmp_path, LAYER, dict_class, seed=2)
    if dict_class == "JumpReluAutoEncoder":
        with torch.no_grad():
            ae.threshold.copy_(ae.threshold.abs() * 0.5)
        torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, tmp_path / f"resid_post_layer_{LAYER}" / "trainer_1" / "ae.pt")
    with torch.no_grad():
        acts = dl_encode(ae, hidden_at(model, tok, TEXT, LAYER), dict_class)
    assert_same(sae_find.find_features(str(tmp_path), LAYER, TEXT, model, tok, k=5, chunk_size=9), expected(acts, 5))


def test_llamascope_and_sparsify_match_their_encode(tmp_path, tiny):
    model, tok = tiny
    x = hidden_at(model, tok, TEXT, LAYER)
    # Llama Scope: inputs scaled to norm sqrt(d_model) on average (dataset-wise), then JumpReLU
    write_llamascope(tmp_path / "ls", LAYER, "R", dtype=torch.float32)
    st = saes.tensor_index(next((tmp_path / "ls").rglob("final.safetensors")), "ls")
    pre = (x * math.sqrt(D) / 3.5) @ st["encoder.weight"].read().T + st["encoder.bias"].read()
    assert_same(sae_find.find_features(str(tmp_path / "ls"), LAYER, TEXT, model, tok, k=5, chunk_size=10),
                expected(torch.relu(pre) * (pre > 0.2), 5))
    # sparsify: relu(encoder(x - b_dec)), then the top k per token
    sp = write_sparsify(tmp_path / "sp", f"layers.{LAYER}", seed=3)
    with torch.no_grad():
        post = torch.relu(sp.encoder(x - sp.b_dec))
        top = post.topk(sp.cfg["k"], dim=-1)
        acts = torch.zeros_like(post).scatter_(-1, top.indices, top.values)
    assert_same(sae_find.find_features(str(tmp_path / "sp"), LAYER, TEXT, model, tok, k=5, chunk_size=11), expected(acts, 5))


def test_the_encoder_is_read_in_chunks(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    write_dictionary_learning(tmp_path, LAYER, "BatchTopKSAE")
    blocks = []
    real = saes.TensorRef.block

    def spy(self, r0, r1, c0, c1):
        blocks.append((r1 - r0) * (c1 - c0))
        return real(self, r0, r1, c0, c1)

    monkeypatch.setattr(saes.TensorRef, "block", spy)
    whole = sae_find.find_features(str(tmp_path), LAYER, TEXT, model, tok, k=4, chunk_size=N)
    n_whole = len(blocks)
    blocks.clear()
    chunked = sae_find.find_features(str(tmp_path), LAYER, TEXT, model, tok, k=4, chunk_size=5)
    assert max(blocks) == 5 * D and len(blocks) == n_whole + math.ceil(N / 5) - 1  # 13 reads of <= 5 features
    assert [f.index for f in chunked] == [f.index for f in whole]
    assert [f.mean for f in chunked] == pytest.approx([f.mean for f in whole], rel=1e-5)


def test_bad_inputs(tmp_path, tiny):
    model, tok = tiny
    write_dictionary_learning(tmp_path, LAYER, "BatchTopKSAE")
    cases = [
        ("word " * 80, LAYER, "the text is 81 tokens long; this model reads at most 64"),
        ("   ", LAYER, "empty"),
        ("Paris", LAYER, "too short"),
        (TEXT, 4, r"layer 4 has no andyrdt SAE .*\(layers available: 3\)"),
    ]
    for text, layer, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            sae_find.find_features(str(tmp_path), layer, text, model, tok)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        sae_find.find_features(str(tmp_path), LAYER, TEXT, model, tok, k=0)
    wide = tmp_path / "wide"
    write_sparsify(wide, f"layers.{LAYER}")
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    with pytest.raises(ValueError, match="the SAE reads vectors of size 32, but the model's hidden size is 16"):
        sae_find.find_features(str(wide), LAYER, TEXT, small, tok)


def test_cli_find_prints_and_writes_the_found_features(tmp_path, tiny, capsys):
    model, tok = tiny
    model_dir = tmp_path / "tiny"  # the model the SAE's config.json names (lm_name)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    ae = write_dictionary_learning(tmp_path / "sae", LAYER, "BatchTopKSAE", seed=2)
    want = sae_find.find_features(str(tmp_path / "sae"), LAYER, TEXT, model, tok, k=3)
    code = esv.main(["--sae-source", str(tmp_path / "sae"), "--layers", str(LAYER), "--find", TEXT, "--top-k", "3",
                     "--model", str(model_dir)])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and [line.split()[0] for line in out[:3]] == [f.key for f in want]
    assert f"mean {want[0].mean:9.4f}" in out[0]

    vectors = tmp_path / "v.pt"
    code = esv.main(["--sae-source", str(tmp_path / "sae"), "--layers", str(LAYER), "--find", TEXT, "--top-k", "3",
                     "--model", str(model_dir), "--output", str(vectors)])
    assert code == 0
    vs = steering.load_vectors(vectors)
    assert vs.names == [f.name for f in want] and list(vs.layer_norms) == [LAYER]
    dec = ae.decoder.weight.detach()
    torch.testing.assert_close(vs.vectors[0].vector, dec[:, want[0].index] / dec[:, want[0].index].norm(), rtol=0, atol=1e-7)

    # too long a text: one line, exit 2, nothing written
    capsys.readouterr()
    code = esv.main(["--sae-source", str(tmp_path / "sae"), "--layers", str(LAYER), "--find", "word " * 80,
                     "--model", str(model_dir), "--output", str(tmp_path / "none.pt")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: the text is 81 tokens long") and not (tmp_path / "none.pt").exists()
    for argv, pattern in ((["--find", TEXT], "--find needs --layers"),
                          (["--find", TEXT, "--layers", "3", "--features", "3:1"], "give --find or --features, not both"),
                          (["--features", "3:1"], "--output is needed")):
        code = esv.main(["--sae-source", str(tmp_path / "sae"), "--model", str(model_dir), *argv])
        assert code == 2 and pattern in capsys.readouterr().err
