"""saes.py: SAE files written as their libraries write them, read back to the exact unit decoder direction.

SAELens folders are written by sae_lens itself (`SAE.save_model` / `save_inference_model`,
requirements-dev.txt). The other libraries are not installed: their save code is mirrored
here line for line (module attribute names, `state_dict()` keys and shapes, file names), and
each writer says which public code it mirrors.
"""

from __future__ import annotations

import json
from pathlib import Path

from llm_steering import extract as esv
from llm_steering import saes, steering

import pytest
import safetensors.torch
import torch
from sae_lens import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata
from torch import nn

D, N = 32, 64  # d_model, d_sae of the little SAEs


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unit(v: torch.Tensor) -> torch.Tensor:
    return v.float() / v.float().norm()


def check(vec: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(vec, unit(want), rtol=0, atol=1e-7)


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random values in every parameter (library inits tie or normalise them, which would hide mix-ups)."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(module.named_parameters())):
            p.copy_(rand(*p.shape, seed=seed * 100 + i))
    return module


# ---------------------------------------------------------------------------
# SAELens: the real library
# ---------------------------------------------------------------------------

SAELENS_KINDS = {
    "standard": lambda m: StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, metadata=m)),
    "topk": lambda m: TopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=8, metadata=m)),
    "batchtopk": lambda m: BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=8, metadata=m)),
    "jumprelu": lambda m: JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=N, metadata=m)),
}


def write_saelens(folder: Path, hook: str, kind: str = "standard", seed: int = 0) -> torch.Tensor:
    """An SAE saved by sae_lens 6 (batchtopk: its inference form, a JumpReLU SAE); returns W_dec [d_sae, d_in]."""
    sae = randomize(SAELENS_KINDS[kind](SAEMetadata(hook_name=hook, model_name="tiny")), seed)
    if kind == "jumprelu":
        with torch.no_grad():
            sae.threshold.copy_(rand(N, seed=seed).abs() * 0.3)
    if kind == "batchtopk":
        sae.topk_threshold.fill_(0.4)
        sae.save_inference_model(folder)
    else:
        sae.save_model(folder)
    return sae.W_dec.detach().clone()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = esv.main(list(argv))
    cap = capsys.readouterr()
    err = cap.err.strip()
    return code, cap.out, err.splitlines()[-1] if err else ""


@pytest.mark.parametrize("kind", list(SAELENS_KINDS))
def test_saelens_6_folders_of_each_class_extract_exact_rows_through_the_cli(tmp_path, capsys, kind):
    w = write_saelens(tmp_path / "sae" / "my-release-id", "blocks.5.hook_resid_post", kind)
    assert "hook_name" not in json.loads((tmp_path / "sae" / "my-release-id" / "cfg.json").read_text())  # under metadata
    out = tmp_path / "v.pt"
    code, _, err = run_cli(capsys, "--sae-source", str(tmp_path / "sae"), "--features", "5:3", "5:63",
                           "--skip-norms", "--model", "tiny", "--output", str(out))
    assert code == 0, err
    vs = steering.load_vectors(out)
    check(vs.get("5:3").vector, w[3])
    check(vs.get("5:63").vector, w[63])
    assert vs.get("5:3").metadata == {"source": str(tmp_path / "sae"), "file": "my-release-id/sae_weights.safetensors",
                                      "format": "saelens", "hook_point": "blocks.5.hook_resid_post", "layer": 5, "index": 3}


def every_saelens_architecture():
    from sae_lens.registry import SAE_CLASS_REGISTRY

    return sorted(SAE_CLASS_REGISTRY)


