"""The prediction service: a FastAPI app around any predictor, and how to run it with uvicorn.

Routes: `POST /predict` (multipart field `file`, repeatable) -> top-k per image; `POST /explain`
(one `file`) -> the Grad-CAM overlay as a base64 PNG with the top-k, computed on its own bounded
queue (one worker, `explain_queue` waiting; 503 when full) so that explanations never hold up
predictions; `GET /health`;
`GET /metadata`; `GET /` (a page to try the model); `GET /openapi.json` (FastAPI's schema, for
generated clients). Every error is JSON `{"error": "..."}` with a 4xx code: 400 (empty file, too
many files), 413 (body over `max_upload_bytes`, counted while it streams in; image over
`max_pixels`), 415 (not an image), 422 (a damaged image, a malformed request).
"""

import asyncio
import base64
import contextlib
import io
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Literal

import numpy as np
import torch
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from cifarlab.core.errors import UserError
from cifarlab.data.image import BadImage, decode_image
from cifarlab.deploy.serve.batching import MicroBatcher
from cifarlab.eval import explain

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # per request
MAX_FILES = 16  # per request
MAX_PIXELS = 16_000_000  # per image, checked from the header before decoding
EXPLAIN_QUEUE = 16  # explanations running or waiting; more are answered 503 (retry shortly)
EXPLAIN_SIDE = 256  # pixels per side of the overlay PNG (small images are scaled up)
EXPLAIN_THREADS = 1  # CPU threads of the explain worker


class Label(BaseModel):
    label: str
    probability: float


class ImagePrediction(BaseModel):
    filename: str
    top: list[Label]


class Predictions(BaseModel):
    model: str
    predictions: list[ImagePrediction]


class Explanation(BaseModel):
    filename: str
    method: str
    label: str  # the class explained
    probability: float
    top: list[Label]
    png: str  # base64 PNG: the image with the class activation map over it


class Limits(BaseModel):
    max_upload_bytes: int
    max_files: int
    max_pixels: int
    explain_queue: int


class Metadata(BaseModel):
    model: str
    classes: list[str]
    image_size: int
    input_size: int
    mean: list[float]
    std: list[float]
    version: str | None
    registered: str | None = None  # NAME/VERSION in the model registry, if served from it
    max_batch: int
    explain: bool  # whether POST /explain works (not for an ONNX model)
    limits: Limits


class Health(BaseModel):
    status: str
    batches: int  # model calls so far
    images: int  # images predicted so far


class ErrorBody(BaseModel):
    error: str


ERRORS = {code: {"model": ErrorBody} for code in (400, 413, 415, 422)}
EXPLAIN_ERRORS = {code: {"model": ErrorBody} for code in (400, 413, 415, 422, 503)}


def create_app(
    predictor,
    max_batch: int = 32,
    max_wait_ms: float = 2.0,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_files: int = MAX_FILES,
    max_pixels: int = MAX_PIXELS,
    explain_queue: int = EXPLAIN_QUEUE,
) -> FastAPI:
    """The service for a predictor (`cifarlab.load(...)`); `max_batch=1` disables batching."""
    for name, value, low in (
        ("max_batch", max_batch, 1),
        ("max_wait_ms", max_wait_ms, 0),
        ("max_upload_bytes", max_upload_bytes, 1),
        ("max_files", max_files, 1),
        ("max_pixels", max_pixels, 1),
        ("explain_queue", explain_queue, 1),
    ):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    batcher = MicroBatcher(predictor.probs, max_batch, max_wait_ms)
    # a few decoding threads, not one per concurrent request: bounded CPU and memory arenas
    decoder = ThreadPoolExecutor(
        max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="decode"
    )
    can_explain = not predictor.explain_refusal()
    limits = Limits(
        max_upload_bytes=max_upload_bytes,
        max_files=max_files,
        max_pixels=max_pixels,
        explain_queue=explain_queue,
    )
    page = (resources.files("cifarlab.deploy.serve") / "static" / "index.html").read_text()
    n_classes = len(predictor.classes)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await batcher.close()
        app.state.explainer.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="cifarlab",
        summary=f"Image classification with {predictor.metadata['model']}",
        version=str(predictor.metadata.get("version") or "unknown"),
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.add_middleware(LimitUploadSize, max_bytes=max_upload_bytes)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> Health:
        return Health(status="ok", batches=batcher.batches, images=batcher.images)

    @app.get("/metadata")
    async def metadata() -> Metadata:
        return Metadata(
            **predictor.metadata, max_batch=max_batch, explain=can_explain, limits=limits
        )

    @app.post("/predict", responses=ERRORS)
    async def predict(
        file: Annotated[list[UploadFile], File(description="images; repeat the field for more")],
        top_k: Annotated[int, Query(ge=1, le=n_classes, description="classes per image")] = 5,
    ) -> Predictions:
        """Top-k classes with probabilities for each uploaded image, in upload order."""
        if len(file) > max_files:
            raise HTTPException(
                400, f"{len(file)} files, over the limit of {max_files}; send fewer"
            )
        loop = asyncio.get_running_loop()
        images = []
        for i, upload in enumerate(file):
            name = upload.filename or f"file {i + 1}"
            data = await upload.read()
            images.append(
                await loop.run_in_executor(
                    decoder, decode_upload, data, name, predictor.image_size, max_pixels
                )
            )
        rows = await asyncio.gather(*(batcher.submit(img) for img in images))
        tops = predictor.top_k(np.stack(rows), top_k)
        return Predictions(
            model=predictor.metadata["model"],
            predictions=[
                ImagePrediction(filename=u.filename or f"file {i + 1}", top=top)
                for i, (u, top) in enumerate(zip(file, tops, strict=True))
            ],
        )

    add_explain(app, predictor, decoder, explain_queue, max_pixels)
    return app


