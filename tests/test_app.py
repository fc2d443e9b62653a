"""The Space (app.py) on the embedded model: in a real browser, through gradio_client, and its helpers.

The app runs in a subprocess on a free localhost port, once for the module. The browser test
drives Debian's headless Chromium (/usr/bin/chromium, installed by tests/run.sh) with Playwright.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from llm_steering import chat_history, steering
from llm_steering.core import round_fraction
from llm_steering.web import handlers, views
from llm_steering.web.panel import GLOBAL

import pytest
import torch
from browser import app_page, bot_texts, download_export, running_app, wait_for
from conftest import write_small_saelens_sae
from test_web_page import answer_texts, open_effects, tags

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(default_app):
    return default_app


def _set_max_new_tokens(page, n: int) -> None:
    box = page.locator("#max-new-tokens input[type='number']")
    box.fill(str(n))
    box.press("Enter")
    page.wait_for_timeout(300)


def test_browser_preset_streaming_compare_stop(server, tmp_path):
    """Preset on, streamed answer, intensity view, compare mode side by side, Stop ends the generation."""
    url, log_path = server
    with app_page(url) as page:
        page.get_by_text("Advanced", exact=True).click()
        _set_max_new_tokens(page, 64)  # a loaded fresh-clone run saw a whole 24-token answer arrive in one draw

        # A preset switches its feature on, and the summary shows its absolute strength.
        page.locator("#preset").get_by_label("Eiffel Tower").check()
        wait_for(lambda: "Eiffel Tower" in page.locator("#summary").inner_text(), 10, "the preset's summary")
        assert page.get_by_role("checkbox", name="Eiffel Tower", exact=True).is_checked()
        # on the shipped profile a preset starts on auto (chosen per answer); a fixed strength is one click away
        assert "auto" in page.locator("#summary").inner_text()
        auto_box = page.locator("#catalog").get_by_label("auto strength").first
        assert auto_box.is_checked()
        auto_box.uncheck()
        wait_for(lambda: "at layer" in page.locator("#summary").inner_text(), 10, "the fixed strength in the summary")

        # Send: the answer streams in (several growing partial texts), then the intensity view fills.
        open_effects(page)
        page.locator("#msg textarea").fill("Tell me about your perfect weekend.")
        page.locator("#send").click()
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and page.locator("#effects .toks .tok").count() == 0:
            texts = bot_texts(page, "chat-steered")
            if texts and texts[-1].strip() and (not seen or texts[-1] != seen[-1]):
                seen.append(texts[-1])
            time.sleep(0.03)
        assert page.locator("#effects .toks .tok").count() > 0, "the effect view stayed empty"
        assert len(seen) >= 2, f"no streaming seen, only {seen!r}"
        assert len(seen[0]) < len(seen[-1]), seen  # (markdown may redraw a partial text shorter for a moment)
        assert "Eiffel Tower" in page.locator("#effects").inner_text()

        # Retry asks the same message again, in place of the last turn.
        _set_max_new_tokens(page, 24)
        page.locator("#retry").click()
        wait_for(lambda: page.locator("#effects .toks .tok").count() == 0, 20, "Retry to start a new answer")
        wait_for(lambda: page.locator("#effects .toks .tok").count() > 0, 60, "the retried answer")
        assert page.locator("#chat-steered [data-testid='user']").all_inner_texts() == ["Tell me about your perfect weekend."]
        assert len(bot_texts(page, "chat-steered")) == 2 and bot_texts(page, "chat-steered")[0].strip()  # answer, tag

        # Share: export the steering as JSON, import another spec (a gradio upload).
        name, body = download_export(page, "Export JSON")
        assert name == "steering.json"
        exported = json.loads(body)
        assert exported["format"] == "llm-steering/spec"
        preset = next(p for p in steering.load_config(ROOT / "demo.yaml").profile().presets if p.name == "Eiffel Tower")
        assert exported["features"] == [{"key": f.key, "fraction": f.fraction, "op": f.op} for f in preset.features]
        assert [f["key"] for f in exported["features"]] == ["eiffel_tower"]
        spec = steering.SteeringSpec(steering.EMBEDDED_MODEL_ID, (steering.ActiveFeature("pirate", 0.4, "add"),))
        steering.save_steering_spec(spec, tmp_path / "pirate.yaml")
        with page.expect_file_chooser() as chooser:
            page.locator("#import").click()
        chooser.value.set_files(str(tmp_path / "pirate.yaml"))
        wait_for(lambda: "Pirate · add · 0.40" in page.locator("#summary").inner_text(), 15, "the imported steering")
        assert page.get_by_role("checkbox", name="Pirate", exact=True).is_checked()
        assert not page.get_by_role("checkbox", name="Eiffel Tower", exact=True).is_checked()
        (tmp_path / "broken.json").write_text('{"format": "llm-steering/spec", "version": 1, "features": "x"}')
        with page.expect_file_chooser() as chooser:
            page.locator("#import").click()
        chooser.value.set_files(str(tmp_path / "broken.json"))
        page.get_by_text("Could not import broken.json").first.wait_for(timeout=15_000)
        assert "Traceback" not in page.content()
        assert page.get_by_role("checkbox", name="Pirate", exact=True).is_checked()  # unchanged

        # Compare mode: the unsteered answer streams beside the steered one; Stop ends both.
        page.locator("#compare").get_by_role("checkbox").check()
        page.locator("#chat-plain").wait_for(state="visible", timeout=10_000)
        _set_max_new_tokens(page, 400)
        page.locator("#msg textarea").fill("Write a long story about a dog who goes on a journey.")
        page.locator("#send").click()
        # The unsteered chat holds only unsteered answers: this one (the earlier answer was steered).
        wait_for(lambda: len(answer_texts(page, "chat-plain")) == 1 and answer_texts(page, "chat-plain")[-1].strip()
                  and len(answer_texts(page, "chat-steered")) == 2 and answer_texts(page, "chat-steered")[-1].strip(),
                  60, "both answers to start streaming")
        page.locator("#stop").click()
        wait_for(lambda: "generation threads ended" in log_path.read_text(), 20, "the server to end the generation")
        # The stopped answer's last update (its tag, after the effect view is computed) may take a while
        # on a loaded machine; then the browser may still be drawing updates sent before it: wait for
        # the tag, then until the chats settle.
        wait_for(lambda: len(tags(page)) == 2 and "stopped" in tags(page)[-1], 60, "the answer to be tagged as stopped")
        snapshots = [None]

        def settled() -> bool:
            snapshots.append((answer_texts(page, "chat-steered")[-1], answer_texts(page, "chat-plain")[-1]))
            return snapshots[-1] == snapshots[-2]

        wait_for(settled, 20, "the chats to stop changing", poll=0.7)
        stopped = snapshots[-1]
        page.wait_for_timeout(2000)
        assert (answer_texts(page, "chat-steered")[-1], answer_texts(page, "chat-plain")[-1]) == stopped
        assert len(stopped[0].split()) < 300, "the answer ran to the end: Stop did not stop it"
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        assert (tmp_path / "app.png").stat().st_size > 10_000

        page.locator("#clear").click()
        wait_for(lambda: not bot_texts(page, "chat-steered") and not bot_texts(page, "chat-plain"), 10, "Clear")


def test_gradio_client_chat_endpoint(server, embedded):
    """/chat answers like the steering module itself, with a preset's steering, and errors are one line."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, _ = server
    client = Client(url, verbose=False)
    msg = "Tell me about your weekend."
    settings = dict(temperature=0.0, repetition_penalty=1.1, max_new_tokens=16)
    steered = client.predict(msg, steering_spec="Eiffel Tower", api_name="/chat", **settings)
    plain = client.predict(msg, steering_spec="", api_name="/chat", **settings)

    config = steering.load_config(os.environ.get("STEERING_CONFIG") or ROOT / "demo.yaml")
    profile = config.profile()
    preset = next(p for p in profile.presets if p.name == "Eiffel Tower")
    vectors = steering.load_vectors(profile.vectors_path())
    comps = steering.spec_components(steering.SteeringSpec(steering.model_id_of(embedded[0]), preset.features), vectors)
    chat = [{"role": "system", "content": profile.generation.system_prompt}, {"role": "user", "content": msg}]
    model, tok = embedded
    assert steered == steering.generate_steered_answer_hf(model, tok, chat, comps, **settings)
    assert plain == steering.generate_steered_answer_hf(model, tok, chat, [], **settings)
    assert steered != plain

    # Two visitors at once, steered differently: each gets exactly their own answer.
    jobs = [client.submit(msg, steering_spec=s, api_name="/chat", **settings) for s in ("Eiffel Tower", "")]
    assert [job.result(timeout=60) for job in jobs] == [steered, plain]

    spec = steering.SteeringSpec(steering.model_id_of(model), preset.features).to_dict()
    assert client.predict(msg, steering_spec=json.dumps(spec), api_name="/chat", **settings) == steered
    with pytest.raises(AppError, match="preset name"):
        client.predict(msg, steering_spec="no such preset", api_name="/chat", **settings)