@pytest.mark.parametrize("arch", every_saelens_architecture())
def test_every_saelens_architecture_extracts_its_row_at_its_output_layer(tmp_path, arch):
    """Each class sae_lens registers, saved by itself (bfloat16 too): transcoders at their output hook's layer."""
    import dataclasses

    from sae_lens.registry import SAE_CLASS_REGISTRY

    cls, cfg_cls = SAE_CLASS_REGISTRY[arch]
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    kw = {"k": 8, "matryoshka_widths": [16, N], "n_heads": 4, "bottleneck_factor": 1}
    kw = {key: value for key, value in kw.items() if key in fields}
    hook = SAEMetadata(hook_name="blocks.3.hook_resid_post", model_name="tiny")
    if "d_out" in fields:
        kw.update(d_out=D, apply_b_dec_to_input=False)
        hook = SAEMetadata(hook_name="blocks.3.hook_resid_pre", hook_name_out="blocks.3.hook_mlp_out", model_name="tiny")
    sae = randomize(cls(cfg_cls(d_in=D, d_sae=N, dtype="bfloat16" if arch == "standard" else "float32", metadata=hook, **kw)), 1)
    sae.save_model(tmp_path / "s")
    (f,) = saes.read_features(str(tmp_path), [(3, 9)], hook_point="blocks.3.hook_mlp_out" if "d_out" in fields else None)
    check(f.direction, sae.W_dec.detach()[9])
    assert f.layer == 3 and f.sae.architecture == arch


def test_saelens_5x_and_older_cfgs(tmp_path):
    """5.x wrote hook_name and hook_layer at the top level, older versions hook_point (no metadata)."""
    for version, fields in (("5.x", {"hook_name": "blocks.4.hook_resid_post", "hook_layer": 4}),
                            ("old", {"hook_point": "blocks.4.hook_resid_post", "hook_point_layer": 4})):
        folder = tmp_path / version
        w = write_saelens(folder, "blocks.4.hook_resid_post")
        cfg = json.loads((folder / "cfg.json").read_text())
        del cfg["metadata"]
        (folder / "cfg.json").write_text(json.dumps({**cfg, **fields}))
        (f,) = saes.read_features(str(folder), [(4, 10)])
        check(f.direction, w[10])
        assert f.sae.hook_point == "blocks.4.hook_resid_post"


def test_folder_mixing_hook_points_picks_the_residual_sae(tmp_path, capsys):
    root = tmp_path / "release"
    w = {hook: write_saelens(root / hook, f"blocks.5.{hook}", seed=i)
         for i, hook in enumerate(("hook_attn_out", "hook_mlp_out", "hook_resid_post"))}
    out = tmp_path / "v.pt"
    code, _, err = run_cli(capsys, "--sae-source", str(root), "--features", "5:7", "--skip-norms", "--model", "tiny",
                           "--output", str(out))
    assert code == 0, err
    check(steering.load_vectors(out).get("L5F7").vector, w["hook_resid_post"][7])

    # without a residual SAE the others are refused, by name, unless --hook-point asks for one
    (root / "hook_resid_post" / "cfg.json").unlink()
    code, _, err = run_cli(capsys, "--sae-source", str(root), "--features", "5:7", "--skip-norms", "--model", "tiny",
                           "--output", str(tmp_path / "none.pt"))
    assert code == 2 and not (tmp_path / "none.pt").exists()
    assert "no residual-stream saelens SAE" in err and "blocks.5.hook_attn_out, blocks.5.hook_mlp_out" in err and "--hook-point" in err
    (f,) = saes.read_features(str(root), [(5, 7)], hook_point="blocks.5.hook_mlp_out")
    check(f.direction, w["hook_mlp_out"][7])
    assert f.sae.hook_point == "blocks.5.hook_mlp_out" and not f.sae.residual
    with pytest.raises(ValueError, match="hook point blocks.5.hook_mlp_out is at layer 5, not 4"):
        saes.read_features(str(root), [(4, 7)], hook_point="blocks.5.hook_mlp_out")


