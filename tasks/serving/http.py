"""``bgremoval serve``: background removal over HTTP, as rembg's ``rembg s`` offers it.

``POST /api/remove`` takes one image — the raw body, or a multipart form field ``file`` — and
answers with the RGBA PNG cut-out (``?output=cutout``, the default), the mask (``mask``) or a JPEG on
a colour (``jpeg&background=%23f4f4f4``); ``decontaminate=true`` and ``refine=auto|on|off`` as in
``bgremoval remove`` (``--decontaminate``, ``--refine``; ``auto``, the default, follows the choice
measured for the model; ``true``/``false`` mean on/off). The
quality score comes back in the ``X-Quality-Score`` header. ``GET /healthz`` says the process is up,
``GET /readyz`` that a model is loaded (and which).

Guards, all from :class:`ServeConfig`: bodies over ``max_bytes`` are refused with 413 before they
are read in full (the ``Content-Length`` header first, then while reading); photos whose header
claims more than ``max_pixels`` with 413 before decoding; undecodable bodies with 422; at most
``concurrency`` images are in the model at once and a request that waits more than
``queue_timeout`` seconds for a slot gets 503 (with ``Retry-After``). A ``models:/<name>@<alias>``
model is re-read every ``reload_interval`` seconds and swapped in when the alias has moved.

There is no login: the service listens on loopback unless told otherwise; put it behind the
proxy that authenticates your users.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from tasks import registry
from tasks.model.refine_choice import REFINE_MODES
from tasks.serving.config import ServeConfig
from tasks.serving.engines import Engine, load_engine, refinement_for
from tasks.serving.pipeline import SINGLE_OUTPUTS, cut_out_bytes, single_output_config

__all__ = ["ModelHolder", "ServeConfig", "create_app", "serve"]

log = logging.getLogger(__name__)

#: ``refine``'s values: the modes, and true/false for on/off.
REFINE_PATTERN = f"^(?i:{'|'.join((*REFINE_MODES, 'true', 'false'))})$"



class ModelHolder:
    """The engine the service runs, and its reload when a registry alias moves."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.version: str | None = None
        self.engine: Engine | None = None
        self._unloadable: str | None = None  # a version that failed to load: not downloaded again each minute
        self._lock = threading.Lock()

    def alias(self) -> tuple[str, str] | None:
        """``(name, alias)`` of a ``models:/<name>@<alias>`` model, else None."""
        ref = self.config.model
        name, at, alias = ref.removeprefix("models:/").rpartition("@")
        if not ref.startswith("models:/") or not at or "/" in alias:  # models:/team@shop/3 is a version
            return None
        return name, alias

    def load(self) -> Engine:
        """Load the model (for an alias: the version it points at now) and make it current."""
        alias = self.alias()
        pinned = registry.pinned_uri(self.config.model) if alias else self.config.model
        version = pinned.rsplit("/", 1)[1] if alias else None  # the alias read once: what loads is what is named
        engine = load_engine(pinned, threads=self.config.threads, sessions=self.config.sessions)
        with self._lock:
            self.engine, self.version = engine, version
        log.info("serving %s%s; edge refinement with refine=auto: %s", engine.describe(),
                 f" (version {version})" if version else "", refinement_for(engine)[1])
        return engine

    def reload_if_moved(self) -> bool:
        """Re-read the alias; load the model again when it points at another version. True when
        it did. A registry that cannot be reached keeps the current model."""
        alias = self.alias()
        if alias is None:
            return False
        try:
            version = registry.alias_version(*alias)
        except Exception as exc:  # noqa: BLE001 - keep serving what is loaded
            log.warning("cannot read %s: %s", self.config.model, exc)
            return False
        if version is None or version in (self.version, self._unloadable):
            return False
        try:
            self.load()
        except Exception as exc:  # noqa: BLE001 - a registry or download failure: keep serving what is loaded
            self._unloadable = version
            log.warning("cannot load %s (version %s): %s; still serving version %s (tried again when the alias "
                        "moves once more, or after a restart)", self.config.model, version, exc, self.version)
            return False
        return True


