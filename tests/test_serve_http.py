"""`vqar serve`: the HTTP API (its answers, the requests it refuses and why, bodies it does not read) and the
command itself (loopback binding, class names, uploads, temporary files, a port in use)."""

from __future__ import annotations

import base64
import io
import logging
import os
import socket
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

if os.environ.get("CI", "").lower() == "true":  # CI installs the serve extra: its absence fails there
    import gradio  # noqa: F401
else:
    pytest.importorskip("gradio", reason="the serve extra is not installed (pip install 'vqar[serve]')")

from test_serve import _free_port  # noqa: E402
from vqar.serve.api import decode_png  # noqa: E402
from vqar.serve.app import build_app, is_loopback  # noqa: E402
from vqar.serve.engine import SamplingEngine  # noqa: E402


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
        # settings that would do nothing, answered 200 although `vqar sample` refuses their flags
        ({"class_id": 1, "cfg_interval": 3}, 422, "cfg_interval shapes classifier-free guidance, which cfg_scale 1"),
        ({"class_id": 1, "cfg_scale": 1.0, "cfg_schedule": "linear"}, 422, "cfg_schedule shapes classifier-free"),
        ({"class_id": 1, "speculative_window": 4}, 422, "speculative_window has no effect without speculative"),
        ({"class_id": 1, "speculative": False, "speculative_drafts": "sjd"}, 422, "speculative_drafts has no effect"),
        ({"class_id": 1, "greedy": True, "top_k": 5, "temperature": 0.5}, 422,
         "temperature and top_k have no effect with greedy, which always takes the most likely code"),
        ({"class_id": 1, "greedy": True, "speculative": True, "speculative_drafts": "sjd"}, 422,
         "speculative_drafts has no effect with greedy"),
        ({"class_id": 1, "cfg_scale": 0.5, "cfg_interval": 3}, 422, "cfg_scale must be a finite number >= 1"),
    ],
)
def test_api_rejects_bad_requests(client, body, status, message):
    answer = client.post("/generate", json=body)
    assert answer.status_code == status
    assert message in str(answer.json()["detail"])


def test_settings_that_shape_another_are_taken_with_it(client):
    for body in ({"cfg_scale": 2.0, "cfg_interval": 3, "cfg_schedule": "linear"},
                 {"speculative": True, "speculative_window": 4, "speculative_drafts": "sjd"},
                 {"greedy": True}, {"greedy": False, "top_k": 5}):  # fmt: skip
        answer = client.post("/generate", json={"class_id": 1, "n": 1, **body})
        assert answer.status_code == 200, (body, answer.text)


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
    # No content-type at all (`curl -H 'content-type:'`, a hand-written client) was a 422 about a dictionary.
    answer = client.post("/generate", content='{"class_id": 1, "n": 1}', headers={"content-type": ""})
    assert answer.status_code == 415, answer.text
    assert answer.json()["detail"].startswith("the body is sent without a content-type: send the parameters as")
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


def _text_engine(tmp_path) -> SamplingEngine:
    """An engine over an untrained GPT of 8 text tokens, with a caption tokenizer of two captions' words."""
    from conftest import random_tokenizer
    from vqar.ar import GPT, GPTConfig
    from vqar.text import TextTokenizer

    captions = TextTokenizer.train(["a handwritten seven", "the digit one"] * 4, tmp_path, vocab_size=200, length=8,
                                   min_frequency=1)  # fmt: skip
    tokenizer = random_tokenizer()
    model = GPT(GPTConfig(vocab_size=16, code_shape=[4, 4], dim=32, n_layer=1, n_head=2, num_classes=0,
                          text_length=8, text_vocab_size=captions.vocab_size)).attach(tokenizer, captions)  # fmt: skip
    return SamplingEngine(model, tokenizer, max_images=2)


@pytest.mark.parametrize("prompt", ["a seven\nwritten neatly", "a seven\r\nwritten", "a seven\u2028written",
                                    "a seven\x0c", "a seven\n"])  # fmt: skip
def test_a_prompt_holding_a_line_break_is_a_422_naming_it(tmp_path, prompt):
    """As `vqar sample --prompt` refuses it (prompt i is line i + 1 of its prompts.txt): the same prompt is taken or
    refused by every entry point."""
    from fastapi.testclient import TestClient

    text_engine = _text_engine(tmp_path)
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


def test_what_reading_a_prompt_changed_is_answered_and_logged_once(tmp_path, caplog):
    """A prompt cut to the model's text length, or with characters the caption tokenizer lacks, was answered 200
    without a word to the client, and its warning logged twice (the request was read once to check it and again to
    queue it)."""
    from fastapi.testclient import TestClient

    text_engine = _text_engine(tmp_path)
    try:
        client = TestClient(build_app(text_engine, ui=False))
        for prompt, said in (("seven " * 30, "is longer than the model's 8 text tokens; truncated to"),
                             ("a seven \u263a", "not in the caption tokenizer's vocabulary")):  # fmt: skip
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="vqar"):
                answer = client.post("/generate", json={"prompt": prompt, "n": 1})
            assert answer.status_code == 200, answer.text
            warnings = answer.json()["warnings"]
            assert len(warnings) == 1 and said in warnings[0], warnings
            assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == warnings
        assert client.post("/generate", json={"prompt": "a seven", "n": 1}).json()["warnings"] == []
    finally:
        text_engine.close()


def test_base64_images_round_trip():
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    assert np.array_equal(decode_png(base64.b64encode(buffer.getvalue()).decode()), pixels)


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
    # SIGTERM (terminate) ends it as it ends any command: status 143 and one line (it ended in silence)
    assert process.returncode == 143 and err.endswith("vqar: interrupted\n"), (process.returncode, err[-300:])


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


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path, capsys):
    from vqar.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code = main(["serve", "--model", str(tmp_path / "not-loaded"), "--port", port])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"port {port} on 127.0.0.1 is in use" in err, err
