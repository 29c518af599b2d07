"""The OpenAI-compatible HTTP API, laid out as vLLM's entrypoints are:
  protocol   request bodies (pydantic) and reading one, with OpenAI's 400s
  responses  response models and the renderers of whole answers and stream chunks
  serving    the endpoints' logic over the backend (choices, retries, streaming)
  errors     OpenAI's error shape for every refusal
  auth       API / admin keys and per-key limits (an ASGI middleware)
  metrics    Prometheus families of the ingress
  admin      the drafter registry's admin routes and the snapshots /metrics and the dashboard read
  openapi    the schema, declared from the same models and rules
  app        create_app: the wiring (its docstring describes the backend interface)
"""
from onspec.cluster.api.app import create_app

__all__ = ["create_app"]
