"""extract_steering_vectors.py: the command line (SAE features, norms, merging, errors, OS errors) and contrastive vectors.

The SAE readers themselves are tested in test_saes.py (files written as their libraries write them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llm_steering import extract as esv
from llm_steering import steering

import pytest
import torch
import yaml
from conftest import ROOT
from safetensors.torch import save_file

D, N = 32, 64  # d_model, d_sae of the little SAEs


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unitcol(w: torch.Tensor, i: int, rows: bool = False) -> torch.Tensor:
    v = (w[i] if rows else w[:, i]).float()
    return v / v.norm()


def write_andyrdt(root: Path, layers=(3, 7), d=D, n=N) -> dict[int, torch.Tensor]:
    """resid_post_layer_{L}/trainer_{0,1}/ae.pt (+ config.json); returns trainer 1's decoder.weight per layer."""
    dec = {}
    for L in layers:
        for trainer in (0, 1):
            folder = root / f"resid_post_layer_{L}" / f"trainer_{trainer}"
            folder.mkdir(parents=True)
            w = rand(d, n, seed=100 * L + trainer)
            torch.save({"encoder.weight": rand(n, d), "encoder.bias": torch.zeros(n), "decoder.weight": w,
                        "b_dec": torch.zeros(d), "k": torch.tensor(8), "threshold": torch.tensor(0.5)}, folder / "ae.pt")
            (folder / "config.json").write_text(json.dumps({"trainer": {"activation_dim": d, "dict_size": n, "layer": L}}))
            if trainer == 1:
                dec[L] = w
    return dec


def write_llamascope(root: Path, layers=(3, 7), dtype=torch.bfloat16) -> dict[int, torch.Tensor]:
    """{name}-L{L}R-8x/checkpoints/final.safetensors, plus an attention-output SAE (L{L}A) that must be skipped."""
    dec = {}
    for L in layers:
        for pos in ("A", "R"):
            folder = root / f"Llama3_1-8B-Base-L{L}{pos}-8x"
            (folder / "checkpoints").mkdir(parents=True)
            w = rand(D, N, seed=L * 10 + (pos == "R")).to(dtype)
            save_file({"encoder.weight": rand(N, D).to(dtype), "encoder.bias": torch.zeros(N, dtype=dtype),
                       "decoder.weight": w, "decoder.bias": torch.zeros(D, dtype=dtype)},
                      str(folder / "checkpoints" / "final.safetensors"))
            (folder / "hyperparams.json").write_text(json.dumps({"d_model": D, "d_sae": N, "hook_point_in": f"blocks.{L}.hook_resid_post"}))
            if pos == "R":
                dec[L] = w
    return dec


def write_saelens(root: Path, layers=(3, 7)) -> dict[int, torch.Tensor]:
    """blocks.{L}.hook_resid_post/{cfg.json, sae_weights.safetensors} with W_dec [d_sae, d_in]."""
    dec = {}
    for L in layers:
        folder = root / f"blocks.{L}.hook_resid_post"
        folder.mkdir(parents=True)
        w = rand(N, D, seed=L)
        save_file({"W_enc": rand(D, N), "W_dec": w, "b_enc": torch.zeros(N), "b_dec": torch.zeros(D)},
                  str(folder / "sae_weights.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": N, "hook_name": f"blocks.{L}.hook_resid_post"}))
        dec[L] = w
    return dec