def test_hook_resid_pre_is_the_layer_before(tmp_path, capsys):
    root = tmp_path / "release"
    w = write_saelens(root / "blocks.6.hook_resid_pre", "blocks.6.hook_resid_pre")
    write_saelens(root / "blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre")  # the embeddings: no layer
    out = tmp_path / "v.pt"
    code, _, err = run_cli(capsys, "--sae-source", str(root), "--features", "5:9", "--skip-norms", "--model", "tiny",
                           "--output", str(out))
    assert code == 0, err
    vec = steering.load_vectors(out).get("L5F9")
    assert vec.layer == 5 and vec.metadata["hook_point"] == "blocks.6.hook_resid_pre"
    check(vec.vector, w[9])
    with pytest.raises(ValueError, match=r"layer 6 has no saelens SAE .*\(layers available: 5\)"):
        saes.read_features(str(root), [(6, 9)])


def test_hook_layer_names():
    assert saes.hook_layer("blocks.15.hook_resid_post") == (15, True)
    assert saes.hook_layer("blocks.15.hook_resid_pre") == (14, True)
    assert saes.hook_layer("blocks.0.hook_resid_pre") == (None, True)
    assert saes.hook_layer("blocks.15.hook_mlp_out") == (15, False)
    assert saes.hook_layer("layers.15") == (15, True) and saes.hook_layer("layers.15.mlp") == (15, False)
    assert saes.hook_layer("resid_post_layer_15") == (15, True) and saes.hook_layer("mlp_out_layer_15") == (15, False)
    assert saes.hook_layer("embed_tokens") == (None, False)


# ---------------------------------------------------------------------------
# dictionary_learning (andyrdt's SAEs): mirrors saprmarks/dictionary_learning @ 60ec6bf
# ---------------------------------------------------------------------------


class BatchTopKSAE(nn.Module):
    """dictionary_learning/trainers/batch_top_k.py: BatchTopKSAE.__init__ (the andyrdt SAEs' class)."""

    def __init__(self, activation_dim: int, dict_size: int, k: int):
        super().__init__()
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        self.encoder = nn.Linear(activation_dim, dict_size)
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))


class AutoEncoderTopK(BatchTopKSAE):
    """dictionary_learning/trainers/top_k.py: AutoEncoderTopK.__init__ registers the same tensors."""


class MatryoshkaBatchTopKSAE(nn.Module):
    """dictionary_learning/trainers/matryoshka_batch_top_k.py: W_enc [d, n], W_dec [n, d] as nn.Parameter."""

    def __init__(self, activation_dim: int, dict_size: int, k: int, group_sizes: list[int]):
        super().__init__()
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))
        self.register_buffer("group_sizes", torch.tensor(group_sizes))
        self.W_enc = nn.Parameter(torch.empty(activation_dim, dict_size))
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.W_dec = nn.Parameter(torch.empty(dict_size, activation_dim))
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))


class JumpReluAutoEncoder(nn.Module):
    """dictionary_learning/dictionary.py: JumpReluAutoEncoder (apply_b_dec_to_input = False, not saved)."""

    def __init__(self, activation_dim: int, dict_size: int):
        super().__init__()
        self.W_enc = nn.Parameter(torch.empty(activation_dim, dict_size))
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.W_dec = nn.Parameter(torch.empty(dict_size, activation_dim))
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        self.threshold = nn.Parameter(torch.ones(dict_size) * 0.001)


class AutoEncoder(nn.Module):
    """dictionary_learning/dictionary.py: AutoEncoder (the standard ReLU SAE; input bias `bias`)."""

    def __init__(self, activation_dim: int, dict_size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(activation_dim))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)


DL_CLASSES = {
    "BatchTopKSAE": lambda: BatchTopKSAE(D, N, 8),
    "AutoEncoderTopK": lambda: AutoEncoderTopK(D, N, 8),
    "MatryoshkaBatchTopKSAE": lambda: MatryoshkaBatchTopKSAE(D, N, 8, [16, 48]),
    "JumpReluAutoEncoder": lambda: JumpReluAutoEncoder(D, N),
    "AutoEncoder": lambda: AutoEncoder(D, N),
}


