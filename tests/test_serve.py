"""`vqar serve`: the sampling engine (validation, queue limits, batching that keeps seeds reproducible, also for
requests that arrive over HTTP together), and a request that fails, whose client hangs up or that times out, alone."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

if os.environ.get("CI", "").lower() == "true":  # CI installs the serve extra: its absence fails there
    import gradio  # noqa: F401
else:
    pytest.importorskip("gradio", reason="the serve extra is not installed (pip install 'vqar[serve]')")

from vqar.sampling import SamplingSettings  # noqa: E402
from vqar.serve.app import build_app  # noqa: E402
from vqar.serve.engine import GenerateRequest, RequestError, SamplingEngine  # noqa: E402


def ask(class_id=None, n=4, prompt=None, coarse_to_fine=False, **settings) -> GenerateRequest:
    return GenerateRequest(class_id, prompt, n, SamplingSettings(**settings), coarse_to_fine)


def _wait_until_taken(engine: SamplingEngine) -> None:
    """Until the worker has taken the queued requests into a round (it then waits for the lock the test holds)."""
    assert engine.sampling.wait(timeout=60), "the sampling worker did not take the queued request"


def _wait_for(condition, what: str, seconds: float = 60) -> None:
    for _ in range(int(seconds * 20)):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} within {seconds:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_seeds_give_the_same_images_alone_or_batched(engine):
    alone = engine.generate(ask(class_id=3, n=4, seed=7, top_k=16, cfg_scale=2.0), timeout=120)
    assert alone.images.shape == (4, 1, 32, 32)
    again = engine.generate(ask(class_id=3, n=4, seed=7, top_k=16, cfg_scale=2.0), timeout=120)
    assert torch.equal(alone.images, again.images)
    other = engine.generate(ask(class_id=3, n=4, seed=8, top_k=16, cfg_scale=2.0), timeout=120)
    assert not torch.equal(alone.images, other.images)
    runs = engine.model_runs
    with engine._lock:  # the worker takes a first request and waits for the model; three more queue up meanwhile
        blocker = engine.submit(ask(class_id=0, n=1))
        _wait_until_taken(engine)
        futures = [engine.submit(ask(class_id=c, n=4, seed=s, top_k=16, cfg_scale=2.0))
                   for c, s in ((3, 7), (5, 1), (3, 8))]  # fmt: skip
    blocker.result(timeout=120)
    results = [f.result(timeout=120) for f in futures]
    assert engine.model_runs == runs + 2 and results[0].batched_with == 12  # the three shared one model run
    assert torch.equal(results[0].images, alone.images) and torch.equal(results[2].images, other.images)
    first_two = engine.generate(ask(class_id=3, n=2, seed=7, top_k=16, cfg_scale=2.0), timeout=120)
    assert torch.equal(first_two.images, alone.images[:2])  # image j depends on (seed, j) only


@pytest.mark.parametrize(
    ("request_fields", "status", "message"),
    [
        ({"class_id": 12}, 422, r"^class_id must be an integer in 0..9, got 12$"),
        ({"class_id": -1}, 422, r"^class_id must be an integer in 0..9, got -1$"),
        ({"class_id": True}, 422, r"^class_id must be an integer in 0..9, got True$"),
        ({}, 422, r"^class_id is required by this class-conditional model: give one in 0..9$"),
        ({"class_id": 1, "seed": -1}, 422, "seed"),
        ({"class_id": 1, "cfg_scale": 0.5}, 422, "cfg_scale"),
        ({"class_id": 1, "cfg_scale": 1e308}, 422, "cfg_scale must be at most 1,000,000"),  # answered 200, all NaN
        ({"class_id": 1, "top_p": 2.0}, 422, "top_p"),
        ({"class_id": 1, "temperature": 0.0}, 422, "temperature"),
        ({"class_id": 1, "top_k": [4, 4]}, 422, "depth 4"),
        ({"class_id": 1, "n": 0}, 422, "positive number"),
        ({"class_id": 1, "n": 7}, 413, "6 images per request"),
        ({"class_id": 1, "prompt": "a cat"}, 422, "not text-conditioned"),
        ({"class_id": 1, "cfg_interval": -5}, 422, "cfg_interval"),
        ({"class_id": 1, "smooth": True}, 422, "RQTransformer does not take"),  # checked before queueing, not a 500
    ],
)
def test_invalid_requests_are_refused_with_the_reason(engine, request_fields, status, message):
    with pytest.raises(RequestError, match=message) as err:
        engine.submit(ask(**request_fields))
    assert err.value.status == status


def test_a_class_id_is_refused_by_a_model_without_classes(class_model):
    """A class_id sent to an unconditional model was "this model is unconditional: sample it without classes",
    which names neither the field nor the value."""
    import dataclasses

    uncond = type(class_model)(dataclasses.replace(class_model.cfg, num_classes=0)).attach(class_model.tokenizer)
    engine = SamplingEngine(uncond, class_model.tokenizer, max_images=2)
    try:
        with pytest.raises(RequestError, match=r"^class_id must be left out for an unconditional model, got 3$"):
            engine.submit(ask(class_id=3, n=1))
        assert engine.generate(ask(n=1), timeout=120).images.shape == (1, 1, 32, 32)
    finally:
        engine.close()


def test_a_full_queue_answers_429_and_recovers(class_model):
    small = SamplingEngine(class_model, class_model.tokenizer, max_images=2, max_queue=2)
    try:
        with small._lock:  # the worker is stuck on the first job: two more fill the queue, the fourth is refused
            first = small.submit(ask(class_id=0, n=1))
            _wait_until_taken(small)
            waiting = [small.submit(ask(class_id=0, n=1)) for _ in range(2)]
            with pytest.raises(RequestError, match="busy") as err:
                small.submit(ask(class_id=0, n=1))
            assert err.value.status == 429
        assert all(f.result(timeout=120).images.shape == (1, 1, 32, 32) for f in [first, *waiting])
        assert small.generate(ask(class_id=0, n=1), timeout=120).images.shape[0] == 1
    finally:
        small.close()


def test_a_request_that_fails_while_drawing_fails_alone(engine, monkeypatch):
    """Two requests batched together; drawing fails for one of them: the other still gets its images, the same
    ones it gets alone."""
    import vqar.serve.engine as engine_module

    real_draw = engine_module.draw

    def draw_failing_for_seed_13(*args, seeds=None, **kwargs):
        if seeds is not None and bool((seeds == 13).any()):
            raise RuntimeError("out of memory (as if)")
        return real_draw(*args, seeds=seeds, **kwargs)

    alone = engine.generate(ask(class_id=2, n=2, seed=5), timeout=120)
    monkeypatch.setattr(engine_module, "draw", draw_failing_for_seed_13)
    with engine._lock:  # both requests wait for the model and are taken in one round
        blocker = engine.submit(ask(class_id=0, n=1))
        _wait_until_taken(engine)
        failing, fine = engine.submit(ask(class_id=1, n=2, seed=13)), engine.submit(ask(class_id=2, n=2, seed=5))
    blocker.result(timeout=120)
    with pytest.raises(RuntimeError, match="out of memory"):
        failing.result(timeout=120)
    assert torch.equal(fine.result(timeout=120).images, alone.images)


def test_api_burst_of_concurrent_requests(client, engine):
    """32 HTTP requests of 2 images arrive while the worker is busy: all of them are served in one round, 64 images
    in batches of at most max_batch=16, so exactly 4 model runs (plus 1 for the request that kept it busy)."""
    import tracemalloc

    runs = engine.model_runs
    tracemalloc.start()

    def post(i: int):
        return i, client.post("/generate", json={"class_id": i % 10, "n": 2, "seed": i, "top_k": 16})

    with ThreadPoolExecutor(max_workers=32) as pool:
        with engine._lock:  # the worker takes a first request and waits for the model; the burst queues up
            blocker = engine.submit(ask(class_id=0, n=1))
            _wait_until_taken(engine)
            pending = pool.map(post, range(32))
            for _ in range(1200):
                if engine.jobs.qsize() == 32:
                    break
                time.sleep(0.1)
            assert engine.jobs.qsize() == 32, "the 32 requests did not reach the queue within 120 s"
        blocker.result(timeout=120)
        answers = list(pending)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert all(answer.status_code == 200 and len(answer.json()["images"]) == 2 for _, answer in answers)
    assert all(answer.json()["batched_with"] == 64 for _, answer in answers)  # one round for all of them
    assert engine.model_runs - runs == 1 + 64 // 16
    assert peak < 64 * 2**20  # 64 tiny images and their requests: bounded, far below a leak's growth
    alone = client.post("/generate", json={"class_id": 5 % 10, "n": 2, "seed": 5, "top_k": 16}).json()
    assert answers[5][1].json()["images"] == alone["images"]  # batching did not change what seed 5 draws


def test_a_client_that_hangs_up_stops_its_drawing(engine):
    """A request whose client hung up was drawn to the end, its images thrown away: the model stayed busy for
    nobody. Now the handler notices the hang-up, and a round whose requests are all gone stops before its next
    batch; the server goes on answering."""
    import json

    import uvicorn

    port = _free_port()
    running = uvicorn.Server(uvicorn.Config(build_app(engine, ui=False), host="127.0.0.1", port=port,
                                            log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: running.started, "the server did not start")
        runs, abandoned = engine.model_runs, engine.abandoned
        body = json.dumps({"class_id": 1, "n": 4}).encode()
        head = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        with engine._lock:  # the worker takes the request and waits for the model while the client hangs up
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(f"{head}\r\n\r\n".encode() + body)
                _wait_until_taken(engine)
            _wait_for(lambda: engine.abandoned == abandoned + 1, "the hang-up was not noticed")
        _wait_for(lambda: not engine.sampling.is_set(), "the worker did not finish its round")
        assert engine.model_runs == runs  # nothing was drawn for the client that left
        assert engine.generate(ask(class_id=1, n=1), timeout=120).images.shape == (1, 1, 32, 32)
    finally:
        running.should_exit = True
        thread.join(timeout=10)


def test_a_request_that_times_out_leaves_the_server_answering(engine):
    """A request answered 504 (sampling took longer than the timeout) was drawn on and then ended the worker
    thread when its answer was set on the given-up future, so that every later request waited forever."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from vqar.serve.api import build_router

    app = FastAPI()
    app.include_router(build_router(engine, timeout=0.5))
    client = TestClient(app)
    with engine._lock:
        answer = client.post("/generate", json={"class_id": 1, "n": 1})
    assert answer.status_code == 504 and "longer than" in answer.json()["detail"]
    _wait_for(lambda: not engine.sampling.is_set(), "the worker did not finish its round")
    assert client.post("/generate", json={"class_id": 1, "n": 1}).status_code == 200