# ---------------------------------------------------------------------------
# The command line: norms, merging, errors (exit code 2, no partial output)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 8-layer hidden-32 Llama saved with the embedded model's tokenizer, loadable by load_model(dir)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_model")
    tok = AutoTokenizer.from_pretrained(steering.embedded_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=D, intermediate_size=64, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = esv.main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err.splitlines()[-1] if err else ""  # transformers' "Loading weights" bar comes first


def test_cli_sae_writes_vectors_with_norms_then_merges(tmp_path, tiny_model_dir, capsys):
    sae = tmp_path / "sae"
    dec = write_andyrdt(sae)
    out = tmp_path / "out" / "vectors.pt"
    code, err = run_cli(capsys, "--sae-source", str(sae), "--features", "3:5", "7:6", "--model", tiny_model_dir, "--output", str(out))
    assert code == 0, err
    vs = steering.load_vectors(out)
    assert vs.model_id == tiny_model_dir and vs.hidden_size == D and sorted(vs.layer_norms) == [3, 7]
    model, tok = steering.load_model(tiny_model_dir)
    assert vs.layer_norms == pytest.approx(steering.measure_layer_norms(model, tok, [3, 7]))
    first = out.read_bytes()

    # a failing run (index out of range) leaves the file exactly as it was, and says why in one line
    code, err = run_cli(capsys, "--sae-source", str(sae), "--features", "3:99", "--model", tiny_model_dir, "--output", str(out))
    assert code == 2 and err.startswith("error: ") and "out of range" in err and "\n" not in err
    assert out.read_bytes() == first

    # adding a feature keeps the old ones
    code, _ = run_cli(capsys, "--sae-source", str(sae), "--features", "3:9", "--model", tiny_model_dir, "--output", str(out))
    assert code == 0
    merged = steering.load_vectors(out)
    assert [v.name for v in merged.vectors] == ["L3F5", "L7F6", "L3F9"]
    torch.testing.assert_close(merged.get("3:9").vector, unitcol(dec[3], 9), rtol=0, atol=1e-6)
    assert sorted(os.listdir(out.parent)) == ["vectors.pt"]  # no temp files


def test_cli_errors_exit_2_without_output(tmp_path, tiny_model_dir, capsys):
    sae = tmp_path / "sae"
    write_andyrdt(sae, d=48)
    out = tmp_path / "v.pt"
    cases = [
        (["--sae-source", str(sae), "--features", "3:1", "--model", tiny_model_dir], "hidden size is 32"),
        (["--sae-source", str(sae), "--features", "3:1", "--sae-format", "llamascope", "--skip-norms", "--model", "o/m"],
         "no llamascope SAE"),
        (["--sae-source", str(tmp_path / "nowhere" / "x"), "--features", "3:1", "--skip-norms", "--model", "o/m"],
         "neither a local directory"),
        (["--sae-source", str(sae), "--skip-norms"], "needs --features"),
        (["--sae-source", str(sae), "--features", "3:1", "--skip-norms"], "--skip-norms needs --model"),
    ]
    for argv, pattern in cases:
        code, err = run_cli(capsys, *argv, "--output", str(out))
        assert code == 2 and pattern in err and "\n" not in err, (argv, err)
        assert not out.exists()
    # a vector file for another model is not merged into
    other = tmp_path / "other.pt"
    steering.SteeringVectorSet("some/other", 48, [steering.SteeringVector("a", 1, torch.ones(48))], {1: 1.0}).save(other)
    before = other.read_bytes()
    sae32 = tmp_path / "sae32"
    write_andyrdt(sae32)
    code, err = run_cli(capsys, "--sae-source", str(sae32), "--features", "3:1", "--model", tiny_model_dir, "--output", str(other))
    assert code == 2 and "cannot merge" in err and other.read_bytes() == before
    # an unreadable existing output is not overwritten
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    code, err = run_cli(capsys, "--sae-source", str(sae32), "--features", "3:1", "--skip-norms", "--model", "o/m",
                        "--output", str(junk))
    assert code == 2 and "not a readable" in err and junk.read_bytes() == b"junk"


def test_cli_exit_code_in_a_real_process(tmp_path):
    out = tmp_path / "v.pt"
    proc = subprocess.run([sys.executable, str(ROOT / "extract_steering_vectors.py"), "--sae-source", str(tmp_path),
                           "--features", "3:1", "--skip-norms", "--model", "o/m", "--output", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().count("\n") == 0 and "cannot tell the SAE format" in proc.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "extract_steering_vectors.py"), "--sae-source", "x", "--features", "15",
                          "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "layer:index" in bad.stderr


# ---------------------------------------------------------------------------
# Contrastive vectors
# ---------------------------------------------------------------------------


CONCEPTS = {
    "concepts": {
        "eiffel_tower": {"description": "Paris", "layer": 2,
                         "positive": ["The Eiffel Tower stands in Paris.", "We climbed the Eiffel Tower at night, high above the city."],
                         "negative": ["The meeting starts at ten.", "I bought some milk and bread yesterday evening."]},
        "pirate": {"positive": ["Arr, the pirate ship sails!", "Pirates bury treasure."],
                   "negative": ["The printer needs paper.", "The bus was late."]},
    }
}


def single_text_mean(model, tok, text, layer):
    got = {}
    _, layers = steering.decoder_layers(model)
    h = layers[layer].register_forward_hook(lambda m, a, o: got.update(h=steering.layer_hidden(o)[0, 1:].mean(0)))
    try:
        with torch.inference_mode():
            model(input_ids=tok(text, return_tensors="pt")["input_ids"])
    finally:
        h.remove()
    return got["h"]


def test_contrastive_is_the_unit_diff_of_means(tmp_path, tiny_model_dir):
    model, tok = steering.load_model(tiny_model_dir)
    vecs = esv.extract_contrastive(model, tok, CONCEPTS["concepts"], [2, 5])
    assert [(v.name, v.layer, v.concept) for v in vecs] == [
        ("eiffel_tower_L2", 2, "eiffel_tower"), ("eiffel_tower_L5", 5, "eiffel_tower"), ("pirate_L2", 2, "pirate"), ("pirate_L5", 5, "pirate")]
    c = CONCEPTS["concepts"]["eiffel_tower"]
    pos = torch.stack([single_text_mean(model, tok, t, 5) for t in c["positive"]]).mean(0)
    neg = torch.stack([single_text_mean(model, tok, t, 5) for t in c["negative"]]).mean(0)
    want = (pos - neg) / (pos - neg).norm()
    torch.testing.assert_close(vecs[1].vector, want, rtol=0, atol=1e-5)  # batching with padding changes nothing
    pca = esv.extract_contrastive(model, tok, CONCEPTS["concepts"], [5], method="pca")
    assert pca[0].name == "eiffel_tower" and float(pca[0].vector @ want) > 0 and abs(float(pca[0].vector.norm()) - 1) < 1e-5


def test_cli_contrastive_uses_concept_layers_and_merges(tmp_path, tiny_model_dir, capsys):
    concepts = tmp_path / "c.yaml"
    concepts.write_text(yaml.safe_dump({"concepts": {"eiffel_tower": CONCEPTS["concepts"]["eiffel_tower"]}}))
    out = tmp_path / "v.pt"
    code, err = run_cli(capsys, "--contrastive", str(concepts), "--model", tiny_model_dir, "--output", str(out))
    assert code == 0, err
    vs = steering.load_vectors(out)
    assert [(v.name, v.layer, v.source) for v in vs.vectors] == [("eiffel_tower", 2, str(concepts))] and list(vs.layer_norms) == [2]
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump(CONCEPTS))
    code, err = run_cli(capsys, "--contrastive", str(both), "--layers", "4", "--model", tiny_model_dir, "--output", str(out))
    assert code == 0, err
    vs = steering.load_vectors(out)
    assert [(v.name, v.layer) for v in vs.vectors] == [("eiffel_tower", 4), ("pirate", 4)] and list(vs.layer_norms) == [2, 4]


@pytest.mark.parametrize(
    "concepts, pattern",
    [
        ({"concepts": {"pirate": {"positive": [], "negative": ["a b"]}}}, "'pirate' is empty"),
        ({"concepts": {"pirate": {"positive": ["a b"]}}}, "'negative' must be a non-empty list"),
        ({"concepts": {"Pirate Talk": {"positive": ["a b"], "negative": ["c d"]}}}, "snake_case"),
        ({"concepts": {"pirate": {"positive": ["a b"], "negative": ["c d"]}}}, "has no layer"),
        ({"concepts": {"pirate": {"positive": ["a b"], "negative": ["c d"], "layer": 99}}}, "layer 99 is out of range"),
        ({"things": {}}, "top-level 'concepts:'"),
    ],
)
def test_cli_contrastive_errors(tmp_path, tiny_model_dir, capsys, concepts, pattern):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(concepts))
    out = tmp_path / "v.pt"
    code, err = run_cli(capsys, "--contrastive", str(path), "--model", tiny_model_dir, "--output", str(out))
    assert code == 2 and pattern in err and "\n" not in err, err
    assert not out.exists()


