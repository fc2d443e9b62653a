"""catalog.py: the app, the console, the library and the server read every input the same way.

The same steering specs and the same long inputs go through the app's handlers and the
console's chat; both must build the same components and send the model the same input. The
same specs also go through the library's `steering.spec_components` and the server's
resolution (the middleware's record, as the vLLM worker turns it into components).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

from llm_steering import catalog as catalog_module
from llm_steering import chat_input, steering
from llm_steering.catalog import Catalog
from llm_steering.chat_input import fit_chat
from llm_steering.console import chat as demo
from llm_steering.web import handlers

import pytest
from conftest import write_small_saelens_sae

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def loaded(embedded):
    from llm_steering.web import app

    app.LOADED = app.LOADED or app.load_app()
    return app, app.LOADED


def console_for(loaded_app, system: str = "You are a helpful assistant.") -> demo.Console:
    model, tok = loaded_app.model, loaded_app.tokenizer
    gen = loaded_app.profile.generation
    settings = demo.Settings(backend="hf", temperature=0.0, max_new_tokens=2, repetition_penalty=1.0, system=system,
                             max_input_tokens=gen.max_input_tokens)
    return demo.Console(model, tok, loaded_app.catalog, settings, out=io.StringIO(), info=io.StringIO(), interactive=False)


def comp_tuple(c: steering.SteeringComponent) -> tuple:
    return c.layer, c.op, round(c.strength, 4), c.name, tuple(c.vector.tolist())


SPECS = [
    # no op given: each feature's own op (eiffel_tower adds, pirate clamps) in both front ends
    [{"key": "eiffel_tower", "fraction": 0.3}, {"key": "pirate", "fraction": 0.2}],
    [{"key": "eiffel_tower", "fraction": 0.3, "op": "clamp"}],
    [{"key": "shakespeare", "fraction": -1.0, "op": "add"}, {"key": "music", "fraction": 2.0}],
    [{"key": "ocean", "fraction": 0.1, "mode": "add"}],  # a file written before op was called op
    # an auto answer that kept a learned direction: its turn's spec names the learned vector (no op: the feature's)
    [{"key": "eiffel_tower", "fraction": 0.3}, {"key": "pirate_learned", "fraction": 0.255}],
]


@pytest.mark.parametrize("features", SPECS)
def test_app_and_console_build_the_same_components(loaded, tmp_path, features):
    app, la = loaded
    spec_dict = {"format": "llm-steering/spec", "version": 1, "model_id": la.model_id, "features": features}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec_dict))
    console = console_for(la)
    console.load(str(path))
    from_console = [comp_tuple(c) for c in console.components()]
    *updates, _preset, _file = handlers.import_spec(la, str(path))  # the app's controls, as the visitor would then send them
    skip = type(handlers.gr.skip())
    controls = [default if isinstance(u, skip) else u for u, default in zip(updates, la.panel.pack({}), strict=True)]
    from_app = [comp_tuple(c) for c in la.catalog.components(handlers.spec_from_controls(la, la.panel.read(controls)))]
    assert from_app == from_console and from_app
    spec = steering.SteeringSpec.from_dict(spec_dict)
    vectors_path = la.profile.vectors_path()
    from_library = [comp_tuple(c) for c in steering.spec_components(spec, steering.load_vectors(vectors_path))]
    assert from_library == from_app
    assert [comp_tuple(c) for c, _ in server_components(spec, vectors_path)] == from_app


def server_components(spec: steering.SteeringSpec, vectors_path: Path) -> list:
    """What the server steers with for a spec: the middleware's record, as the vLLM worker reads it."""
    from llm_steering.backends.vllm.wire import SteeringRecord, file_digest
    from llm_steering.backends.vllm.worker import record_components
    from llm_steering.serving.middleware import resolve_record

    vectors = steering.load_vectors(vectors_path)
    catalog = catalog_module.catalog_for_vectors(vectors, file_only=True)  # the middleware's catalog
    record = resolve_record(catalog, spec, 30, 576, str(vectors_path), file_digest(vectors_path))
    return record_components(SteeringRecord.read(record.sign()), vectors)


@pytest.mark.parametrize("fraction", [2.5, -1.5, 11.0])
def test_both_refuse_the_same_out_of_range_strengths(loaded, tmp_path, fraction):
    app, la = loaded
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"format": "llm-steering/spec", "version": 1, "model_id": la.model_id,
                                "features": [{"key": "pirate", "fraction": fraction}]}))
    with pytest.raises(ValueError, match="out of range") as from_console:
        console_for(la).load(str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        updates = handlers.import_spec(la, str(path))
    assert all(isinstance(u, type(handlers.gr.skip())) for u in updates)
    assert any("out of range" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="out of range") as from_api:
        la.catalog.components(la.catalog.parse_steering(path.read_text()))
    assert str(from_api.value) == str(from_console.value)
    spec = steering.SteeringSpec.from_dict(json.loads(path.read_text()))
    with pytest.raises(ValueError, match="out of range") as from_library:
        steering.spec_components(spec, steering.load_vectors(la.profile.vectors_path()))
    assert str(from_library.value) == str(from_console.value)
    from llm_steering.serving.middleware import RequestError

    with pytest.raises(RequestError) as from_server:
        server_components(spec, la.profile.vectors_path())
    assert from_server.value.status == 400 and from_server.value.message == str(from_console.value)


@pytest.mark.parametrize("n_words, n_turns", [(50, 0), (3000, 0), (400, 12)])
def test_app_and_console_send_the_model_the_same_input(loaded, monkeypatch, n_words, n_turns):
    from llm_steering.backends import Generation, Stream
    from llm_steering.backends.hooks import HooksBackend

    app, la = loaded
    system = la.profile.generation.system_prompt
    history = []
    for i in range(n_turns):
        history += [{"role": "user", "content": f"question {i} " + "lorem ipsum " * 60},
                    {"role": "assistant", "content": f"answer {i} " + "dolor sit " * 60}]
    message = " ".join(f"w{i}" for i in range(n_words)) + " Summarize the above in one sentence."
    app_chat, app_message = handlers.model_chat(la, system, history, message)

    seen = []

    def record(self, chat, comps, settings=None, cancel=None):
        seen.append(chat)
        return Stream(iter(["ok"]), Generation([]))

    monkeypatch.setattr(HooksBackend, "stream", record)  # the console's backend: what it is asked
    console = console_for(la, system)
    console.history = list(history)
    console.ask(message)
    assert seen == [app_chat]
    assert console.history[-2]["content"] == app_message
    assert len(steering.chat_input_ids(la.tokenizer, app_chat)) <= la.profile.generation.max_input_tokens
    assert app_message.endswith("Summarize the above in one sentence.")  # the question survives a cut


def test_fit_chat_is_bounded_for_hostile_sizes(embedded):
    _, tok = embedded
    with pytest.raises(ValueError, match=r"^the message is 2,000,000 characters; the limit is 200,000"):
        fit_chat(tok, "", [], "a" * 2_000_000, 2048)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}] * 10_000
    fitted = fit_chat(tok, "", history, "Hello?", 2048)
    assert fitted.dropped_messages >= 20_000 - chat_input.MAX_HISTORY_MESSAGES
    assert len(fitted.chat) <= chat_input.MAX_HISTORY_MESSAGES + 1


