"""The running half of benchmarks/rehearse_llama31_8b.py: each entry point (extract_steering_vectors.py,
app.py with a browser, demo.py) in a child process whose resident memory is sampled every 0.1 s, and
the table rows it adds. Run it through rehearse_llama31_8b.py, which builds the files first.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
PROMPT = "Tell me about your perfect weekend."
FEATURES = ["15:21576", "19:93"]


# ---------------------------------------------------------------------------
# Running children and measuring them
# ---------------------------------------------------------------------------


@dataclass
class Sampler:
    """Peak resident memory of a process and its children, sampled in a thread."""

    pid: int
    peak_rss: int = 0
    peak_anon: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Sampler:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            rss = anon = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    anon += _rss_anon(p.pid)
                except (psutil.Error, OSError):
                    pass
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            time.sleep(0.1)


def _rss_anon(pid: int) -> int:
    """Anonymous resident memory (the part that is not file pages the kernel can drop)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def wait_for_memory(min_gb: float, minutes: float, log) -> float:
    """Available memory in GiB, after waiting (up to `minutes`) for at least `min_gb`."""
    deadline = time.time() + 60 * minutes
    while True:
        avail = psutil.virtual_memory().available / 2**30
        if avail >= min_gb:
            return avail
        if time.time() > deadline:
            raise SystemExit(f"only {avail:.1f} GiB of memory available after {minutes} min (need {min_gb}): not starting")
        log(f"  {avail:.1f} GiB available, waiting for {min_gb} GiB ...")
        time.sleep(20)


def run_child(cmd: list[str], env: dict, log_path: Path, timeout: float) -> tuple[int, float, Sampler, str]:
    t0 = time.time()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid).start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        sampler.stop.set()
    return code, time.time() - t0, sampler, log_path.read_text(errors="replace")


