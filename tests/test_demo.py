"""demo.py, the console chat: the real program in a pseudo-terminal, the one-shot mode, errors.

Answers are checked token for token against the steering module called directly, on the
embedded model with the shipped demo.yaml and its vectors file (greedy, a few tokens).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from llm_steering import steering
from llm_steering.console import chat as demo
from llm_steering.console import commands as console_commands
from llm_steering.core import format_fraction, round_fraction

import pexpect
import pytest
import torch
from conftest import hooks_on

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "demo.py")
PROMPT = "you> "
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\001\002\r]")
TOKENS = 8
QUESTION = "Tell me about your weekend."
NO_CONCEPTS = {"STEERING_DATA_DIR": tempfile.mkdtemp(prefix="no-concepts-")}  # never the tester's own concepts file


@pytest.fixture(scope="module")
def shipped():
    """The default profile of the shipped demo.yaml and its vectors file."""
    profile = steering.load_config(ROOT / "demo.yaml").profile()
    return profile, steering.load_vectors(profile.vectors_path())


_ANSWERS: dict = {}


def reference(embedded, profile, vectors, prompt, steers, max_new_tokens=TOKENS, history=()):
    """The answer the steering module gives for `steers` [(key, fraction, mode)], greedy, after
    the earlier exchanges `history` [(user, answer)]."""
    key = (prompt, tuple(steers), max_new_tokens, tuple(history))
    if key not in _ANSWERS:
        _ANSWERS[key] = _reference(embedded, profile, vectors, prompt, steers, max_new_tokens, history)
    return _ANSWERS[key]


def _reference(embedded, profile, vectors, prompt, steers, max_new_tokens, history):
    model, tok = embedded
    gen = profile.generation
    chat = [{"role": "system", "content": gen.system_prompt}]
    for user, answer in history:
        chat += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    chat.append({"role": "user", "content": prompt})
    # op None: the feature's own op in demo.yaml, as `--steer NAME STRENGTH` uses
    comps = [vectors.component(key, fraction, op=mode or profile.feature(key).op) for key, fraction, mode in steers]
    return steering.generate_steered_answer_hf(
        model, tok, chat, comps, max_new_tokens=max_new_tokens, temperature=0.0,
        repetition_penalty=gen.repetition_penalty,
    )


def clean(text: str) -> str:
    return ANSI.sub("", text)


def spawn(*args: str, env: dict | None = None, wait: bool = True, columns: int = 200) -> pexpect.spawn:
    """Start the chat in a pseudo-terminal `columns` wide; with `wait`, return once it shows its prompt."""
    full_env = {**os.environ, "TERM": "dumb", "COLUMNS": str(columns), "HF_HUB_OFFLINE": "1", **NO_CONCEPTS}
    full_env.pop("NO_COLOR", None)
    full_env.update(env or {})
    child = pexpect.spawn(sys.executable, [DEMO, *args], cwd=str(ROOT), env=full_env, encoding="utf-8",
                          timeout=90, dimensions=(50, columns))
    child.logfile_read = io.StringIO()  # everything the program printed
    if wait:
        child.expect_exact(PROMPT)
    return child


def say(child: pexpect.spawn, line: str) -> str:
    """Type a line, wait for the next prompt, return what was printed in between (no colours)."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return clean(child.before)


def quit_cleanly(child: pexpect.spawn) -> None:
    """Type quit and wait for the program to end."""
    child.sendline("quit")
    child.expect(pexpect.EOF)


def assert_clean_exit(child: pexpect.spawn) -> None:
    """The program ended with status 0 and printed no traceback."""
    assert child.exitstatus == 0
    assert "Traceback" not in child.logfile_read.getvalue()


