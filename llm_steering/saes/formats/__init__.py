"""One module per SAE file format; each registers itself (see llm_steering/saes/registry.py)."""