#: Connections ``serve`` keeps for the health and readiness probes beside the requests in hand.
HEALTH_CONNECTIONS = 8


async def _read_body(request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is longer than ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(config: ServeConfig, holder: ModelHolder | None = None):
    """The FastAPI application of ``bgremoval serve`` (the model is loaded at startup)."""
    holder = holder or ModelHolder(config)
    slots = asyncio.Semaphore(config.concurrency)
    in_hand = asyncio.Semaphore(config.concurrency + config.max_waiting)  # requests whose bodies are held

    async def reload_loop() -> None:
        while True:
            await asyncio.sleep(config.reload_interval)
            await run_in_threadpool(holder.reload_if_moved)

    @asynccontextmanager
    async def lifespan(app):
        if holder.engine is None:
            await run_in_threadpool(holder.load)
        task = asyncio.create_task(reload_loop()) if config.reload_interval > 0 and holder.alias() else None
        yield
        if task:
            task.cancel()

    app = FastAPI(title="bgremoval", summary="Background removal for product photos", lifespan=lifespan)

    def error(status: int, message: str, **headers: str) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status, headers=headers or None)

    @app.get("/healthz")
    def healthz() -> dict:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        """A model is loaded: which, and its registry version."""
        if holder.engine is None:
            return error(503, "no model loaded yet")
        return {"status": "ready", "model": holder.engine.describe(), "version": holder.version}

    @app.post("/api/remove")
    async def remove(request: Request, output: str = Query("cutout", pattern=f"^({'|'.join(SINGLE_OUTPUTS)})$"),
                     background: str = Query("#ffffff", pattern="^#[0-9a-fA-F]{6}$"),
                     decontaminate: bool = False, refine: str = Query("auto", pattern=REFINE_PATTERN)):
        """Cut out one image: the raw body or the multipart field ``file``. Past ``concurrency +
        max_waiting`` requests in hand, 503 before the body is read."""
        if in_hand.locked():
            return error(503, f"busy: {config.concurrency + config.max_waiting} requests in hand", **{"Retry-After": "5"})
        async with in_hand:
            return await _remove(request, output, background, decontaminate, refine)

    async def _remove(request: Request, output: str, background: str, decontaminate: bool, refine: str):
        data = await _read_body(request, config.max_bytes)
        if data is None:
            return error(413, f"the body is larger than {config.max_bytes} bytes")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            async def replay() -> dict:  # the form is parsed from the body already read (and capped)
                return {"type": "http.request", "body": data, "more_body": False}

            form = await Request(request.scope, replay).form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                return error(422, "the multipart form has no file field 'file'")
            data = await upload.read()
        if not data:
            return error(422, "the body holds no image")
        engine = holder.engine
        if engine is None:
            return error(503, "no model loaded yet", **{"Retry-After": "5"})
        inference = single_output_config(output, background, decontaminate, config.max_pixels,
                                         refinement_for(engine, refine.lower())[0])
        try:
            await asyncio.wait_for(slots.acquire(), config.queue_timeout)
        except TimeoutError:
            return error(503, f"busy: no slot within {config.queue_timeout:g} s", **{"Retry-After": "5"})
        try:
            result = await run_in_threadpool(cut_out_bytes, data, engine, inference, "upload", "upload")
        finally:
            slots.release()
        if not result.ok:
            return error(413 if result.too_large else 422, result.error or "cannot cut out this image")
        return Response(result.output(output), media_type=SINGLE_OUTPUTS[output], headers={"X-Quality-Score": f"{result.score:.4f}"})

    return app


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 7000) -> None:
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    # Connections beyond those in hand and a few for /healthz and /readyz are answered 503 by uvicorn itself.
    uvicorn.run(create_app(config), host=host, port=port, log_level="info",
                limit_concurrency=config.concurrency + config.max_waiting + HEALTH_CONNECTIONS)

