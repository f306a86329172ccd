"""The HTTP API of `vqar serve` (FastAPI, the server Gradio itself runs on).

    GET  /health     {"status": "ok", "queued": N, "sampling": true while the model runs}
    GET  /model      what is loaded: architecture, conditioning, classes, limits
    POST /generate   JSON parameters -> {"images": [base64 PNG, ...], ...}, or a zip of PNGs with "format": "zip"

Invalid parameters, and a setting that would do nothing (`cfg_interval` without a `cfg_scale` above 1, say) are
answered 422 with the reason, more images than the server allows 413, a full queue 429, a request still waiting
when the server begins to stop 503,
a body that is not sent as JSON (content-type) 415, a body over MAX_BODY_BYTES 413 before it is read (`middleware`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import typing
import zipfile
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, create_model

from vqar.sampling import SamplingSettings
from vqar.sampling.settings import check_settings_apply
from vqar.serve.engine import SHUTTING_DOWN, GenerateRequest, RequestError, SamplingEngine
from vqar.utils.images import to_uint8

SETTINGS_FIELDS = [f.name for f in dataclasses.fields(SamplingSettings)]
# The schema's types of the settings given once or per depth (SamplingSettings itself checks their values); every
# other field takes its dataclass type made strict (`STRICT`). Types are strict: `"n": true`, `"seed": "7"`,
# `"cfg_scale": true` or `"temperature": "1.0"` are refused, not read as 1, 7 or 1.0 (a float field takes an
# integer, as JSON has one kind of number). A prompt is at most MAX_PROMPT_CHARS characters (a model reads a few
# dozen tokens of it), and a body at most MAX_BODY_BYTES (a few hundred bytes are enough; a larger one is a 413
# before it is read, not held in memory and parsed).
MAX_PROMPT_CHARS = 2000
# How often a waiting /generate looks whether its client has hung up (a look costs one non-blocking receive).
HANG_UP_POLL_SECONDS = 0.2
MAX_BODY_BYTES = 64 * 1024
SCHEMA_TYPES = {
    "temperature": StrictFloat | list[StrictFloat],
    "top_k": StrictInt | list[StrictInt | None] | None,
    "top_p": StrictFloat | list[StrictFloat | None] | None,
    "prompt": Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None,
}
STRICT = {int: StrictInt, float: StrictFloat, bool: StrictBool, str: StrictStr}


def _strict(hint):
    """`hint` with int, float, bool and str (also inside `X | None`) replaced by pydantic's strict types."""
    if hint in STRICT:
        return STRICT[hint]
    args = typing.get_args(hint)
    if args and all(arg in STRICT or arg is type(None) for arg in args):
        strict = [STRICT.get(arg, arg) for arg in args]
        union = strict[0]
        for arg in strict[1:]:
            union = union | arg
        return union
    return hint


def _body_model() -> type[BaseModel]:
    """POST /generate's body, flat: the fields of `GenerateRequest` and of its `SamplingSettings` (unknown fields
    refused) plus the answer format. Values are checked by the engine, which names what is wrong."""
    fields = {}
    for cls in (GenerateRequest, SamplingSettings):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name != "settings":
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                fields[f.name] = (SCHEMA_TYPES.get(f.name, _strict(hints[f.name])), default)
    fields["format"] = (str, Field("png_base64", pattern="^(png_base64|zip)$"))
    return create_model("GenerateBody", __config__=ConfigDict(extra="forbid"), **fields)


def request_from_body(fields: dict) -> GenerateRequest:
    settings = SamplingSettings(**{name: fields.pop(name) for name in SETTINGS_FIELDS})
    return GenerateRequest(**fields, settings=settings)


GenerateBody = _body_model()