def write_dictionary_learning(root: Path, layer: int, dict_class: str, trainer: int = 1, seed: int = 0) -> nn.Module:
    """dictionary_learning/training.py trainSAE: save_dir/trainer_{i}/config.json ({"trainer": trainer.config}),
    then at the end t.save({k: v.cpu() for k, v in ae.state_dict().items()}, save_dir/trainer_{i}/ae.pt)."""
    ae = randomize(DL_CLASSES[dict_class](), seed)
    if hasattr(ae, "threshold") and ae.threshold.dim() == 0:
        ae.threshold.fill_(0.3)  # set by BatchTopK training
    folder = root / f"resid_post_layer_{layer}" / f"trainer_{trainer}"
    folder.mkdir(parents=True)
    config = {"trainer": {"dict_class": dict_class, "activation_dim": D, "dict_size": N, "layer": layer,
                          "lm_name": "tiny", "submodule_name": f"resid_post_layer_{layer}"}}
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, folder / "ae.pt")
    return ae


def dl_decoder(ae: nn.Module) -> torch.Tensor:
    """[d_sae, d_model]: decoder.weight is [d_model, d_sae] (nn.Linear), W_dec already [d_sae, d_model]."""
    return ae.W_dec.detach() if hasattr(ae, "W_dec") else ae.decoder.weight.detach().T


@pytest.mark.parametrize("dict_class", list(DL_CLASSES))
def test_dictionary_learning_classes(tmp_path, dict_class):
    aes = {layer: write_dictionary_learning(tmp_path, layer, dict_class, seed=layer) for layer in (3, 7)}
    feats = saes.read_features(str(tmp_path), [(7, 5), (3, 63), (7, 0)])
    assert [f.name for f in feats] == ["L7F5", "L3F63", "L7F0"]
    for f in feats:
        check(f.direction, dl_decoder(aes[f.layer])[f.index])
        assert f.sae.format == "andyrdt" and f.sae.file == f"resid_post_layer_{f.layer}/trainer_1/ae.pt"


def test_dictionary_learning_trainer_choice(tmp_path, capsys):
    ae0 = write_dictionary_learning(tmp_path, 3, "BatchTopKSAE", trainer=0, seed=1)
    ae1 = write_dictionary_learning(tmp_path, 3, "BatchTopKSAE", trainer=1, seed=2)
    check(saes.read_features(str(tmp_path), [(3, 4)])[0].direction, dl_decoder(ae1)[4])  # trainer 1 by default
    check(saes.read_features(str(tmp_path), [(3, 4)], trainer=0)[0].direction, dl_decoder(ae0)[4])
    with pytest.raises(ValueError, match="layer 3 has no andyrdt SAE for trainer 5"):
        saes.read_features(str(tmp_path), [(3, 4)], trainer=5)
    out = tmp_path / "v.pt"
    code, _, err = run_cli(capsys, "--sae-source", str(tmp_path), "--features", "3:4", "--trainer", "0",
                           "--skip-norms", "--model", "tiny", "--output", str(out))
    assert code == 0, err
    assert steering.load_vectors(out).get("L3F4").metadata["file"] == "resid_post_layer_3/trainer_0/ae.pt"


def test_a_decoder_saved_as_a_transposed_view_reads_by_its_strides(tmp_path):
    """torch.save keeps a view's storage and strides: decoder.weight [d_model, d_sae] stored column-major."""
    folder = tmp_path / "resid_post_layer_2" / "trainer_1"
    folder.mkdir(parents=True)
    dec_t = rand(N, D, seed=5)  # [d_sae, d_model] contiguous
    torch.save({"decoder.weight": dec_t.T, "encoder.weight": rand(N, D)}, folder / "ae.pt")
    (f,) = saes.read_features(str(tmp_path), [(2, 17)])
    check(f.direction, dec_t[17])


