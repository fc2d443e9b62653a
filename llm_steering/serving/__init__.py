"""Steering on vLLM's own OpenAI-compatible server: the middleware (serve.py launches it)."""
