"""`vqar serve`: one process holding one model, a web page at / and an HTTP API beside it (see `api.py`)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a model server

from fastapi import FastAPI  # noqa: E402

from vqar.serve.engine import SamplingEngine  # noqa: E402

log = logging.getLogger("vqar.serve")


def class_names_for(model_path: str | Path) -> list[str] | None:
    """The class names of the code store a training run was made from (None when unknown)."""
    run_yaml = Path(model_path) / "run.yaml"
    if not run_yaml.is_file():
        return None
    import yaml

    codes = (yaml.safe_load(run_yaml.read_text()) or {}).get("data", {}).get("codes")
    manifest = Path(codes) / "manifest.json" if codes else None
    if manifest is None or not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("class_names") or None


def build_app(engine: SamplingEngine, *, ui: bool = True) -> FastAPI:
    """The FastAPI app: the API routes, and the Gradio page mounted at / (`ui=False` leaves it out)."""
    from vqar.serve.api import build_router

    app = FastAPI(title="vqar", description="Sample a vqar model: POST /generate, GET /model, GET /health")
    app.include_router(build_router(engine))
    if ui:
        import gradio as gr

        from vqar.serve.ui import build_ui

        app = gr.mount_gradio_app(app, build_ui(engine), path="/")
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(engine: SamplingEngine, host: str = "127.0.0.1", port: int = 7860) -> None:
    import uvicorn

    if not is_loopback(host):
        log.warning("binding to %s: anyone who can reach this machine on port %d can use the model (and its "
                    "CPU/GPU). Put it behind a proxy with authentication for shared networks.", host, port)  # fmt: skip
    app = build_app(engine)
    print(f"vqar serve: http://{host}:{port}/ (web page), POST http://{host}:{port}/generate (API)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
