"""The app's page as a newcomer meets it: importing, long messages, the effect view, tags, strengths,
retry, stop, layout, then the whole path, in headless Chromium at 1440x900 and at a 390x844 phone size.

The app runs greedy (temperature 0) with short answers from a copy of demo.yaml, so answers
can be checked token for token against the steering module. Screenshots of the newcomer path
go to tests/screenshots/ (ignored by git; the README's pictures are taken from there).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

from llm_steering import steering
from llm_steering.core import human_name

import pytest
from browser import DESKTOP, PHONE, TOKENS, greedy_config, open_page, running_app, wait_for

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "tests" / "screenshots"
QUESTION = "What should I cook for dinner tonight?"
LONG_QUESTION = "Summarize the above in one sentence."
TAG = ".message.thought [data-testid='bot']"  # an answer's steering tag: the plain message after it


@pytest.fixture
def server(greedy_app):
    return greedy_app


@pytest.fixture
def page(server, browser):
    page = open_page(browser, server[0])
    yield page
    page.context.close()


def profile():
    return steering.load_config(ROOT / "demo.yaml").profile()


def expected_answer(embedded, chat: list[dict], steers: list[tuple[str, float, str]] = ()) -> str:
    """The greedy answer the steering module gives to `chat` (system prompt first) with `steers`."""
    model, tok = embedded
    prof = profile()
    vectors = steering.load_vectors(prof.vectors_path())
    comps = [vectors.component(key, fraction, op=op) for key, fraction, op in steers]
    full = [{"role": "system", "content": prof.generation.system_prompt}, *chat]
    return steering.generate_steered_answer_hf(model, tok, full, comps, max_new_tokens=TOKENS, temperature=0.0,
                                               repetition_penalty=prof.generation.repetition_penalty)


def feature(page, title: str):
    return page.get_by_role("checkbox", name=title, exact=True)


def summary(page) -> str:
    return page.locator("#summary").inner_text()


def toast_texts(page) -> list[str]:
    return page.locator(".toast-body, [data-testid='toast-body']").all_inner_texts()


def send(page, text: str) -> None:
    page.locator("#msg textarea").fill(text)
    page.locator("#send").click()


def answers_done(page, n: int, chat: str = "chat-steered", timeout: float = 90) -> int:
    """Wait until the chat holds `n` finished answers (a finished answer shows its steering tag); a timeout
    says what the chat, the message box and the toasts showed instead."""
    def state() -> dict:
        return {"chat": page.locator(f"#{chat}").inner_text()[-600:], "message box": page.locator("#msg textarea").input_value(),
                "toasts": toast_texts(page)}

    wait_for(lambda: page.locator(f"#{chat} {TAG}").count() >= n, timeout,
             f"{n} finished answers in #{chat}", state=state)
    return n


def new_chat(page) -> None:
    """Click New chat and wait until its answer is back: it empties the message box and cancels a running
    answer, so a message sent before it lands is wiped or its answer cancelled (a CI run waited 300 s for an
    answer to a question sent right after the click). Text in the box first makes the emptying visible."""
    box = page.locator("#msg textarea")
    box.fill("(new chat)")
    page.locator("#clear").click()
    wait_for(lambda: box.input_value() == "" and page.locator(f"#chat-steered {TAG}").count() == 0, 15, "a new chat",
             state=lambda: {"message box": box.input_value(), "answers": page.locator(f"#chat-steered {TAG}").count()})


def open_effects(page) -> None:
    """Unfold the effect view (folded by default: the chat already shows the answer)."""
    if not page.locator("#effects").is_visible():
        page.locator("#effects-acc").get_by_text("Colour the last answer", exact=False).first.click()
        page.locator("#effects").wait_for(state="visible", timeout=10_000)


def answer_texts(page, chat: str = "chat-steered") -> list[str]:
    """The answers, without their tags (each tag is the plain message after its answer)."""
    return page.locator(f"#{chat} .message:not(.thought) > [data-testid='bot']").all_inner_texts()


def exported_chat(page) -> dict:
    """The chat as the Export chat button writes it. An earlier export's link stays on the page until the new
    file replaces it (seconds on a loaded machine: a test once read the previous chat's answer from it), so
    this waits for a link other than the one before the click; the same link after 20 s means the same file
    (the chat did not change)."""
    if not page.locator("#export-chat").is_visible():
        page.locator("#share-acc").get_by_text("Share", exact=False).first.click()
    link = page.locator("#exported [data-testid='download-link']")
    before = link.first.get_attribute("href") if link.count() else None
    page.locator("#export-chat").click()
    wait_for(lambda: link.count() and (link.first.get_attribute("download") or "").startswith("chat"), 15, "the chat file")
    deadline = time.monotonic() + 20
    while link.first.get_attribute("href") == before and time.monotonic() < deadline:
        time.sleep(0.2)
    with urllib.request.urlopen(link.first.get_attribute("href"), timeout=10) as resp:
        return json.loads(resp.read())


def tags(page, chat: str = "chat-steered") -> list[str]:
    return page.locator(f"#{chat} {TAG}").all_inner_texts()


def upload(page, path: Path) -> None:
    page.locator("#share-acc").get_by_text("Share", exact=False).first.click() if not page.locator("#import").is_visible() else None
    with page.expect_file_chooser() as chooser:
        page.locator("#import").click()
    chooser.value.set_files(str(path))


def open_advanced(page) -> None:
    if not page.locator("#max-new-tokens").is_visible():
        page.get_by_text("Advanced", exact=True).click()


def set_max_new_tokens(page, n: int) -> None:
    open_advanced(page)
    box = page.locator("#max-new-tokens input[type='number']")
    # the slider takes the value once the box commits it: a fixed pause once let a loaded run send 24 tokens.
    # Typed again if it has not taken it after a while: a loaded run once lost the Enter while the page redrew
    # after a concept was made.
    slider = page.locator("#max-new-tokens input[type='range']")
    for _ in range(6):  # 30 s in all
        box.fill(str(n))
        box.press("Enter")
        box.blur()
        if wait_for_quietly(lambda: slider.input_value() == str(n), 5):
            return
    pytest.fail(f"the max new tokens slider never took {n}: it shows {slider.input_value()}")


def wait_for_quietly(predicate, timeout: float) -> bool:
    """Whether `predicate` turns true within `timeout` seconds (polled); False where wait_for would fail."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


# ---------------------------------------------------------------------------
# One behaviour of the page each
# ---------------------------------------------------------------------------


def test_import_moves_the_preset_radio_and_none_switches_off(page, tmp_path):
    pirate = next(p for p in profile().presets if p.name == "Pirate")
    steering.save_steering_spec(steering.SteeringSpec(steering.EMBEDDED_MODEL_ID, pirate.features), tmp_path / "p.json")
    upload(page, tmp_path / "p.json")
    wait_for(lambda: page.locator("#preset").get_by_label("Pirate").is_checked(), 15, "the Pirate preset to be selected")
    two = steering.SteeringSpec(steering.EMBEDDED_MODEL_ID, (steering.ActiveFeature("cats", 0.3, "add"),
                                                            steering.ActiveFeature("ocean", 0.1, "clamp")))
    steering.save_steering_spec(two, tmp_path / "two.json")
    upload(page, tmp_path / "two.json")
    wait_for(lambda: feature(page, "Cats").is_checked() and feature(page, "Ocean").is_checked(), 15, "the import")
    assert not page.locator("#preset").get_by_label("None").is_checked()
    assert not page.locator("#preset").get_by_label("Pirate").is_checked()
    page.locator("#preset").get_by_label("None").check()
    wait_for(lambda: not feature(page, "Cats").is_checked() and not feature(page, "Ocean").is_checked(), 15,
             "None to switch the imported features off")
    wait_for(lambda: "none" in summary(page).lower(), 10, "the summary to say no steering")


def test_a_long_message_is_shown_as_typed_keeps_its_question_and_shows_progress(page):
    filler = "The quick brown fox jumps over the lazy dog near the river bank. " * 320
    message = filler[: 20_000 - len(LONG_QUESTION) - 1] + " " + LONG_QUESTION
    send(page, message)
    toasts: list[str] = []

    def progress() -> list[str]:
        toasts.extend(toast_texts(page))
        return [t for t in page.locator("#chat-steered [data-testid='bot']").all_inner_texts() if "Reading your message" in t]

    note = wait_for(progress, 30, "a progress note while the prompt is read")
    assert re.search(r"Reading your message \([\d,]+ tokens\)", note[0]), note
    # The notice of what the model did not read: seen while the prompt is read or the answer written.
    wait_for(lambda: toasts.extend(toast_texts(page)) or any("left out" in t for t in toasts)
             or page.locator(f"#chat-steered {TAG}").count() >= 1, 90, "the notice or the answer")
    toasts.extend(toast_texts(page))
    assert any("left out" in t for t in toasts), toasts
    answers_done(page, 1)
    shown = page.locator("#chat-steered [data-testid='user']").all_inner_texts()[-1]
    assert shown.strip().endswith(LONG_QUESTION)
    assert len(shown.strip()) >= len(message) - 50, "the chat shows a cut message, not what was typed"


def test_the_effect_view_reads_right_for_a_newcomer(page):
    feature(page, "Cats").check()
    wait_for(lambda: "Cats" in summary(page), 10, "the summary")
    send(page, QUESTION)
    answers_done(page, 1)
    open_effects(page)
    view = page.locator("#effects")
    wait_for(lambda: view.locator(".tok").count() > 0, 20, "the effect view")
    text = view.inner_text()
    assert "Cats" in text and "more likely" in text
    for jargon in ("max |", "norm", "projection", "cats ·"):
        assert jargon not in text, jargon
    styles = [s or "" for s in view.locator(".tok").evaluate_all("els => els.map(e => e.getAttribute('style'))")]
    orange = sum("234,88,12" in s for s in styles)
    blue = sum("37,99,235" in s for s in styles)
    assert orange > blue, (orange, blue)


def test_each_answer_carries_its_steering_and_the_next_does_not_inherit_it(page, embedded):
    page.locator("#preset").get_by_label("Pirate").check()
    wait_for(lambda: "Pirate" in summary(page), 10, "the preset")
    send(page, QUESTION)
    answers_done(page, 1)
    page.locator("#preset").get_by_label("None").check()
    wait_for(lambda: "none" in summary(page).lower(), 10, "no steering")
    send(page, QUESTION)
    answers_done(page, 2)
    assert "Pirate" in tags(page)[0] and "no steering" in tags(page)[1].lower(), tags(page)

    # Compare: the unsteered side sees only unsteered turns (the second one), never pirate answers.
    page.locator("#preset").get_by_label("Pirate").check()
    wait_for(lambda: "Pirate" in summary(page), 10, "the preset")
    page.locator("#compare").get_by_role("checkbox").check()
    send(page, "And for dessert?")
    answers_done(page, 3)
    answers_done(page, 1, chat="chat-plain")

    # The chat export keeps each answer's steering, and the answers are what the model was shown.
    turns = exported_chat(page)["turns"]
    assert [[f["key"] for f in t["steering"]["features"]] for t in turns] == [["pirate"], [], ["pirate"]]
    first, second = turns[0]["answer"], turns[1]["answer"]
    # The default: the model sees only earlier turns made with the steering of this answer.
    assert second == expected_answer(embedded, [{"role": "user", "content": QUESTION}])
    pirate = [(f.key, f.fraction, f.op) for f in next(p for p in profile().presets if p.name == "Pirate").features]
    assert first == expected_answer(embedded, [{"role": "user", "content": QUESTION}], pirate)
    chat = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": second},
            {"role": "user", "content": "And for dessert?"}]
    assert turns[2]["unsteered"] == expected_answer(embedded, chat)
    steered_chat = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "And for dessert?"}]
    assert turns[2]["answer"] == expected_answer(embedded, steered_chat, pirate)