def test_each_batched_request_gets_coarse_to_fine_only_if_it_asked(client, engine):
    """Requests batched together in one round: one asks for coarse_to_fine, and every answer of the round used to
    carry it (the JSON key, the zip's coarse_to_fine/ files), so what a client got depended on other clients.
    Each answer now holds what its own request asked for, and the same images as without batching."""
    plain = {"class_id": 3, "n": 4, "seed": 0}
    ladder = {"class_id": 3, "n": 1, "seed": 0, "coarse_to_fine": True}
    alone = client.post("/generate", json=plain).json()
    assert "coarse_to_fine" not in alone
    bodies = [plain, plain, {**plain, "format": "zip"}, ladder, {**ladder, "format": "zip"}]
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        with engine._lock:  # the worker takes a first request and waits for the model; the others queue up
            blocker = engine.submit(ask(class_id=0, n=1))
            _wait_until_taken(engine)
            pending = pool.map(lambda body: client.post("/generate", json=body), bodies)
            _wait_for(lambda: engine.jobs.qsize() == len(bodies), "the requests did not reach the queue")
        blocker.result(timeout=120)
        answers = list(pending)
    assert all(answer.status_code == 200 for answer in answers)
    first, second, third, fourth, fifth = answers
    for answer in (first, second):
        data = answer.json()
        assert data["batched_with"] == 14  # one round for all of them
        assert "coarse_to_fine" not in data and data["images"] == alone["images"]
    names = zipfile.ZipFile(io.BytesIO(third.content)).namelist()
    assert names == [f"image_{i:03d}.png" for i in range(4)]
    asked = fourth.json()
    assert asked["images"] == alone["images"][:1]  # image j depends on (seed, j) only
    assert len(asked["coarse_to_fine"]) == 4 and all(len(level) == 1 for level in asked["coarse_to_fine"])
    assert asked["coarse_to_fine"][-1] == asked["images"]
    names = zipfile.ZipFile(io.BytesIO(fifth.content)).namelist()
    assert len([n for n in names if n.startswith("coarse_to_fine/")]) == 4 and "image_000.png" in names
