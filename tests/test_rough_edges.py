"""Issue 22's rough edges of the page, each as a newcomer met it, in headless Chromium at 1440x900
and (where the edge shows there) at a 390x844 phone size; one app process for the module.

The app runs greedy with short answers (test_web_page.greedy_config), so answers are repeatable.
"""

from __future__ import annotations

import json
import re
import urllib.request

from llm_steering import steering

import pytest
from browser import DESKTOP, PHONE, open_page, wait_for
from test_web_page import (
    QUESTION,
    answers_done,
    feature,
    open_effects,
    profile,
    send,
    summary,
    tags,
    toast_texts,
    upload,
)

SIZES = {"desktop": DESKTOP, "phone": PHONE}


@pytest.fixture
def server(greedy_app):
    return greedy_app


def opened(server, browser, size: str = "desktop"):
    page = open_page(browser, server[0], SIZES[size])
    page.wait_for_timeout(1000)
    return page


def shown(fraction: float) -> str:
    """A strength as the page writes it: three decimals at most, at least two."""
    text = f"{round(fraction, 3):.3f}".rstrip("0")
    return text + "0" * max(0, 2 - len(text.split(".")[1]))


def strength_box(page):
    return page.locator("#catalog input[type='number']").first  # only switched-on features show their strength


def commit(box, text: str) -> None:
    box.fill(text)
    box.press("Enter")


def error_badges(page) -> int:
    return sum(1 for e in page.get_by_text("Error", exact=True).all() if e.is_visible())


def fresh_toasts(page, before: int) -> list[str]:
    return toast_texts(page)[before:] if len(toast_texts(page)) >= before else toast_texts(page)


# ---------------------------------------------------------------------------
# 1. An empty or invalid strength: a readable warning, the slider usable, the value in force shown
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_an_empty_strength_warns_and_keeps_the_value_in_force(server, browser, size):
    page = opened(server, browser, size)
    try:
        if size == "phone":
            page.locator("#features-acc").get_by_text("Features", exact=False).first.click()
        feature(page, "Pirate").check()
        wait_for(lambda: "Pirate" in summary(page), 10, "the summary")
        box = strength_box(page)
        commit(box, "0.15")
        wait_for(lambda: "0.15" in summary(page), 10, "0.15 in force")
        for bad in ("", "-"):
            box.fill("")
            if bad:
                box.type(bad)
            box.press("Enter")
            note = wait_for(lambda: [t for t in toast_texts(page) if "number" in t], 10, "the warning")[-1]
            line = note.strip().splitlines()[-1]  # under the toast's "Warning" title
            assert "Pirate" in line and "0.15" in line and line.endswith("."), note
            page.wait_for_timeout(1500)
            assert error_badges(page) == 0, "red Error badges"
            assert box.input_value() == "0.15", box.input_value()
            assert "0.15" in summary(page) and "out of range" not in summary(page), summary(page)
            page.evaluate("() => document.querySelectorAll('.toast-close, [data-testid=toast-close]')"
                          ".forEach(b => b.click())")
        commit(box, "0.1")  # still usable
        wait_for(lambda: "0.10" in summary(page), 10, "the next strength")
        assert "Traceback" not in server[1].read_text()
    finally:
        page.context.close()


# ---------------------------------------------------------------------------
# 2. The box validates when editing ends, not at every keystroke
# ---------------------------------------------------------------------------


def test_the_strength_box_checks_when_editing_ends_not_per_keystroke(server, browser):
    page = opened(server, browser)
    try:
        feature(page, "Pirate").check()
        wait_for(lambda: "Pirate" in summary(page), 10, "the summary")
        box = strength_box(page)
        box.click()
        box.press("Control+a")
        page.keyboard.type("999", delay=120)
        page.wait_for_timeout(2000)
        assert not [t for t in toast_texts(page) if "Strength" in t], toast_texts(page)
        box.press("Enter")
        note = wait_for(lambda: [t for t in toast_texts(page) if "Strength" in t], 10, "the warning")[-1]
        assert "Strength 999 " in note, note
        # the warning and the summary's return to the default come from one event, drawn one after the other
        wait_for(lambda: shown(0.2) in summary(page), 10, "the summary back at pirate's default (0.2)")
    finally:
        page.context.close()