@pytest.fixture(scope="module")
def app_module():
    """app.py imported in this process, with its App loaded (the embedded model and the catalog)."""
    from llm_steering.web import app

    app.LOADED = app.LOADED or app.load_app()
    return app


def test_long_input_is_cut_with_a_warning(app_module):
    loaded = app_module.LOADED
    limit = loaded.profile.generation.max_input_tokens
    long_message = "word " * (limit + 50) + "What is this about?"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chat, message = handlers.model_chat(loaded, "You are a helpful assistant.", [], long_message)
    assert len(steering.chat_input_ids(loaded.tokenizer, chat)) <= limit
    assert chat[-1]["content"] == message and message.startswith("word") and message.endswith("What is this about?")
    assert any("middle were left out" in str(w.message) for w in caught), [str(w.message) for w in caught]
    history = [{"role": "user", "content": "hello " * (limit // 2)}, {"role": "assistant", "content": "ok"}] * 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chat, _ = handlers.model_chat(loaded, "", history, "Hi")
    assert len(steering.chat_input_ids(loaded.tokenizer, chat)) <= limit
    assert chat[-1] == {"role": "user", "content": "Hi"} and len(chat) < len(history) + 1
    assert any("oldest" in str(w.message) for w in caught)


def test_turns_the_model_and_the_unsteered_side_see(app_module):
    """"same" keeps only earlier turns made with this answer's steering; compare's unsteered side
    reads only unsteered answers; each answer is tagged with its steering."""
    loaded = app_module.LOADED
    pirate = loaded.catalog.preset_spec("Pirate")
    none = steering.SteeringSpec(loaded.model_id, ())
    turns = [{"user": "a", "answer": "A-pirate", "steering": pirate.to_dict(), "unsteered": None},
             {"user": "b", "answer": "B-plain", "steering": none.to_dict(), "unsteered": None},
             {"user": "c", "answer": "C-pirate", "steering": pirate.to_dict(), "unsteered": "C-plain"}]
    seen = chat_history.visible_chat(turns, none, "same")  # unsteered now: compare's unsteered answers count
    assert [m["content"] for m in seen.messages] == ["b", "B-plain", "c", "C-plain"] and seen.left_out == 1
    seen = chat_history.visible_chat(turns, pirate, "same")
    assert [m["content"] for m in seen.messages] == ["a", "A-pirate", "c", "C-pirate"] and seen.left_out == 1
    seen = chat_history.visible_chat(turns, none, "all")
    assert len(seen.messages) == 6 and seen.left_out == 0
    unsteered = chat_history.unsteered_chat(turns).messages
    assert [m["content"] for m in unsteered] == ["b", "B-plain", "c", "C-plain"]
    shown = handlers.turn_messages(loaded.catalog, turns)
    # each answer, then its tag as a plain-text message of its own (no markup for Copy or screen readers)
    assert [m["content"] for m in shown[:3]] == ["a", "A-pirate", "Pirate · clamp 0.20"]
    assert shown[5]["content"] == "no steering" and not any("<" in m["content"] for m in shown)
    assert [m["content"] for m in handlers.turn_messages(loaded.catalog, turns, unsteered=True)] == [
        "c", "C-plain", "no steering (compared)"]


def test_gradio6_message_content_and_steering_parsing(app_module):
    app, catalog = app_module, app_module.LOADED.catalog
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}], "metadata": None},
               {"role": "assistant", "content": "Hello"}]
    assert handlers.chat_messages(history) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert catalog.parse_steering("").features == ()
    preset = app.LOADED.profile.presets[0]
    assert catalog.parse_steering(preset.name).features == preset.features
    with pytest.raises(ValueError, match="preset name"):
        catalog.parse_steering("[1, 2]")
    with pytest.raises(ValueError, match="not a steering spec"):
        catalog.parse_steering('{"format": "other"}')
    other = steering.SteeringSpec("some/other-model", preset.features)
    with pytest.raises(ValueError, match="this chat runs"):
        catalog.components(other)


