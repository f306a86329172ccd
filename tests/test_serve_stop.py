"""`vqar serve` stopping (Ctrl-C, SIGTERM, a second Ctrl-C) with requests waiting and being drawn, large
coarse-to-fine requests, and the address it prints."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

if os.environ.get("CI", "").lower() == "true":  # CI installs the serve extra: its absence fails there
    import gradio  # noqa: F401
else:
    pytest.importorskip("gradio", reason="the serve extra is not installed (pip install 'vqar[serve]')")

from test_serve import _wait_for, _wait_until_taken, ask  # noqa: E402
from vqar.serve.engine import SHUTTING_DOWN, RequestError, SamplingEngine  # noqa: E402


def _refused_503(future) -> bool:
    try:
        future.result(timeout=10)
    except RequestError as err:
        return err.status == 503 and str(err) == SHUTTING_DOWN
    return False


def test_a_stopping_server_answers_what_waits_at_once_and_what_it_draws_after_its_grace(class_model):
    """Stopped with requests queued, the server drew every one of them for nobody before it exited (39 s for 10
    requests on a CPU), and a service manager kills a server that takes that long. Now the queued requests are
    answered 503 at once, new ones are refused, and the round being drawn has a grace period: then it stops before
    its next batch and its requests are answered 503 too."""
    engine = SamplingEngine(class_model, class_model.tokenizer, max_images=4, max_queue=8, max_batch=1)
    try:
        with engine._lock:  # the worker takes the first request and waits for the model
            drawn = engine.submit(ask(class_id=0, n=4))
            _wait_until_taken(engine)
            queued = [engine.submit(ask(class_id=1, n=1)) for _ in range(3)]
            engine.shut_down(grace=0.3)
            assert all(_refused_503(future) for future in queued)  # at once: the worker is still stuck
            with pytest.raises(RequestError, match="shutting down") as err:
                engine.submit(ask(class_id=1, n=1))
            assert err.value.status == 503
            assert not drawn.done()
            time.sleep(0.6)  # past the grace period
        assert _refused_503(drawn)
        assert engine.model_runs == 0  # it stopped before its first batch
    finally:
        engine.close()


def test_close_stops_the_round_being_drawn(class_model):
    """The server's last step: the worker ran on after the interpreter began to exit (`close` waited 30 s, then
    gave up), and a torch thread still running at exit aborts the process (`terminate called without an active
    exception`, status 134). `close` now stops the round before its next batch and waits for the worker."""
    engine = SamplingEngine(class_model, class_model.tokenizer, max_images=4, max_queue=8, max_batch=1)
    with engine._lock:
        drawn = engine.submit(ask(class_id=0, n=4))
        _wait_until_taken(engine)
        closing = threading.Thread(target=engine.close)
        closing.start()
        _wait_for(lambda: engine.stopping, "close did not stop the round")
    closing.join(timeout=60)
    assert not closing.is_alive() and not engine._worker.is_alive()
    assert _refused_503(drawn)


def test_the_signal_that_stops_uvicorn_shuts_the_engine_down(engine):
    import uvicorn

    from vqar.serve.app import _Server, build_app

    server = _Server(uvicorn.Config(build_app(engine, ui=False)), engine, grace=5.0)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and engine.closing.is_set()
    engine.closing.clear()  # the module's engine serves the other tests


def test_a_request_queued_when_the_server_stops_is_a_503_over_http(class_model):
    from fastapi.testclient import TestClient

    from vqar.serve.app import build_app

    engine = SamplingEngine(class_model, class_model.tokenizer, max_images=4, max_queue=8, max_batch=4)
    client = TestClient(build_app(engine, ui=False))
    try:
        with ThreadPoolExecutor(max_workers=1) as pool, engine._lock:
            blocker = engine.submit(ask(class_id=0, n=1))
            _wait_until_taken(engine)
            pending = pool.submit(client.post, "/generate", json={"class_id": 1, "n": 1})
            _wait_for(lambda: engine.jobs.qsize() == 1, "the request did not reach the queue")
            engine.shut_down()
            answer = pending.result(timeout=60)
        assert answer.status_code == 503 and answer.json()["detail"] == SHUTTING_DOWN
        assert blocker.result(timeout=120).images.shape[0] == 1  # no grace given: the round is drawn to its end
        late = client.post("/generate", json={"class_id": 1, "n": 1})
        assert late.status_code == 503 and late.json()["detail"] == SHUTTING_DOWN
    finally:
        engine.close()


def test_a_forced_stop_gives_the_waiting_request_up_and_answers_503(engine):
    """A second Ctrl-C cancels the handlers: each answered 500 with a CancelledError traceback in the log, and
    its request was still drawn for nobody."""
    from fastapi import HTTPException

    from vqar.serve.api import _result_while_connected

    class StillConnected:
        async def is_disconnected(self) -> bool:
            return False

    async def cancelled_while_waiting(future):
        task = asyncio.create_task(_result_while_connected(engine, future, StillConnected(), timeout=60))
        await asyncio.sleep(0.3)
        task.cancel()
        return await task

    with engine._lock:
        future = engine.submit(ask(class_id=1, n=1))
        with pytest.raises(HTTPException) as err:
            asyncio.run(cancelled_while_waiting(future))
        assert err.value.status_code == 503 and err.value.detail == SHUTTING_DOWN
        assert future.cancelled()  # given up: not drawn
    _wait_for(lambda: not engine.sampling.is_set() and engine.jobs.qsize() == 0, "the worker did not settle")


def test_coarse_to_fine_is_decoded_in_batches_and_timed(class_model, monkeypatch):
    """A request of 2,048 images with coarse_to_fine decoded all of them at once at every level (1.3 GB where
    its images took 0.2 GB), and the `seconds` it reported left that decoding out (9.9 s of 44 s)."""
    tokenizer = class_model.tokenizer
    whole = SamplingEngine(class_model, tokenizer, max_images=5, max_batch=64)
    try:
        expected = whole.generate(ask(class_id=3, n=5, seed=2, coarse_to_fine=True), timeout=120)
    finally:
        whole.close()
    sizes, seconds = [], [0.0]
    real_decode = type(tokenizer).decode

    def decode_watched(self, codes, *args, **kwargs):
        began = time.perf_counter()
        sizes.append(codes.shape[0])
        try:
            return real_decode(self, codes, *args, **kwargs)
        finally:
            seconds[0] += time.perf_counter() - began

    monkeypatch.setattr(type(tokenizer), "decode", decode_watched)
    engine = SamplingEngine(class_model, tokenizer, max_images=5, max_batch=2)
    try:
        result = engine.generate(ask(class_id=3, n=5, seed=2, coarse_to_fine=True), timeout=120)
    finally:
        engine.close()
    assert max(sizes) <= 2 and len(sizes) >= 3 * (1 + engine.levels)  # 3 batches, for the images and each level
    assert result.seconds >= seconds[0]  # the decoding is part of the time reported
    assert torch.allclose(result.images, expected.images, atol=1e-5)
    for level, want in zip(result.coarse_to_fine, expected.coarse_to_fine, strict=True):
        assert torch.allclose(level, want, atol=1e-5)


def test_the_memory_check_counts_the_coarse_to_fine_decodes(class_run, capsys, monkeypatch):
    import vqar.serve.app
    import vqar.utils.memory
    from conftest import run_cli

    monkeypatch.setattr(vqar.utils.memory, "available_memory", lambda: 8 << 30)
    monkeypatch.setattr(vqar.serve.app, "serve", lambda *args, **kwargs: None)
    code, err = run_cli(["serve", "--model", str(class_run), "--port", "0", "--max-images", "500000"], capsys)
    # 32x32 grey images: 4 KiB each as float32, and 4 more for the 4 levels of the RQ stack.
    assert code == 2 and "with their 4 coarse-to-fine decodes would need about 10" in err, err


@pytest.mark.parametrize(("host", "url"), [("127.0.0.1", "http://127.0.0.1:80/"), ("::1", "http://[::1]:80/"),
                                           ("localhost", "http://localhost:80/")])  # fmt: skip
def test_the_printed_address_is_a_url_for_ipv6_hosts_too(host, url):
    from vqar.serve.app import server_url

    assert server_url(host, 80) == url