# ---------------------------------------------------------------------------
# 3. One rounding rule: display, tag, summary, export and import
# ---------------------------------------------------------------------------


def test_one_strength_is_written_one_way_everywhere(server, browser):
    page = opened(server, browser)
    try:
        eiffel = next(p for p in profile().presets if p.name == "Eiffel Tower").features[0].fraction
        page.locator("#preset").get_by_label("Eiffel Tower").check()
        wait_for(lambda: "Eiffel Tower" in summary(page), 10, "the summary")
        page.wait_for_timeout(1000)
        assert strength_box(page).input_value() == shown(eiffel).rstrip("0"), strength_box(page).input_value()
        numbers = re.findall(r"\b\d\.\d+\b", summary(page))
        assert numbers and numbers[0] == shown(eiffel), summary(page)
        page.locator("#preset").get_by_label("None").check()
        wait_for(lambda: "none" in summary(page).lower(), 10, "no steering")
        feature(page, "Eiffel Tower").check()
        wait_for(lambda: "Eiffel Tower" in summary(page), 10, "the summary")
        card = page.locator("#catalog .feature").first.inner_text()
        default = re.search(r"default (\S+)", card).group(1)
        in_summary = re.findall(r"\b\d\.\d+\b", summary(page))[0]
        assert default == in_summary and strength_box(page).input_value() == default.rstrip("0").rstrip("."), (
            card, summary(page), strength_box(page).input_value())
    finally:
        page.context.close()


def test_an_exported_file_reimports_to_the_same_strengths_exactly(server, browser, tmp_path):
    page = opened(server, browser)
    try:
        features = (steering.ActiveFeature("music", 0.128, "add"), steering.ActiveFeature("coffee", 0.165, "add"),
                    steering.ActiveFeature("cats", 0.385, "add"))
        steering.save_steering_spec(steering.SteeringSpec(steering.EMBEDDED_MODEL_ID, features), tmp_path / "in.json")
        upload(page, tmp_path / "in.json")
        wait_for(lambda: feature(page, "Music").is_checked() and feature(page, "Cats").is_checked(), 15, "the import")
        page.wait_for_timeout(1500)
        for f in features:
            assert shown(f.fraction) in summary(page), summary(page)
        page.get_by_role("button", name="Export JSON").click()
        link = page.locator("#exported [data-testid='download-link']")
        wait_for(lambda: link.count() and (link.first.get_attribute("download") or "").endswith(".json"), 15, "the file")
        with urllib.request.urlopen(link.first.get_attribute("href"), timeout=10) as resp:
            out = json.loads(resp.read())
        assert {(f["key"], f["fraction"]) for f in out["features"]} == {(f.key, f.fraction) for f in features}, out
    finally:
        page.context.close()


# ---------------------------------------------------------------------------
# 4. Copy and screen-reader text without markup; 7. tags outside code blocks, markdown in the effect view
# ---------------------------------------------------------------------------

STUB_CLIPBOARD = "() => { window.copied = []; navigator.clipboard.writeText = async t => { window.copied.push(t); }; }"
TAG_IN_CODE = """() => [...document.querySelectorAll('#chat-steered [data-testid=bot] *')].filter(
    e => /Eiffel Tower · add/.test(e.textContent) && e.closest('pre, code')).length"""