def test_sae_profile_without_vector_file_extracts_features_at_start_up(app_module, tmp_path):
    """The Space's path: a profile with an SAE source and no vector file gets its features and norms at start-up."""
    from llm_steering.catalog import Catalog

    import torch

    model, tok = app_module.LOADED.model, app_module.LOADED.tokenizer
    d_model = steering.hidden_size(model)
    w_dec = write_small_saelens_sae(tmp_path / "sae", 9, d_model, 8)
    (tmp_path / "demo.yaml").write_text(
        "profiles:\n"
        "  sae:\n"
        "    model_id: null\n"
        "    vectors_file: not_made_yet.pt\n"
        f"    sae_source: {tmp_path / 'sae'}\n"
        "    sae_format: saelens\n"
        "    reduced_strengths: true\n"
        "    features:\n"
        "      - {name: L9F3, description: a random feature, feature: [9, 3, 4.0], op: add}\n"
    )
    profile = steering.load_config(tmp_path / "demo.yaml").profile()
    (entry,) = Catalog.open(profile, model, tok).features
    assert not (tmp_path / "not_made_yet.pt").exists()
    assert torch.allclose(entry.vector.vector, w_dec[3] / w_dec[3].norm(), atol=1e-6)
    norm = steering.measure_layer_norms(model, tok, [9])[9]
    assert entry.norm == pytest.approx(norm)
    assert entry.default_fraction == pytest.approx(4.0 * 9 / norm)
    comp = entry.component(0.5, "add")
    assert (comp.layer, comp.op, comp.name) == (9, "add", "L9F3") and comp.strength == pytest.approx(0.5 * norm)


