"""`vqar serve`: a web page (Gradio) and an HTTP API over one loaded model, with a batching request queue.

Needs the `serve` extra (gradio, which brings FastAPI and uvicorn): `pip install 'vqar[serve]'`."""

from vqar.serve.engine import GenerateRequest, GenerateResult, RequestError, SamplingEngine

__all__ = ["GenerateRequest", "GenerateResult", "RequestError", "SamplingEngine"]