# ---------------------------------------------------------------------------
# Llama Scope: mirrors the released folders (fnlp/Llama3_1-8B-Base-LXR-8x and sae_lens's llama_scope loader)
# ---------------------------------------------------------------------------


def write_llamascope(root: Path, layer: int, pos: str, seed: int = 0, dtype=torch.bfloat16) -> torch.Tensor:
    """{name}-L{L}{pos}-8x/hyperparams.json + checkpoints/final.safetensors (encoder.weight [d_sae, d_model],
    encoder.bias, decoder.weight [d_model, d_sae], decoder.bias); returns decoder.weight."""
    folder = root / f"Llama3_1-8B-Base-L{layer}{pos}-8x"
    (folder / "checkpoints").mkdir(parents=True)
    dec = rand(D, N, seed=seed).to(dtype)
    safetensors.torch.save_file({"encoder.weight": rand(N, D, seed=seed + 1).to(dtype), "encoder.bias": rand(N, seed=seed + 2).to(dtype),
                                 "decoder.weight": dec, "decoder.bias": rand(D, seed=seed + 3).to(dtype)},
                                str(folder / "checkpoints" / "final.safetensors"))
    hook = {"R": "hook_resid_post", "A": "hook_attn_out", "M": "hook_mlp_out", "TC": "ln2.hook_normalized"}[pos]
    (folder / "hyperparams.json").write_text(json.dumps({
        "d_model": D, "d_sae": N, "hook_point_in": f"blocks.{layer}.{hook}", "hook_point_out": f"blocks.{layer}.{hook}",
        "act_fn": "jumprelu", "jump_relu_threshold": 0.2, "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": 3.5, "out": 3.5}}))
    return dec


def test_llamascope_reads_the_r_position_only(tmp_path):
    dec = {pos: write_llamascope(tmp_path, 7, pos, seed=i) for i, pos in enumerate(("A", "M", "TC", "R"))}
    (f,) = saes.read_features(str(tmp_path), [(7, 12)])
    check(f.direction, dec["R"][:, 12])
    assert f.sae.hook_point == "blocks.7.hook_resid_post" and f.direction.dtype == torch.float32
    only_others = tmp_path / "others"
    for pos in ("A", "M"):
        write_llamascope(only_others, 4, pos)
    with pytest.raises(ValueError, match=r"no residual-stream llamascope SAE .*blocks.4.hook_attn_out, blocks.4.hook_mlp_out"):
        saes.read_features(str(only_others), [(4, 1)])


# ---------------------------------------------------------------------------
# EleutherAI sparsify: mirrors EleutherAI/sparsify @ 9d3b136 (sparse_coder.py SparseCoder.save_to_disk)
# ---------------------------------------------------------------------------


class SparseCoder(nn.Module):
    """SparseCoder.__init__: encoder = nn.Linear(d_in, num_latents), W_dec [num_latents, d_in], b_dec [d_in]."""

    def __init__(self, d_in: int, cfg: dict):
        super().__init__()
        self.cfg, self.d_in = cfg, d_in
        self.encoder = nn.Linear(d_in, cfg["num_latents"])
        self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def save_to_disk(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_model(self, str(path / "sae.safetensors"))
        with open(path / "cfg.json", "w") as f:
            json.dump({**self.cfg, "d_in": self.d_in}, f)


SPARSIFY_CFG = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": N, "k": 8,
                "multi_topk": False, "skip_connection": False, "transcode": False}


def write_sparsify(root: Path, hookpoint: str, seed: int = 0) -> SparseCoder:
    """Trainer._checkpoint: sae.save_to_disk(f"{path}/{name}") for each hookpoint name ("layers.3", ...)."""
    sae = randomize(SparseCoder(D, dict(SPARSIFY_CFG)), seed)
    sae.save_to_disk(root / hookpoint)
    return sae


