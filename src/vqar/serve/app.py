"""`vqar serve`: one process holding one model, a web page at / and an HTTP API beside it (see `api.py`)."""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import signal
import socket
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a model server

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from vqar.parallel.runtime import Terminated  # noqa: E402
from vqar.serve.engine import SamplingEngine  # noqa: E402

log = logging.getLogger("vqar.serve")

MAX_UPLOAD_BYTES = 1024


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


def build_app(engine: SamplingEngine, *, ui: bool = True, work_dir: str | Path | None = None) -> FastAPI:
    """The FastAPI app: the API routes, and the Gradio page mounted at / (`ui=False` leaves it out), which writes
    its zip downloads in `work_dir`."""
    from fastapi.exceptions import RequestValidationError

    from vqar.serve.api import build_router, validation_error
    from vqar.serve.middleware import BodyLimit, WrongMethodGuard

    app = FastAPI(title="vqar", description="Sample a vqar model: POST /generate, GET /model, GET /health")
    router = build_router(engine)
    app.include_router(router)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(BodyLimit, router=router)
    app.add_middleware(WrongMethodGuard, router=router)  # outermost: a wrong method is a 405 before the body is read
    if ui:
        import gradio as gr

        from vqar.serve.ui import build_ui

        # The page takes no files: Gradio's upload route gets a token limit instead of an unbounded one.
        app = gr.mount_gradio_app(app, build_ui(engine, work_dir), path="/", max_file_size=MAX_UPLOAD_BYTES)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, which on Ctrl-C or SIGTERM also shuts the engine down at once (`SamplingEngine.shut_down`):
    the requests still queued are answered 503 then, not drawn one after another while the server waits for their
    connections to end (which it does before any shutdown hook runs), and the round being drawn has `grace`
    seconds."""

    def __init__(self, config: uvicorn.Config, engine: SamplingEngine, grace: float):
        super().__init__(config)
        self.engine, self.grace = engine, grace

    def handle_exit(self, sig, frame) -> None:
        self.engine.shut_down(self.grace)
        super().handle_exit(sig, frame)


def _exit_on_signal(signum, frame) -> None:
    raise Terminated  # ends as any command stopped by SIGTERM: status 143 and "vqar: interrupted"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, ready for the server; an address in use (or not this machine's) is an OSError
    of one line, before the model is loaded."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, OverflowError) as err:
        raise OSError(f"cannot listen on {host}:{port}: {err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise OSError(
                f"port {port} on {host} is in use (another server?): stop it or choose another --port"
            ) from None
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def server_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"  # IPv6 addresses in brackets


def serve(engine: SamplingEngine, host: str = "127.0.0.1", port: int = 7860, sock: socket.socket | None = None,
          grace: float = 10.0) -> None:  # fmt: skip
    """Runs the server until it is stopped; `sock` is a socket from `listen(host, port)` (else one is bound here).
    Stopped, it gives the requests being drawn `grace` seconds (see `SamplingEngine.shut_down`)."""
    sock = sock or listen(host, port)
    port = sock.getsockname()[1]  # the one the system chose for --port 0
    if not is_loopback(host):
        log.warning("binding to %s: anyone who can reach this machine on port %d can use the model (and its "
                    "CPU/GPU). Put it behind a proxy with authentication for shared networks.", host, port)  # fmt: skip
    # Zip downloads and anything Gradio stores go to one temporary folder, removed when the server stops. Uvicorn
    # stops on SIGTERM and then raises the signal again: exiting through an exception lets the folder be removed.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with tempfile.TemporaryDirectory(prefix="vqar-serve-") as work:
        os.environ["GRADIO_TEMP_DIR"] = work
        app = build_app(engine, work_dir=work)
        url = server_url(host, port)
        print(f"vqar serve: {url} (web page), POST {url}generate (API)", flush=True)
        try:
            _Server(uvicorn.Config(app, host=host, port=port, log_level="warning"), engine, grace).run(sockets=[sock])
        finally:
            sock.close()
            engine.close()
