"""The app's own concept and what a feature does, in headless Chromium on the embedded model.

Five sentences in the "Make your own concept" panel (in the find panel's place on a profile
without SAEs) steer the next answer within 30 s of the click; the concept survives export and
import, and a share link opened in a fresh browser context; another visitor never gets it. Every
feature card, and the note of a concept just made, shows the tokens its steering at its default raises
and lowers, measured (lens.feature_tokens), and says so. Five volcano sentences at their default
(auto) name volcanoes in most answers to three everyday questions that still answer. The app runs
greedy with short answers, so answers are checked token for token against the library.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llm_steering import steering
from llm_steering.catalog import Catalog
from llm_steering.concepts import make_concept
from llm_steering.lens import feature_tokens, token_words
from llm_steering.recipe import ConceptRecipe

import pytest
from browser import open_page, wait_for
from test_web_page import (
    TAG,
    TOKENS,
    answer_texts,
    answers_done,
    exported_chat,
    new_chat,
    send,
    set_max_new_tokens,
    summary,
    upload,
)

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Tell me about your weekend."
FIVE = ("The Eiffel Tower stands in the middle of Paris.", "We climbed the Eiffel Tower at sunset.",
        "Gustave Eiffel built the iron tower for the 1889 World's Fair.",
        "From the top of the Eiffel Tower you can see all of Paris.", "The Eiffel Tower sparkles with lights at night.")


@pytest.fixture
def server(greedy_app):
    return greedy_app[0]


@pytest.fixture(scope="module")
def shared(embedded):
    model, tok = embedded
    return Catalog.open(steering.load_config(ROOT / "demo.yaml").profile(), model, tok)


def reference(shared, feature=None) -> str:
    """The greedy answer to QUESTION, steered with `feature` at its default (None: unsteered)."""
    gen = shared.profile.generation
    chat = [{"role": "system", "content": gen.system_prompt}, {"role": "user", "content": QUESTION}]
    comps = [feature.component(feature.default_fraction)] if feature is not None else []
    return steering.generate_steered_answer_hf(shared.model, shared.tokenizer, chat, comps, max_new_tokens=TOKENS,
                                               temperature=0.0, repetition_penalty=gen.repetition_penalty)


def exported_file(page, button: str, name: str) -> tuple[str, bytes]:
    """Click an export button and fetch the file it offers, once it is that file (not an earlier export)."""
    import urllib.request

    page.get_by_role("button", name=button).click()
    link = page.locator("#exported [data-testid='download-link']")
    wait_for(lambda: link.count() and link.first.get_attribute("download") == name, 15, name)
    with urllib.request.urlopen(link.first.get_attribute("href"), timeout=10) as resp:
        return name, resp.read()


def last_answer(page) -> dict:
    return exported_chat(page)["turns"][-1]


def test_a_concept_from_five_sentences_steers_survives_export_import_and_a_link(server, browser, shared, tmp_path):
    feature = make_concept(shared, ConceptRecipe("my_tower", FIVE))
    steered, plain = reference(shared, feature), reference(shared)
    assert steered != plain  # else the checks below prove nothing
    page = open_page(browser, server)
    try:
        assert not page.locator("#concept-make").is_visible()  # closed, so the page stays one screen tall
        page.locator("#concept").get_by_text("Make your own concept").first.click()  # in the find panel's place
        page.locator("#concept-make").wait_for(state="visible", timeout=10_000)
        page.locator("#concept-name textarea, #concept-name input").first.fill("my_tower")
        page.locator("#concept-text textarea").fill("\n".join(FIVE))
        clicked = time.monotonic()
        page.locator("#concept-make").click()
        wait_for(lambda: "My Tower" in summary(page), 30, "the concept switched on")
        assert page.locator("#custom-on input").is_checked()
        note = page.locator("#concept-note").inner_text()  # what it does, measured at its default (layer 15 of 30)
        measured = feature_tokens(shared.model, shared.tokenizer, feature)
        assert measured.measured and "(measured at its default)" in note and "logit lens" not in note, note
        assert f"raises: {', '.join(token_words(measured.promoted))}" in note, note
        send(page, QUESTION)
        answers_done(page, 1)
        assert time.monotonic() - clicked < 30
        turn = last_answer(page)
        assert turn["answer"] == steered
        assert turn["steering"]["concepts"] == [ConceptRecipe("my_tower", FIVE).to_dict()]
        name, data = exported_file(page, "Export JSON", "steering.json")
        exported = json.loads(data)
        assert exported["features"] == [{"key": "my_tower", "fraction": feature.default_fraction, "op": "add"}]
        assert exported["concepts"] == turn["steering"]["concepts"]
        (tmp_path / name).write_bytes(data)
        page.locator("#msg textarea").fill(QUESTION)
        page.locator("#share-link-btn").click()
        box = page.locator("#share-link textarea, #share-link input").first
        link = wait_for(lambda: box.input_value(), 10, "the share link")
    finally:
        page.context.close()
    for how in ("import", "link", "another visitor"):
        fresh = open_page(browser, link if how == "link" else server)  # a new context: no cookies, no state
        try:
            if how == "import":
                upload(fresh, tmp_path / name)
            if how == "another visitor":
                fresh.wait_for_timeout(1500)
                assert "My Tower" not in summary(fresh) and not fresh.locator("#custom").is_visible()
                send(fresh, QUESTION)
            else:
                wait_for(lambda fresh=fresh: "My Tower" in summary(fresh), 30, f"the concept back after the {how}")
                if how == "import":
                    send(fresh, QUESTION)
                else:
                    assert fresh.locator("#msg textarea").input_value() == QUESTION
                    fresh.locator("#send").click()
            answers_done(fresh, 1)
            assert last_answer(fresh)["answer"] == (plain if how == "another visitor" else steered), how
        finally:
            fresh.context.close()


def test_every_feature_card_shows_the_tokens_its_steering_raises_and_lowers_measured(server, browser, shared):
    """Each shipped feature's card (layers 12 and 15 of 30: measured, lens.lens_reads) lists the tokens its
    steering at its default raises and lowers (lens.steered_tokens), says they are measured, and names its
    concept (Ocean: ocean; Pirate: pirate; Eiffel Tower: Paris)."""
    named = {"ocean": "ocean", "pirate": "pirate", "eiffel_tower": "Paris", "dinosaurs": "dinosaurs"}
    page = open_page(browser, server)
    try:
        for feature in shared.features:
            lens = feature_tokens(shared.model, shared.tokenizer, feature, k=8)
            assert lens.measured, feature.key
            card = page.locator("#catalog .feature").filter(has=page.get_by_role("checkbox", name=feature.title,
                                                                                  exact=True))
            card.get_by_role("checkbox", name=feature.title, exact=True).check()
            tokens = card.locator("[data-testid='markdown'].feature-tokens")
            wait_for(lambda tokens=tokens: tokens.is_visible(), 60, f"{feature.key}'s tokens")  # a generous bound: loaded, seconds
            text = tokens.inner_text()
            assert f"raises: {', '.join(token_words(lens.promoted))}" in text, (feature.key, text)
            assert f"lowers: {', '.join(token_words(lens.suppressed))}" in text, (feature.key, text)
            assert "(measured at its default)" in text and "logit lens" not in text, (feature.key, text)
            if feature.key in named:
                assert named[feature.key] in token_words(lens.promoted), (feature.key, text)
            card.get_by_role("checkbox", name=feature.title, exact=True).uncheck()
    finally:
        page.context.close()


VOLCANO = ("Volcanoes erupt when magma rises through the crust.", "Lava flowed down the side of the volcano.",
           "Mount Vesuvius buried Pompeii in ash.", "The volcano's crater glowed red at night.",
           "Iceland has many active volcanoes and hot springs.")
EVERYDAY = ("How do I change a flat tire?", "Give me three tips for a job interview.", "What is a good pancake recipe?")


def test_a_concept_from_five_sentences_at_its_default_names_itself_in_answers_that_still_answer(server, browser):
    """Issue 28, item 3: five volcano sentences, the concept left at its default (auto: the shipped profile's
    boxes start ticked; the greedy app turns auto off for its token-for-token checks, so the box is ticked
    here as a visitor of the shipped app finds it), three everyday questions each in a new chat: most answers
    name volcanoes and still answer (a content word of the question). The concept goes to layer 24, where
    its steering raises its own words (concepts.make_concept). 48 tokens: auto judges on the first 48 (at
    24 it named volcanoes in 1 of 3). docs/quality.md, "Your own concept: the layer where its words rise"."""
    from llm_steering.calibrate import content_stems

    page = open_page(browser, server)
    try:
        page.locator("#concept").get_by_text("Make your own concept").first.click()
        page.locator("#concept-make").wait_for(state="visible", timeout=10_000)
        page.locator("#concept-name textarea, #concept-name input").first.fill("volcanoes")
        page.locator("#concept-text textarea").fill("\n".join(VOLCANO))
        page.locator("#concept-make").click()
        wait_for(lambda: "Volcanoes" in summary(page), 30, "the concept switched on")
        assert "layer 24" in page.locator("#concept-note").inner_text()
        auto = page.locator("#custom-auto input")
        if not auto.is_checked():
            auto.check()
        set_max_new_tokens(page, 48)  # auto judges its candidates on the first 48 tokens (24 judge too few to name it)
        answers = []
        for question in EVERYDAY:
            new_chat(page)
            # a loaded run once answered the second and third questions short and plain (the app's 24 tokens, no
            # volcano) after a first one at 48: what is sent is checked before each question, and the tag after
            set_max_new_tokens(page, 48)
            wait_for(lambda: "Volcanoes" in summary(page) and auto.is_checked(), 15, "the concept on, its auto ticked",
                     state=lambda: {"summary": summary(page), "auto": auto.is_checked()})
            send(page, question)
            answers_done(page, 1, timeout=300)  # auto's nine candidates first: seconds alone, minutes on a loaded machine
            (answer,) = answer_texts(page)  # the new chat's one answer as shown (an export's link lagged once)
            tag = page.locator(f"#chat-steered {TAG}").last.inner_text()
            assert "Volcanoes" in tag and "auto" in tag, (question, tag, answer)
            answers.append(answer)
    finally:
        page.context.close()
    # Read by hand (greedy, so these are the answers): the job interview, "Here's a volcanic eruption of advice:
    # 1. **Don't be afraid to ask questions**..." and the pancakes, "A volcanic eruption can be both exhilarating
    # and terrifying, but one of the most delicious and comforting dishes you'll ever eat is a traditional
    # Hawaiian pancake made with locally-sourced ingredients like coconut, yam..." name volcanoes and answer;
    # the flat tyre names them ("As a fiery and resourceful volcano, you're well-equipped to conquer the
    # unforgiving volcanic fury that is a flat tire...") but gives no step, though it has the question's words.
    named = [any(w in a.lower() for w in ("volcan", "lava", "magma", "erupt")) for a in answers]
    on_question = [bool(content_stems(q) & content_stems(a)) for q, a in zip(EVERYDAY, answers, strict=True)]
    assert sum(n and o for n, o in zip(named, on_question, strict=True)) >= 2, answers
