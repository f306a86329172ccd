"""`vqar serve`: a wrong HTTP method on an API route is answered 405 with the methods it takes, also with the web
page mounted at / (which would otherwise answer every path the API routes do not fully match); HEAD on a GET route
is answered like GET, without the body."""

from __future__ import annotations

import os

import pytest

if os.environ.get("CI", "").lower() == "true":  # CI installs the serve extra: its absence fails there
    import gradio  # noqa: F401
else:
    pytest.importorskip("gradio", reason="the serve extra is not installed (pip install 'vqar[serve]')")

import vqar  # noqa: E402
from vqar.serve.app import build_app  # noqa: E402
from vqar.serve.engine import SamplingEngine  # noqa: E402

WRONG_METHODS = [
    ("GET", "/generate", "POST"),
    ("PUT", "/generate", "POST"),
    ("DELETE", "/generate", "POST"),
    ("HEAD", "/generate", "POST"),
    ("POST", "/health", "GET, HEAD"),
    ("PATCH", "/health", "GET, HEAD"),
    ("DELETE", "/model", "GET, HEAD"),
    ("POST", "/model", "GET, HEAD"),
]


@pytest.fixture(scope="module")
def engine(class_run):
    model = vqar.load_pretrained(class_run)
    engine = SamplingEngine(model, model.tokenizer, max_images=2, max_queue=4, max_batch=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module", params=[True, False], ids=["with-page", "api-only"])
def client(engine, request, tmp_path_factory):
    from fastapi.testclient import TestClient

    return TestClient(build_app(engine, ui=request.param, work_dir=tmp_path_factory.mktemp("serve")))


@pytest.mark.parametrize(("method", "path", "allowed"), WRONG_METHODS)
def test_a_wrong_method_is_405_naming_the_allowed_ones(client, method, path, allowed):
    answer = client.request(method, path)
    assert answer.status_code == 405, answer.text[:200]
    assert answer.headers["allow"] == allowed
    if method != "HEAD":
        assert answer.json() == {"detail": "Method Not Allowed"}


@pytest.mark.parametrize("path", ["/health", "/model"])
def test_head_on_a_get_route_answers_like_get_without_a_body(client, path):
    """Load balancers' health checks and `curl -I` send HEAD: it gets GET's status and headers, and no body."""
    get, head = client.get(path), client.head(path)
    assert head.status_code == 200, head.text[:200]
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"] == "application/json"
    assert head.headers["content-length"] == get.headers["content-length"]


def test_the_right_methods_and_the_page_still_answer(client):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/model").json()["max_images_per_request"] == 2
    images = client.post("/generate", json={"class_id": 1, "n": 1, "seed": 3}).json()["images"]
    assert len(images) == 1
    assert client.post("/generate", json={"class_id": 1, "n": 3}).status_code == 413


def test_the_page_at_root_is_unaffected(engine, tmp_path):
    from fastapi.testclient import TestClient

    client = TestClient(build_app(engine, work_dir=tmp_path))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get("/config").json()["mode"] == "blocks"  # Gradio's own routes below / still answer
    assert client.get("/no-such-page").status_code == 404  # a path that is no API route is not made a 405