def test_a_typed_out_of_range_strength_is_refused_and_never_used(page):
    feature(page, "Pirate").check()
    default = next(f for f in profile().features if f.name == "pirate")
    wait_for(lambda: "Pirate" in summary(page), 10, "the summary")
    box = page.locator("#catalog input[type='number']").first  # only switched-on features show their strength
    box.fill("7")
    box.press("Enter")
    page.get_by_text("outside").first.wait_for(timeout=15_000)
    page.locator("#msg textarea").click()
    page.wait_for_timeout(2500)
    assert "2.00" not in summary(page), summary(page)
    wait_for(lambda: f"{0.2:.2f}" in summary(page), 10, "the strength set back")
    send(page, QUESTION)
    answers_done(page, 1)
    assert "0.20" in tags(page)[0], tags(page)
    assert default.op in tags(page)[0]


def test_retry_on_an_empty_chat_says_there_is_nothing_to_retry(page):
    page.locator("#retry").click()
    wait_for(lambda: any("Nothing to retry" in t for t in toast_texts(page)), 10, "the retry notice")
    page.wait_for_timeout(1500)
    assert not any("Type a message" in t for t in toast_texts(page)), toast_texts(page)


def test_stopped_and_length_capped_answers_are_marked(page):
    set_max_new_tokens(page, 400)
    page.locator("#preset").get_by_label("Pirate").check()
    send(page, "Write a long story about a dog who goes on a journey.")
    wait_for(lambda: len((answer_texts(page) or [""])[-1].split()) > 5, 60, "the answer to start")
    page.locator("#stop").click()
    wait_for(lambda: tags(page) and "stopped" in tags(page)[-1].lower(), 30, "a 'stopped' tag")
    open_effects(page)
    wait_for(lambda: "Stopped" in page.locator("#effects").inner_text(), 20, "the effect view after Stop")
    assert "appears" not in page.locator("#effects").inner_text()
    set_max_new_tokens(page, 8)
    send(page, QUESTION)
    answers_done(page, 2)
    assert "cut at 8 tokens" in tags(page)[-1].lower(), tags(page)
    assert "length limit" in page.locator("#effects").inner_text()