def test_import_refuses_files_the_controls_cannot_show(app_module, tmp_path):
    loaded = app_module.LOADED
    name = loaded.features[0].key
    good = steering.SteeringSpec(loaded.model_id, (steering.ActiveFeature(name, 0.25, "add"),), steer_prompt=False)
    steering.save_steering_spec(good, tmp_path / "good.json")
    *controls, preset, _file = handlers.import_spec(loaded, str(tmp_path / "good.json"))
    shown = loaded.panel.read(controls)  # the update of every control, by name
    assert [shown[f.key, "on"] for f in loaded.features] == [f.key == name for f in loaded.features]
    assert shown[name, "fraction"] == 0.25 and shown[name, "op"] == "add"
    assert [shown[f.key, "auto"] for f in loaded.features] == [False] * len(loaded.features)  # auto off
    assert shown[GLOBAL, "steer_prompt"] is False and preset is None  # no preset is this spec
    for spec in (steering.SteeringSpec(loaded.model_id, (steering.ActiveFeature(name, 5.0),)),
                 steering.SteeringSpec("other/model", (steering.ActiveFeature(name, 0.5),)),
                 steering.SteeringSpec(loaded.model_id, (steering.ActiveFeature("no_such_feature", 0.5),))):
        steering.save_steering_spec(spec, tmp_path / "bad.yaml")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            updates = handlers.import_spec(loaded, str(tmp_path / "bad.yaml"))
        assert all(isinstance(u, type(handlers.gr.skip())) for u in updates), updates
        assert any("Could not import" in str(w.message) for w in caught)