def start_one_shot(*args: str, env: dict | None = None) -> subprocess.Popen:
    """Start `demo.py ARGS` with stdout and stderr captured (not a terminal)."""
    env = {**{k: v for k, v in os.environ.items() if k != "NO_COLOR"}, **NO_CONCEPTS, **(env or {})}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.Popen([sys.executable, DEMO, *args], cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_one_shot(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return finish(start_one_shot(*args, env=env))


def one_shot_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """What demo.py does with `args` (cli.before_loading, then main), in this process: for input refused before
    the model loads, where a new process would only add its imports (the process itself is checked by
    test_a_bad_steer_op_is_one_line_and_exit_code_2)."""
    from llm_steering.console import cli as console_cli

    capsys.readouterr()
    try:
        console_cli.before_loading(list(args))
        code = demo.main(list(args))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["demo.py", *args], code, out, err)


# ---------------------------------------------------------------------------
# The interactive chat in a pseudo-terminal
# ---------------------------------------------------------------------------


def test_a_session_steers_compares_saves_loads_survives_an_error_and_quits(embedded, shipped, tmp_path):
    profile, vectors = shipped
    spec_file = tmp_path / "steering.json"
    child = spawn("--temperature", "0", "--max-new-tokens", str(TOKENS), wait=False)  # loads meanwhile
    try:
        unsteered = reference(embedded, profile, vectors, QUESTION, [])
        steered = reference(embedded, profile, vectors, QUESTION, [("eiffel_tower", 0.5, "clamp")])
        assert unsteered != steered  # otherwise the comparison below proves nothing
        child.expect_exact(PROMPT)
        assert "/steer <name|layer:index>" in say(child, "/help")
        out = say(child, "/features")
        for feature in profile.features:
            assert feature.name in out and feature.description in out
        out = say(child, "/steer eiffel_tower 0.5 clamp")
        norm = vectors.norm(profile.feature("eiffel_tower").layer)
        assert f"steering with Eiffel Tower (eiffel_tower) at 0.50 x norm ({0.5 * norm:.1f}" in out
        assert "eiffel_tower" in say(child, "/active")

        say(child, "/compare")
        child.sendline(QUESTION)
        child.expect_exact(PROMPT)
        raw = child.before
        out = clean(raw)
        assert f"unsteered> {unsteered}\nsteered> {steered}\n" in out
        # colours on a terminal: the unsteered answer in cyan, the steered one in magenta
        assert demo.COLOURS["unsteered"] + "unsteered> " in raw and demo.COLOURS["steered"] + "steered> " in raw

        out = say(child, "/steer pirate abc")
        assert out.strip().splitlines()[-1] == (
            "error: strength 'abc' is not a number: give a fraction of the layer's typical norm, e.g. 0.5"
        )
        out = say(child, "/steer 99:1 0.5")
        assert "error:" in out and "99:1" in out

        assert "saved" in say(child, f"/save {spec_file}")
        saved = json.loads(spec_file.read_text())
        assert saved["format"] == "llm-steering/spec" and saved["model_id"] == steering.EMBEDDED_MODEL_ID
        assert saved["features"] == [{"key": "eiffel_tower", "fraction": 0.5, "op": "clamp"}]

        say(child, "/clear")
        assert "nothing is steered" in say(child, "/active")
        out = say(child, f"/load {tmp_path / 'missing.yaml'}")
        assert "error:" in out and "not found" in out
        out = say(child, f"/load {spec_file}")
        assert "eiffel_tower" in out and "0.50 x norm" in out

        # the same message again, with the history forgotten, on the nnsight backend: same tokens
        say(child, "/reset")
        assert "backend: nnsight" in say(child, "/backend nnsight")
        out = say(child, QUESTION)
        assert f"steered> {steered}\n" in out

        assert "no longer steering with Eiffel Tower (eiffel_tower)" in say(child, "/unsteer eiffel_tower")
        assert "nothing is steered" in say(child, "/active")
        quit_cleanly(child)
    finally:
        child.close(force=True)
    assert_clean_exit(child)


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(shipped):
    child = spawn("--temperature", "0", "--max-new-tokens", "400", "--steer", "pirate", "0.3",
                  env={"NO_COLOR": "1"})
    try:
        started = time.monotonic()
        child.sendline("Write a long story about a dragon who lives in a castle.")
        child.expect_exact("steered> ")
        child.expect(r"\w+\W+\w+")  # a few words have streamed
        child.sendintr()
        child.expect_exact("(stopped: this exchange is not kept in the conversation)", timeout=10)
        child.expect_exact(PROMPT, timeout=10)
        assert time.monotonic() - started < 25  # 400 tokens would take far longer
        assert "pirate" in say(child, "/active")
        child.sendeof()  # Ctrl-D ends the chat
        child.expect(pexpect.EOF, timeout=20)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    printed = child.logfile_read.getvalue()
    assert "Traceback" not in printed and "\x1b[" not in printed  # NO_COLOR: no colour codes


def test_an_interrupted_answer_ends_its_thread_and_removes_its_hooks(embedded, shipped):
    """Ctrl-C (a real SIGINT) arriving while the answer streams, in-process."""
    model, tok = embedded
    profile, vectors = shipped

    class InterruptOnFirstPiece:
        def __init__(self):
            self.text, self.sent = "", False

        def write(self, s):
            self.text += s
            if s.strip() and not self.sent and "steered" not in s:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler raises in here

        def flush(self):
            pass

        def isatty(self):
            return False

    out = InterruptOnFirstPiece()
    settings = demo.Settings(backend="hf", temperature=0.0, max_new_tokens=200, repetition_penalty=1.1,
                             system="", max_input_tokens=2048)
    catalog = demo.Catalog(profile, vectors)
    catalog.attach(model, tok)
    console = demo.Console(model, tok, catalog, settings, out=out, info=out, interactive=True)
    console.steer("eiffel_tower", 0.5)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a job started with &
    assert console.ask("Tell me a long story.") is None
    assert out.sent and "(stopped" in out.text
    assert hooks_on(model) == 0
    assert not [t for t in threading.enumerate() if t.name == "steered-generation"]
    assert console.history == []
    assert signal.getsignal(signal.SIGINT) is before  # the console's handler is gone again


# ---------------------------------------------------------------------------
# One-shot mode
# ---------------------------------------------------------------------------


def test_one_shot_prints_only_the_answer(embedded, shipped):
    profile, vectors = shipped
    proc = start_one_shot("--prompt", "Tell me about Paris", "--steer", "eiffel_tower", "0.5",
                          "--steer", "pirate", "0.3", "--temperature", "0", "--max-new-tokens", str(TOKENS))
    expected = reference(embedded, profile, vectors, "Tell me about Paris",
                         [("eiffel_tower", 0.5, None), ("pirate", 0.3, None)])
    result = finish(proc)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "Traceback" not in result.stderr


def test_one_shot_compare_prints_both_answers_labelled(embedded, shipped):
    profile, vectors = shipped
    proc = start_one_shot("--prompt", QUESTION, "--steer", "eiffel_tower", "0.5", "--compare",
                          "--temperature", "0", "--max-new-tokens", str(TOKENS))
    unsteered = reference(embedded, profile, vectors, QUESTION, [])
    steered = reference(embedded, profile, vectors, QUESTION, [("eiffel_tower", 0.5, None)])
    result = finish(proc)
    assert result.returncode == 0, result.stderr
    # not a terminal: no colour codes
    assert result.stdout == f"[unsteered]\n{unsteered}\n[steered]\n{steered}\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steer", "eifel_tower", "0.5"], "unknown feature 'eifel_tower': use one of"),
        (["--steer", "pirate", "half"], "strength 'half' is not a number"),
        (["--steer", "15:21576", "0.5"], "has no SAE to extract it from"),
        (["--config", "no-such.yaml"], "config file 'no-such.yaml' not found"),
        (["--compare"], "--compare needs at least one --steer"),
        (["--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
    ],
)
def test_one_shot_bad_input_is_one_line_and_exit_code_2(args, message, capsys):
    result = one_shot_in_process(capsys, "--prompt", "Hi", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


# ---------------------------------------------------------------------------
# layer:index on a profile with an SAE source: extracted on demand
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sae_profile(tmp_path_factory, shipped):
    """A demo.yaml whose profile has a local SAELens-layout SAE at layer 3 (16 random features)."""
    import yaml
    from safetensors.torch import save_file

    _, vectors = shipped
    root = tmp_path_factory.mktemp("sae")
    folder = root / "saes" / "blocks.3.hook_resid_post"
    folder.mkdir(parents=True)
    w_dec = torch.randn(16, vectors.hidden_size, generator=torch.Generator().manual_seed(3))  # [d_sae, d_in]
    save_file({"W_enc": w_dec.T.contiguous(), "W_dec": w_dec, "b_enc": torch.zeros(16),
               "b_dec": torch.zeros(vectors.hidden_size)}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(
        {"d_in": vectors.hidden_size, "d_sae": 16, "hook_name": "blocks.3.hook_resid_post"}))
    profile = steering.load_config(ROOT / "demo.yaml").profile()
    config = {"default_profile": "sae", "profiles": {"sae": {
        "model_id": None, "vectors_file": str(profile.vectors_path()), "sae_source": str(root / "saes"),
        "sae_format": "saelens", "features": [], "generation": {"repetition_penalty": 1.1},
    }}}
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, w_dec


def test_an_sae_feature_is_extracted_on_demand_with_its_layer_norm(embedded, shipped, sae_profile):
    model, tok = embedded
    _, vectors = shipped
    path, w_dec = sae_profile
    profile = steering.load_config(path).profile()
    catalog = demo.Catalog(profile, steering.load_vectors(profile.vectors_path()))
    catalog.check("3:5")  # not in the vectors file, but the profile has an SAE: fine
    catalog.attach(model, tok)
    norm = vectors.layer_norms.get(3) or steering.measure_layer_norms(model, tok, [3])[3]
    feature = catalog.resolve("3:5")
    assert feature.key == "3:5" and feature.vector.name == "L3F5" and feature.norm == pytest.approx(norm)
    torch.testing.assert_close(feature.vector.vector, w_dec[5] / w_dec[5].norm())

    settings = demo.Settings(backend="hf", temperature=0.0, max_new_tokens=TOKENS, repetition_penalty=1.1,
                             system="You are a helpful assistant.", max_input_tokens=2048)
    console = demo.Console(model, tok, catalog, settings, out=io.StringIO(), info=io.StringIO(), interactive=False)
    console.steer("3:5", 0.5)
    comp = steering.SteeringComponent(layer=3, vector=w_dec[5], strength=0.5 * norm, op="clamp")
    chat = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": QUESTION}]
    expected = steering.generate_steered_answer_hf(model, tok, chat, [comp], max_new_tokens=TOKENS,
                                                   temperature=0.0, repetition_penalty=1.1)
    assert console.ask(QUESTION) == expected
    assert console.spec().features == (steering.ActiveFeature("3:5", 0.5, "clamp"),)


def test_a_layer_out_of_range_is_refused_before_any_extraction(embedded, sae_profile):
    model, tok = embedded
    profile = steering.load_config(sae_profile[0]).profile()
    catalog = demo.Catalog(profile, steering.load_vectors(profile.vectors_path()))
    catalog.check("40:5")  # without the model the layer count is unknown: deferred
    catalog.attach(model, tok)
    with pytest.raises(ValueError, match=r"^layer 40 is out of range: this model has 30 layers \(0-29\)$"):
        catalog.resolve("40:5")
    with pytest.raises(ValueError, match="index|16"):  # the SAE has 16 features
        catalog.resolve("3:99")


@pytest.mark.parametrize("text", ["inf", "nan", "many"])
def test_strengths_that_are_not_numbers_are_refused(text):
    with pytest.raises(ValueError, match=r"^strength .* (is not a number|is not a finite number)"):
        demo.parse_fraction(text)


@pytest.mark.parametrize("fraction", [11.0, -10.5, 1e9, 2.5, -1.5])
def test_strengths_outside_the_catalogs_range_are_refused_as_in_the_app(embedded, shipped, fraction):
    """The console and the app share one range (catalog.FRACTION_RANGE, widened by presets)."""
    model, tok = embedded
    profile, vectors = shipped
    catalog = demo.Catalog(profile, vectors)
    catalog.attach(model, tok)
    settings = demo.Settings(backend="hf", temperature=0.0, max_new_tokens=2, repetition_penalty=1.0,
                             system="", max_input_tokens=2048)
    console = demo.Console(model, tok, catalog, settings, out=io.StringIO(), info=io.StringIO(), interactive=False)
    with pytest.raises(ValueError, match=r"^strength .* for pirate is out of range: use a fraction .* from -1 to 2 "):
        console.steer("pirate", fraction)
    assert console.active == {}


def test_long_input_is_cut_and_old_exchanges_go_with_a_notice(embedded, shipped):
    model, tok = embedded
    profile, vectors = shipped

    class Out:
        text = ""

        def write(self, s):
            Out.text += s

        def flush(self):
            pass

    settings = demo.Settings(backend="hf", temperature=0.0, max_new_tokens=2, repetition_penalty=1.0,
                             system="", max_input_tokens=40)
    catalog = demo.Catalog(profile, vectors)
    catalog.attach(model, tok)
    console = demo.Console(model, tok, catalog, settings, out=Out(), info=Out(), interactive=True)
    long_message = "the quick brown fox jumps over the lazy dog " * 20 + "What is the animal?"
    assert console.ask(long_message) is not None
    n_tokens = len(tok(long_message, add_special_tokens=False)["input_ids"])
    assert f"Your message is {n_tokens:,} tokens; the model reads at most 40 here" in Out.text
    kept = console.history[0]["content"]
    assert kept.startswith("the") and "[...]" in kept and kept.endswith("What is the animal?")  # the question survives
    assert len(steering.chat_input_ids(tok, [{"role": "user", "content": kept}])) <= 40
    assert console.ask("And now?") is not None  # the first exchange no longer fits with this one
    assert "the oldest 2 messages were left out" in Out.text
    assert [m["content"] for m in console.history if m["role"] == "user"] == ["And now?"]


def test_ctrl_c_with_nnsight_ends_the_run_at_its_next_token(embedded, shipped):
    model, tok = embedded
    profile, vectors = shipped
    out = io.StringIO()
    settings = demo.Settings(backend="nnsight", temperature=0.0, max_new_tokens=300, repetition_penalty=1.0,
                             system="", max_input_tokens=2048)
    catalog = demo.Catalog(profile, vectors)
    catalog.attach(model, tok)
    console = demo.Console(model, tok, catalog, settings, out=out, info=out, interactive=True)

    before = signal.getsignal(signal.SIGINT)

    def press_ctrl_c_once_the_answer_waits():
        deadline = time.monotonic() + 60
        while signal.getsignal(signal.SIGINT) is before and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # let the run get going
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c_once_the_answer_waits, daemon=True).start()
    t0 = time.monotonic()
    assert console.ask("Tell me a long story.") is None
    # the stopped run ended after its current token, far sooner than 300 tokens would take
    assert time.monotonic() - t0 < 12
    settings.max_new_tokens = 4
    answer = console.ask("Tell me a story.")
    assert answer
    assert console.history == [{"role": "user", "content": "Tell me a story."},
                               {"role": "assistant", "content": answer}]