NO_NESTED_SCROLL = """() => [...document.querySelectorAll('#steer-panel *')].filter(e => {
    const s = getComputedStyle(e);
    return (s.overflowY === 'auto' || s.overflowY === 'scroll') && e.scrollHeight > e.clientHeight + 2
        && e.clientHeight > 60 && !e.closest('.wrap') && e.tagName !== 'TEXTAREA';
}).map(e => e.id || e.className)"""

CLIPPED_NAMES = """() => [...document.querySelectorAll('#catalog label span')].filter(
    e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)"""


def test_phone_layout_and_the_desktop_catalog(server, browser):
    phone = open_page(browser, server[0], PHONE)
    try:
        phone.wait_for_timeout(2000)
        assert phone.evaluate("window.scrollY") == 0, "the page opened scrolled"
        preset = phone.locator("#preset").bounding_box()
        chat = phone.locator("#chat-steered").bounding_box()
        assert preset["y"] < chat["y"] and preset["y"] < PHONE[1], (preset, chat)
        phone.locator("#features-acc").get_by_text("Features", exact=False).first.click()
        feature(phone, "Eiffel Tower").wait_for(state="visible", timeout=10_000)
        assert phone.evaluate(CLIPPED_NAMES) == []
        assert phone.evaluate(NO_NESTED_SCROLL) == []
        phone.locator("#compare").get_by_role("checkbox").check()
        phone.locator("#chat-plain").wait_for(state="visible", timeout=10_000)
        widths = [phone.locator(f"#{c}").bounding_box()["width"] for c in ("chat-steered", "chat-plain")]
        assert min(widths) > 300, widths  # stacked, each readable, not squeezed side by side
    finally:
        phone.context.close()
    desk = open_page(browser, server[0], DESKTOP)
    try:
        for f in profile().features:  # each card shown: waited for, not assumed there as the page opens
            feature(desk, human_name(f.name)).wait_for(state="visible", timeout=30_000)
        assert desk.evaluate(NO_NESTED_SCROLL) == []
        assert desk.evaluate(CLIPPED_NAMES) == []
    finally:
        desk.context.close()


