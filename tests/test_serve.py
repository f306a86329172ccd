"""`vqar serve`: the sampling engine (validation, queue limits, batching that keeps seeds reproducible), the HTTP
API, and the web page driven in a real headless Chromium (Debian's package, through Playwright)."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import socket
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

if os.environ.get("CI", "").lower() == "true":  # CI installs the serve extra: its absence fails there
    import gradio  # noqa: F401
else:
    pytest.importorskip("gradio", reason="the serve extra is not installed (pip install 'vqar[serve]')")

import vqar  # noqa: E402
from vqar.sampling import SamplingSettings  # noqa: E402
from vqar.serve.api import decode_png  # noqa: E402
from vqar.serve.app import build_app, is_loopback  # noqa: E402
from vqar.serve.engine import GenerateRequest, RequestError, SamplingEngine  # noqa: E402


def ask(class_id=None, n=4, prompt=None, coarse_to_fine=False, **settings) -> GenerateRequest:
    return GenerateRequest(class_id, prompt, n, SamplingSettings(**settings), coarse_to_fine)


def find_chromium() -> str | None:
    """The Chromium to drive: $VQAR_CHROMIUM, else the first of chromium / chromium-browser / google-chrome on
    PATH (Debian's package is `chromium`; `make browser` installs it)."""
    chosen = os.environ.get("VQAR_CHROMIUM")
    if chosen:
        return shutil.which(chosen)  # a path or a command name; None when it is not an executable
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def need_for_browser_test(missing: str | None) -> None:
    """Skips the browser test with the reason when something it needs is missing; under CI (CI=true), where it
    must run, that is a failure instead."""
    if missing is None:
        return
    if in_ci():
        pytest.fail(f"CI=true but {missing}: the browser test of `vqar serve` cannot run", pytrace=False)
    pytest.skip(missing)


@pytest.fixture(scope="module")
def class_model(class_run):
    return vqar.load_pretrained(class_run)


@pytest.fixture(scope="module")
def engine(class_model):
    engine = SamplingEngine(class_model, class_model.tokenizer, max_images=6, max_queue=64, max_batch=16)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    return TestClient(build_app(engine, ui=False))


# ---------------------------------------------------------------- engine
def _wait_until_taken(engine: SamplingEngine) -> None:
    """Until the worker has taken the queued requests into a round (it then waits for the lock the test holds)."""
    assert engine.sampling.wait(timeout=60), "the sampling worker did not take the queued request"


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


# ---------------------------------------------------------------- HTTP API
def test_api_health_model_and_generate(client):
    assert client.get("/health").json()["status"] == "ok"
    described = client.get("/model").json()
    assert described["architecture"] == "RQTransformer" and described["conditioning"] == "class"
    assert described["num_classes"] == 10 and described["depth"] == 4 and described["max_images_per_request"] == 6
    body = {"class_id": 2, "n": 3, "seed": 5, "top_k": [16, 16, 8, 8], "top_p": 0.95, "cfg_scale": 2.0,
            "coarse_to_fine": True}  # fmt: skip
    answer = client.post("/generate", json=body)
    assert answer.status_code == 200
    data = answer.json()
    images = [decode_png(text) for text in data["images"]]
    assert len(images) == 3 and images[0].shape == (32, 32) and images[0].dtype == np.uint8
    assert len(data["coarse_to_fine"]) == 4 and all(len(level) == 3 for level in data["coarse_to_fine"])
    assert data["coarse_to_fine"][-1] == data["images"]  # all D codes: the images themselves
    assert client.post("/generate", json=body).json()["images"] == data["images"]
    archive = client.post("/generate", json={**body, "format": "zip"})
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(archive.content)).namelist()
    assert sorted(n for n in names if "/" not in n) == ["image_000.png", "image_001.png", "image_002.png"]
    assert len([n for n in names if n.startswith("coarse_to_fine/")]) == 12


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"class_id": 1, "top_p": 2}, 422, "top_p"),
        ({"class_id": 99}, 422, "class_id must be an integer in 0..9, got 99"),
        ({"class_id": 1, "greedy": "maybe"}, 422, "bool"),
        ({"class_id": 1, "n": True}, 422, "int"),
        ({"class_id": 1, "seed": -1}, 422, "seed"),
        ({"class_id": 1, "seed": "7"}, 422, "int"),
        ({"class_id": 1, "cfg_scale": True}, 422, "float_type"),  # float fields are strict too (the README)
        ({"class_id": 1, "temperature": "1.0"}, 422, "float_type"),
        ({"class_id": 1, "top_p": [0.9, "0.9", 0.9, 0.9]}, 422, "float_type"),
        ({"class_id": 1, "n": 100}, 413, "images per request"),
        ({"class_id": 1, "steps": 3}, 422, "extra"),
        ({"class_id": "seven"}, 422, "int"),
        ({"class_id": 1, "format": "gif"}, 422, "pattern"),
        ({"class_id": 1, "smooth": True}, 422, "smooth sampling"),
    ],
)
def test_api_rejects_bad_requests(client, body, status, message):
    answer = client.post("/generate", json=body)
    assert answer.status_code == status
    assert message in str(answer.json()["detail"])


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(client, value):
    body = f'{{"class_id": 1, "cfg_scale": {value}}}'  # what Python's json module sends for nan and inf
    answer = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422 and "cfg_scale" in answer.text


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_a_body_not_sent_as_json_is_a_415_that_says_so(client, content_type):
    """`curl -d '{...}'` without `-H 'content-type: application/json'` sends a form: the answer names the header."""
    answer = client.post("/generate", content='{"class_id": 1, "n": 1}', headers={"content-type": content_type})
    assert answer.status_code == 415
    assert answer.json()["detail"].startswith(f"the body is sent as {content_type}: send the parameters as a JSON")
    assert "content-type: application/json" in answer.json()["detail"]
    vendor_json = {"content-type": "application/vnd.api+json; charset=utf-8"}  # JSON by another name is read
    assert client.post("/generate", content='{"class_id": 1, "n": 1}', headers=vendor_json).status_code == 200


