"""Serving: an OpenAI-compatible HTTP API, the official ChatGLM-6B `api.py` endpoint and a web chat
page, on a request queue that batches requests onto the jitted decoder (`glm-serve`)."""

from glm_jax.serve.app import ServeLimits, create_app
from glm_jax.serve.background import serve_in_thread
from glm_jax.serve.engine import Engine, GenerationRequest

__all__ = ["Engine", "GenerationRequest", "ServeLimits", "create_app", "serve_in_thread"]