def test_a_malformed_json_file_gets_one_clear_sentence(page, tmp_path):
    (tmp_path / "bad.json").write_text('{"format": "llm-steering/spec", "version": 1,, "features": []}')
    upload(page, tmp_path / "bad.json")
    note = wait_for(lambda: [t for t in toast_texts(page) if "import" in t], 15, "the import warning")[0]
    assert "not valid JSON" in note and "line 1" in note, note
    assert "YAML" not in note and note.count("import") == 1 and note.count("file") <= 1, note
    assert note.rstrip().endswith("."), note


# ---------------------------------------------------------------------------
# The newcomer's whole path, at both sizes, with screenshots
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_a_newcomers_path(server, browser, tmp_path, size):
    """Open, pick a preset, chat, compare, share a link and open it in a fresh browser, stop,
    retry, import. Screenshots: tests/screenshots/<size>/."""
    viewport = DESKTOP if size == "desktop" else PHONE
    shots = SHOTS / size
    shots.mkdir(parents=True, exist_ok=True)
    page = open_page(browser, server[0], viewport)
    try:
        page.wait_for_timeout(1000)
        assert page.evaluate("window.scrollY") == 0
        page.screenshot(path=str(shots / "01-open.png"))

        page.locator("#preset").get_by_label("Eiffel Tower").check()
        wait_for(lambda: "Eiffel Tower" in summary(page), 10, "the preset")
        send(page, "Tell me about your perfect weekend.")
        answers_done(page, 1)
        assert "Eiffel Tower" in tags(page)[0]
        open_effects(page)
        wait_for(lambda: page.locator("#effects .toks .tok").count() > 0, 20, "the effect view")
        page.screenshot(path=str(shots / "02-answer.png"), full_page=True)

        page.locator("#compare").get_by_role("checkbox").check()
        send(page, "Write a short poem about the sea.")
        answers_done(page, 2)
        answers_done(page, 1, chat="chat-plain")
        page.locator("#chat-plain").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "03-compare.png"), full_page=size == "desktop")

        page.locator("#share-acc").get_by_text("Share", exact=True).click()
        page.locator("#msg textarea").fill("What should I cook for dinner tonight?")
        page.locator("#share-link-btn").click()
        box = page.locator("#share-link textarea, #share-link input").first
        link = wait_for(lambda: box.input_value(), 10, "the share link")
        assert "steering=" in link and "message=" in link
        fresh = open_page(browser, link, viewport)  # a new browser context: no cookies, no state
        try:
            wait_for(lambda: fresh.locator("#preset").get_by_label("Eiffel Tower").is_checked(), 15, "the link's preset")
            assert fresh.locator("#msg textarea").input_value() == "What should I cook for dinner tonight?"
            wait_for(lambda: "Eiffel Tower" in summary(fresh), 10, "the link's steering in the summary")
            fresh.screenshot(path=str(shots / "04-opened-link.png"))
        finally:
            fresh.context.close()

        page.locator("#compare").get_by_role("checkbox").uncheck()
        set_max_new_tokens(page, 300)
        send(page, "Write a long story about a dog who goes on a journey.")
        wait_for(lambda: len(answer_texts(page)) == 3 and len(answer_texts(page)[-1].split()) > 5, 60, "the story")
        page.locator("#stop").click()
        wait_for(lambda: len(tags(page)) == 3 and "stopped" in tags(page)[-1], 120, "the stopped tag",
                 state=lambda: (tags(page), [t[-200:] for t in answer_texts(page)],
                                page.screenshot(path=str(shots / "05-stopped-timed-out.png"), full_page=True) and None))  # the app finishes the answer and its view first: slow under load
        page.screenshot(path=str(shots / "05-stopped.png"), full_page=size == "desktop")

        set_max_new_tokens(page, TOKENS)
        page.locator("#retry").click()
        wait_for(lambda: len(tags(page)) == 3 and "stopped" not in tags(page)[-1], 90, "the retried answer")
        assert len(page.locator("#chat-steered [data-testid='user']").all_inner_texts()) == 3

        pirate = next(p for p in profile().presets if p.name == "Pirate")
        steering.save_steering_spec(steering.SteeringSpec(steering.EMBEDDED_MODEL_ID, pirate.features),
                                    tmp_path / "pirate.json")
        upload(page, tmp_path / "pirate.json")
        wait_for(lambda: page.locator("#preset").get_by_label("Pirate").is_checked(), 15, "the imported preset")
        page.screenshot(path=str(shots / "06-imported.png"))
    finally:
        page.context.close()
    for name in ("01-open", "02-answer", "03-compare", "04-opened-link", "05-stopped", "06-imported"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name


def test_a_vector_of_the_file_the_profile_does_not_list_can_be_steered_by_name(browser, tmp_path):
    """A profile without an SAE lists 3 of the 10 vectors of its file: the others are one name away."""
    text = greedy_config(tmp_path).read_text()
    head, rest = text.split("    features:", 1)
    items, presets = rest.split("    presets:", 1)
    kept = "      - name:".join(items.split("      - name:")[:4])  # eiffel_tower, pirate, shakespeare
    (tmp_path / "demo.yaml").write_text(head + "    features:" + kept + "    presets:" + presets)
    with running_app(tmp_path / "server.log", STEERING_CONFIG=str(tmp_path / "demo.yaml")) as url:
        page = open_page(browser, url)
        try:
            feature(page, "Shakespeare").wait_for(state="visible", timeout=30_000)  # the cards render after the box
            assert feature(page, "Coffee").count() == 0
            page.locator("#custom-on").get_by_role("checkbox").check()  # unfolds the custom card
            key = page.locator("#custom-key input").first
            key.click()
            options = page.get_by_role("option")
            wait_for(lambda: options.count() == 7, 10, "the unlisted vectors as choices")
            page.get_by_role("option", name="coffee").click()
            wait_for(lambda: "Coffee" in summary(page), 15, "the summary to show the added vector")
            send(page, QUESTION)
            answers_done(page, 1)
            assert "Coffee" in tags(page)[0]
        finally:
            page.context.close()