def test_find_lists_the_features_that_fire_and_one_steers_them(embedded, sae_profile):
    from llm_steering.saes import find as sae_find

    model, tok = embedded
    path, _ = sae_profile
    profile = steering.load_config(path).profile()
    catalog = demo.Catalog(profile, steering.load_vectors(profile.vectors_path()))
    catalog.attach(model, tok)
    out = io.StringIO()
    settings = demo.Settings(backend="hf", temperature=0.0, max_new_tokens=2, repetition_penalty=1.0, system="",
                             max_input_tokens=2048)
    console = demo.Console(model, tok, catalog, settings, out=out, info=out, interactive=True)
    text = "The Eiffel Tower in Paris is tall."
    assert console.command(f"/find 3 {text}")
    expected = sae_find.find_features(profile.sae_source, 3, text, model, tok, k=10, sae_format="saelens")
    assert expected
    listed = re.findall(r"^\s+(\d+:\d+)\s+mean\s+(\S+)", clean(out.getvalue()), re.M)
    assert [k for k, _ in listed] == [f.key for f in expected]
    assert [float(m) for _, m in listed] == pytest.approx([round(f.mean, 3) for f in expected], abs=1e-3)
    console.command(f"/steer {expected[0].key} 0.3")  # one command from being steered
    assert list(console.active) == [expected[0].key]
    with pytest.raises(ValueError, match="no SAE to search"):
        shipped_profile = steering.load_config(ROOT / "demo.yaml").profile()
        demo.Catalog(shipped_profile, steering.load_vectors(shipped_profile.vectors_path())).find("hi")
    assert "/find [layer] <text>" in console_commands.help_text()