def test_a_large_invalid_body_is_not_echoed_back(client):
    answer = client.post("/generate", json={"class_id": 1, "prompt": "x" * 60_000})  # within MAX_BODY_BYTES
    assert answer.status_code == 422 and len(answer.content) < 2000
    answer = client.post("/generate", json={"class_id": 1, "junk": ["y" * 1000] * 60})
    assert answer.status_code == 422 and len(answer.content) < 2000 and "extra" in answer.text


TOO_LARGE = "the body is over 65536 bytes: /generate takes a JSON object of its parameters"


def test_a_body_larger_than_any_request_is_a_413(client):
    """A body past MAX_BODY_BYTES (64 KiB) is a 413 whether its length is announced or not: a body of gigabytes was
    held in memory, and parsed, before being refused. The server goes on serving."""
    answer = client.post("/generate", json={"class_id": 1, "prompt": "x" * 100_000})
    assert answer.status_code == 413 and answer.json()["detail"].startswith(TOO_LARGE)

    def chunks():  # sent chunked, without a content-length
        yield b'{"class_id": 1, "prompt": "'
        yield from [b"x" * 10_000] * 100
        yield b'"}'

    answer = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413 and answer.json()["detail"].startswith(TOO_LARGE)
    assert client.post("/generate", json={"class_id": 1, "n": 1}).status_code == 200


def test_an_announced_oversized_body_is_not_read(engine):
    """A content-length of 10 GB is answered at once, without reading a byte of the body."""
    import asyncio

    from vqar.serve.api import build_router
    from vqar.serve.middleware import BodyLimit

    async def app(scope, receive, send):
        raise AssertionError("the request reached the app")

    async def receive():
        raise AssertionError("the body was read")

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/generate", "headers": [(b"content-length", b"10000000000")]}
    asyncio.run(BodyLimit(app, build_router(engine))(scope, receive, send))
    assert sent[0]["status"] == 413 and TOO_LARGE.encode() in sent[1]["body"]


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


def _wait_for(condition, what: str, seconds: float = 60) -> None:
    for _ in range(int(seconds * 20)):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} within {seconds:.0f} s")


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