def test_a_preset_the_catalog_cannot_resolve_fails_at_start_up(embedded, tmp_path):
    model, tok = embedded
    profile = steering.load_config(ROOT / "demo.yaml").profile()
    (tmp_path / "demo.yaml").write_text(
        "profiles:\n  p:\n    model_id: null\n"
        f"    vectors_file: {profile.vectors_path()}\n"
        "    features:\n      - {name: pirate, feature: [15, null, 34.4], op: clamp}\n"
        "    presets:\n      - {name: Raw, features: [{key: '3:7', fraction: 0.2}]}\n"
    )
    with pytest.raises(ValueError, match=r"^preset 'Raw' in 'p': feature 3:7 is not in .* has no SAE") as info:
        Catalog.open(steering.load_config(tmp_path / "demo.yaml").profile(), model, tok)
    assert "\n" not in str(info.value)
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "app.py"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "STEERING_CONFIG": str(tmp_path / "demo.yaml")})
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith("app.py: preset 'Raw'")


def test_missing_vectors_file_names_the_right_command(tmp_path):
    cfg = steering.load_config(ROOT / "demo.yaml")
    sae = cfg.profile("llama31_8b")
    hint = catalog_module.vectors_hint(sae)
    assert hint.startswith("python extract_steering_vectors.py --sae-source andyrdt/saes-llama-3.1-8b-instruct")
    assert "--features 15:21576 19:93" in hint and "--model meta-llama/Llama-3.1-8B-Instruct" in hint
    assert "--contrastive concepts.yaml" in catalog_module.vectors_hint(cfg.profile("smollm2"))


def test_console_extracts_a_profiles_sae_features_when_its_vectors_file_is_missing(embedded, tmp_path):
    """`demo.py --profile <SAE profile>` without a vectors file works, as the app does."""
    import subprocess
    import sys

    model, _ = embedded
    d = steering.hidden_size(model)
    write_small_saelens_sae(tmp_path / "saes", 5, d, 8, seed=1)
    (tmp_path / "demo.yaml").write_text(
        "profiles:\n  sae:\n    model_id: null\n    vectors_file: not_made.pt\n"
        f"    sae_source: {tmp_path / 'saes'}\n    sae_format: saelens\n"
        "    features:\n      - {name: L5F2, feature: [5, 2, 30.0], op: clamp}\n"
    )
    out = subprocess.run([sys.executable, "demo.py", "--config", str(tmp_path / "demo.yaml"), "--prompt", "Hi",
                          "--steer", "L5F2", "0.3", "--max-new-tokens", "4", "--temperature", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() and not (tmp_path / "not_made.pt").exists()


def test_a_yaml_spec_in_any_key_order_is_read_as_a_spec(loaded):
    import yaml

    _, la = loaded
    spec = {"version": 1, "model_id": la.model_id, "format": "llm-steering/spec",
            "features": [{"key": "pirate", "fraction": 0.2}]}
    assert la.catalog.parse_steering(yaml.safe_dump(spec, sort_keys=True)).features == (
        steering.ActiveFeature("pirate", 0.2),)
    with pytest.raises(ValueError, match="preset name"):
        la.catalog.parse_steering("no such preset")


def test_features_have_human_names_and_demo_yaml_may_set_one(tmp_path):
    """Keys stay keys (eiffel_tower); what people read is a name (Eiffel Tower), or demo.yaml's label."""
    from llm_steering.config import load_config
    from llm_steering.core import human_name

    assert human_name("eiffel_tower") == "Eiffel Tower"
    assert human_name("15:21576") == "Feature 15:21576"
    text = (ROOT / "demo.yaml").read_text().replace("- name: pirate ", "- name: pirate\n        label: Pirates ahoy\n       ", 1)
    (tmp_path / "demo.yaml").write_text(text)
    profile = load_config(tmp_path / "demo.yaml").profile()
    assert profile.feature("pirate").label == "Pirates ahoy"
    with pytest.raises(ValueError, match="label must be a short string"):
        (tmp_path / "bad.yaml").write_text(text.replace("label: Pirates ahoy", "label: " + "x" * 61))
        load_config(tmp_path / "bad.yaml")