def test_copy_and_screen_reader_text_carry_no_markup_and_tags_stay_outside_code(server, browser):
    page = opened(server, browser)
    try:
        nearly_unsteered(page)
        send(page, "Write a Python class for a bank account with deposit and withdraw methods.")
        answers_done(page, 1)
        page.wait_for_timeout(500)
        assert page.locator("#chat-steered pre").count(), "no code in the answer to check with"
        assert page.evaluate(TAG_IN_CODE) == 0, "the steering tag is inside the code block"
        page.evaluate(STUB_CLIPBOARD)
        page.locator("#chat-steered button[aria-label*='opy']").last.click(force=True)
        copied = wait_for(lambda: page.evaluate("window.copied"), 5, "the copy")[-1]
        assert "<" not in copied and "steer-tag" not in copied and "class BankAccount" in copied, copied
        labels = page.locator("#chat-steered [data-testid='bot']").evaluate_all(
            "els => els.map(e => e.getAttribute('aria-label') || '')")
        assert labels and not any("<" in label for label in labels), labels
    finally:
        page.context.close()


def nearly_unsteered(page) -> None:
    """Eiffel Tower added at 0.01: a tag on the answer, the text as the plain model writes it."""
    feature(page, "Eiffel Tower").check()
    commit(strength_box(page), "0.01")
    wait_for(lambda: "0.01" in summary(page), 10, "the strength")


def test_the_effect_view_renders_markdown(server, browser):
    page = opened(server, browser)
    try:
        nearly_unsteered(page)
        send(page, "Give me a recipe for pancakes in markdown.")
        answers_done(page, 1)
        assert page.locator("#chat-steered strong").count(), "no bold text in the answer to check with"
        open_effects(page)
        view = page.locator("#effects")
        wait_for(lambda: view.locator(".tok").count() > 0, 20, "the effect view")
        assert "**" not in view.inner_text(), view.inner_text()
        assert view.locator("b .tok, strong .tok, .tok b, .tok strong").count() > 0
    finally:
        page.context.close()


# ---------------------------------------------------------------------------
# 5. Auto strength: says what it does while it calibrates, "auto" in the summary, the slider greyed out
# ---------------------------------------------------------------------------


def test_auto_strength_shows_what_it_does(server, browser):
    page = opened(server, browser)
    try:
        feature(page, "Pirate").check()
        wait_for(lambda: "Pirate" in summary(page), 10, "the summary")
        page.locator("#catalog").get_by_label("auto strength").first.check()
        wait_for(lambda: "auto" in summary(page), 10, "auto in the summary")
        assert page.locator("#catalog input[type='range']").first.is_disabled()
        assert strength_box(page).is_disabled()
        send(page, QUESTION)
        note = wait_for(lambda: [t for t in page.locator("#chat-steered [data-testid='bot']").all_inner_texts()
                                 if "auto" in t.lower()], 60, "a note while auto compares the candidates")[0]
        assert re.search(r"Pirate", note) and "still answers" in note, note
        answers_done(page, 1)
        assert "(auto: " in tags(page)[-1]
    finally:
        page.context.close()


# ---------------------------------------------------------------------------
# Issue 21: a warning before sending when the switched-on features together likely break the text
# ---------------------------------------------------------------------------


def test_features_that_together_break_the_text_get_a_warning_before_sending(server, browser):
    page = opened(server, browser)
    try:
        page.locator("#preset").get_by_label("Eiffel Tower").check()
        wait_for(lambda: "Eiffel Tower" in summary(page), 10, "the summary")
        assert "break" not in summary(page).lower()
        for title in ("Cats", "Pirate", "Coffee"):
            feature(page, title).check()
        for box in page.locator("#catalog input[type='number']").all():
            commit(box, "0.9")
        wait_for(lambda: "break" in summary(page).lower(), 10, "the warning")
        assert "lower" in summary(page).lower(), summary(page)
        send(page, QUESTION)
        wait_for(lambda: [t for t in toast_texts(page) if "break" in t.lower()], 20, "the warning on sending")
    finally:
        page.context.close()


