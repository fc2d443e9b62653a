"""Issue 19: every hook point means what its library means, and no file gives a silent wrong answer.

Each case holds the tool against the library that wrote the file: sae_lens 6.54 (installed:
`SAE.encode`, `Transcoder`, hook_z SAEs, `save_model`) and dictionary_learning (mirrored in
test_saes.py). Reference activations at a hook point are taken from the model's own
`hidden_states` (the residual stream) and their differences (attn_out = resid_mid - resid_pre,
mlp_out = resid_post - resid_mid), not through the finder's hooks.
"""

from __future__ import annotations

import json
import struct

from llm_steering import extract as esv
from llm_steering import saes, steering
from llm_steering.saes import find as sae_find

import pytest
import safetensors.torch
import torch
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from test_sae_find import TEXT, expected
from test_saes import D, N, check, rand, randomize, write_dictionary_learning

MODEL = "tiny"  # the name the SAEs' configs give, and the folder the test model is saved in


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 6-layer hidden-32 Llama (4 heads of 8: heads x head size = d_model, as in Llama) saved as `tiny/`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(steering.embedded_model_dir())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=D, intermediate_size=64, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=True)).eval()
    path = tmp_path_factory.mktemp("m") / MODEL
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, path


def streams(model, tok, layer: int) -> dict[str, torch.Tensor]:
    """Residual stream before/after block `layer` from hidden_states, and its attn_out and mlp_out (first token left out)."""
    mid = {}
    norm = model.model.layers[layer].post_attention_layernorm
    h = norm.register_forward_pre_hook(lambda m, a: mid.update(x=a[0][0, 1:]))
    try:
        with torch.inference_mode():
            hs = model(input_ids=tok(TEXT, return_tensors="pt")["input_ids"], output_hidden_states=True).hidden_states
    finally:
        h.remove()
    pre, post = hs[layer][0, 1:], hs[layer + 1][0, 1:]
    return {"resid_pre": pre, "resid_post": post, "attn_out": mid["x"] - pre, "mlp_out": post - mid["x"]}


def same(found, acts: torch.Tensor, k: int = 6) -> None:
    """The found features are the library's top k by mean activation: same indices, values to 1e-3 relative."""
    want = expected(acts, k)
    assert [f.index for f in found] == [i for i, _, _ in want] and want
    for f, (_, mean, mx) in zip(found, want, strict=True):
        assert f.mean == pytest.approx(mean, rel=1e-3) and f.max == pytest.approx(mx, rel=1e-3)


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = esv.main([str(a) for a in argv])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    return code, cap.out, lines[-1] if lines else ""


def save_sl(sae, folder, seed: int = 0):
    randomize(sae, seed)
    sae.save_model(folder)
    return sae


def meta(hook: str, **kw) -> SAEMetadata:
    return SAEMetadata(hook_name=hook, model_name=MODEL, **kw)


def edit_weights(folder, **tensors) -> None:
    """Replace tensors in a sae_lens weights file (as a file damaged or edited after saving would be)."""
    path = folder / "sae_weights.safetensors"
    state = safetensors.torch.load_file(str(path))
    state.update(tensors)
    safetensors.torch.save_file(state, str(path))


# 1. --find --hook-point reads the activations of that hook

@pytest.mark.parametrize("hook", ["hook_mlp_out", "hook_attn_out"])
def test_find_at_mlp_out_and_attn_out_encodes_that_hook(tmp_path, tiny, capsys, hook):
    model, tok, path = tiny
    sae = save_sl(StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, metadata=meta(f"blocks.1.{hook}"))), tmp_path / "s", 3)
    with torch.no_grad():
        acts = sae.encode(streams(model, tok, 1)[hook.removeprefix("hook_")])
    found = sae_find.find_features(str(tmp_path), 1, TEXT, model, tok, k=6, hook_point=f"blocks.1.{hook}")
    same(found, acts)
    code, out, err = cli(capsys, "--sae-source", tmp_path, "--find", TEXT, "--layers", 1, "--top-k", 6,
                         "--hook-point", f"blocks.1.{hook}", "--model", path)
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[:6]] == [f"1:{i}" for i, _, _ in expected(acts, 6)]


