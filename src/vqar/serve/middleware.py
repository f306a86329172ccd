"""ASGI middleware in front of the API of `vqar serve` (`vqar.serve.api`): answers that FastAPI's routing would get
wrong once the web page is mounted at /, or would give only after holding a whole body in memory."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.routing import Match

from vqar.serve.api import MAX_BODY_BYTES, MAX_PROMPT_CHARS


class WrongMethodGuard:
    """ASGI middleware answering 405, with an `Allow` header, a request whose path is an API route's but whose
    method is not one it takes. Starlette would do so itself, but only when no other route matches fully: the web
    page mounted at / matches every path, so without this the page (not the API) answered `GET /generate`.
    A HEAD request on a GET route is answered as the GET without its body (FastAPI's GET routes take no HEAD, and
    load balancers' health checks and `curl -I` send it)."""

    def __init__(self, app, router: APIRouter):
        self.app, self.routes = app, list(router.routes)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            if scope["method"] == "HEAD":
                as_get = dict(scope, method="GET")  # a copy: the server reads the method of its own to drop the body
                if any(route.matches(as_get)[0] is Match.FULL for route in self.routes):
                    await self.app(as_get, receive, _headers_only(send))
                    return
            for route in self.routes:
                if route.matches(scope)[0] is Match.PARTIAL:  # the path is this route's, the method is not
                    allow = ", ".join(sorted(route.methods | ({"HEAD"} if "GET" in route.methods else set())))
                    answer = JSONResponse({"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": allow})
                    await answer(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware answering 413 a POST to an API route whose body is over `limit` bytes, before more than
    that is read: FastAPI reads a body whole, then parses it, so a body of gigabytes was held in memory twice over
    before the 422. The body (at most `limit` bytes) is read here and handed on."""

    def __init__(self, app, router: APIRouter, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit
        self.paths = {route.path for route in router.routes if "POST" in route.methods}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        announced = dict(scope["headers"]).get(b"content-length", b"")
        too_large = announced.isdigit() and int(announced) > self.limit  # then nothing is read
        body, more = b"", True
        while more and not too_large:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client is gone: nobody to answer
            body += message.get("body", b"")
            more, too_large = message.get("more_body", False), len(body) > self.limit
        if too_large:
            detail = (f"the body is over {self.limit} bytes: {scope['path']} takes a JSON object of its parameters "
                      f"(a prompt of at most {MAX_PROMPT_CHARS} characters)")  # fmt: skip
            answer = JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})
            await answer(scope, receive, send)
            return
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _headers_only(send):
    """`send` passing on the status and headers of an answer (its content-length too, as HEAD asks), not its body."""

    async def send_headers(message):
        if message["type"] == "http.response.body":
            if message.get("more_body", False):
                return
            message = {"type": "http.response.body", "body": b""}
        await send(message)

    return send_headers