class LoadRows(list):
    """Table rows, each with the machine's 1-minute load average when it was added (the machine is shared)."""

    def append(self, row: tuple) -> None:
        super().append((*row, f"{os.getloadavg()[0]:.1f}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# ---------------------------------------------------------------------------
# The three entry points
# ---------------------------------------------------------------------------


def run_extract(model_dir: Path, sae_dir: Path, vectors: Path, env: dict, logs: Path, rows: list, log) -> None:
    if vectors.exists():
        vectors.unlink()
    cmd = [sys.executable, "extract_steering_vectors.py", "--sae-source", str(sae_dir), "--features", *FEATURES,
           "--model", str(model_dir), "--output", str(vectors)]
    log("$ " + " ".join(cmd))
    code, secs, s, out = run_child(cmd, env, logs / "extract.log", 3600)
    if code != 0:
        raise SystemExit(f"extract failed ({code}):\n{out[-3000:]}")
    log("  " + out.strip().splitlines()[-1])
    rows.append(("extract_steering_vectors.py (2 features + norms)", f"{secs:.1f} s", gib(s.peak_rss), gib(s.peak_anon), ""))


def run_app(model_dir: Path, env: dict, logs: Path, rows: list, log, max_new_tokens: int, stop_tokens: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = logs / "app.log"
    cmd = [sys.executable, "app.py", "--port", str(port)]
    log("$ STEERING_PROFILE=llama31_8b STEERING_MODEL=... " + " ".join(cmd))
    t0 = time.time()
    out = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    sampler = Sampler(proc.pid).start()
    try:
        import urllib.request

        while True:
            if proc.poll() is not None:
                raise SystemExit(f"app.py exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
            if time.time() - t0 > 1800:
                raise SystemExit("app.py did not start within 30 min")
        startup = time.time() - t0
        peak_start = sampler.peak_rss
        rows.append(("app.py start-up (weights mapped, paged in by the first answer)", f"{startup:.1f} s", gib(peak_start),
                     gib(sampler.peak_anon), ""))
        log(f"  app up after {startup:.1f} s, peak RSS {gib(peak_start)}")

        from gradio_client import Client

        client = Client(url, verbose=False)
        for spec, label in (("Eiffel Tower", "preset 'Eiffel Tower' (clamp at layer 15)"), ("", "unsteered")):
            first, total, last = stream_chat(client, spec, max_new_tokens)
            # Random weights almost never pick one of the 3 end-of-answer ids among 128256, so an
            # answer runs to the limit: max_new_tokens tokens, the first one at `first`.
            rate = (max_new_tokens - 1) / (total - first)
            log(f"  /chat {label}: first text after {first:.1f} s, {max_new_tokens} tokens after {total:.1f} s: {last[:60]!r}")
            rows.append((f"app /chat, {label}, {max_new_tokens} new tokens", f"first {first:.1f} s, all {total:.1f} s",
                         gib(sampler.peak_rss), gib(sampler.peak_anon), f"{rate:.2f}"))
        compare_and_stop(url, log_path, rows, log, sampler, stop_tokens)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        sampler.stop.set()
        out.close()


def stream_chat(client, spec: str, max_new_tokens: int) -> tuple[float, float, str]:
    """(seconds to the first text, seconds to the whole answer, the answer) of one streamed /chat call."""
    t0 = time.time()
    job = client.submit(PROMPT, steering_spec=spec, max_new_tokens=max_new_tokens, api_name="/chat")
    first, last = None, ""
    for partial in job:
        if first is None and partial:
            first = time.time() - t0
        last = partial
    return first if first is not None else float("nan"), time.time() - t0, last


def compare_and_stop(url: str, log_path: Path, rows: list, log, sampler: Sampler, stop_tokens: int) -> None:
    """In a headless browser: preset on, compare mode, send, wait for both answers to stream, Stop."""
    if not Path(CHROMIUM).is_file():
        log(f"  {CHROMIUM} missing: compare mode and Stop not driven")
        return
    from playwright.sync_api import sync_playwright

    def bots(page, chat_id):
        return page.locator(f"#{chat_id} [data-testid='bot']").all_inner_texts()

    def wait(pred, timeout, what):
        end = time.time() + timeout
        while time.time() < end:
            if pred():
                return
            time.sleep(0.1)
        raise SystemExit(f"timed out after {timeout} s waiting for {what}")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(url)
            page.wait_for_selector("#msg textarea", timeout=120_000)
            page.get_by_text("Advanced", exact=True).click()
            box = page.locator("#max-new-tokens input[type='number']")
            box.fill(str(stop_tokens))
            box.press("Enter")
            page.locator("#preset").get_by_label("Eiffel Tower", exact=True).check()
            page.locator("#compare").get_by_role("checkbox").check()
            page.locator("#chat-plain").wait_for(state="visible", timeout=20_000)
            page.locator("#msg textarea").fill("Write a long story about a dog who goes on a journey.")
            before = log_path.read_text().count("generation threads ended")
            t0 = time.time()
            page.locator("#send").click()
            wait(lambda: all(bots(page, c) and bots(page, c)[-1].strip() for c in ("chat-steered", "chat-plain")),
                 900, "both answers (steered and unsteered) to start streaming")
            both = time.time() - t0
            page.locator("#stop").click()
            t1 = time.time()
            wait(lambda: log_path.read_text().count("generation threads ended") > before, 300, "Stop to end the generation")
            stopped = time.time() - t1
            words = [len(bots(page, c)[-1].split()) for c in ("chat-steered", "chat-plain")]
            log(f"  compare: both streaming after {both:.1f} s; Stop ended generation after {stopped:.1f} s "
                f"(words shown: steered {words[0]}, unsteered {words[1]}, limit {stop_tokens} tokens)")
            rows.append(("app compare mode (browser): both answers streaming", f"{both:.1f} s", gib(sampler.peak_rss),
                         gib(sampler.peak_anon), ""))
            rows.append(("app Stop (browser) -> server generation threads ended", f"{stopped:.1f} s", "", "", ""))
        finally:
            browser.close()


def run_console(env: dict, logs: Path, rows: list, log, max_new_tokens: int, backend: str) -> None:
    cmd = [sys.executable, "demo.py", "--profile", "llama31_8b", "--prompt", PROMPT, "--steer", "15:21576", "0.5",
           "--max-new-tokens", str(max_new_tokens), "--backend", backend]
    log("$ " + " ".join(cmd))
    code, secs, s, out = run_child(cmd, env, logs / f"demo-{backend}.log", 3600)
    if code != 0:
        raise SystemExit(f"demo.py failed ({code}):\n{out[-3000:]}")
    log("  " + " | ".join(out.strip().splitlines()[-3:])[:300])
    rows.append((f"demo.py one-shot --backend {backend}, --steer 15:21576 0.5, {max_new_tokens} new tokens (load included)",
                 f"{secs:.1f} s", gib(s.peak_rss), gib(s.peak_anon), ""))