def test_find_on_resid_pre_encodes_the_stream_before_the_block(tmp_path, tiny):
    model, tok, _ = tiny
    sae = save_sl(StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, metadata=meta("blocks.3.hook_resid_pre"))), tmp_path / "s", 4)
    with torch.no_grad():
        acts = sae.encode(streams(model, tok, 3)["resid_pre"])
    same(sae_find.find_features(str(tmp_path), 2, TEXT, model, tok, k=6), acts)


# 2. lying safetensors headers

def rewrite_header(path, change) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


@pytest.mark.parametrize("lie", ["copies W_enc's offsets", "negative offsets"])
def test_a_lying_safetensors_header_is_refused(tmp_path, capsys, lie):
    folder = tmp_path / "s"
    save_sl(StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, metadata=meta("blocks.3.hook_resid_post"))), folder)

    def change(h):
        a, b = h["W_dec"]["data_offsets"]
        h["W_dec"]["data_offsets"] = h["W_enc"]["data_offsets"] if lie.startswith("copies") else [a - 64, b - 64]

    rewrite_header(folder / "sae_weights.safetensors", change)
    out = tmp_path / "v.pt"
    code, _, err = cli(capsys, "--sae-source", tmp_path, "--features", "3:5", "--skip-norms", "--model", MODEL, "--output", out)
    assert code == 2 and not out.exists()
    assert err.startswith("error: ") and "is not a readable safetensors file" in err


# 3. hook_z rows are mapped into the residual stream through o_proj

def test_a_hook_z_sae_steers_with_what_the_feature_writes_into_the_residual_stream(tmp_path, tiny, capsys):
    model, _, path = tiny
    sae = save_sl(StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, reshape_activations="hook_z",
                                                metadata=meta("blocks.2.attn.hook_z"))), tmp_path / "z", 5)
    out = tmp_path / "v.pt"
    code, _, err = cli(capsys, "--sae-source", tmp_path, "--features", "2:5", "--hook-point", "blocks.2.attn.hook_z",
                       "--model", path, "--output", out)
    assert code == 0, err
    vec = steering.load_vectors(out).get("L2F5")
    with torch.no_grad():
        written = model.model.layers[2].self_attn.o_proj(sae.W_dec[5])  # W_O z: what the feature adds to the stream
    assert vec.layer == 2
    torch.testing.assert_close(vec.vector, unit_of(written), rtol=0, atol=1e-6)
    code, _, err = cli(capsys, "--sae-source", tmp_path, "--features", "2:5", "--hook-point", "blocks.2.attn.hook_z",
                       "--skip-norms", "--model", MODEL, "--output", tmp_path / "none.pt")
    assert code == 2 and "o_proj" in err and not (tmp_path / "none.pt").exists()


