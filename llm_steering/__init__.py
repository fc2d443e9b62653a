"""llm_steering: steer a chat LLM by editing its residual stream with feature directions.

The public API is re-exported by the `steering` module at the repository root (and by
`llm_steering.steering`); the entry points (`app.py`, `demo.py`, `extract_steering_vectors.py`,
`serve.py`) sit beside it. This file must stay free of heavy imports: the console's `--help`
imports the package without torch.
"""

import os

# PyTorch's OpenMP threads spin while idle ("active" wait). Generations run in their own
# threads (one per request, plus the caller's), each with its own OpenMP team, and spinning
# teams starve the working one: measured here, an NNsight answer after a hooks answer ran 4-5x
# slower. Passive waiting removes that and costs nothing measurable on one stream. It must be
# set before torch is first imported: this is the one place that sets it, and every import of
# the package runs it first (ruff's isort puts first-party imports before third-party ones, see
# ruff.toml). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Fast downloads of the big files (4 GiB SAE files, a 16 GB model): the design card named hf-transfer,
# but huggingface_hub 2.x dropped it (HF_HUB_ENABLE_HF_TRANSFER is ignored) for hf-xet, whose fast
# mode is HF_XET_HIGH_PERFORMANCE. huggingface_hub reads it once, when it is first imported, so it
# is set here, before anything imports it. An explicit setting wins.
os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")

__version__ = "0.3.0"