def alias_bomb(levels: int = 8) -> str:
    """About 340 bytes of YAML whose aliases expand 9x per level (9^8 strings at 8 levels)."""
    names = "abcdefghij"
    lines = ["format: llm-steering/spec", "a: &a [x,x,x,x,x,x,x,x,x]"]
    for i in range(1, levels + 1):
        lines.append(f"{names[i]}: &{names[i]} [" + ",".join([f"*{names[i - 1]}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_hostile_requests_get_short_errors_fast_and_the_app_keeps_serving(server):
    """Each visitor-controlled input is bounded before it is parsed or tokenized."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, _ = server
    client = Client(url, verbose=False)
    small = dict(temperature=0.0, max_new_tokens=4)
    spec_json = json.dumps({"format": "llm-steering/spec", "version": 1, "model_id": steering.EMBEDDED_MODEL_ID,
                            "features": [{"key": "pirate", "fraction": 0.2}] * 3, "pad": "x" * 70_000})
    hostile = {
        "alias bomb": dict(message="Hi", steering_spec=alias_bomb()),
        "2 MB message": dict(message="a" * 2_000_000),
        "spec over 64 kB": dict(message="Hi", steering_spec=spec_json),
        "NaN strength": dict(message="Hi", steering_spec=json.dumps(
            {"format": "llm-steering/spec", "version": 1, "model_id": steering.EMBEDDED_MODEL_ID,
             "features": [{"key": "pirate", "fraction": float("nan")}]})),
        "unknown feature": dict(message="Hi", steering_spec=json.dumps(
            {"format": "llm-steering/spec", "version": 1, "model_id": steering.EMBEDDED_MODEL_ID,
             "features": [{"key": "x" * 5000, "fraction": 0.2}]})),
    }
    assert len(alias_bomb().encode()) < 400
    for what, kwargs in hostile.items():
        t0 = time.monotonic()
        with pytest.raises(AppError) as info:
            client.predict(api_name="/chat", **small, **kwargs)
        took = time.monotonic() - t0
        message = str(info.value)
        assert took < 5, f"{what}: {took:.1f} s"
        assert len(message) < 300 and "\n" not in message.strip(), f"{what}: {message[:400]!r}"
    # A 20,000-message history is cut to its newest messages (documented) and answered.
    history = [{"role": "user", "content": f"message {i}"} if i % 2 == 0 else
               {"role": "assistant", "content": "ok"} for i in range(20_000)]
    t0 = time.monotonic()
    answer = client.predict("Say hi.", history=history, api_name="/chat", **small)
    # 8.7 s on 2 idle cores, 13 s with another job on them (the app's cut reads only the newest 200 messages;
    # the 20,000 go through gradio's client and server); a cut that re-tokenized growing prefixes takes hours
    assert answer.strip() and time.monotonic() - t0 < 30
    # ... and the app still answers normally.
    assert client.predict("Say hi.", api_name="/chat", **small).strip()


def test_browser_find_features_from_text_and_steer_one(tmp_path, embedded):
    """A profile with an SAE: the app lists the features a plain encoder ranks highest; a click steers one."""
    from llm_steering.saes import find as sae_find

    model, tok = embedded
    d = steering.hidden_size(model)
    write_small_saelens_sae(tmp_path / "saes", 3, d, 32, seed=7)
    shipped = steering.load_config(ROOT / "demo.yaml").profile()
    (tmp_path / "demo.yaml").write_text(
        f"profiles:\n  sae:\n    model_id: null\n    vectors_file: {shipped.vectors_path()}\n"
        f"    sae_source: {tmp_path / 'saes'}\n    sae_format: saelens\n"
        "    features:\n      - {name: pirate, feature: [15, null, 34.4], op: clamp}\n"
        "      - {name: L3F5, feature: [3, 5, 20.0], op: clamp}\n"
    )
    text = "The Eiffel Tower in Paris"
    expected = sae_find.find_features(str(tmp_path / "saes"), 3, text, model, tok, k=10, sae_format="saelens")
    assert expected
    with running_app(tmp_path / "server.log", STEERING_CONFIG=str(tmp_path / "demo.yaml")) as url, app_page(url) as page:
        page.get_by_text("Find features from text").click()
        page.locator("#find-text textarea").fill(text)
        page.locator("#find-btn").click()
        options = page.locator("#found label")
        wait_for(lambda: options.count() == len(expected), 30, "the found features")
        assert [t.split(" · ")[0] for t in options.all_inner_texts()] == [f.key for f in expected]
        options.first.click()
        wait_for(lambda: page.locator("#custom-key textarea, #custom-key input").first.input_value() == expected[0].key,
                  15, "the custom row to take the feature")
        wait_for(lambda: f"`{expected[0].key}`" in page.locator("#summary").inner_html()
                  or expected[0].key in page.locator("#summary").inner_text(), 15, "the summary")


def test_auto_chooses_how_to_steer_this_answer_then_goes_on_with_it(app_module, capsys):
    """The "auto" box beside a feature (issue 28): the candidates compared in one batch on the first words
    (calibrate.auto_answer), the answer is the chosen one's, and the tag and the turn's steering say which."""
    from llm_steering import calibrate

    la = app_module.LOADED
    feature = next(f for f in la.features if f.key == "pirate")
    controls = la.panel.pack({("pirate", "on"): True, ("pirate", "auto"): True})
    message, system = "Tell me about your weekend.", la.profile.generation.system_prompt
    mode = next(iter(handlers.HISTORY_MODES))
    *_, last = handlers.respond(la, message, [], system, 0.0, 1.1, 12, False, mode, "", *controls)
    shown = capsys.readouterr().out  # gr.Info outside a browser session prints its message
    chat = [{"role": "system", "content": system}, {"role": "user", "content": message}]
    expected = calibrate.auto_answer(la.model, la.tokenizer, chat, feature.component(feature.default_fraction),
                                     norm=feature.norm, max_new_tokens=12, repetition_penalty=1.1)
    turn = last[1][-1]
    cand = expected.chosen
    key = "pirate_learned" if cand.vector else "pirate"  # a learned direction kept: the spec names it
    assert turn["answer"] == expected.answer and turn["auto"] == key
    if cand.components:
        assert turn["steering"]["features"] == [{"key": key, "op": cand.components[0].op,
                                                 "fraction": round_fraction(feature.default_fraction * cand.multiplier)}]
        assert turn["steering"].get("steer_prompt", True) == cand.steer_prompt
    else:
        assert turn["steering"]["features"] == []
    assert f"Auto: Pirate {turn['auto_setting']} (compared {len(expected.table)} ways in" in shown
    assert f"(auto: {turn['auto_setting']})" in views.turn_messages(la.catalog, [turn])[-1]["content"]


def test_an_auto_answer_steered_by_the_learned_direction_says_so_and_its_link_steers_the_same(app_module, capsys, monkeypatch):
    """When auto keeps a row of the direction learned for the feature, the turn's spec names that vector
    (pirate_learned), not the feature at the same strength: the tag says it, and the spec, read back as a link
    or an export would be, gives the very answer."""
    from llm_steering import calibrate

    la = app_module.LOADED
    monkeypatch.setattr(calibrate, "pick_candidate",
                        lambda rows, **kw: next(i for i, r in enumerate(rows) if r.candidate.vector))  # the learned x1
    controls = la.panel.pack({("pirate", "on"): True, ("pirate", "auto"): True})
    message, system = "Tell me about your weekend.", la.profile.generation.system_prompt
    mode = next(iter(handlers.HISTORY_MODES))
    *_, last = handlers.respond(la, message, [], system, 0.0, 1.1, 12, False, mode, "", *controls)
    turn = last[1][-1]
    feature = la.catalog.resolve("pirate")
    assert turn["auto"] == "pirate_learned" and turn["auto_setting"] == "clamp, its learned direction, 1x its default"
    assert turn["steering"]["features"] == [{"key": "pirate_learned", "op": "clamp",
                                             "fraction": round_fraction(feature.default_fraction)}]
    assert f"Auto: Pirate {turn['auto_setting']} (compared 10 ways in" in capsys.readouterr().out
    tag = views.turn_messages(la.catalog, [turn])[-1]["content"]
    assert "Pirate (learned) · clamp" in tag and "(auto: clamp, its learned direction, 1x its default)" in tag, tag
    spec = steering.SteeringSpec.from_dict(json.loads(json.dumps(turn["steering"])))
    comps = la.catalog.components(spec)
    assert torch.equal(comps[0].vector, la.catalog.vectors.get("pirate_learned").vector)
    chat = [{"role": "system", "content": system}, {"role": "user", "content": message}]
    def answer(components):
        return "".join(steering.stream_steered_answer_hf(la.model, la.tokenizer, chat, components, max_new_tokens=12,
                                                         temperature=0.0, repetition_penalty=1.1))

    assert answer(comps) == turn["answer"]
    assert answer([feature.component(feature.default_fraction)]) != turn["answer"]  # the feature's own vector: another answer


def test_a_long_auto_answer_lets_go_after_the_judged_words_and_says_so(app_module, capsys, monkeypatch):
    """Past the 48 judged tokens the chosen steering lets go (calibrate.AUTO_LET_GO): the app's answer is the
    library's, and the tag and the notice say where it let go (that letting go changes an answer:
    tests/test_auto.py)."""
    from llm_steering import calibrate

    la = app_module.LOADED
    monkeypatch.setattr(calibrate, "pick_candidate", lambda rows, **kw: 1)  # the op x1, prompt steered
    feature = la.catalog.resolve("pirate")
    controls = la.panel.pack({("pirate", "on"): True, ("pirate", "auto"): True})
    message, system = "Tell me about your weekend.", la.profile.generation.system_prompt
    mode = next(iter(handlers.HISTORY_MODES))
    *_, last = handlers.respond(la, message, [], system, 0.0, 1.1, 52, False, mode, "", *controls)
    turn = last[1][-1]
    chat = [{"role": "system", "content": system}, {"role": "user", "content": message}]
    expected = calibrate.auto_answer(la.model, la.tokenizer, chat, feature.component(feature.default_fraction),
                                     norm=feature.norm, max_new_tokens=52, repetition_penalty=1.1)
    assert expected.let_go_at == calibrate.AUTO_JUDGE_TOKENS and len(expected.token_ids) > expected.let_go_at
    assert turn["answer"] == expected.answer
    assert turn["auto_setting"] == "clamp, 1x its default, let go after its first 48 tokens"
    assert f"Auto: Pirate {turn['auto_setting']} (compared" in capsys.readouterr().out
    assert "let go after its first 48 tokens" in views.turn_messages(la.catalog, [turn])[-1]["content"]


def test_auto_never_chooses_a_strength_outside_the_sliders_range(app_module, capsys):
    """Auto's candidates are multiples of the strength set (up to 4x): at 1.2 of pirate's norm, 1.8x or a
    release at 2-4x would be past the slider's 2.0, a spec the tag showed as "no steering". Those are left
    out; the turn's steering stays in range and its tag names the feature."""
    la = app_module.LOADED
    lo, hi = la.catalog.fraction_range(la.catalog.resolve("pirate"))
    assert hi == 2.0
    controls = la.panel.pack({("pirate", "on"): True, ("pirate", "auto"): True, ("pirate", "fraction"): 1.2})
    mode = next(iter(handlers.HISTORY_MODES))
    *_, last = handlers.respond(la, "Tell me about your weekend.", [], "", 0.0, 1.1, 6, False, mode, "", *controls)
    turn = last[1][-1]
    shown = capsys.readouterr().out
    # the unsteered answer, x1 and x1.1, and the learned direction at x1, x0.6, x1.4, x1.1 and x1.2 (not x2 or x3)
    assert "(compared 8 ways in" in shown, shown
    for f in turn["steering"]["features"]:
        assert lo <= f["fraction"] <= hi, turn["steering"]
    tag = views.turn_messages(la.catalog, [turn])[-1]["content"]
    assert "no steering" not in tag or not turn["steering"]["features"], tag


def test_features_that_together_break_the_text_are_named_from_the_curves(app_module):
    """Issue 21: each feature uses up strength / (where its measured curve crosses the quality bar);
    past 1 in all a warning names the features to lower. Synthetic curves in the file's schema."""
    la = app_module.LOADED
    cats, coffee = (next(f for f in la.features if f.key == k) for k in ("cats", "coffee"))
    curves = {k: [{"fraction": 0.2, "mention_rate": 0.5, "nll_ratio": 1.5, "rep3": 0.0},
                  {"fraction": 0.6, "mention_rate": 0.9, "nll_ratio": 3.5, "rep3": 0.1}] for k in ("cats", "coffee")}
    assert abs(views.break_fraction(cats, cats.default_op, curves) - 0.4) < 1e-9  # 1.5 -> 3.5 crosses 2.5 at 0.4
    assert views.break_fraction(cats, "clamp" if cats.default_op == "add" else "add", curves) == 2 * cats.default_fraction

    def spec(cats_at: float, coffee_at: float) -> steering.SteeringSpec:
        return la.catalog.spec({"cats": (cats_at, cats.default_op), "coffee": (coffee_at, coffee.default_op)})

    assert views.break_warning(la.catalog, spec(0.15, 0.15), curves) is None  # 0.375 + 0.375 of the way
    warning = views.break_warning(la.catalog, spec(0.3, 0.15), curves)  # 0.75 + 0.375
    assert warning and warning.startswith("Together") and warning.endswith("lower Cats."), warning
    assert views.break_warning(la.catalog, spec(0.45, 0.45), curves).endswith("lower Cats, Coffee.")  # both must come down
    assert "\n" not in warning and views.break_warning(la.catalog, spec(0.15, 0.15), {}) is None


def test_strength_words_say_only_what_the_curve_measured_and_else_compare_with_the_default(app_module):
    """Within a measured curve: fluent or not, and in how many answers the concept is named; whether answers
    still answer only where the curve records it ("addresses"/"tint"); never "clear"/"strong"."""
    from llm_steering.web.views import strength_label

    pirate = next(f for f in app_module.LOADED.features if f.key == "pirate")
    curve = {"pirate": [{"fraction": 0.1, "mention_rate": 0.1, "nll_ratio": 1.5, "rep3": 0.0},
                        {"fraction": 0.2, "mention_rate": 0.5, "nll_ratio": 1.8, "rep3": 0.0},
                        {"fraction": 0.3, "mention_rate": 0.9, "nll_ratio": 3.5, "rep3": 0.1}]}
    assert [strength_label(pirate, f, "clamp", curve) for f in (0.0, -0.2, 0.1, 0.2, 0.24, 0.3)] == [
        "off", "away from it", "fluent; named in few answers", "fluent; named in about half of the answers",
        "fluent; named in most answers", "breaks the text"]
    answered = {"pirate": [{**p, "addresses": a} for p, a in zip(curve["pirate"], (0.9, 0.4, 0.1), strict=True)]}
    assert strength_label(pirate, 0.1, "clamp", answered) == "fluent; named in few answers; most answers still answer the question"
    assert strength_label(pirate, 0.2, "clamp", answered).endswith("; about half of the answers still answer the question")
    tinted = {"pirate": [{**p, "tint": 0.2} for p in curve["pirate"]]}
    assert strength_label(pirate, 0.2, "clamp", tinted).endswith("; few answers name it and still answer the question")
    # beyond the measured fractions, another op, or no curve: only how it compares with the default (0.2)
    assert strength_label(pirate, 0.8, "clamp", curve) == "likely breaks the text"
    assert [strength_label(pirate, f, "add", curve) for f in (0.1, 0.2, 0.3, 0.4)] == [
        "weaker than its default", "about its default", "stronger than its default", "likely breaks the text"]
    assert strength_label(pirate, 0.2, "clamp", {}) == "about its default"
    shipped = [strength_label(f, f.default_fraction) for f in app_module.LOADED.features]
    assert all(word.startswith("fluent; named in ") for word in shipped), shipped
    assert not any(w in word for word in shipped for w in ("clear", "strong", "subtle"))


def test_how_it_works_states_the_loaded_models_ranges(app_module):
    """The "How it works" text states this model's defaults and where its measured curves break the text,
    computed from the profile and strength_curves.json (not another model's "around 0.5"); without curves,
    it says there are none."""
    from llm_steering.web import views

    catalog = app_module.LOADED.catalog
    text = views.how_it_works(catalog)
    defaults = [f.default_fraction for f in catalog.features]
    assert f"the features' defaults are {min(defaults):.2f} to {max(defaults):.2f}." in text
    breaks = [b for f in catalog.features if (b := views.measured_break(views.measured_curve(f, f.default_op, views.strength_curves())))]
    assert breaks and f"For {len(breaks)} of its {len(defaults)} features the text stops reading fluently from about " \
        f"{min(breaks):.2f} to {max(breaks):.2f} (measured on 42 prompts)." in text
    assert max(breaks) < 0.5 and "0.5" not in text and "creeps" not in text
    assert "not whether the answer still answers the question." in text
    bare = views.how_it_works(catalog, curves={})
    assert "No strength curve was measured for this model" in bare and "stops reading fluently" not in bare


def test_the_keep_the_norm_box_steers_with_the_norm_preserving_op_and_round_trips(app_module):
    """A per-feature control added in one place (panel.FEATURE_CONTROLS): ticking "keep the norm"
    makes the feature's op clamp_keepnorm; an import of such a spec ticks the box again."""
    la = app_module.LOADED
    pirate = next(f for f in la.features if f.key == "pirate")
    values = la.panel.read(la.panel.pack({("pirate", "on"): True, ("pirate", "op"): "clamp", ("pirate", "keepnorm"): True}))
    spec = handlers.spec_from_controls(la, values)
    assert [(f.key, f.op) for f in spec.features] == [("pirate", "clamp_keepnorm")]
    (comp,) = la.catalog.components(spec)
    assert comp.op == "clamp_keepnorm" and comp.strength == pytest.approx(spec.features[0].fraction * pirate.norm)
    ids = torch.tensor([steering.chat_input_ids(la.tokenizer, [{"role": "user", "content": "Tell me about your weekend."}])])
    with steering.steer(la.model, [comp]):
        kept = la.model(ids).logits
    with steering.steer(la.model, [comp.with_op("clamp")]):
        plain = la.model(ids).logits
    assert (kept - plain).abs().max() > 1e-2  # the box changes what the model computes
    shown = la.panel.read(handlers.controls_update(la, spec))
    assert (shown["pirate", "on"], shown["pirate", "op"], shown["pirate", "keepnorm"]) == (True, "clamp", True)
    shown = la.panel.read(handlers.controls_update(la, handlers.spec_from_controls(la, la.panel.read(la.panel.pack(
        {("pirate", "on"): True})))))
    assert shown["pirate", "keepnorm"] is False


def test_a_profile_with_generation_auto_ticks_auto_for_features_and_presets(app_module):
    """demo.yaml's embedded profile says `auto: true` (issue 28): every auto box starts ticked, a preset
    ticks its features' boxes, a file's or a link's spec keeps its strengths (auto off)."""
    from llm_steering.config import load_config

    la = app_module.LOADED
    assert load_config(Path(__file__).resolve().parent.parent / "demo.yaml").profile().generation.auto is True
    from llm_steering.web.panel import CUSTOM, ControlPanel

    panel = ControlPanel(la.features, auto=True)
    defaults = panel.defaults()
    assert all(defaults[f.key, "auto"] for f in la.features) and defaults[CUSTOM, "auto"]
    assert not any(ControlPanel(la.features).defaults()[f.key, "auto"] for f in la.features)
    spec = la.catalog.preset_spec("Pirate")
    ticked = dict(zip(la.panel.names, handlers.controls_update(la, spec, auto=True), strict=True))
    assert ticked["pirate", "auto"] is True and ticked["eiffel_tower", "auto"] is False
    kept = dict(zip(la.panel.names, handlers.controls_update(la, spec), strict=True))
    assert kept["pirate", "auto"] is False