def test_find_on_hook_z_encodes_the_heads_before_o_proj(tmp_path, tiny):
    model, tok, _ = tiny
    sae = save_sl(StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, reshape_activations="hook_z",
                                                metadata=meta("blocks.2.attn.hook_z"))), tmp_path / "z", 8)
    z = {}
    attn = model.model.layers[2].self_attn
    h = attn.o_proj.register_forward_pre_hook(lambda m, a: z.update(x=a[0][0, 1:]))
    try:
        streams(model, tok, 2)
    finally:
        h.remove()
    with torch.no_grad():  # the z taken is what o_proj turns into the layer's attention output
        torch.testing.assert_close(attn.o_proj(z["x"]), streams(model, tok, 2)["attn_out"], rtol=1e-4, atol=1e-5)
        acts = sae.encode(z["x"].reshape(-1, 4, D // 4))  # sae_lens's hook_z input: [tokens, heads, d_head]
    same(sae_find.find_features(str(tmp_path), 2, TEXT, model, tok, k=6, hook_point="blocks.2.attn.hook_z"), acts)


def unit_of(v: torch.Tensor) -> torch.Tensor:
    return v.float() / v.float().norm()


# 4. a transcoder steers at its output hook's layer and encodes its input hook

def test_a_transcoder_is_at_its_output_hooks_layer(tmp_path, tiny, capsys):
    model, tok, _ = tiny
    tc = save_sl(Transcoder(TranscoderConfig(d_in=D, d_sae=N, d_out=D, apply_b_dec_to_input=False,
                                             metadata=meta("blocks.3.hook_resid_pre", hook_name_out="blocks.3.hook_mlp_out"))),
                 tmp_path / "tc", 6)
    code, _, err = cli(capsys, "--sae-source", tmp_path, "--features", "2:5", "--skip-norms", "--model", MODEL,
                       "--output", tmp_path / "none.pt")
    assert code == 2 and "layer 2 has no saelens SAE" in err
    out = tmp_path / "v.pt"
    code, _, err = cli(capsys, "--sae-source", tmp_path, "--features", "3:5", "--hook-point", "blocks.3.hook_mlp_out",
                       "--skip-norms", "--model", MODEL, "--output", out)
    assert code == 0, err
    vec = steering.load_vectors(out).get("L3F5")
    assert vec.layer == 3 and vec.metadata["hook_out"] == "blocks.3.hook_mlp_out"
    check(vec.vector, tc.W_dec.detach()[5])
    with torch.no_grad():
        acts = SAE.load_from_disk(tmp_path / "tc").encode(streams(model, tok, 3)["resid_pre"])
    same(sae_find.find_features(str(tmp_path), 3, TEXT, model, tok, k=6, hook_point="blocks.3.hook_mlp_out"), acts)
    # beside an SAE that reads blocks.3.hook_mlp_out, that hook point names the SAE; the transcoder is named by its input
    sae = save_sl(StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, metadata=meta("blocks.3.hook_mlp_out"))), tmp_path / "z-sae", 7)
    (f,) = saes.read_features(str(tmp_path), [(3, 5)], hook_point="blocks.3.hook_mlp_out")
    check(f.direction, sae.W_dec.detach()[5])
    (f,) = saes.read_features(str(tmp_path), [(3, 5)], hook_point="blocks.3.hook_resid_pre")
    check(f.direction, tc.W_dec.detach()[5])


# 5. dictionary_learning AutoEncoderTopK without config.json

def test_topk_and_batchtopk_without_config_json_are_not_guessed(tmp_path, tiny):
    model, tok, _ = tiny
    write_dictionary_learning(tmp_path, 2, "AutoEncoderTopK", seed=2)
    (tmp_path / "resid_post_layer_2" / "trainer_1" / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json saying its class") as info:
        sae_find.find_features(str(tmp_path), 2, TEXT, model, tok)
    assert "\n" not in str(info.value)
    assert saes.read_features(str(tmp_path), [(2, 5)])[0].layer == 2  # its decoder rows are still read


# 6. malformed files the libraries refuse

def jumprelu_with_threshold(folder, threshold):
    save_sl(JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=N, metadata=meta("blocks.3.hook_resid_post"))), folder)
    edit_weights(folder, threshold=threshold)


def topk_with_k(folder, k):
    save_sl(TopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=k, metadata=meta("blocks.3.hook_resid_post"))), folder)


def damaged(folder, name, fill):
    save_sl(StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, metadata=meta("blocks.3.hook_resid_post"))), folder)
    t = safetensors.torch.load_file(str(folder / "sae_weights.safetensors"))[name]
    if name == "W_enc":
        t[:, 7] = fill
    else:
        t[11] = fill
    edit_weights(folder, **{name: t})


