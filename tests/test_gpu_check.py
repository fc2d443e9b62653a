"""benchmarks/gpu_check.py --tiny: the GPU check's steps run on a CPU and print the speed table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -r requirements-vllm.txt)")

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_mode_finishes_and_prints_the_table():
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\| tiny Llama \(random\) \| (\S+(?: \(HTTP\))?) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|", done.stdout, re.M)
    assert {(backend, int(n)) for backend, n, _, _ in rows} == {
        (b, n) for b in ("server (HTTP)", "hooks", "nnsight") for n in (1, 2)}
    assert all(float(u) > 0 and float(s) > 0 for _, _, u, s in rows)