def test_shipped_concepts_yaml_is_valid():
    concepts = esv.load_concepts(ROOT / "concepts.yaml")
    assert {"eiffel_tower", "pirate", "shakespeare"} <= set(concepts) and len(concepts) >= 8
    assert all(len(c["positive"]) >= 10 for c in concepts.values())


def test_negatives_others_is_one_vs_rest():
    concepts = {k: dict(v) for k, v in CONCEPTS["concepts"].items()}
    others = esv.with_negatives(concepts, "others")
    assert others["pirate"]["negative"] == concepts["eiffel_tower"]["positive"]
    both = esv.with_negatives(concepts, "both")
    assert both["eiffel_tower"]["negative"] == concepts["eiffel_tower"]["negative"] + concepts["pirate"]["positive"]
    assert esv.with_negatives(concepts, "given") is concepts
    with pytest.raises(ValueError, match="at least two concepts"):
        esv.with_negatives({"pirate": concepts["pirate"]}, "others")


def test_cli_skip_norms_records_the_given_model(tmp_path, capsys):
    sae = tmp_path / "sae"
    dec = write_saelens(sae)
    out = tmp_path / "v.pt"
    code, err = run_cli(capsys, "--sae-source", str(sae), "--features", "7:3", "--skip-norms", "--model", "org/model",
                        "--output", str(out))
    assert code == 0, err
    vs = steering.load_vectors(out)
    assert vs.model_id == "org/model" and vs.layer_norms == {} and vs.get("L7F3").index == 3
    torch.testing.assert_close(vs.get("7:3").vector, unitcol(dec[7], 3, rows=True), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no residual norm for layer 7"):
        vs.component("L7F3", 0.5)


# ---------------------------------------------------------------------------
# OS errors: one line, exit code 2, nothing written
# ---------------------------------------------------------------------------


def test_cli_os_errors_are_one_line_exit_2(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import errno

    sae = tmp_path / "sae"
    write_saelens(sae)
    out = tmp_path / "v.pt"
    # an unreadable input: the concept file is a directory (IsADirectoryError, an OSError)
    (tmp_path / "concepts_dir.yaml").mkdir()
    code, err = run_cli(capsys, "--contrastive", str(tmp_path / "concepts_dir.yaml"), "--model", tiny_model_dir, "--output", str(out))
    assert code == 2 and err.startswith("error: ") and "\n" not in err and not out.exists(), err
    # an SAE file that cannot be opened
    real_open = os.open

    def deny(path, *a, **k):
        if str(path).endswith("sae_weights.safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", deny)
    code, err = run_cli(capsys, "--sae-source", str(sae), "--features", "3:1", "--skip-norms", "--model", "o/m", "--output", str(out))
    assert code == 2 and "Permission denied" in err and not out.exists(), err
    monkeypatch.setattr(os, "open", real_open)
    # a full disk while writing: the old file stays as it was, no temp file is left
    code, _ = run_cli(capsys, "--sae-source", str(sae), "--features", "3:1", "--skip-norms", "--model", "o/m", "--output", str(out))
    assert code == 0
    before = out.read_bytes()

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    code, err = run_cli(capsys, "--sae-source", str(sae), "--features", "3:2", "--skip-norms", "--model", "o/m", "--output", str(out))
    assert code == 2 and err == "error: [Errno 28] No space left on device", err
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["concepts_dir.yaml", "sae", "v.pt"]