def is_json(content_type: str) -> bool:
    media_type = content_type.split(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def validation_error(request, error: RequestValidationError) -> JSONResponse:
    """422 with where and why each field is wrong, without the values sent: a large body is not echoed back.
    A body sent as something else than JSON (`curl -d` without `-H`: a form) is a 415 that says so; FastAPI does
    not read it as JSON, and the 422 would say only that the body is not an object."""
    content_type = request.headers.get("content-type")
    body_unread = any(tuple(problem.get("loc", ())) == ("body",) for problem in error.errors())
    if (content_type and not is_json(content_type)) or (not content_type and body_unread):
        sent = f"as {content_type.split(';')[0]}" if content_type else "without a content-type"
        message = (f"the body is sent {sent}: send the parameters as a JSON object with the header 'content-type: "
                   "application/json'")  # fmt: skip
        return JSONResponse({"detail": message}, status_code=415)
    detail = [{key: problem[key] for key in ("loc", "msg", "type") if key in problem} for problem in error.errors()]
    return JSONResponse({"detail": detail[:20]}, status_code=422)


def png_bytes(image) -> bytes:
    """PNG of one (C, H, W) image in [-1, 1]."""
    pixels = to_uint8(image[None])[0]
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def images_as_png(images) -> list[bytes]:
    return [png_bytes(image) for image in images]


def build_router(engine: SamplingEngine, timeout: float = 600.0) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    def health() -> dict:
        return {"status": "ok", "queued": engine.jobs.qsize(), "sampling": engine.sampling.is_set()}

    @router.get("/model")
    def describe() -> dict:
        return engine.describe()

    @router.post("/generate")
    async def generate(body: GenerateBody, request: Request):  # type: ignore[valid-type]
        fields = body.model_dump(exclude={"format"})
        given = {name: fields[name] for name in body.model_fields_set if name in SETTINGS_FIELDS}
        asked = request_from_body(fields)
        try:
            read = engine.read(asked)  # values first: a cfg_scale of 0.5 with a cfg_interval is named as a bad scale
            check_settings_apply(given)  # a setting that would do nothing is refused, as `vqar sample` refuses it
            future = engine.submit(asked, read)
        except RequestError as err:
            raise HTTPException(status_code=err.status, detail=str(err)) from None
        except ValueError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        try:
            result = await _result_while_connected(engine, future, request, timeout)
        except RequestError as err:  # a request still waiting when the server began to shut down: 503
            raise HTTPException(status_code=err.status, detail=str(err)) from None
        if result is None:  # nobody is left to read an answer
            return Response(status_code=499)
        # Encoding thousands of PNGs takes seconds: in a worker thread, the event loop goes on answering /health
        # and noticing other clients that hang up.
        return await run_in_threadpool(_answer, result, body.format)

    return router


def _answer(result, answer_format: str) -> Response | dict:
    """The answer to /generate: a zip of PNGs, or JSON with the images as base64 PNGs."""
    pngs = images_as_png(result.images)
    if answer_format == "zip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for i, data in enumerate(pngs):
                archive.writestr(f"image_{i:03d}.png", data)
            for d, level in enumerate(result.coarse_to_fine or [], start=1):
                for i, data in enumerate(images_as_png(level)):
                    archive.writestr(f"coarse_to_fine/image_{i:03d}_level{d}.png", data)
        headers = {"Content-Disposition": 'attachment; filename="samples.zip"'}
        return Response(buffer.getvalue(), media_type="application/zip", headers=headers)
    answer = {
        "images": [base64.b64encode(data).decode() for data in pngs],
        "seconds": result.seconds,
        "batched_with": result.batched_with,
        "calls_per_image": result.calls_per_image,
        "acceptance_rate": result.acceptance_rate,
        "warnings": result.warnings,
    }
    if result.coarse_to_fine is not None:
        answer["coarse_to_fine"] = [[base64.b64encode(d).decode() for d in images_as_png(level)]
                                    for level in result.coarse_to_fine]  # fmt: skip
    return answer


async def _result_while_connected(engine: SamplingEngine, future, request: Request, timeout: float):
    """The result of `future`, or None once the client has hung up. The handler is not cancelled when its client
    goes, so without looking the model would go on drawing images nobody will read; a request given up (a hang-up,
    the timeout's 504) is abandoned, which stops its drawing."""
    waiting = asyncio.wrap_future(future)
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            left = deadline - asyncio.get_running_loop().time()
            done, _ = await asyncio.wait({waiting}, timeout=max(0.0, min(HANG_UP_POLL_SECONDS, left)))
            if done:
                return waiting.result()
            if await request.is_disconnected():
                engine.abandon(future)
                return None
            if left <= 0:
                engine.abandon(future)
                raise HTTPException(status_code=504, detail=f"sampling took longer than {timeout:.0f} s")
    except asyncio.CancelledError:  # the server is forced to stop (a second Ctrl-C): its images are not drawn
        engine.abandon(future)
        raise HTTPException(status_code=503, detail=SHUTTING_DOWN) from None  # the answer, not uvicorn's 500


def decode_png(text: str) -> np.ndarray:
    """A base64 PNG from /generate as a uint8 array (for clients and tests)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))
