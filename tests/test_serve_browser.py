"""`vqar serve`: the web page driven in a real headless Chromium (Debian's package, through Playwright), what a
missing browser does under CI and elsewhere, and the page's parsing of its settings."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

if os.environ.get("CI", "").lower() == "true":  # CI installs the serve extra: its absence fails there
    import gradio  # noqa: F401
else:
    pytest.importorskip("gradio", reason="the serve extra is not installed (pip install 'vqar[serve]')")

from test_serve import _free_port, _wait_for, _wait_until_taken  # noqa: E402
from vqar.serve.api import decode_png  # noqa: E402
from vqar.serve.app import build_app  # noqa: E402
from vqar.serve.engine import RequestError  # noqa: E402


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


def open_page(page, url: str) -> None:
    """Loads the page until its Generate button is there. Not "network idle": the page keeps a heartbeat
    connection open (Gradio's, for the per-visitor state the page holds)."""
    page.goto(url)
    page.locator("#generate").wait_for(timeout=60_000)


def test_page_generates_in_a_real_browser(server, client):
    with headless_chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        open_page(page, server)
        page.locator("#class input").click()
        page.get_by_role("option", name="7", exact=True).click()
        page.locator("#seed textarea, #seed input").first.fill("11")
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
        open_page(page, server)
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


def test_page_settings_parse_one_value_or_one_per_depth():
    from vqar.serve.ui import _or_default, parse_setting

    assert parse_setting("0.9", float, 4, "top-p") == 0.9
    assert parse_setting("512, 256,none,64", int, 4, "top-k") == [512, 256, None, 64]
    assert parse_setting(" ", int, 4, "top-k") is None
    assert _or_default(parse_setting("0", float, 4, "temperature"), 1.0) == 0.0  # refused later, not defaulted
    with pytest.raises(RequestError, match="not a number"):
        parse_setting("high", float, 4, "temperature")
    with pytest.raises(RequestError, match=r"^top-k: '1.5' is not an integer \(or one per depth"):
        parse_setting("1.5", int, 4, "top-k")
    with pytest.raises(RequestError, match="one code per position"):
        parse_setting("1,2", int, 1, "top-k")


def test_the_page_reads_a_seed_exactly():
    """The seed box was a number box, a JavaScript float: seeds above 2^53 were rounded, so the page drew other
    images than the API for the same seed, and 2^63 - 1, the largest the API takes, was refused as 2^63."""
    from vqar.serve.ui import parse_seed

    assert parse_seed(" 9223372036854775807 ") == 2**63 - 1
    assert parse_seed(str(2**53 + 1)) == 2**53 + 1
    assert parse_seed("") == 0
    with pytest.raises(RequestError, match=r"^seed: '1e3' is not an integer$"):
        parse_seed("1e3")


def test_the_page_refuses_what_the_api_refuses(engine, tmp_path):
    """The page drew with a CFG interval beside a CFG scale of 1, which the API and `vqar sample` refuse as a
    setting without effect; it read a seed of "1_000" as 1000 and a top-k of "1_0" as 10 (Python's digit
    separators), and cut a CFG interval of 2.5 to 2."""
    import gradio as gr

    from vqar.serve.ui import build_ui, parse_seed, parse_setting

    page = build_ui(engine, work_dir=tmp_path)
    event = next(f for f in page.fns.values() if getattr(f.fn, "__name__", "") == "run")
    base = {"class": 1, "n": 1, "seed": "0", "temperature": "1.0", "top_k": "", "top_p": "", "cfg_scale": 2.0,
            "cfg_interval": -1, "speculative": False}  # fmt: skip

    def refusal(**changed) -> str:
        values = {**base, **changed}
        with pytest.raises(gr.Error) as raised:
            next(event.fn(0, *[values[c.elem_id] for c in event.inputs[1:]]))
        return raised.value.message

    assert refusal(cfg_scale=1.0, cfg_interval=3) == ("CFG interval shapes classifier-free guidance, which CFG scale "
                                                       "1 (the default) leaves off: give CFG scale above 1, or leave "
                                                       "it out")  # fmt: skip
    assert refusal(cfg_interval=2.5) == "CFG interval: 2.5 is not an integer"
    assert refusal(seed="1_000") == "seed: '1_000' is not an integer"
    assert refusal(top_k="1_0") == "top-k: '1_0' is not an integer (or one per depth, comma-separated)"
    assert parse_seed(" 1000 ") == 1000 and parse_setting("10, 2", int, 2, "top-k") == [10, 2]


def test_pages_share_the_engine_s_queue_and_count_their_own_runs(server, engine, capfd):
    """Gradio ran one page event at a time: a second page's request waited in Gradio's own queue, unbounded by
    --max-queue and never batched with others, while the first was drawn. Now both reach the engine's queue. Each
    page counts its own runs (the count was shared by every visitor), and a mistake typed on the page is shown
    there without a traceback in the server's log."""
    with headless_chromium() as browser:
        pages = [browser.new_page() for _ in range(2)]
        for page in pages:
            open_page(page, server)
        with engine._lock:  # the worker takes the first page's request and waits for the model
            pages[0].locator("#generate").click()
            _wait_until_taken(engine)
            pages[1].locator("#generate").click()
            _wait_for(lambda: engine.jobs.qsize() == 1, "the second page's request did not reach the engine's queue")
        for page in pages:
            page.get_by_text("Run 1: 4 images").wait_for(timeout=120_000)
        pages[1].locator("#top_k textarea, #top_k input").first.fill("abc")
        capfd.readouterr()
        pages[1].locator("#generate").click()
        pages[1].get_by_text("top-k: 'abc' is not an integer").first.wait_for(timeout=60_000)
        assert "Traceback" not in capfd.readouterr().err