MALFORMED = {
    "threshold of 300 for 256": (lambda f: jumprelu_with_threshold(f, rand(300).abs()), r"threshold .* shape \[300\]"),
    "threshold of shape [1]": (lambda f: jumprelu_with_threshold(f, rand(1).abs()), r"threshold .* shape \[1\]"),
    "k = 0": (lambda f: topk_with_k(f, 0), r"k = 0, but a TopK SAE needs 1 <= k <= d_sae \(64\)"),
    "k above d_sae": (lambda f: topk_with_k(f, N + 1), r"k = 65, but"),
    "NaN encoder column": (lambda f: damaged(f, "W_enc", float("nan")), r"W_enc holds NaN or infinite values \(feature 7\)"),
    "infinite b_enc": (lambda f: damaged(f, "b_enc", float("inf")), r"b_enc holds NaN or infinite values"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_encoders_are_refused(tmp_path, tiny, capsys, case):
    model, tok, path = tiny
    make, pattern = MALFORMED[case]
    make(tmp_path / "s")
    with pytest.raises(ValueError, match=pattern) as info:
        sae_find.find_features(str(tmp_path), 3, TEXT, model, tok)
    assert "\n" not in str(info.value)
    code, _, err = cli(capsys, "--sae-source", tmp_path, "--find", TEXT, "--layers", 3, "--model", path)
    assert code == 2 and err.startswith("error: ")


# Also: normalisations, the model an SAE names, the pickle refusal

@pytest.mark.parametrize("norm", ["expected_average_only_in", "covariance_whitening", "constant_norm_rescale", "layer_norm"])
def test_normalisations_are_what_sae_encode_does(tmp_path, tiny, norm):
    model, tok, _ = tiny
    save_sl(StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, normalize_activations=norm, metadata=meta("blocks.3.hook_resid_post"))),
            tmp_path / "s", 7)
    with torch.no_grad():
        acts = SAE.load_from_disk(tmp_path / "s").encode(streams(model, tok, 3)["resid_post"])
    same(sae_find.find_features(str(tmp_path), 3, TEXT, model, tok, k=6), acts)


def test_an_sae_of_another_model_needs_allow_other_model(tmp_path, tiny, capsys):
    model, tok, path = tiny
    folder = tmp_path / "s"
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, metadata=SAEMetadata(hook_name="blocks.3.hook_resid_post",
                                                                               model_name="meta-llama/Llama-3.1-8B")))
    save_sl(sae, folder)
    out = tmp_path / "v.pt"
    for argv in (["--features", "3:5", "--skip-norms", "--model", MODEL, "--output", out],
                 ["--find", TEXT, "--layers", 3, "--model", path]):
        code, _, err = cli(capsys, "--sae-source", tmp_path, *argv)
        assert code == 2 and "trained on meta-llama/Llama-3.1-8B" in err and "--allow-other-model" in err
    assert not out.exists()
    code, _, err = cli(capsys, "--sae-source", tmp_path, "--features", "3:5", "--skip-norms", "--model", MODEL,
                       "--output", out, "--allow-other-model")
    assert code == 0, err
    check(steering.load_vectors(out).get("L3F5").vector, sae.W_dec.detach()[5])
    # the same name in another spelling (owner, case, a local folder of that name) is the same model
    code, _, err = cli(capsys, "--sae-source", tmp_path, "--features", "3:5", "--skip-norms", "--model",
                       "/models/llama-3.1-8b/", "--output", tmp_path / "w.pt")
    assert code == 0, err


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_the_pickle_refusal_says_what_was_refused_in_one_whole_line(tmp_path, capsys):
    folder = tmp_path / "resid_post_layer_3" / "trainer_1"
    folder.mkdir(parents=True)
    torch.save({"decoder.weight": torch.ones(4, 4), "x": Boom()}, folder / "ae.pt")
    code, _, err = cli(capsys, "--sae-source", tmp_path, "--features", "3:1", "--skip-norms", "--model", MODEL,
                       "--output", tmp_path / "v.pt")
    assert code == 2 and "torch.load(weights_only=True) refused it" in err
    assert "GLOBAL posix.system" in err and err.endswith("only state dicts of tensors are read") and "\x1b" not in err