def add_explain(app: FastAPI, predictor, decoder, explain_queue: int, max_pixels: int) -> None:
    """POST /explain, on its own worker thread and bounded queue."""
    # one worker on one core: explanations queue behind each other, never take a prediction's
    # cores (torch's thread count is per thread)
    explainer = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="explain", initializer=torch.set_num_threads,
        initargs=(EXPLAIN_THREADS,),
    )  # fmt: skip
    app.state.explainer = explainer
    explaining = {"n": 0}  # requests in the explain queue (the event loop is one thread)
    app.state.explaining = explaining
    n_classes = len(predictor.classes)
    refusal = predictor.explain_refusal()

    @app.post("/explain", responses=EXPLAIN_ERRORS)
    async def explain_image(
        file: Annotated[UploadFile, File(description="one image")],
        label: Annotated[
            str | None, Query(alias="class", description="class to explain (default: predicted)")
        ] = None,
        method: Annotated[Literal["gradcam", "gradcam++"], Query()] = "gradcam",
        top_k: Annotated[int, Query(ge=1, le=n_classes, description="classes listed")] = 5,
    ) -> Explanation:
        """Where the model found the evidence for a class: Grad-CAM over the image."""
        if refusal:
            raise HTTPException(400, refusal)
        if label is not None and label not in predictor.classes:
            raise HTTPException(400, f"unknown class {label!r}; use one of {predictor.classes}")
        if explaining["n"] >= explain_queue:
            raise HTTPException(
                503, f"{explain_queue} explanations are under way; try again in a moment",
                headers={"Retry-After": "1"},
            )  # fmt: skip
        explaining["n"] += 1
        try:
            name = file.filename or "file 1"
            loop = asyncio.get_running_loop()
            data = await file.read()
            image = await loop.run_in_executor(
                decoder, decode_upload, data, name, predictor.image_size, max_pixels
            )
            wanted = None if label is None else [predictor.classes.index(label)]
            return await loop.run_in_executor(
                explainer, explained, predictor, image, name, wanted, method, top_k
            )
        finally:
            explaining["n"] -= 1


def explained(predictor, image, name, wanted, method, top_k) -> Explanation:
    """The explain worker's job: the map, the overlay PNG and the top-k of one image."""
    maps, probs = predictor.explain(image[None], wanted, method)
    k = int(probs[0].argmax()) if wanted is None else wanted[0]
    scale = max(1, EXPLAIN_SIDE // image.shape[0])
    big = image.repeat(scale, 0).repeat(scale, 1)  # pixels stay sharp; the map is smooth
    png = explain.png_bytes(explain.overlay(big, maps[0]))
    return Explanation(
        filename=name,
        method=method,
        label=predictor.classes[k],
        probability=float(probs[0, k]),
        top=predictor.top_k(probs, top_k)[0],
        png=base64.b64encode(png).decode("ascii"),
    )


def decode_upload(data: bytes, name: str, size: int, max_pixels: int) -> np.ndarray:
    """One uploaded file -> (size, size, 3) uint8, or an HTTPException saying what is wrong."""
    if not data:
        raise HTTPException(400, f"{name} is empty (0 bytes); send an image file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"{name}: {e}; send a smaller image") from None
    except Exception:  # noqa: BLE001 - Pillow could not even identify it
        raise HTTPException(
            415, f"{name} is not an image (PNG, JPEG, BMP, WebP, ...); send an image file"
        ) from None
    if width * height > max_pixels:
        raise HTTPException(
            413,
            f"{name} is {width}x{height} pixels, over the limit of {max_pixels:,}; "
            "send a smaller image",
        )
    try:
        return decode_image(data, size)
    except BadImage as e:
        raise HTTPException(
            422, f"{name} could not be decoded ({e}); send an intact image"
        ) from None


class LimitUploadSize:
    """ASGI middleware: refuse request bodies over `max_bytes` with a JSON 413. A declared
    Content-Length is checked before reading; the bytes are also counted as they stream in, so a
    missing or false Content-Length does not get past the limit. (FastAPI's own `max_body_size`
    answers a declared oversize body in plain text, not JSON.)"""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def message(self) -> str:
        return f"request body over {self.max_bytes:,} bytes; send smaller or fewer images"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"error": self.message()}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.message())  # answered by `http_error`
            return message

        await self.app(scope, counted, send)


async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    if any(p.get("loc", ())[-1:] == ("file",) and p.get("type") == "missing" for p in problems):
        text = "no image in the request; send images as multipart/form-data field 'file'"
    else:
        text = "; ".join(
            f"{'.'.join(str(x) for x in p.get('loc', ()))}: {p.get('msg')}" for p in problems
        )
        text = f"invalid request ({text}); see /openapi.json"
    return JSONResponse({"error": text}, 422)


async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, 500)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or a UserError saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host"
        ) from None


def run(app: FastAPI, sock: socket.socket, access_log: bool = True) -> None:
    """Serve `app` with uvicorn on an already bound socket until Ctrl-C or SIGTERM, then shut
    down gracefully and return."""
    import uvicorn

    config = uvicorn.Config(app, access_log=access_log, timeout_graceful_shutdown=5)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the signal it handled
        uvicorn.Server(config).run(sockets=[sock])
