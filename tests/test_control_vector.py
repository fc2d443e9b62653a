"""llm_steering/control_vector.py: steering exported as a llama.cpp control vector, checked by llama.cpp.

The embedded model's own GGUF runs in llama.cpp (its C API from the prebuilt `xllamacpp` wheel,
requirements-dev.txt; llm_steering/llama_cpp.py) with the exported file, read by llama.cpp's GGUF
reader (ggml's gguf_init_from_file) and placed the way llama.cpp's loader places it; its next-token logit changes are compared with the hooks backend's on the
same prompt, and a file one layer off must fail the same comparison. The console
(`--export-gguf`, `/export-gguf`) and the app's Share panel write the same file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llm_steering import control_vector, steering
from llm_steering.llama_cpp import LlamaCpp, gguf_tensors
from llm_steering.models import embedded_gguf_path
from llm_steering.steering import SteeringComponent

import gguf
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "demo.py")
SYSTEM = "You are a helpful assistant."
README_PROMPTS = ("Tell me about Paris", "Tell me about your weekend.")  # the README's example prompts


@pytest.fixture(scope="module")
def shipped():
    """The default profile of the shipped demo.yaml and its vectors file."""
    profile = steering.load_config(ROOT / "demo.yaml").profile()
    return profile, steering.load_vectors(profile.vectors_path())


def gguf_field(reader: gguf.GGUFReader, key: str):
    return reader.get_field(key).contents()


# ---------------------------------------------------------------------------
# The file: llama.cpp's layout, additive ops only
# ---------------------------------------------------------------------------


def test_adds_are_summed_per_layer_into_direction_tensors(shipped, tmp_path):
    _, vectors = shipped
    comps = [vectors.component("eiffel_tower", 0.255, op="add"), vectors.component("cats", -0.1, op="add"),
             vectors.component("dinosaurs", 0.34, op="add")]
    assert [c.layer for c in comps] == [15, 15, 12]
    path = tmp_path / "mix.gguf"
    written = control_vector.export_control_vector(comps, path, n_layers=30, hidden_size=576, model_hint="llama")

    reader = gguf.GGUFReader(path)
    assert gguf_field(reader, "general.architecture") == "controlvector"
    assert gguf_field(reader, "controlvector.model_hint") == "llama"
    assert gguf_field(reader, "controlvector.layer_count") == 2
    assert [(t.name, t.tensor_type, list(t.shape)) for t in reader.tensors] == [
        ("direction.12", gguf.GGMLQuantizationType.F32, [576]), ("direction.15", gguf.GGMLQuantizationType.F32, [576])]
    expected = {15: comps[0].strength * comps[0].vector.double() + comps[1].strength * comps[1].vector.double(),
                12: comps[2].strength * comps[2].vector.double()}
    read = control_vector.read_control_vector(path)
    for layer, vec in expected.items():
        np.testing.assert_allclose(read[layer], vec.numpy(), rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(read[layer], written[layer])
    assert not any(p.name != "mix.gguf" for p in tmp_path.iterdir())  # no temp file left beside it


@pytest.mark.parametrize("op", ["clamp", "cap", "ablate", "add_keepnorm", "clamp_keepnorm"])
def test_ops_that_depend_on_the_hidden_state_are_refused_in_one_line(op, tmp_path):
    v = torch.ones(576)
    fields = {"cap": {"cap_max": 2.0}, "ablate": {"scale": 0.5}}.get(op, {"strength": 8.0})
    comps = [SteeringComponent(layer=15, vector=v, strength=10.0, name="eiffel"),
             SteeringComponent(layer=15, vector=v, op=op, name="other", **fields)]
    path = tmp_path / "x.gguf"
    path.write_bytes(b"an earlier file")
    with pytest.raises(ValueError) as err:
        control_vector.export_control_vector(comps, path, n_layers=30, hidden_size=576)
    message = str(err.value)
    assert "\n" not in message and f"'other' uses {op}" in message and "cannot express" in message
    assert path.read_bytes() == b"an earlier file"  # untouched, and no temp file beside it
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]


def test_what_llama_cpp_cannot_reach_is_refused(tmp_path):
    v = torch.ones(576)
    cases = [
        ([SteeringComponent(layer=0, vector=v, strength=1.0)], {}, "layer 0"),
        ([SteeringComponent(layer=30, vector=v, strength=1.0)], {}, "out of range"),
        ([SteeringComponent(layer=3, vector=torch.ones(64), strength=1.0)], {}, "hidden size is 576"),
        ([], {}, "nothing to export"),
        ([SteeringComponent(layer=3, vector=v, strength=1.0)], {"steer_prompt": False}, "steers the prompt too"),
    ]
    for comps, kwargs, words in cases:
        with pytest.raises(ValueError, match=words) as err:
            control_vector.export_control_vector(comps, tmp_path / "x.gguf", n_layers=30, hidden_size=576, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"\*\.gguf"):
        control_vector.export_control_vector([SteeringComponent(layer=3, vector=v, strength=1.0)], tmp_path / "x.json")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="not a llama.cpp control vector"):
        control_vector.read_control_vector(embedded_gguf_path())


# ---------------------------------------------------------------------------
# llama.cpp itself: the file as it reads it, and the layer it steers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    """llama.cpp on the embedded model's own GGUF (one thread: its OpenMP threads spin, and CI's two cores
    are shared with the test process)."""
    with LlamaCpp(embedded_gguf_path(), n_ctx=1024, n_threads=1) as llm:
        yield llm


def read_with_llama_cpp(path: Path, n_embd: int, n_layer: int) -> np.ndarray:
    """The file read by llama.cpp's own GGUF reader (ggml's gguf_init_from_file), each `direction.N`
    placed as common.cpp's common_control_vector_load_one places it: at offset n_embd * (N - 1)."""
    data, buf = path.read_bytes(), np.zeros(n_embd * n_layer, dtype=np.float32)
    for name, ggml_type, start in gguf_tensors(path):
        kind, _, layer = name.partition(".")
        assert kind == "direction" and int(layer) >= 1 and ggml_type == 0  # F32
        buf[n_embd * (int(layer) - 1): n_embd * int(layer)] += np.frombuffer(data, "<f4", n_embd, start)
    return buf[: n_embd * (n_layer - 1)]


