"""Issue 31's rough edges of the page, in headless Chromium at 1440x900 and 390x844; one app process
for the module (greedy, short answers: test_web_page.greedy_config).

The edges outside the page (the Quick start, serve.py, the console, the stream) are in test_newcomer.py.
"""

from __future__ import annotations

import json

import pytest
from browser import DESKTOP, PHONE, chromium, open_page, running_app, wait_for
from test_web_page import answers_done, greedy_config, send, summary, tags

SIZES = {"desktop": DESKTOP, "phone": PHONE}
VOLCANOES = ("Volcanoes erupt lava and ash.", "Mount Etna is an active volcano.", "Magma rises from the volcano's crater.",
             "The volcano erupted last night.", "Lava flows down the sides of the volcano.")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("newcomer31")
    with running_app(tmp / "server.log", STEERING_CONFIG=str(greedy_config(tmp))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def desktop(server, browser):
    page = open_page(browser, server, DESKTOP)
    page.wait_for_timeout(1000)
    yield page
    page.context.close()


# ---------------------------------------------------------------------------
# 5. "Make it and switch it on": the summary never keeps a stale "unknown feature"
# ---------------------------------------------------------------------------


def stale_summary_request(request) -> bool:
    """A request of the page that carries the new concept's key in the custom card but not yet its
    recipe in the hidden concepts control: what a change event sent before that control was updated."""
    if request.method != "POST" or "/gradio_api/run/predict" not in request.url:  # the unqueued events
        return False
    try:
        data = json.loads(request.post_data or "{}").get("data") or []
    except ValueError:
        return False
    texts = [d for d in data if isinstance(d, str)]
    return "volcanoes" in texts and not any(t.startswith('[{"name": "volcanoes"') for t in texts)


def test_making_a_concept_leaves_the_summary_right_whatever_order_the_answers_come_in(desktop):
    """The race of a loaded machine, made certain: requests sent before the hidden concepts control
    had the new recipe are held in the browser until the others are answered. The summary must then
    still name the concept, never '⚠ unknown feature', also after an answer."""
    page = desktop
    held = []
    page.route("**/gradio_api/**", lambda route: held.append(route) if stale_summary_request(route.request)
               else route.continue_())
    page.locator("#concept").get_by_text("Make your own concept").click()
    page.locator("#concept-name input, #concept-name textarea").first.fill("volcanoes")
    page.locator("#concept-text textarea").fill("\n".join(VOLCANOES))
    page.locator("#concept-make").click()
    wait_for(lambda: "Volcanoes" in page.locator("#concept-note").inner_text(), 60, "the concept made")
    page.wait_for_timeout(2000)  # every answer that was not held has come back
    wait_for(lambda: held, 5, "a request sent before the concepts control had the recipe")
    for route in held:
        route.continue_()
    page.wait_for_timeout(3000)
    text = summary(page)
    assert "unknown feature" not in text and "Volcanoes" in text, text
    send(page, "Tell me about your weekend.")
    answers_done(page, 1)
    assert "Volcanoes" in tags(page)[-1]
    text = summary(page)
    assert "unknown feature" not in text and "Volcanoes" in text, text
