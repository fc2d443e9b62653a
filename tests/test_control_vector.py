"""llm_steering/control_vector.py: steering exported as a llama.cpp control vector, checked by llama.cpp.

The embedded model's own GGUF runs in llama.cpp (llama-cpp-python, requirements-dev.txt) with
the exported file, read by llama.cpp's GGUF reader (libggml-base) and placed the way llama.cpp's
loader places it; its next-token logit changes are compared with the hooks backend's on the
same prompt, and a file one layer off must fail the same comparison. The console
(`--export-gguf`, `/export-gguf`) and the app's Share panel write the same file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from llm_steering import control_vector, steering
from llm_steering.models import embedded_gguf_path
from llm_steering.steering import SteeringComponent

import gguf
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "demo.py")


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


def test_one_shot_export_of_a_clamp_is_refused_with_exit_2(tmp_path):
    path = tmp_path / "pirate.gguf"
    done = run_demo("--steer", "pirate", "0.2", "--export-gguf", str(path))  # pirate's own op is clamp
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 'pirate' uses clamp") and "cannot express" in lines[0], lines
    assert done.stdout == "" and not path.exists()
    for args, words in ((["--export-gguf", str(path)], "--steer NAME STRENGTH add"),
                        (["--prompt", "Hi", "--steer", "cats", "0.3", "--export-gguf", str(path)], "no --prompt"),
                        (["--steer", "cats", "0.3", "--export-gguf", str(tmp_path / "cats.json")], "*.gguf")):
        done = run_demo(*args, timeout=60)
        assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not list(tmp_path.iterdir())


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
        assert "/export-gguf FILE" in say(child, "/help")
        quit_cleanly(child)
    finally:
        child.close(force=True)
    assert_clean_exit(child)


# ---------------------------------------------------------------------------
# The app: the Share panel's button
# ---------------------------------------------------------------------------


def test_share_panel_exports_the_current_steering_as_gguf(shipped, tmp_path):
    from browser import app_page, running_app, wait_for

    _, vectors = shipped
    with running_app(tmp_path / "server.log") as url, app_page(url) as page:
        page.locator("#preset").get_by_label("Eiffel Tower").check()
        wait_for(lambda: "Eiffel Tower" in page.locator("#summary").inner_text(), 10, "the preset's summary")
        page.locator("#share-acc").get_by_text("Share", exact=True).click()
        page.get_by_role("button", name="Export llama.cpp GGUF").click()
        link = page.locator("#exported [data-testid='download-link']")
        link.wait_for(timeout=15_000)
        assert link.get_attribute("download") == "steering.gguf"
        with urllib.request.urlopen(link.get_attribute("href"), timeout=10) as resp:
            (tmp_path / "steering.gguf").write_bytes(resp.read())
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