def test_serve_binds_to_loopback_unless_told_otherwise():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_vqar_serve_command(class_run, tmp_path):
    """The real command: loads the run, names its classes from a file, warns about 0.0.0.0, limits uploads, and
    leaves no temporary files behind when it stops."""
    import json
    import subprocess
    import sys
    import urllib.request

    import httpx

    port = _free_port()
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"digit {i}" for i in range(10)))
    command = [sys.executable, "-m", "vqar.cli", "serve", "--model", str(class_run), "--host", "0.0.0.0",
               "--port", str(port), "--class-names", str(names), "--max-images", "3"]  # fmt: skip
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=2) as answer:
                    described = json.loads(answer.read())
                break
            except OSError:
                assert process.poll() is None, process.communicate()[1]
                time.sleep(0.2)
        else:
            pytest.fail("vqar serve did not answer within 120 s")
        assert described["class_names"][7] == "digit 7" and described["max_images_per_request"] == 3
        upload = f"http://127.0.0.1:{port}/gradio_api/upload"
        assert httpx.post(upload, files={"files": ("big.bin", b"x" * 4096)}).status_code == 413  # the page takes none
        assert httpx.post(upload, files={"files": ("small.bin", b"x" * 16)}).status_code == 200
        assert list(scratch.iterdir())  # the server's temporary folder, while it runs
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert "binding to 0.0.0.0" in err
    assert not list(scratch.rglob("*")), "vqar serve left temporary files behind"


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("zero\none\ntwo\n\nthree\nfour\nfive\nsix\nseven\neight\nnine\n", 4),  # 11 lines, 10 names
        ("zero\none\ntwo\n  \t\nthree\nfour\nfive\nsix\nseven\neight\nnine", 4),  # whitespace only
        ("\nzero\none\ntwo\nthree\nfour\nfive\nsix\nseven\neight\nnine\n", 1),
        ("zero\r\none\r\n\r\ntwo\r\nthree\r\nfour\r\nfive\r\nsix\r\nseven\r\neight\r\nnine\r\n", 3),
        (None, None),  # one name per line, a trailing newline
        ("\n".join(DIGIT_NAMES) + "\n\n \n", None),  # blank lines after the last name shift nothing
    ],
)
def test_a_blank_line_among_class_names_is_refused_naming_the_line(class_run, tmp_path, capsys, monkeypatch, text,
                                                                     line):  # fmt: skip
    """A blank line in --class-names was dropped: an 11-line file with a blank 4th line passed the count check
    for 10 classes, and class 3 was shown as "four" on the page and in /model."""
    import vqar.serve.app
    from vqar.cli import main

    served = []

    def serve(engine, **kwargs):  # instead of the server: keep what it would serve
        served.append(engine.describe()["class_names"])
        engine.close()

    monkeypatch.setattr(vqar.serve.app, "serve", serve)
    names = tmp_path / "names.txt"
    names.write_bytes(("\n".join(DIGIT_NAMES) + "\n" if text is None else text).encode())
    code = main(["serve", "--model", str(class_run), "--port", "0", "--class-names", str(names)])
    err = capsys.readouterr().err
    if line is None:
        assert code == 0 and served == [DIGIT_NAMES], err
        return
    assert code == 2 and not served, served
    assert err.count("\n") == 1 and f"{names}, line {line}: a blank line among the class names" in err, err
    assert f"write the name of class {line - 1} there, or remove the line" in err


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


@pytest.mark.parametrize("prompt", ["a seven\nwritten neatly", "a seven\r\nwritten", "a seven\u2028written",
                                    "a seven\x0c", "a seven\n"])  # fmt: skip
def test_a_prompt_holding_a_line_break_is_a_422_naming_it(tmp_path, prompt):
    """As `vqar sample --prompt` refuses it (prompt i is line i + 1 of its prompts.txt): the same prompt is taken or
    refused by every entry point."""
    from fastapi.testclient import TestClient

    from conftest import random_tokenizer
    from vqar.ar import GPT, GPTConfig
    from vqar.text import TextTokenizer

    captions = TextTokenizer.train(["a handwritten seven", "the digit one"] * 4, tmp_path, vocab_size=200, length=8,
                                   min_frequency=1)  # fmt: skip
    tokenizer = random_tokenizer()
    model = GPT(GPTConfig(vocab_size=16, code_shape=[4, 4], dim=32, n_layer=1, n_head=2, num_classes=0,
                          text_length=8, text_vocab_size=captions.vocab_size)).attach(tokenizer, captions)  # fmt: skip
    text_engine = SamplingEngine(model, tokenizer, max_images=2)
    try:
        client = TestClient(build_app(text_engine, ui=False))
        answer = client.post("/generate", json={"prompt": prompt, "n": 1})
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"].startswith(f"prompt {prompt!r} holds a line break"), answer.text
        assert client.post("/generate", json={"prompt": "a seven", "n": 1}).status_code == 200
        answer = client.post("/generate", json={"n": 1})  # it said "give prompts", a field requests do not have
        assert answer.status_code == 422 and answer.json()["detail"] == (
            'prompt is required by this text-conditioned model: give one ("prompt": "a seven")'), answer.text
    finally:
        text_engine.close()