def pirate_auto(embedded, shipped, max_new_tokens: int, backend=None):
    """`/steer pirate auto` then QUESTION in a greedy console (on `backend`, a started one, else hf): (its answer,
    what it printed, the feature, and calibrate.auto_answer's answer to the same chat)."""
    from llm_steering import calibrate

    model, tok = embedded
    profile, vectors = shipped
    catalog = demo.Catalog(profile, vectors)
    catalog.attach(model, tok)
    out = io.StringIO()
    settings = demo.Settings(backend=backend.name if backend else "hf", temperature=0.0, max_new_tokens=max_new_tokens,
                             repetition_penalty=1.1, system="You are a helpful assistant.", max_input_tokens=2048)
    console = demo.Console(model, tok, catalog, settings, out=out, info=out, interactive=False)
    if backend is not None:
        console._backends[backend.name] = backend
    console.command("/steer pirate auto")
    answer = console.ask(QUESTION)
    feature = catalog.resolve("pirate")
    chat = [{"role": "system", "content": settings.system}, {"role": "user", "content": QUESTION}]
    expected = calibrate.auto_answer(model, tok, chat, feature.component(feature.default_fraction), norm=feature.norm,
                                     max_new_tokens=max_new_tokens, repetition_penalty=1.1)
    return answer, out.getvalue(), feature, expected


def test_steer_auto_on_the_vllm_backend_runs_its_candidates_on_the_engine(embedded, shipped, vllm_engine):
    """On the vLLM backend, /steer pirate auto runs the candidates as parallel requests on the engine
    (VLLMEngine.open_auto_stream, serving/auto.py's steps), the steering scores measured by its workers: the
    same answer as calibrate.auto_answer on the in-process model, token for token (both float32, greedy), its
    vectors carried with the requests; every prompt here prefilled in chunks of 16 tokens."""
    from llm_steering.backends.vllm import VLLMBackend

    answer, text, feature, expected = pirate_auto(embedded, shipped, 52, backend=VLLMBackend(vllm_engine))
    assert answer == expected.answer and f"auto: {feature.title} " in text
    assert expected.chosen.release  # the case: a release, let go in the workers at the concept's first word
    assert "let go once it named the concept" in text
    assert vllm_engine._auto._scores  # the steering scores were measured through the engine


def test_ctrl_c_while_auto_chooses_on_the_vllm_backend_aborts_its_candidates(embedded, shipped, vllm_engine):
    """Ctrl-C in the console while auto works on the engine (its steering scores, then its candidates: the
    seconds before the first words, when a user gives up waiting) ends the answer at once and takes auto's
    requests off the engine: they no longer run on for nobody ahead of the next question (before, Ctrl-C
    returned, but the engine went on with them for seconds)."""
    from llm_steering.backends.vllm import VLLMBackend

    model, tok = embedded
    profile, vectors = shipped
    catalog = demo.Catalog(profile, vectors)
    catalog.attach(model, tok)
    out = io.StringIO()
    settings = demo.Settings(backend="vllm", temperature=0.0, max_new_tokens=52, repetition_penalty=1.1,
                             system="You are a helpful assistant.", max_input_tokens=2048)
    console = demo.Console(model, tok, catalog, settings, out=out, info=out, interactive=False)
    console._backends["vllm"] = VLLMBackend(vllm_engine)
    console.command("/steer pirate auto")
    engine, pressed = vllm_engine.engine, []

    def press_once_auto_runs() -> None:
        deadline = time.monotonic() + 120
        while engine.get_num_unfinished_requests() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        pressed.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C

    presser = threading.Thread(target=press_once_auto_runs, daemon=True)
    presser.start()
    answer = console.ask("Write a short note to welcome a new neighbor.")
    ended = time.monotonic()
    presser.join()
    assert answer is None and "(stopped" in out.getvalue()
    assert ended - pressed[0] < 1.5, f"Ctrl-C took {ended - pressed[0]:.1f} s: it waited for the candidates"
    while engine.get_num_unfinished_requests() and time.monotonic() < ended + 2:
        time.sleep(0.01)
    seen = []  # and none starts after it: before, the scores' requests and then the candidates ran on for seconds
    while time.monotonic() < ended + 5:
        seen.append(engine.get_num_unfinished_requests())
        time.sleep(0.05)
    assert not any(seen), f"the engine ran on after Ctrl-C: {seen}"


