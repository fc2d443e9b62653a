"""Vector files, components_from_file, demo.yaml, steering specs."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

from llm_steering import steering
from llm_steering.steering import ActiveFeature, SteeringSpec, SteeringVector, SteeringVectorSet

import pytest
import torch
import yaml
from conftest import ROOT, build_tiny_llama, unit

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def make_set(d: int = 32, model_id: str = "tiny/llama") -> SteeringVectorSet:
    return SteeringVectorSet(
        model_id=model_id,
        hidden_size=d,
        vectors=[
            SteeringVector(name="eiffel_tower", layer=2, vector=unit(d, 1) * 3.0, concept="eiffel_tower", source="c.yaml"),
            SteeringVector(name="L3F17", layer=3, vector=unit(d, 2), index=17, source="some/sae"),
        ],
        layer_norms={2: 10.0, 3: 20.0},
    )


# ---------------------------------------------------------------------------
# Vector files
# ---------------------------------------------------------------------------


def test_save_load_round_trip_keeps_everything(tmp_path):
    vs = make_set()
    path = tmp_path / "v.pt"
    vs.save(path)
    back = steering.load_vectors(path)
    assert back.model_id == "tiny/llama" and back.hidden_size == 32
    assert back.layer_norms == {2: 10.0, 3: 20.0}
    assert [v.name for v in back.vectors] == ["eiffel_tower", "L3F17"]
    e = back.get("eiffel_tower")
    torch.testing.assert_close(e.vector, unit(32, 1), rtol=0, atol=1e-6)  # stored unit length
    assert e.concept == "eiffel_tower" and e.index is None and e.source == "c.yaml"
    assert back.get("3:17").name == "L3F17" and back.get("L3F17").index == 17
    # the file is a plain dict that torch's safe loader reads
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "llm-steering/vectors" and raw["vectors"][1]["index"] == 17
    assert not [p for p in os.listdir(tmp_path) if p != "v.pt"]  # no temp file left behind


def test_component_strength_is_fraction_of_layer_norm(tmp_path):
    vs = make_set()
    comp = vs.component("L3F17", 0.5, op="clamp")
    assert comp.layer == 3 and comp.strength == 10.0 and comp.op == "clamp" and comp.name == "L3F17"
    assert vs.component("eiffel_tower", 1.5).strength == 15.0
    with pytest.raises(ValueError, match="available: eiffel_tower, L3F17"):
        vs.get("pirate")
    with pytest.raises(ValueError, match="no residual norm for layer 7"):
        vs.norm(7)


def test_invalid_sets_are_refused():
    with pytest.raises(ValueError, match="used twice"):
        SteeringVectorSet("m", 32, [SteeringVector("a", 1, unit(32, 1)), SteeringVector("a", 2, unit(32, 2))])
    with pytest.raises(ValueError, match="hidden size is 16"):
        SteeringVectorSet("m", 16, [SteeringVector("a", 1, unit(32, 1))])
    with pytest.raises(ValueError, match="zero norm"):
        SteeringVector("a", 1, torch.zeros(32))
    with pytest.raises(ValueError, match="not valid"):
        SteeringVector("bad name", 1, unit(32, 1))


def test_missing_file_names_the_command_that_creates_it(tmp_path):
    with pytest.raises(ValueError, match="extract_steering_vectors.py --contrastive"):
        steering.load_vectors(tmp_path / "nope.pt")


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_hostile_pickle_is_refused_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "llm-steering/vectors", "payload": Boom()}, path)
    with pytest.raises(ValueError) as info:
        steering.load_vectors(path)
    assert "weights_only" in str(info.value) and "\n" not in str(info.value)
    plain = tmp_path / "evil.pkl"  # a raw (non-zip) pickle too
    plain.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError):
        steering.load_vectors(plain)
    assert not (tmp_path / "pwned_marker").exists()


def test_corrupt_and_malformed_files_fail_cleanly(tmp_path):
    good = tmp_path / "good.pt"
    make_set().save(good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:300])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a zip at all" * 10)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    wrong_shape = tmp_path / "shape.pt"
    data = make_set().to_dict()
    data["vectors"][0]["vector"] = torch.ones(7)
    torch.save(data, wrong_shape)
    for path, pattern in [(cut, "not a readable"), (junk, "not a readable"), (other, "not a steering vector file"),
                          (wrong_shape, "hidden size is 32")]:
        with pytest.raises(ValueError, match=pattern) as info:
            steering.load_vectors(path)
        assert "\n" not in str(info.value)
    assert zipfile.is_zipfile(good)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "v.pt"
    make_set().save(path)
    before = path.read_bytes()

    def broken(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        SteeringVectorSet("x/y", 32, [SteeringVector("zz", 1, unit(32, 5))], {1: 2.0}).save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["v.pt"]


def test_measure_layer_norms_leaves_out_the_first_token():
    model = build_tiny_llama()
    captured = {}
    _, layers = steering.decoder_layers(model)
    h = layers[2].register_forward_hook(lambda m, a, o: captured.update(h=steering.layer_hidden(o)[0].clone()))
    try:
        tok = _CharTokenizer()
        norms = steering.measure_layer_norms(model, tok, [2, 1], text="abcdefgh")
    finally:
        h.remove()
    assert list(norms) == [1, 2]
    assert norms[2] == pytest.approx(float(captured["h"][1:].norm(dim=-1).mean()), rel=1e-6)
    assert steering.decoder_layers(model)[1][2]._forward_hooks == {}  # no hook left
    with pytest.raises(ValueError, match="out of range"):
        steering.measure_layer_norms(model, tok, [4])


class _CharTokenizer:
    """Enough of a tokenizer for measure_layer_norms on a tiny Llama (vocab 128)."""

    def __call__(self, text, return_tensors=None):
        ids = [ord(c) % 128 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


# ---------------------------------------------------------------------------
# components_from_file
# ---------------------------------------------------------------------------


def test_components_from_file_reduced_strengths_and_clamp(tmp_path):
    path = tmp_path / "v.pt"
    make_set(model_id=LLAMA).save(path)
    cfg = {"features": [[3, 17, 0.5]], "reduced_strengths": True, "clamp_intensity": True, "model_id": LLAMA, "hidden_size": 32}
    (comp,) = steering.components_from_file(path, cfg)
    assert comp.layer == 3 and comp.strength == pytest.approx(1.5) and comp.op == "clamp" and comp.name == "L3F17"
    torch.testing.assert_close(comp.vector, unit(32, 2), rtol=0, atol=1e-6)
    comps = steering.components_from_file(path, {"features": [[3, 17, 0.5], ["eiffel_tower", 4.0], "eiffel_tower"]})
    assert [(c.strength, c.op) for c in comps] == [(0.5, "add"), (4.0, "add"), (5.0, "add")]  # bare name: half the norm


def test_components_from_file_mismatches_and_missing(tmp_path):
    path = tmp_path / "v.pt"
    make_set(model_id=LLAMA).save(path)
    with pytest.raises(ValueError, match="holds vectors for 'meta-llama/Llama-3.1-8B-Instruct', not for 'other/model'"):
        steering.components_from_file(path, {"features": [[3, 17, 1.0]], "model_id": "other/model"})
    with pytest.raises(ValueError, match="hidden size is 4096"):
        steering.components_from_file(path, {"features": [[3, 17, 1.0]], "hidden_size": 4096})
    with pytest.raises(ValueError, match="--features 5:9"):
        steering.components_from_file(path, {"features": [[5, 9, 1.0]]})
    with pytest.raises(ValueError, match="extract_steering_vectors.py"):
        steering.components_from_file(tmp_path / "missing.pt", {"features": [[3, 17, 1.0]]})
    with pytest.raises(ValueError, match="non-empty list"):
        steering.components_from_file(path, {"features": []})


def test_components_from_file_steer_a_tiny_llama(tmp_path):
    model = build_tiny_llama()
    path = tmp_path / "v.pt"
    make_set().save(path)
    comps = steering.components_from_file(path, {"features": [[3, 17, 2.0]], "clamp_intensity": True})
    steering.validate_components(model, comps)
    _, layers = steering.decoder_layers(model)
    got = {}
    with steering.steer(model, comps):
        # registered after the steering hook, so it sees the clamped output
        h = layers[3].register_forward_hook(lambda m, a, o: got.update(h=steering.layer_hidden(o).clone()))
        try:
            model(torch.tensor([[1, 2, 3, 4]]))
        finally:
            h.remove()
    proj = got["h"] @ unit(32, 2)
    torch.testing.assert_close(proj, torch.full((1, 4), 2.0), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# demo.yaml
# ---------------------------------------------------------------------------


def test_shipped_demo_yaml_loads_with_both_profiles():
    cfg = steering.load_config(ROOT / "demo.yaml")
    prof = cfg.profile()
    assert prof.name == "smollm2" and prof.model_id is None and cfg.default_profile == "smollm2"
    assert prof.vectors_path() == (ROOT / "steering_vectors.pt").resolve()
    assert {"eiffel_tower", "pirate", "shakespeare"} <= {f.name for f in prof.features}
    assert prof.generation.temperature == 0.5 and prof.generation.repetition_penalty == 1.1
    llama = cfg.profile("llama31_8b")
    assert llama.model_id == LLAMA and llama.sae_source == "andyrdt/saes-llama-3.1-8b-instruct" and llama.reduced_strengths
    main = llama.feature("L15F21576")
    assert (main.layer, main.index, main.op) == (15, 21576, "clamp") and main.strength == pytest.approx(0.57 * 15)
    assert llama.feature("L19F93").index == 93
    assert llama.presets and all(isinstance(f, ActiveFeature) for p in llama.presets for f in p.features)
    with pytest.raises(ValueError, match="available: smollm2, llama31_8b"):
        cfg.profile("gpt5")
    with pytest.raises(ValueError, match="has no feature 'x'"):
        prof.feature("x")


def test_every_demo_yaml_line_with_a_field_is_commented():
    for n, line in enumerate((ROOT / "demo.yaml").read_text().splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#") and not s.startswith("- {"):
            assert "#" in s, f"demo.yaml line {n} has no comment: {s}"


def write_cfg(tmp_path, data) -> Path:
    path = tmp_path / "demo.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def minimal_profile(**over):
    prof = {"model_id": None, "vectors_file": "v.pt", "features": [{"name": "pirate", "feature": [9, None, 60.0]}]}
    prof.update(over)
    return prof


@pytest.mark.parametrize(
    "data, pattern",
    [
        ("profiles: [unclosed", "not valid YAML"),
        ({"profiles": {"a": minimal_profile(colour="red")}}, "unknown field 'colour'"),
        ({"profiles": {"a": minimal_profile(features=[{"name": "p", "feature": [9, None]}])}}, r"\[layer, index, strength\]"),
        ({"profiles": {"a": minimal_profile(features=[{"name": "p", "feature": [-1, None, 1.0]}])}}, "non-negative"),
        ({"profiles": {"a": minimal_profile(features=[{"name": "p", "feature": [1, None, 1.0], "mode": "boost"}])}}, "'clamp' or 'add'"),
        ({"profiles": {"a": minimal_profile(sae_format="parquet")}}, "sae_format 'parquet' is unknown"),
        ({"profiles": {"a": minimal_profile(generation={"temperature": -1})}}, "temperature"),
        ({"profiles": {"a": minimal_profile(presets=[{"name": "P", "features": [{"key": "ghost", "fraction": 0.5}]}])}}, "ghost"),
        ({"default_profile": "b", "profiles": {"a": minimal_profile()}}, "default_profile 'b'"),
        ({"default_profile": "a"}, "missing field 'profiles'"),
    ],
)
def test_config_errors_are_one_line(tmp_path, data, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        steering.load_config(write_cfg(tmp_path, data))
    assert "\n" not in str(info.value) and "demo.yaml" in str(info.value)


def test_config_reduced_strengths_and_preset_defaults(tmp_path):
    prof = minimal_profile(reduced_strengths=True, features=[{"name": "L15F1", "feature": [15, 1, 0.5], "mode": "add"}],
                           presets=[{"name": "P", "features": [{"key": "L15F1", "fraction": 0.4}, {"key": "3:7", "fraction": 0.2}]}])
    cfg = steering.load_config(write_cfg(tmp_path, {"profiles": {"a": prof}}))
    p = cfg.profile()
    assert p.feature("L15F1").strength == 7.5
    assert p.presets[0].features == (ActiveFeature("L15F1", 0.4, "add"), ActiveFeature("3:7", 0.2))  # op: the catalog's default
    assert p.generation == steering.GenerationDefaults()
    assert p.vectors_path() == (tmp_path / "v.pt").resolve()


# ---------------------------------------------------------------------------
# Steering specs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_spec_round_trip(tmp_path, suffix):
    spec = SteeringSpec("tiny/llama", (ActiveFeature("eiffel_tower", 0.5), ActiveFeature("3:17", -0.25, "add")), steer_prompt=False)
    path = tmp_path / f"spec{suffix}"
    steering.save_steering_spec(spec, path)
    assert steering.load_steering_spec(path) == spec
    if suffix == ".json":
        data = json.loads(path.read_text())
        assert data == {"format": "llm-steering/spec", "version": 1, "model_id": "tiny/llama", "steer_prompt": False,
                        "features": [{"key": "eiffel_tower", "fraction": 0.5},
                                     {"key": "3:17", "fraction": -0.25, "op": "add"}]}
    # the catalog's meaning, as in the app and the console: no op given and no demo.yaml profile for this
    # model, so the feature's own default (an unlisted vector's: clamp)
    comps = steering.spec_components(spec, make_set())
    assert [(c.name, c.layer, c.strength, c.op) for c in comps] == [("eiffel_tower", 2, 5.0, "clamp"), ("L3F17", 3, -5.0, "add")]


def test_specs_written_before_the_rename_still_load(tmp_path):
    path = tmp_path / "old.json"
    path.write_text('{"format": "llm-steering/spec", "version": 1, "model_id": "m", "features": '
                    '[{"key": "pirate", "fraction": 0.2, "mode": "clamp"}]}')
    assert steering.load_steering_spec(path).features == (ActiveFeature("pirate", 0.2, "clamp"),)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("{not json", r"not valid JSON \(line 1, column 2"),
        ('{"format": "other", "version": 1}', "not a steering spec"),
        ('{"format": "llm-steering/spec", "version": 9, "model_id": "m", "features": []}', "version 9"),
        ('{"format": "llm-steering/spec", "version": 1, "model_id": "m", "features": [{"key": "a"}]}', "fraction"),
        ('{"format": "llm-steering/spec", "version": 1, "model_id": "m", "features": [{"key": "a", "fraction": 1, "op": "x"}]}', "op must be"),
        ('{"format": "llm-steering/spec", "version": 1, "features": []}', "model_id"),
    ],
)
def test_bad_specs_fail_with_one_line(tmp_path, text, pattern):
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=pattern) as info:
        steering.load_steering_spec(path)
    assert "\n" not in str(info.value)


def test_spec_for_another_model_and_unknown_suffix(tmp_path):
    spec = SteeringSpec("other/model", (ActiveFeature("eiffel_tower", 0.5),))
    with pytest.raises(ValueError, match="choose the profile for that model"):
        steering.spec_components(spec, make_set())
    with pytest.raises(ValueError, match=".json, .yaml or .yml"):
        steering.save_steering_spec(spec, tmp_path / "spec.txt")
    with pytest.raises(ValueError, match="unknown feature 'nope'"):
        steering.spec_components(SteeringSpec("tiny/llama", (ActiveFeature("nope", 0.5),)), make_set())


# ---------------------------------------------------------------------------
# The shipped default set
# ---------------------------------------------------------------------------


def test_shipped_vectors_have_eight_concepts_for_the_embedded_model():
    vs = steering.load_vectors(ROOT / "steering_vectors.pt")
    assert vs.model_id == steering.EMBEDDED_MODEL_ID and vs.hidden_size == 576
    names = {v.name for v in vs.vectors}
    assert {"eiffel_tower", "pirate", "shakespeare"} <= names and len(names) >= 8
    prof = steering.load_config(ROOT / "demo.yaml").profile("smollm2")
    for feat in prof.features:  # every configured feature is in the file, at its layer, with a norm there
        vec = vs.get(feat.name)
        assert vec.layer == feat.layer and vec.concept == feat.name
        assert -1 <= feat.strength / vs.norm(feat.layer) <= 2  # the app's slider range


def test_the_old_name_of_components_from_file_still_works_and_says_it_is_deprecated(tmp_path):
    path = tmp_path / "v.pt"
    make_set(model_id=LLAMA).save(path)
    with pytest.warns(DeprecationWarning, match="components_from_file"):
        old = steering.load_saes_from_file(path, {"features": [[3, 17, 0.5]]}, device="cpu")
    assert [c.strength for c in old] == [c.strength for c in steering.components_from_file(path, {"features": [[3, 17, 0.5]]})]
