"""Takes the README's picture of `vqar serve`: serves a model, fills the page in Debian's headless Chromium
(through Playwright), clicks Generate and saves a screenshot.

    python scripts/serve_screenshot.py --model runs/bench/t2i/ar --prompt "someone wrote the digit seven" \\
        --out docs/serve.png
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

import uvicorn
from playwright.sync_api import sync_playwright

import vqar
from vqar.serve.app import build_app
from vqar.serve.engine import SamplingEngine

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", help="for a text model")
    parser.add_argument("--class-id", type=int, default=None, help="for a class-conditional model")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", default="docs/serve.png")
    args = parser.parse_args()
    model = vqar.load(args.model)
    engine = SamplingEngine(model, model.tokenizer, max_images=max(args.n, 16))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}", wait_until="networkidle")
        if args.prompt:
            page.locator("#prompt textarea").fill(args.prompt)
        if args.class_id is not None:
            page.locator("#class input").click()
            page.get_by_role("option", name=str(args.class_id), exact=True).click()
        page.locator("#seed input").fill(str(args.seed))
        page.locator("#n input[type=number]").fill(str(args.n))
        page.locator("#n input[type=number]").press("Enter")
        page.locator("#generate").click()
        page.get_by_text(f"Run 1: {args.n} images").wait_for(timeout=300_000)
        time.sleep(1.0)  # let the gallery finish painting
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    server.should_exit = True
    engine.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