def test_steer_auto_chooses_how_to_steer_each_answer_and_goes_on_with_it(embedded, shipped):
    """/steer pirate auto (issue 28): it says what it tries, then which way it kept, then that answer
    (calibrate.auto_answer's, greedy)."""
    answer, text, feature, expected = pirate_auto(embedded, shipped, 12)
    n = len(expected.table)
    assert text.index(f"auto: trying Pirate {n} ways") < text.index(f"(compared {n} in") < text.index(answer)
    cand = expected.chosen
    if cand.components:
        assert f"auto: Pirate {cand.components[0].op} {format_fraction(feature.default_fraction * cand.multiplier)} x norm" in text
    assert answer == expected.answer
    assert "[strength|auto]" in console_commands.help_text()


# ---------------------------------------------------------------------------
# The console as a newcomer meets it
# ---------------------------------------------------------------------------


def test_help_lists_the_features_at_once_without_loading_torch(shipped):
    """`--help` names every feature (key, human name, description, default strength and op), fast."""
    from llm_steering.core import human_name

    profile, vectors = shipped
    started = time.monotonic()
    result = subprocess.run([sys.executable, DEMO, "--help"], cwd=str(ROOT), capture_output=True, text=True,
                            timeout=60, env={**os.environ, "NO_COLOR": "1"})
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 10, f"--help took {elapsed:.1f} s"  # a hang; that it imports nothing heavy is checked below
    text = result.stdout
    assert "--steer NAME [STRENGTH] [add|clamp]" in text
    for feature in profile.features:
        line = next((ln for ln in text.splitlines() if ln.split()[:1] == [feature.name]), None)
        assert line is not None, f"{feature.name} is not listed in --help:\n{text}"
        fraction = feature.strength / vectors.norm(feature.layer)
        for part in (feature.label or human_name(feature.name), feature.description, f"{fraction:.3g}", feature.op):
            assert part in line, (part, line)
    # and nothing heavy was imported to print it
    probe = ("import runpy, sys\nsys.argv = ['demo.py', '--help']\ntry:\n    runpy.run_path('demo.py', run_name='__main__')\n"
             "except SystemExit:\n    pass\nprint('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout[-300:] + result.stderr[-300:]


def test_help_of_another_profile_lists_its_features_and_a_bad_config_does_not_break_help():
    result = subprocess.run([sys.executable, DEMO, "--profile", "llama31_8b", "--help"], cwd=str(ROOT),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "L15F21576" in result.stdout and "layer:index" in result.stdout
    result = subprocess.run([sys.executable, DEMO, "--config", "no-such.yaml", "--help"], cwd=str(ROOT),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: demo.py" in result.stdout and "no-such.yaml" in result.stdout


def test_one_shot_steer_takes_an_op(embedded, shipped):
    """`--steer NAME STRENGTH OP`: eiffel_tower adds by default; here it clamps."""
    profile, vectors = shipped
    proc = start_one_shot("--prompt", "Tell me about Paris", "--steer", "eiffel_tower", "0.5", "clamp",
                          "--steer", "pirate", "0.2", "--temperature", "0", "--max-new-tokens", str(TOKENS))
    clamped = reference(embedded, profile, vectors, "Tell me about Paris",
                        [("eiffel_tower", 0.5, "clamp"), ("pirate", 0.2, None)])
    added = reference(embedded, profile, vectors, "Tell me about Paris",
                      [("eiffel_tower", 0.5, "add"), ("pirate", 0.2, None)])
    assert clamped != added  # otherwise the op would not show
    result = finish(proc)
    assert result.returncode == 0, result.stderr
    assert result.stdout == clamped + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steer", "pirate", "0.3", "clmp"], "unknown op 'clmp': use add or clamp"),
        (["--steer", "pirate", "0.3", "clamp", "extra"], "--steer takes NAME [STRENGTH] [add|clamp]"),
        (["--steer", "pirate", "0.3", "0.4"], "--steer pirate 0.3 0.4: unknown op '0.4': use add or clamp"),
    ],
)
def test_a_bad_steer_op_is_one_line_and_exit_code_2(args, message):
    result = run_one_shot("--prompt", "Hi", *args)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_a_negative_strength_with_an_op_parses():
    from llm_steering.console import cli as console_cli

    args = console_cli.build_parser([]).parse_args(["--steer", "pirate", "-0.3", "add", "--steer", "cats", "0.2"])
    assert args.steer == [["pirate", "-0.3", "add"], ["cats", "0.2"]]


def test_the_first_line_comes_at_once_and_settings_change_in_the_chat(embedded, shipped):
    profile, vectors = shipped
    started = time.monotonic()
    child = spawn("--temperature", "0.7", wait=False)
    try:
        child.expect(r"\S", timeout=10)  # the first thing printed
        first = time.monotonic() - started
        start = child.after
        child.expect(r"\r?\n")
        line = clean(start + child.before)
        # before any heavy import (about 0.3 s on idle cores; the bound allows a loaded machine, and
        # test_help_lists_the_features_at_once_without_loading_torch checks that nothing heavy is imported first)
        assert first < 10, f"the first output came after {first:.1f} s"
        assert "loading" in line and "first start" in line, line
        expected = reference(embedded, profile, vectors, QUESTION, [], max_new_tokens=5)
        child.expect_exact(PROMPT)
        out = say(child, "/help")
        assert "/temperature" in out and "/max-tokens" in out and "/settings" in out
        out = say(child, "/settings")
        assert "temperature 0.7" in out and f"max tokens {profile.generation.max_new_tokens}" in out
        assert "temperature: 0 (greedy)" in say(child, "/temperature 0")
        assert "max tokens: 5" in say(child, "/max-tokens 5")
        for bad, message in (("/temperature -1", "error: temperature must be a number >= 0"),
                             ("/temperature hot", "error: temperature must be a number >= 0"),
                             ("/max-tokens many", "error: max tokens must be a whole number >= 1"),
                             ("/max-tokens 0", "error: max tokens must be a whole number >= 1")):
            lines = say(child, bad).strip().splitlines()
            assert lines[-1].startswith(message), (bad, lines)
        out = say(child, "/settings")
        assert "temperature 0," in out and "max tokens 5," in out
        assert f"unsteered> {expected}\n" in say(child, QUESTION)
        quit_cleanly(child)
    finally:
        child.close(force=True)
    assert_clean_exit(child)


def test_each_turn_keeps_its_steering_and_compare_unsteered_never_sees_steered_turns(embedded, shipped, tmp_path):
    """Steer, chat, then /compare: the unsteered side reads only unsteered turns."""
    from llm_steering import config

    profile, vectors = shipped
    q1, q2, q3, q4 = "Tell me about your weekend.", "What should I eat tonight?", "And tomorrow?", "Thanks!"
    pirate = [("pirate", 0.3, None)]
    chat_file = tmp_path / "chat.json"
    child = spawn("--temperature", "0", "--max-new-tokens", str(TOKENS), wait=False)
    try:
        a1 = reference(embedded, profile, vectors, q1, pirate)
        u2 = reference(embedded, profile, vectors, q2, [])  # the unsteered side: no steered turn before it
        s2 = reference(embedded, profile, vectors, q2, pirate, history=[(q1, a1)])
        # what the old console gave: the unsteered answer after the steered exchange
        assert reference(embedded, profile, vectors, q2, [], history=[(q1, a1)]) != u2
        a3 = reference(embedded, profile, vectors, q3, [], history=[(q2, u2)])
        # /history all: every turn, a compare turn with its unsteered answer since nothing is steered now
        a4 = reference(embedded, profile, vectors, q4, [], history=[(q1, a1), (q2, u2), (q3, a3)])
        child.expect_exact(PROMPT)
        out = say(child, "/steer pirate 0.3")
        assert "steering with Pirate (pirate) at 0.30 x norm" in out
        assert f"steered> {a1}\n" in say(child, q1)
        out = say(child, f"/compare {q2}")
        assert f"unsteered> {u2}\nsteered> {s2}\n" in out

        out = say(child, "/clear")  # the steering changes: say what the model will read
        assert "the next answer sees 1 of the 2 earlier turns" in out
        assert f"unsteered> {a3}\n" in say(child, q3)
        out = say(child, "/history all")
        assert "the next answer sees all 3 earlier turns, 1 of them answered with other steering" in out
        out = say(child, q4)
        assert "earlier answers were made with other steering" in out and f"unsteered> {a4}\n" in out

        out = say(child, f"/save-chat {chat_file}")
        assert "saved the chat (4 turns, each with its steering)" in out
        quit_cleanly(child)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    saved = json.loads(chat_file.read_text())
    assert saved["format"] == "llm-steering/chat"
    with_pirate = config.SteeringSpec(steering.EMBEDDED_MODEL_ID, (config.ActiveFeature("pirate", 0.3, "clamp"),))
    unsteered = config.SteeringSpec(steering.EMBEDDED_MODEL_ID, ())
    assert [(t["user"], t["answer"], t["steering"], t.get("unsteered")) for t in saved["turns"]] == [
        (q1, a1, with_pirate.to_dict(), None), (q2, s2, with_pirate.to_dict(), u2),
        (q3, a3, unsteered.to_dict(), None), (q4, a4, unsteered.to_dict(), None),
    ]
    assert config.SteeringSpec.from_dict(saved["turns"][0]["steering"]) == with_pirate


# ---------------------------------------------------------------------------
# Your own concept (/concept), what a feature does (/features NAME), defaults without a number
# ---------------------------------------------------------------------------

FIVE = (  # five sentences about the Eiffel Tower, as a newcomer would type them
    "The Eiffel Tower stands in the middle of Paris.", "We climbed the Eiffel Tower at sunset.",
    "Gustave Eiffel built the iron tower for the 1889 World's Fair.",
    "From the top of the Eiffel Tower you can see all of Paris.", "The Eiffel Tower sparkles with lights at night.",
)


def concept_reference(embedded, shipped, prompt: str, fraction: float | None = None):
    """The concept my_tower made in-process from FIVE, its promoted words, and the greedy answer it steers."""
    from llm_steering.concepts import make_concept
    from llm_steering.lens import token_words
    from llm_steering.recipe import ConceptRecipe

    model, tok = embedded
    profile, vectors = shipped
    catalog = demo.Catalog(profile, vectors)
    catalog.attach(model, tok)
    feature = make_concept(catalog, ConceptRecipe("my_tower", FIVE))
    chat = [{"role": "system", "content": profile.generation.system_prompt}, {"role": "user", "content": prompt}]
    comps = [feature.component(feature.default_fraction if fraction is None else fraction, "add")]
    answer = steering.generate_steered_answer_hf(model, tok, chat, comps, max_new_tokens=TOKENS, temperature=0.0,
                                                 repetition_penalty=profile.generation.repetition_penalty)
    lens = catalog.with_concepts([feature.vector]).feature_tokens("my_tower")  # measured at its default (layer 15 of 30)
    assert lens.measured
    return feature, token_words(lens.promoted), answer


def test_a_concept_from_five_sentences_is_made_kept_listed_and_steers(embedded, shipped, tmp_path):
    """/concept in the chat: made in seconds, switched on at its default, in /features (with what it does),
    kept in the user's file, listed by --help and steered with by --steer NAME in a new process."""
    env = {"STEERING_DATA_DIR": str(tmp_path)}
    child = spawn("--temperature", "0", "--max-new-tokens", str(TOKENS), env=env, wait=False)
    try:
        feature, words, steered = concept_reference(embedded, shipped, QUESTION)
        unsteered = reference(embedded, *shipped, QUESTION, [])
        assert steered != unsteered  # else the check below proves nothing
        child.expect_exact(PROMPT)
        out = say(child, "/find the Eiffel Tower")  # the default model has no SAE: say what to do instead
        assert ("error: profile 'smollm2' has no SAE to search for features; make your own concept from a few "
                "sentences instead: /concept NAME: sentence | sentence | ...") in out
        started = time.monotonic()
        out = say(child, "/concept my_tower: " + " | ".join(FIVE))
        assert time.monotonic() - started < 30
        assert "made your concept My Tower (my_tower) from 5 sentences in" in out
        assert f"steering with it at its default {format_fraction(feature.default_fraction)} x norm, add, layer 15" in out
        assert f"it raises: {', '.join(words)} (measured at its default; /features my_tower" in out
        assert (tmp_path / "smollm2-concepts.pt").is_file()
        assert re.search(r"^\s+my_tower\s+My Tower: your topic: The Eiffel Tower stands", say(child, "/features"), re.M)
        out = say(child, "/features my_tower")
        assert f"raises: {', '.join(words)}\n" in out and f"layer 15, default {feature.default_fraction:g}" in out
        assert "(measured: the tokens whose probability rises and falls most" in out
        assert f"steered> {steered}\n" in say(child, QUESTION)
        out = say(child, "/concept eiffel_tower: a b c")
        assert "error: the name 'eiffel_tower' is taken by a feature of profile 'smollm2'" in out
        quit_cleanly(child)
    finally:
        child.close(force=True)
    assert_clean_exit(child)
    helped = subprocess.run([sys.executable, DEMO, "--help"], cwd=str(ROOT), capture_output=True, text=True, timeout=60,
                            env={**os.environ, "NO_COLOR": "1", **env})
    assert re.search(r"^  my_tower  My Tower: your topic: The Eiffel Tower stands .*\(default "
                     + re.escape(f"{feature.default_fraction:g}") + r", add; your concept\)",
                     helped.stdout, re.M), helped.stdout
    # at its default strength, given (without one, the shipped profile steers it by auto)
    result = run_one_shot("--prompt", QUESTION, "--steer", "my_tower", format_fraction(feature.default_fraction),
                          "--temperature", "0", "--max-new-tokens", str(TOKENS), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == steered.strip()


def small_console(embedded, shipped, auto: bool = False, **kw) -> tuple[demo.Console, io.StringIO]:
    """An in-process chat on the shipped profile (greedy, two tokens; a feature without a strength steered by
    auto only with `auto`), printing into one buffer."""
    model, tok = embedded
    catalog = demo.Catalog(*shipped)
    catalog.attach(model, tok)
    out = io.StringIO()
    return demo.Console(model, tok, catalog, demo.Settings("hf", 0.0, 2, 1.0, "", 2048, auto=auto), out=out, info=out,
                        interactive=True, **kw), out


def test_features_name_shows_the_tokens_a_shipped_feature_raises_and_lowers_measured(embedded, shipped):
    """/features pirate: the tokens its steering at its default raises and lowers (lens.steered_tokens; a
    layer-15 feature of the 30-layer model: measured, not the logit lens), and the console says so."""
    from llm_steering.lens import steered_tokens, token_words

    model, tok = embedded
    profile, vectors = shipped
    console, out = small_console(embedded, shipped)
    console.command("/features pirate")
    pirate = console.catalog.resolve("pirate")
    lens = steered_tokens(model, tok, pirate.component(pirate.default_fraction))
    text = clean(out.getvalue())
    assert text.startswith("Pirate (pirate): Pirates, ships and treasure")
    assert f"raises: {', '.join(token_words(lens.promoted))}\n" in text and "pirate, treasure" in text
    assert f"lowers: {', '.join(token_words(lens.suppressed))}\n" in text
    assert "(measured: the tokens whose probability rises and falls most when a few everyday chats are steered" in text
    assert "logit lens" not in text
    with pytest.raises(ValueError, match="unknown feature 'nope'"):
        console.command("/features nope")


def test_steer_without_a_strength_takes_the_features_default(embedded, shipped):
    """/steer NAME and --steer NAME (issue 21): the default of /features, not a fixed 0.5."""
    model, tok = embedded
    profile, vectors = shipped
    console, out = small_console(embedded, shipped)
    catalog = console.catalog
    console.command("/steer pirate")
    console.command("/steer eiffel_tower clamp")
    default = {k: round_fraction(catalog.resolve(k).default_fraction) for k in ("pirate", "eiffel_tower")}  # as the app keeps it
    assert {k: (frac, op) for k, (_, frac, op) in console.active.items()} == {
        "pirate": (default["pirate"], "clamp"), "eiffel_tower": (default["eiffel_tower"], "clamp")}
    assert demo.parse_steer_words(["pirate"]) == ("pirate", None, None)
    assert demo.parse_steer_words(["pirate", "add"]) == ("pirate", None, "add")
    assert demo.parse_steer_words(["pirate", "-0.2", "clamp"]) == ("pirate", -0.2, "clamp")
    fraction = default["pirate"]
    expected = reference(embedded, profile, vectors, QUESTION, [("pirate", fraction, None)])
    result = run_one_shot("--prompt", QUESTION, "--steer", "pirate", format_fraction(fraction), "--temperature", "0",
                          "--max-new-tokens", str(TOKENS))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected.strip()


def test_a_long_auto_answer_in_the_console_lets_go_after_the_judged_words_and_says_so(embedded, shipped, monkeypatch):
    """Past the 48 judged tokens the chosen steering lets go (calibrate.AUTO_LET_GO), in the console as in the app:
    the notice says where, and the answer is calibrate.auto_answer's."""
    from llm_steering import calibrate

    monkeypatch.setattr(calibrate, "pick_candidate", lambda rows, **kw: 1)  # the op x1, prompt steered
    answer, text, _, expected = pirate_auto(embedded, shipped, 52)
    assert expected.let_go_at == 48 and answer == expected.answer
    assert "x norm, let go after its first 48 tokens (compared" in text


def test_a_feature_without_a_strength_is_steered_by_auto_where_the_profile_says_so(embedded, shipped):
    """Issue 28: the shipped profile's generation.auto makes auto what `--steer NAME` and `/steer NAME` do, as a
    preset does in the app; a strength gives the fixed one. The one-shot answer is calibrate.auto_answer's."""
    from llm_steering import calibrate

    model, tok = embedded
    profile, vectors = shipped
    assert profile.generation.auto
    feature = demo.Catalog(profile, vectors).resolve("pirate")
    chat = [{"role": "system", "content": profile.generation.system_prompt}, {"role": "user", "content": QUESTION}]
    expected = calibrate.auto_answer(model, tok, chat, feature.component(feature.default_fraction), norm=feature.norm,
                                     max_new_tokens=TOKENS, repetition_penalty=profile.generation.repetition_penalty)
    result = run_one_shot("--prompt", QUESTION, "--steer", "pirate", "--temperature", "0", "--max-new-tokens", str(TOKENS))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected.answer.strip()
    assert f"auto: trying Pirate {len(expected.table)} ways" in result.stderr

    console, out = small_console(embedded, shipped, auto=True)
    console.command("/steer pirate")
    console.command("/steer ocean 0.2")
    assert console.auto == {"pirate"} and console.active["ocean"][1] == 0.2
    text = out.getvalue()
    assert "Pirate (pirate), clamp, auto: the way to steer is picked for each answer" in text, text
    assert f"/steer pirate {format_fraction(feature.default_fraction)} for that strength, fixed" in text
    assert "auto (the way to steer is picked for each answer" in "\n".join(console.describe_active())
    console.command("/steer eiffel_tower")  # one auto at a time: the one before keeps its strength, and says so
    assert console.auto == {"eiffel_tower"}
    assert f"Pirate stays at {format_fraction(feature.default_fraction)} x norm, fixed" in out.getvalue()


def test_help_examples_use_the_features_defaults():
    """--help's examples name no strength: the defaults are re-picked, and --steer NAME takes them."""
    result = subprocess.run([sys.executable, DEMO, "--help"], cwd=str(ROOT), capture_output=True, text=True, timeout=60,
                            env={**os.environ, "NO_COLOR": "1"})
    examples = result.stdout.split("Examples:")[1]
    assert "--steer eiffel_tower" in examples
    assert not re.search(r"--steer \S+ -?[0-9.]+", examples), examples


def test_slash_help_wraps_with_a_hanging_indent_at_the_terminal_width(tmp_path):
    """/help at 120 columns: no line runs past the edge (where the terminal would wrap it to column 0)."""
    child = spawn(columns=120, env={"STEERING_DATA_DIR": str(tmp_path)})
    try:
        lines = say(child, "/help").strip("\n").splitlines()[1:]
        quit_cleanly(child)
    finally:
        child.close(force=True)
    assert len(lines) > 20 and lines[0].startswith("Commands")
    assert max(map(len, lines)) <= 120, max(lines, key=len)
    assert all(ln.startswith("  ") for ln in lines[1:-2]), lines  # every command and its continuation lines indented
    continued = [ln for ln in lines if ln.startswith("  " + " " * 20)]
    assert continued and all(ln[:32].strip() == "" for ln in continued)  # a hanging indent under the help column


def test_backend_vllm_is_refused_at_once_when_vllm_cannot_be_imported(embedded, shipped, monkeypatch):
    console, _ = small_console(embedded, shipped)
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vLLM were not installed
    with pytest.raises(ValueError, match=r"^backend vllm cannot run here: vLLM is not installed: see requirements-vllm"):
        console.command("/backend vllm")
    assert console.settings.backend == "hf"


def test_bad_concepts_and_a_hostile_concepts_file_are_one_line_and_change_nothing(embedded, shipped, tmp_path):
    from llm_steering.console.own_concepts import load_user_concepts

    path = tmp_path / "smollm2-concepts.pt"
    console, out = small_console(embedded, shipped, concepts_file=path)
    for line, message in (("/concept no colon here", "usage: /concept NAME"),
                          ("/concept Bad Name: a b", "concept name .Bad. is not valid: use snake_case"),
                          ("/concept x: " + "word " * 100, "at most 300 characters"),
                          ("/concept x: " + " | ".join(["a b"] * 30), "give 1 to 20 example sentences"),
                          ("/concept x poem: a b", "template 'poem' is unknown"),
                          ("/concept x: |  | ", "give 1 to 20 example sentences")):
        with pytest.raises(ValueError, match=message) as info:
            console.command(line)
        assert "\n" not in str(info.value)
    assert not path.exists() and not console.active and list(tmp_path.iterdir()) == []
    # a file that is not a vectors file (or one with a pickle that asks for code): a notice, the chat goes on
    path.write_bytes(b"PK\x03\x04 not really a zip" + os.urandom(64))
    catalog, note = load_user_concepts(console.catalog, path)
    assert catalog is console.catalog and note.startswith(f"your concepts in {path} are not loaded: ")
    assert "\n" not in note
    junk = path.read_bytes()
    console.command("/concept mine: We climbed the Eiffel Tower at sunset. | Paris at night.")  # made, not kept there
    assert path.read_bytes() == junk and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert "mine" in console.active and "kept for this chat only: " in clean(out.getvalue())
    path.unlink()
    console.command("/concept mine: We climbed the Eiffel Tower at sunset. | Paris at night.")
    assert steering.load_vectors(path).names == ["mine"] and [p.name for p in tmp_path.iterdir()] == [path.name]
    helped = subprocess.run([sys.executable, DEMO, "--help"], cwd=str(ROOT), capture_output=True, text=True, timeout=60,
                            env={**os.environ, "STEERING_DATA_DIR": str(tmp_path)})
    assert helped.returncode == 0 and re.search(r"^  mine  Mine: your topic: ", helped.stdout, re.M)
