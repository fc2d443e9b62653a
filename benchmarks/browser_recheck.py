"""The issue-28 trial again, as a new visitor makes it (issue 28's opening: 1 of 18 answers still answered).

Starts the shipped app (`python app.py`: demo.yaml as it ships, so sampled at its temperature, 256 new
tokens, auto ticked on every card) and opens it in headless Chromium. For each shipped concept, in a
fresh browser context: the concept's card switched on and nothing else touched, then each everyday
question in a new chat. Writes one JSON line per answer (concept, question, the answer as shown, its
tag) for reading by hand; the verdicts go in the same file afterwards (`"named"`, `"answers"`, `"why"`).
Sampled, so another run gives other answers: the figure is this run's.

    .venv/bin/python benchmarks/browser_recheck.py --out benchmarks/results/auto28_browser_recheck.jsonl
    .venv/bin/python benchmarks/browser_recheck.py --concepts "Eiffel Tower" Pirate --out /tmp/x.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
EVERYDAY = ("How do I change a flat tire?", "Give me three tips for a job interview.", "What is a good pancake recipe?")
CONCEPTS = ("Eiffel Tower", "Pirate", "Shakespeare", "Cats", "Space", "Ocean", "Coffee", "Dinosaurs", "Music", "Dragons")
TAG = ".message.thought [data-testid='bot']"
ANSWER = "#chat-steered .message:not(.thought) > [data-testid='bot']"


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def start_app(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    wait(up, 180, "the app")
    return proc, url


def ask(page, question: str) -> tuple[str, str]:
    """A new chat, the question sent, its answer and tag once the tag shows."""
    box = page.locator("#msg textarea")
    box.fill("(new chat)")
    page.locator("#clear").click()  # New chat empties the box: wait for that before typing the question
    wait(lambda: box.input_value() == "" and page.locator(f"#chat-steered {TAG}").count() == 0, 30, "a new chat")
    box.fill(question)
    page.locator("#send").click()
    wait(lambda: page.locator(f"#chat-steered {TAG}").count() >= 1, 600, "the answer")
    return page.locator(ANSWER).all_inner_texts()[-1], page.locator(f"#chat-steered {TAG}").all_inner_texts()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", nargs="+", default=list(CONCEPTS), help="cards' titles")
    parser.add_argument("--questions", nargs="+", default=list(EVERYDAY))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    proc, url = start_app(out.with_suffix(".app.log"))
    try:
        with sync_playwright() as p, open(out, "a") as f:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
            for title in args.concepts:
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                page.goto(url)
                page.wait_for_selector("#msg textarea", timeout=60_000)
                card = page.get_by_role("checkbox", name=title, exact=True)
                try:  # the cards show once the page has drawn them; the Features fold may start closed
                    card.wait_for(state="visible", timeout=15_000)
                except Exception:
                    page.locator("#features-acc").get_by_text("Features", exact=False).first.click()
                    card.wait_for(state="visible", timeout=30_000)
                card.check()
                wait(lambda page=page, title=title: title in page.locator("#summary").inner_text(), 30, f"{title} switched on")
                for q in args.questions:
                    t0 = time.monotonic()
                    answer, tag = ask(page, q)
                    row = {"concept": title, "question": q, "answer": answer, "tag": tag,
                           "seconds": round(time.monotonic() - t0, 1)}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    print(f"{title} | {q} | {row['seconds']} s | {tag}\n  {answer[:300]!r}", flush=True)
                context.close()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