# ---------------------------------------------------------------- the page in a real browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(engine):
    import uvicorn

    port = _free_port()
    config = uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    for _ in range(300):
        if running.started:
            break
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    running.should_exit = True
    thread.join(timeout=10)


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@contextlib.contextmanager
def headless_chromium():
    """A headless Chromium through Playwright, closed on leaving; skipped with the reason where one is missing
    (a failure under CI)."""
    chromium = find_chromium()
    need_for_browser_test(None if chromium else "no Chromium found (set VQAR_CHROMIUM, or `make browser` installs "
                          "Debian's chromium)")  # fmt: skip
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need_for_browser_test("playwright (Python) is not installed (the dev extra has it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def test_page_generates_in_a_real_browser(server, client):
    with headless_chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server, wait_until="networkidle")
        page.locator("#class input").click()
        page.get_by_role("option", name="7", exact=True).click()
        page.locator("#seed input").fill("11")
        page.locator("#n input[type=number]").fill("3")
        page.locator("#n input[type=number]").press("Enter")

        def generate(run: int) -> list[bytes]:
            page.locator("#generate").click()
            page.get_by_text(f"Run {run}: 3 images").wait_for(timeout=120_000)
            sources = page.locator("#gallery img").evaluate_all("imgs => imgs.map(i => i.src)")
            sources = list(dict.fromkeys(sources))  # a gallery may show a picture twice (thumbnail + preview)
            assert len(sources) == 3
            return [page.request.get(src).body() for src in sources]

        first = generate(1)
        assert all(body.startswith(b"\x89PNG") for body in first)
        assert generate(2) == first  # the same seed gives the same images
        # ... and they are what the API draws for class 7, seed 11 with the page's default settings
        api = client.post("/generate", json={"class_id": 7, "n": 3, "seed": 11, "cfg_scale": 2.0}).json()
        shown = [np.asarray(Image.open(io.BytesIO(body)).convert("L")) for body in first]
        assert all(np.array_equal(a, decode_png(b)) for a, b in zip(shown, api["images"], strict=True))
        assert page.locator("#coarse img").count() >= 3 * 4  # each image with 1..4 codes per position
        shot = os.environ.get("VQAR_SCREENSHOT")
        if shot:
            Path(shot).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=shot, full_page=True)


def test_closing_the_page_while_its_request_waits_stops_its_drawing(server, engine):
    """A page closed while its request was drawn kept the model busy to the end for nobody (the HTTP API already
    gave such requests up). Now the page's handler is stopped by Gradio, and the request given up before its
    first batch."""
    with headless_chromium() as browser:
        page = browser.new_page()
        page.goto(server, wait_until="networkidle")
        runs, abandoned = engine.model_runs, engine.abandoned
        with engine._lock:  # the worker takes the page's request and waits for the model while the page closes
            page.locator("#generate").click()
            _wait_until_taken(engine)
            page.close()
            _wait_for(lambda: engine.abandoned == abandoned + 1, "the closed page's request was not given up")
        _wait_for(lambda: not engine.sampling.is_set(), "the worker did not finish its round")
        assert engine.model_runs == runs  # nothing was drawn for the page that closed


def test_a_missing_browser_fails_under_ci_and_skips_with_the_reason_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no browser on PATH
    monkeypatch.delenv("VQAR_CHROMIUM", raising=False)
    assert find_chromium() is None
    fake = tmp_path / "my-chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("VQAR_CHROMIUM", str(fake))
    assert find_chromium() == str(fake)
    monkeypatch.setenv("VQAR_CHROMIUM", str(tmp_path / "absent"))
    assert find_chromium() is None
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but no Chromium"):
        need_for_browser_test("no Chromium found")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no Chromium found"):
        need_for_browser_test("no Chromium found")
    need_for_browser_test(None)  # nothing missing: neither


def test_base64_images_round_trip():
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    assert np.array_equal(decode_png(base64.b64encode(buffer.getvalue()).decode()), pixels)


def test_page_settings_parse_one_value_or_one_per_depth():
    from vqar.serve.ui import _or_default, parse_setting

    assert parse_setting("0.9", float, 4, "top-p") == 0.9
    assert parse_setting("512, 256,none,64", int, 4, "top-k") == [512, 256, None, 64]
    assert parse_setting(" ", int, 4, "top-k") is None
    assert _or_default(parse_setting("0", float, 4, "temperature"), 1.0) == 0.0  # refused later, not defaulted
    with pytest.raises(RequestError, match="not a number"):
        parse_setting("high", float, 4, "temperature")
    with pytest.raises(RequestError, match="one code per position"):
        parse_setting("1,2", int, 1, "top-k")


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path, capsys):
    from vqar.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code = main(["serve", "--model", str(tmp_path / "not-loaded"), "--port", port])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"port {port} on 127.0.0.1 is in use" in err, err