# ---------------------------------------------------------------------------
# 6 and the design pass: the layout at 1440x900 and at 390x844
# ---------------------------------------------------------------------------

BROKEN_WORDS = """sel => [...document.querySelectorAll(sel)].flatMap(el => {
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  const broken = [];
  for (let node; (node = walker.nextNode());) {
    for (const m of node.textContent.matchAll(/\\S+/g)) {
      const range = document.createRange();
      range.setStart(node, m.index); range.setEnd(node, m.index + m[0].length);
      const lines = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
      if (lines.size > 1) broken.push(m[0]);
    }
  }
  return broken;
})"""


def box_of(page, selector: str) -> dict:
    return page.locator(selector).first.bounding_box()


def test_the_desktop_page_shows_presets_chat_and_steering_at_once(server, browser):
    page = opened(server, browser)
    try:
        page.locator("#preset").get_by_label("Eiffel Tower").check()
        wait_for(lambda: "Eiffel Tower" in summary(page), 10, "the summary")
        page.wait_for_timeout(800)
        preset_text = page.locator("#preset").inner_text()
        assert sum(p.description in preset_text for p in profile().presets) <= 1, preset_text  # not all on one line
        on_card = page.locator("#catalog .feature").first
        for what, box in [("presets", box_of(page, "#preset")), ("chat", box_of(page, "#chat-steered")),
                          ("the switched-on feature", on_card.bounding_box()), ("Share", box_of(page, "#share-acc")),
                          ("Advanced", box_of(page, "#advanced"))]:
            assert box["y"] >= 0 and box["y"] + box["height"] <= DESKTOP[1], (what, box)
        off = [c.bounding_box()["height"] for c in page.locator("#catalog .feature").all()
               if c.is_visible() and not c.locator("input[type='checkbox']").first.is_checked()]
        assert off and max(off) <= 44, off  # a switched-off feature is one line
        send(page, QUESTION)
        answers_done(page, 1)
        label, first = box_of(page, "#chat-steered label, #chat-steered [data-testid='block-label']"), \
            box_of(page, "#chat-steered [data-testid='bot']")
        assert label["y"] + label["height"] <= first["y"] or label["x"] + label["width"] <= first["x"], (label, first)
        answer = page.locator("#chat-steered [data-testid='bot']").first.inner_text().strip()
        assert not page.locator("#effects").is_visible() or answer[:40] not in page.locator("#effects").inner_text()
        height = page.evaluate("document.documentElement.scrollHeight")
        assert height <= 1300, height
        page.locator("#compare").get_by_role("checkbox").check()
        page.locator("#chat-plain").wait_for(state="visible", timeout=10_000)
        page.wait_for_timeout(500)
        widths = [box_of(page, f"#{c}")["width"] for c in ("chat-steered", "chat-plain")]
        assert min(widths) >= 500, widths
    finally:
        page.context.close()


def test_the_phone_page_wraps_words_whole_and_keeps_stop_beside_send(server, browser):
    page = opened(server, browser, "phone")
    try:
        page.locator("#features-acc").get_by_text("Features", exact=False).first.click()
        feature(page, "Pirate").check()
        wait_for(lambda: "Pirate" in summary(page), 10, "the summary")
        page.wait_for_timeout(800)
        assert page.evaluate(BROKEN_WORDS, "#catalog label, #chat-actions button, #msg-row button") == []
        send_box, stop_box = box_of(page, "#send"), box_of(page, "#stop")
        assert abs(send_box["y"] - stop_box["y"]) < 5, (send_box, stop_box)
        new_chat = box_of(page, "#clear")
        assert new_chat["height"] <= 40, new_chat
        send(page, QUESTION)
        answers_done(page, 1)
        open_effects(page)
        wait_for(lambda: page.locator("#effects .tok").count() > 0, 20, "the effect view")
        text = page.locator("#effects").inner_text()
        assert "Hover" not in text and "Tap" in text, text
    finally:
        page.context.close()