def test_sparsify_layers_folders(tmp_path):
    saved = {hp: write_sparsify(tmp_path, hp, seed=i) for i, hp in enumerate(("embed_tokens", "layers.3", "layers.3.mlp", "layers.4"))}
    feats = saes.read_features(str(tmp_path), [(3, 2), (4, 60)])
    check(feats[0].direction, saved["layers.3"].W_dec.detach()[2])
    check(feats[1].direction, saved["layers.4"].W_dec.detach()[60])
    assert feats[0].sae.hook_point == "layers.3" and feats[0].sae.file == "layers.3/sae.safetensors"
    (mlp,) = saes.read_features(str(tmp_path), [(3, 2)], hook_point="layers.3.mlp")
    check(mlp.direction, saved["layers.3.mlp"].W_dec.detach()[2])


def test_the_registry_names_every_format_module_and_config_lists_the_same():
    """One module per format in llm_steering/saes/formats/, named after it; config.py (torch-free) lists the same names."""
    from llm_steering import config

    modules = sorted(p.stem for p in (Path(saes.__file__).parent / "formats").glob("[!_]*.py"))
    assert list(saes.SAE_FORMATS) == modules == list(config.SAE_FORMATS)
    assert {f.name for f in saes.FORMATS.values()} == set(modules)
    assert esv.build_parser()._option_string_actions["--sae-format"].choices == saes.SAE_FORMATS


def test_format_detection_across_layouts(tmp_path):
    write_dictionary_learning(tmp_path / "dl", 3, "BatchTopKSAE")
    write_llamascope(tmp_path / "ls", 3, "R")
    write_saelens(tmp_path / "sl" / "x", "blocks.3.hook_resid_post")
    write_sparsify(tmp_path / "sp", "layers.3")
    for sub, fmt in (("dl", "andyrdt"), ("ls", "llamascope"), ("sl", "saelens"), ("sp", "sparsify")):
        assert saes.detect_format(saes.SAESource.open(str(tmp_path / sub))) == fmt
    with pytest.raises(ValueError, match="several SAE layouts .* --sae-format"):
        saes.detect_format(saes.SAESource.open(str(tmp_path)))