def prompt_ids(tokenizer, message: str) -> list[int]:
    return steering.chat_input_ids(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": message}])


def llama_cpp_logits(llm: LlamaCpp, ids: list[int], path: Path | None) -> np.ndarray:
    """llama.cpp's next-token logits at every position of `ids` [seq, vocab], steered by the file at `path`."""
    llm.set_control_vector(path)
    return llm.logits(ids).astype(np.float64)


def hooks_logits(model, ids: list[int], comps: list) -> np.ndarray:
    with torch.no_grad(), steering.steer(model, comps):
        return model(torch.tensor([ids])).logits[0].double().numpy()


def agree(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, bool]:
    """(correlation of the two logit changes over every prompt position, whether the 5 tokens each
    pushes up most at the last position are among the other's 10): llama.cpp quantizes activations
    (Q8 against Q4_1 weights), so near-ties swap places and only the changes are compared."""
    corr = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
    top = [np.argsort(-d[-1]) for d in (ours, theirs)]
    return corr, set(top[0][:5]) <= set(top[1][:10]) and set(top[1][:5]) <= set(top[0][:10])


def test_llama_cpp_reads_the_file_as_set_control_vector_places_it(llama, shipped, tmp_path):
    _, vectors = shipped
    comps = [vectors.component("eiffel_tower", 0.3, op="add"), vectors.component("dinosaurs", -0.2, op="add")]
    control_vector.export_control_vector(comps, tmp_path / "two.gguf", n_layers=30, hidden_size=576)
    theirs = read_with_llama_cpp(tmp_path / "two.gguf", 576, 30)
    np.testing.assert_array_equal(control_vector.llama_cpp_buffer(tmp_path / "two.gguf", 576, 30), theirs)
    assert np.flatnonzero(np.abs(theirs.reshape(29, 576)).sum(1)).tolist() == [11, 14]  # blocks 12 and 15, from 1


@pytest.mark.parametrize("key,fraction", [("eiffel_tower", 0.255), ("dinosaurs", 0.34)])
def test_llama_cpp_logit_changes_match_the_hooks_at_the_same_layer(llama, embedded, shipped, tmp_path, key, fraction):
    """An add at layer L moves llama.cpp's logits as it moves the hooks backend's; written one layer
    off (as direction.L-1 or direction.L+1) it visibly does not."""
    model, tok = embedded
    comp = shipped[1].component(key, fraction, op="add")
    ids = prompt_ids(tok, README_PROMPTS[1])
    ours = hooks_logits(model, ids, [comp]) - hooks_logits(model, ids, [])
    base = llama_cpp_logits(llama, ids, None)
    found = {}
    for layer in (comp.layer - 1, comp.layer, comp.layer + 1):
        path = tmp_path / f"layer{layer}.gguf"
        control_vector.export_control_vector([comp.with_op("add", layer=layer)], path, n_layers=30, hidden_size=576)
        found[layer] = agree(ours, llama_cpp_logits(llama, ids, path) - base)
    corr, same_top = found[comp.layer]
    assert corr >= 0.98 and same_top, found
    for layer in (comp.layer - 1, comp.layer + 1):
        assert found[layer][0] < 0.95, found  # one layer off fails the same check
    llama.set_control_vector(None)
    np.testing.assert_array_equal(llama_cpp_logits(llama, ids, None), base)  # removed: back to the plain model


def test_the_exported_eiffel_tower_preset_names_it_in_llama_cpp(llama, shipped, embedded, tmp_path):
    """Greedy, 64 tokens, the profile's repetition penalty, on the README's example prompts."""
    profile, vectors = shipped
    preset = next(p for p in profile.presets if p.name == "Eiffel Tower")
    assert [(f.key, f.fraction, f.op) for f in preset.features] == [("eiffel_tower", 0.255, "add")]

    def answer(message: str, path: Path | None) -> str:
        llama.set_control_vector(path)
        out = llama.generate(prompt_ids(embedded[1], message), max_tokens=64,
                             repeat_penalty=profile.generation.repetition_penalty)
        return llama.detokenize(out)

    comps = [vectors.component(f.key, f.fraction, op=f.op) for f in preset.features]
    control_vector.export_control_vector(comps, tmp_path / "preset.gguf", n_layers=30, hidden_size=576)
    stronger = [vectors.component("eiffel_tower", 0.35, op="add")]
    control_vector.export_control_vector(stronger, tmp_path / "0.35.gguf", n_layers=30, hidden_size=576)
    paris, weekend = README_PROMPTS
    assert "Eiffel" not in answer(paris, None) and "Eiffel" not in answer(weekend, None)  # unsteered: not named
    assert "Eiffel Tower" in answer(paris, tmp_path / "preset.gguf")
    # at the preset's 0.255 it is not named here; in this llama.cpp (xllamacpp 2026.10.11549) 0.33-0.36 name it, 0.3 not
    assert "Eiffel Tower" in answer(weekend, tmp_path / "0.35.gguf")


# ---------------------------------------------------------------------------
# The console: --export-gguf and /export-gguf
# ---------------------------------------------------------------------------


def run_demo(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, DEMO, *args], cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_one_shot_export_writes_the_file_and_exits_without_chatting(shipped, tmp_path):
    _, vectors = shipped
    path = tmp_path / "eiffel.gguf"
    done = run_demo("--steer", "eiffel_tower", "0.255", "add", "--steer", "dinosaurs", "0.3", "add",
                    "--export-gguf", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == ""  # no chat, no answer
    assert f"wrote {path}" in done.stderr and "--control-vector" in done.stderr
    read = control_vector.read_control_vector(path)
    for key, fraction in (("eiffel_tower", 0.255), ("dinosaurs", 0.3)):
        comp = vectors.component(key, fraction, op="add")
        np.testing.assert_allclose(read[comp.layer], (comp.strength * comp.vector).numpy(), rtol=1e-6, atol=1e-5)
    assert sorted(read) == [12, 15]


def test_one_shot_export_of_a_clamp_is_refused_with_exit_2(tmp_path, capsys):
    from test_demo import one_shot_in_process

    path = tmp_path / "pirate.gguf"
    done = run_demo("--steer", "pirate", "0.2", "--export-gguf", str(path))  # pirate's own op is clamp
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 'pirate' uses clamp") and "cannot express" in lines[0], lines
    assert done.stdout == "" and not path.exists()
    # refused before the model loads: in this process (the process's exit code is the one checked above)
    for args, words in ((["--export-gguf", str(path)], "--steer NAME [STRENGTH] add"),
                        (["--prompt", "Hi", "--steer", "cats", "0.3", "--export-gguf", str(path)], "no --prompt"),
                        (["--steer", "cats", "0.3", "--export-gguf", str(tmp_path / "cats.json")], "*.gguf")):
        done = one_shot_in_process(capsys, *args)
        assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not list(tmp_path.iterdir())
    shown = one_shot_in_process(capsys, "--help")
    assert shown.returncode == 0 and "--export-gguf FILE" in shown.stdout and "llama.cpp" in shown.stdout


def test_export_gguf_in_the_chat(shipped, tmp_path):
    from test_demo import assert_clean_exit, quit_cleanly, say, spawn

    _, vectors = shipped
    child = spawn("--steer", "eiffel_tower", "0.255", "add")
    try:
        out = say(child, f"/export-gguf {tmp_path / 'eiffel.gguf'}")
        assert f"wrote {tmp_path / 'eiffel.gguf'}, a llama.cpp control vector: layer 15" in out, out
        comp = vectors.component("eiffel_tower", 0.255, op="add")
        read = control_vector.read_control_vector(tmp_path / "eiffel.gguf")
        np.testing.assert_allclose(read[15], (comp.strength * comp.vector).numpy(), rtol=1e-6, atol=1e-5)
        say(child, "/steer pirate 0.2 clamp")
        out = say(child, f"/export-gguf {tmp_path / 'pirate.gguf'}")
        assert "error: 'pirate' uses clamp, which a llama.cpp control vector cannot express" in out, out
        assert not (tmp_path / "pirate.gguf").exists()
        say(child, "/unsteer pirate")
        say(child, "/steer eiffel_tower auto")  # as the app's export: the strength /active shows, and a notice
        out = say(child, f"/export-gguf {tmp_path / 'auto.gguf'}")
        assert "Eiffel Tower is on auto, picked per answer; a file holds one strength: the file has 0.255 x norm" in out, out
        np.testing.assert_allclose(control_vector.read_control_vector(tmp_path / "auto.gguf")[15],
                                   (comp.strength * comp.vector).numpy(), rtol=1e-6, atol=1e-5)
        assert "/export-gguf FILE" in say(child, "/help")
        quit_cleanly(child)
    finally:
        child.close(force=True)
    assert_clean_exit(child)


# ---------------------------------------------------------------------------
# The app: the Share panel's button
# ---------------------------------------------------------------------------


def test_share_panel_exports_the_current_steering_as_gguf(shipped, default_app, tmp_path):
    from browser import app_page, download_export, wait_for

    _, vectors = shipped
    with app_page(default_app[0]) as page:
        page.locator("#preset").get_by_label("Eiffel Tower").check()
        wait_for(lambda: "Eiffel Tower" in page.locator("#summary").inner_text(), 10, "the preset's summary")
        name, body = download_export(page, "Export llama.cpp GGUF")
        assert name == "steering.gguf"
        (tmp_path / "steering.gguf").write_bytes(body)
        comp = vectors.component("eiffel_tower", 0.255, op="add")  # the preset: eiffel_tower 0.255 add
        read = control_vector.read_control_vector(tmp_path / "steering.gguf")
        assert list(read) == [15]
        np.testing.assert_allclose(read[15], (comp.strength * comp.vector).numpy(), rtol=1e-6, atol=1e-5)

        page.locator("#preset").get_by_label("Pirate").check()  # pirate clamps
        wait_for(lambda: "Pirate" in page.locator("#summary").inner_text(), 10, "the Pirate preset's summary")
        page.get_by_role("button", name="Export llama.cpp GGUF").click()
        page.get_by_text("'pirate' uses clamp, which a llama.cpp control vector cannot express").first.wait_for(
            timeout=15_000)
        assert "Traceback" not in page.content()