# ---------------------------------------------------------------------------
# Bad input: one-line ValueError
# ---------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors(tmp_path):
    def fails(source, features, pattern, **kw):
        with pytest.raises(ValueError, match=pattern) as info:
            saes.read_features(str(source), features, **kw)
        assert "\n" not in str(info.value)

    bad_json = tmp_path / "bad_json" / "a"
    write_saelens(bad_json, "blocks.3.hook_resid_post")
    (bad_json / "cfg.json").write_text('{"d_in": 32,')
    fails(bad_json.parent, [(3, 1)], r"a/cfg.json is not valid JSON \(")

    no_hook = tmp_path / "no_hook" / "a"
    write_saelens(no_hook, "blocks.3.hook_resid_post")
    (no_hook / "cfg.json").write_text('{"d_in": 32, "d_sae": 64}')
    fails(no_hook.parent, [(3, 1)], "names no hook point")

    transposed = tmp_path / "transposed" / "a"
    transposed.mkdir(parents=True)
    safetensors.torch.save_file({"W_dec": rand(D, N), "W_enc": rand(D, N)}, str(transposed / "sae_weights.safetensors"))
    (transposed / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": N, "hook_name": "blocks.3.hook_resid_post"}))
    fails(transposed.parent, [(3, 1)], r"W_dec has shape \[32, 64\], but its config says d_sae, d_in = \[64, 32\]")

    three_d = tmp_path / "three_d" / "resid_post_layer_3" / "trainer_1"
    three_d.mkdir(parents=True)
    torch.save({"decoder.weight": torch.ones(2, 3, 4)}, three_d / "ae.pt")
    fails(three_d.parents[1], [(3, 1)], r"decoder.weight must be 2-D, got shape \[2, 3, 4\]")

    mismatch = tmp_path / "mismatch" / "resid_post_layer_3" / "trainer_1"
    mismatch.mkdir(parents=True)
    torch.save({"decoder.weight": rand(D, N), "encoder.weight": rand(D, N)}, mismatch / "ae.pt")
    fails(mismatch.parents[1], [(3, 1)], "does not match encoder.weight")

    write_dictionary_learning(tmp_path / "dl", 3, "BatchTopKSAE")
    fails(tmp_path / "dl", [(3, 64)], "index 64 is out of range: .* has 64 features")
    fails(tmp_path / "dl", [(5, 1)], r"layer 5 has no andyrdt SAE .*\(layers available: 3\)")
    fails(tmp_path / "dl", [(3, 1)], "layer 3 has no saelens SAE .*none found", sae_format="saelens")
    fails(tmp_path / "dl", [(3, 1)], "--trainer is for andyrdt", sae_format="saelens", trainer=0)
    fails(tmp_path / "dl", [], "no features given")
    fails(tmp_path / "nowhere" / "x", [(3, 1)], "neither a local directory")


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned_marker",))


def test_hostile_and_truncated_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil" / "resid_post_layer_3" / "trainer_1"
    evil.mkdir(parents=True)
    torch.save({"decoder.weight": torch.ones(4, 4), "x": Boom()}, evil / "ae.pt")
    with pytest.raises(ValueError, match="weights_only"):
        saes.read_features(str(tmp_path / "evil"), [(3, 1)])
    assert not (tmp_path / "pwned_marker").exists()

    cut = tmp_path / "cut" / "a"
    write_saelens(cut, "blocks.3.hook_resid_post")
    weights = cut / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable safetensors file .*incomplete metadata"):
        saes.read_features(str(cut.parent), [(3, 1)])


def test_neuronpedia_links():
    assert saes.neuronpedia_url(15, 21576) == "https://www.neuronpedia.org/llama3.1-8b-it/15-resid-post-aa/21576"
    assert saes.neuronpedia_url(19, 93) == "https://www.neuronpedia.org/llama3.1-8b-it/19-resid-post-aa/93"
    assert saes.neuronpedia_url(16, 1) is None  # andyrdt has SAEs at 3, 7, ..., 27 only
    assert saes.neuronpedia_url(15, 1, source="some/other-saes") is None
    assert saes.neuronpedia_url(19, 5, "Goodfire/Llama-3.1-8B-Instruct-SAE-l19").endswith("/19-resid-post-gf/5")


def test_hub_repo_downloads_only_the_needed_files(tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub (mocked: no network in tests): one SAE file per layer, and of a
    SAELens release only the cfg.json of folders that can hold the layer."""
    import huggingface_hub

    repo = tmp_path / "repo"
    aes = {layer: write_dictionary_learning(repo, layer, "BatchTopKSAE", seed=layer) for layer in (3, 7, 11)}
    for hook in ("blocks.2.hook_resid_post", "blocks.12.hook_resid_pre", "blocks.11.hook_mlp_out"):
        write_saelens(repo / "sl" / hook, hook)
    files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    downloads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **k: files)

    def fake_download(repo_id, filename, **k):
        downloads.append(filename)
        return str(repo / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    (f,) = saes.read_features("andyrdt/saes-llama-3.1-8b-instruct", [(11, 9)], sae_format="andyrdt")
    assert downloads == ["resid_post_layer_11/trainer_1/ae.pt"]
    check(f.direction, dl_decoder(aes[11])[9])
    assert f.sae.source == "andyrdt/saes-llama-3.1-8b-instruct"
    downloads.clear()
    (f,) = saes.read_features("someone/release", [(11, 2)], sae_format="saelens")
    assert f.sae.hook_point == "blocks.12.hook_resid_pre"
    assert sorted({d for d in downloads if d.endswith("cfg.json")}) == [
        "sl/blocks.11.hook_mlp_out/cfg.json", "sl/blocks.12.hook_resid_pre/cfg.json"]  # not blocks.2's
