"""The HTTP API (FastAPI): thin routes over the registry, the batcher and the review store.

Routes parse, check limits and auth, and call the estimator; no algorithm or file format lives here.
State-changing routes (feedback, apply-update, reload) always need the bearer token; predict needs it
too when the server listens beyond loopback, unless started with --open-predict.
"""
from __future__ import annotations

import base64
import hmac
import io
import logging
import math
import sqlite3
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..._version import __version__
from ...errors import InputError, PatchCoreError
from ...io.render import colormap, normalise_map, overlay
from .batcher import Batcher, ScoredImage, ScoringError
from .decode import UploadError, decode_upload
from .metrics import Metrics
from .registry import ModelEntry, ModelRegistry, file_digest
from .review import AlreadyApplied, ReviewStore
from .settings import ServerSettings
from .threshold_review import NotEnoughMarks, ScoreCache, apply_threshold, marked_scores, review_report
from .versions import previous_versions, save_keeping_previous

log = logging.getLogger("patchcore.server")

# Response size bounds: pictures (overlay, heatmap, input) are sent at most this many pixels each (scaled
# down alike, aspect kept), the map at most this many values (block maxima, so no peak is lost). A
# response is then at most ~3 x 4 MiB of base64 PNG + ~2.5 MiB of map JSON, whatever the image size.
MAX_PICTURE_PIXELS = 1 << 20
MAX_MAP_VALUES = 1 << 18


# ---------------------------------------------------------------------------- shared objects
class Recent:
    """Recent uploads by result_id (bounded in count and bytes), so feedback can name what was scored."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, dict] = OrderedDict()
        self._bytes = 0

    def put(self, result_id: str, item: dict) -> None:
        self._items[result_id] = item
        self._bytes += len(item["data"])
        while self._items and (len(self._items) > self.max_items or self._bytes > self.max_bytes):
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old["data"])

    def get(self, result_id: str) -> dict | None:
        return self._items.get(result_id)


class Services:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.metrics = Metrics()
        self.registry = ModelRegistry(settings.models_dir, device=settings.device, runtime=settings.runtime)
        self.registry.check_folder()  # before the review store creates anything under it
        self.review = ReviewStore(settings.review_dir)
        self.batcher = Batcher(max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                               max_queue=settings.max_queue, on_batch=self.metrics.batch_size.observe)
        self.recent = Recent(settings.recent_results, settings.recent_bytes)
        self.marked_scores = ScoreCache()  # marks rescored by each served model file, for its ROC
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
        self.metrics.in_flight.set_function(lambda: self.batcher.in_flight)
        self.ready = False

    def publish(self, entry: ModelEntry) -> None:
        self.metrics.model_version.labels(entry.name).set(entry.version)
        self.metrics.bank_size.labels(entry.name).set(entry.model.memory_bank_.shape[0])


def services(request: Request) -> Services:
    return request.app.state.services


def model_entry(name: str, svc: Annotated[Services, Depends(services)]) -> ModelEntry:
    entry = svc.registry.get(name)
    if entry is None:
        raise HTTPException(404, f"no model named {name!r}; GET /v1/models lists them")
    return entry


# ---------------------------------------------------------------------------- auth
def _check_token(request: Request, token: str | None) -> None:
    if token is None:
        raise HTTPException(403, "this server was started without a token (--token-file or PATCHCORE_TOKEN), "
                                 "so this endpoint is disabled")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise HTTPException(401, "this endpoint needs 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(403, "wrong token")


def require_token(request: Request, svc: Annotated[Services, Depends(services)]) -> None:
    """Every state-changing endpoint: missing token 401, wrong token (or none configured) 403."""
    _check_token(request, svc.settings.token)


def predict_access(request: Request, svc: Annotated[Services, Depends(services)]) -> None:
    if svc.settings.predict_needs_token:
        _check_token(request, svc.settings.token)


# ---------------------------------------------------------------------------- middleware
class BodyLimit:
    """Refuse request bodies over the limit with 413: by Content-Length up front, and by counting the
    bytes of a body without one (chunked), before multipart parsing buffers them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_413(send, self.limit)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, f"request body over this server's limit of {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


async def _send_413(send, limit: int) -> None:
    body = f'{{"detail":"request body over this server\'s limit of {limit} bytes"}}'.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------- schemas
class Timing(BaseModel):
    decode: float
    queue: float
    compute: float
    total: float


class Prediction(BaseModel):
    model: str
    model_version: int
    result_id: str = Field(description="refer to this image in POST .../feedback (kept in memory for a while)")
    score: float = Field(description="image anomaly score (paper eq. 7)")
    label: Literal["good", "defect"] | None = Field(description="score > threshold; null without a threshold")
    threshold: float | None
    pixel_threshold: float | None
    batch_size: int = Field(description="images scored together with this one")
    timing_ms: Timing
    image_size: tuple[int, int]
    overlay_png: str | None = Field(None, description="base64 PNG: heat over the (resized, cropped) input")
    heatmap_png: str | None = None
    input_png: str | None = None
    picture_size: tuple[int, int] | None = Field(None, description="(H, W) of the pictures: the model input, "
                                                 f"scaled down to at most {MAX_PICTURE_PIXELS} pixels")
    map: list[list[float]] | None = Field(None, description="pixel scores at the model's input geometry (block "
                                          f"maxima where it has more than {MAX_MAP_VALUES} values)")
    map_size: tuple[int, int] | None = Field(None, description="(H, W) of `map`")
    map_full_size: tuple[int, int] | None = Field(None, description="(H, W) of the map at the model input")


class FeedbackIn(BaseModel):
    result_id: str = Field(max_length=64)
    verdict: Literal["good", "defect"]
    note: str | None = Field(None, max_length=1000)


class UpdateIn(BaseModel):
    max_new: int | None = Field(None, ge=0, description="budget: most bank rows one update may add")


class ThresholdIn(BaseModel):
    """Exactly one: a threshold value, or a target rate on the marked results whose proposal is applied.
    Checked by `checked()`, not by field constraints: a validation error echoes its input, and FastAPI cannot
    write a NaN from the body into JSON (a 500 instead of a 422)."""

    threshold: float | None = Field(None, description="the image threshold itself (finite)")
    false_alarm_rate: float | None = Field(None, description="in [0, 1]: the most detections with at most this "
                                           "share of the marked good flagged")
    miss_rate: float | None = Field(None, description="in [0, 1]: the fewest false alarms with at most this share "
                                    "of the marked defects missed")

    def checked(self) -> ThresholdIn:
        given = {k: v for k, v in self.model_dump().items() if v is not None}
        if len(given) != 1:
            raise HTTPException(422, "give exactly one of threshold, false_alarm_rate, miss_rate")
        (name, value), = given.items()
        if not math.isfinite(value) or (name != "threshold" and not 0.0 <= value <= 1.0):
            raise HTTPException(422, f"{name} must be a finite number{'' if name == 'threshold' else ' in [0, 1]'}, "
                                     f"got {value}")
        return self


# ---------------------------------------------------------------------------- app
def create_app(settings: ServerSettings) -> FastAPI:
    svc = Services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(svc.registry.load_all)
        for entry in svc.registry.entries.values():
            svc.publish(entry)
        svc.batcher.start()
        svc.ready = bool(svc.registry.entries)
        try:
            yield
        finally:
            svc.ready = False
            svc.batcher.stop()

    app = FastAPI(title="patchcore", version=__version__, lifespan=lifespan,
                  description="PatchCore anomaly detection: score images, review results, update models.")
    app.state.services = svc
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + 64 * 1024)  # room for multipart framing

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        status = 500  # an exception that escapes the routes becomes a 500: counted as one
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "other")
            svc.metrics.requests.labels(path, str(status)).inc()
            svc.metrics.latency.labels(path).observe(time.perf_counter() - started)

    @app.exception_handler(PatchCoreError)
    async def user_error(request: Request, err: PatchCoreError):
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        # FastAPI's own answer echoes the input, and a JSON body holding NaN cannot be written back as JSON:
        # that was a 500 for any such body. Say where and what, never the value.
        problems = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "invalid"))} for e in err.errors()]
        return JSONResponse({"detail": problems}, status_code=422)

    # -------------------------------------------------------------- health and metadata
    @app.get("/healthz", tags=["ops"])
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz():
        ready = svc.ready and svc.batcher.running
        body = {"ready": ready, "models": sorted(svc.registry.entries), "load_errors": svc.registry.errors}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"])
    async def metrics():
        return Response(svc.metrics.render(), media_type=svc.metrics.content_type)

    @app.get("/v1/models", tags=["models"])
    async def list_models():
        return {"models": [_summary(e) for e in svc.registry.entries.values()]}

    @app.get("/v1/models/{name}", tags=["models"])
    async def model_info(entry: Annotated[ModelEntry, Depends(model_entry)]):
        m = entry.model
        info = _summary(entry)
        info.update(config=m.config.to_dict(), distance_scale=m.distance_scale_, grid=list(m.grid_),
                    n_train_patches=m.n_train_patches_, file_sha256=entry.file_sha256,
                    previous_versions=[p.name for p in previous_versions(entry.path)],
                    feedback=await run_in_threadpool(svc.review.counts, entry.name),
                    threshold_history=await run_in_threadpool(svc.review.threshold_history, entry.name))
        return info

    # -------------------------------------------------------------- scoring
    @app.post("/v1/models/{name}/predict", tags=["scoring"], response_model=Prediction,
              dependencies=[Depends(predict_access)],
              responses={413: {"description": "upload too large"}, 415: {"description": "not an image"},
                         503: {"description": "queue full; retry after Retry-After seconds"}})
    async def predict(file: Annotated[UploadFile, File(description="the image (PNG, JPEG, BMP, TIFF, WebP)")],
                      entry: Annotated[ModelEntry, Depends(model_entry)],
                      overlay_png: Annotated[bool, Query(alias="overlay", description="the overlay PNG")] = False,
                      heatmap_png: Annotated[bool, Query(alias="heatmap", description="the heatmap PNG")] = False,
                      include_map: Annotated[bool, Query(alias="map", description="the pixel score map")] = False,
                      input_png: Annotated[bool, Query(alias="input", description="the input as the model saw it "
                                                       "(resized, cropped), for layering the heatmap")] = False):
        started = time.perf_counter()
        if file.content_type and not (file.content_type.startswith("image/")
                                      or file.content_type == "application/octet-stream"):
            svc.metrics.rejected.labels("media_type").inc()
            raise HTTPException(415, f"expected an image upload (image/png, image/jpeg, ...), "
                                     f"got {file.content_type}")
        if not svc.batcher.admit():
            svc.metrics.rejected.labels("queue_full").inc()
            retry = max(1, math.ceil(svc.batcher.in_flight / max(1, settings.max_batch) * 0.5))
            raise HTTPException(503, "server busy: the scoring queue is full", headers={"Retry-After": str(retry)})
        try:
            data = await file.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                svc.metrics.rejected.labels("too_large").inc()
                raise HTTPException(413, f"upload over this server's limit of {settings.max_upload_bytes} bytes")
            try:
                image, suffix = await run_in_threadpool(decode_upload, data, settings.max_pixels,
                                                        _input_budget(entry, settings.max_input_pixels))
            except UploadError as err:
                svc.metrics.rejected.labels("too_large" if err.status == 413 else "bad_image").inc()
                raise HTTPException(err.status, str(err)) from None
            decoded = time.perf_counter()
            try:
                scored = await svc.batcher.score(entry, image)
            except PatchCoreError as err:
                raise HTTPException(422, str(err)) from None
            except ScoringError as err:  # never answered with a label
                svc.metrics.rejected.labels("not_scored").inc()
                raise HTTPException(500, str(err)) from None
        finally:
            svc.batcher.release()
        result_id = uuid.uuid4().hex
        svc.recent.put(result_id, {"model": entry.name, "data": data, "suffix": suffix, "score": scored.score,
                                   "version": scored.version})
        extras = {}
        if overlay_png or heatmap_png or include_map or input_png:
            extras = await run_in_threadpool(_pictures, entry, image, scored, overlay_png, heatmap_png, include_map,
                                             input_png)
        total = (time.perf_counter() - started) * 1000.0
        return Prediction(
            model=entry.name, model_version=scored.version, result_id=result_id, score=scored.score,
            label=None if scored.label is None else ("defect" if scored.label else "good"),
            threshold=scored.threshold, pixel_threshold=entry.model.pixel_threshold_, batch_size=scored.batch_size,
            timing_ms=Timing(decode=(decoded - started) * 1000.0, queue=scored.queue_ms, compute=scored.compute_ms,
                             total=total),
            image_size=(int(image.shape[1]), int(image.shape[2])), **extras)

    # -------------------------------------------------------------- review and update (token)
    @app.post("/v1/models/{name}/feedback", tags=["review"], dependencies=[Depends(require_token)], status_code=201)
    async def feedback(body: FeedbackIn, entry: Annotated[ModelEntry, Depends(model_entry)]):
        item = svc.recent.get(body.result_id)
        if item is None or item["model"] != entry.name:
            raise HTTPException(404, f"no recent result {body.result_id!r} for model {entry.name!r} (results are "
                                     f"kept in memory for the last {settings.recent_results} uploads); score the "
                                     f"image again")
        try:
            stored = await run_in_threadpool(
                lambda: svc.review.add(model=entry.name, result_id=body.result_id, image=item["data"],
                                       suffix=item["suffix"], verdict=body.verdict, score=item["score"],
                                       model_version=item["version"], note=body.note))
        except (OSError, sqlite3.Error, ValueError) as err:  # nothing is kept: the image goes with its row
            log.error("feedback for %s not stored: %s", entry.name, err)
            raise HTTPException(503, f"the feedback could not be stored ({err}); nothing was kept, try again") from None
        counts = await run_in_threadpool(svc.review.counts, entry.name)
        return {"feedback_id": stored.id, "verdict": stored.verdict,
                "stored_as": stored.image_path.relative_to(svc.review.folder).as_posix(), "counts": counts}

    @app.get("/v1/models/{name}/feedback", tags=["review"], dependencies=[Depends(predict_access)])
    async def list_feedback(entry: Annotated[ModelEntry, Depends(model_entry)],
                            limit: Annotated[int, Query(ge=1, le=10_000)] = 1000):
        """The model's feedback, newest first: pending, applied (with the model version) or left out of an
        update (with the reason)."""
        items = await run_in_threadpool(lambda: svc.review.list_feedback(entry.name, limit=limit))
        return {"model": entry.name, "feedback": [f.to_dict(svc.review.folder) for f in items],
                "counts": await run_in_threadpool(svc.review.counts, entry.name)}

    @app.delete("/v1/models/{name}/feedback/{feedback_id}", tags=["review"], dependencies=[Depends(require_token)])
    async def withdraw_feedback(feedback_id: int, entry: Annotated[ModelEntry, Depends(model_entry)]):
        """Withdraw feedback no update has used yet (its stored image is deleted). Feedback already folded into
        the model is 409: roll the model back by file to undo it."""
        async with entry.lock:  # not while an update is reading the pending images
            try:
                item = await run_in_threadpool(svc.review.withdraw, entry.name, feedback_id)
            except AlreadyApplied as err:
                raise HTTPException(409, str(err)) from None
        if item is None:
            raise HTTPException(404, f"no feedback {feedback_id} for model {entry.name!r}")
        return {"withdrawn": item.to_dict(svc.review.folder),
                "counts": await run_in_threadpool(svc.review.counts, entry.name)}

    @app.post("/v1/models/{name}/apply-update", tags=["review"], dependencies=[Depends(require_token)])
    async def apply_update(entry: Annotated[ModelEntry, Depends(model_entry)], body: UpdateIn | None = None):
        """Fold the accepted good feedback into the model (incremental coreset update), write the new
        model file (previous kept as .prev), and swap it in: requests in flight finish on the old bank."""
        async with entry.lock:
            pending = await run_in_threadpool(svc.review.pending_good, entry.name)
            if not pending:
                raise HTTPException(409, "no accepted good feedback waiting for this model")
            max_new = body.max_new if body is not None else None
            outcome = await run_in_threadpool(_update_and_save, entry, pending, max_new)
            left_out = outcome.pop("left_out")
            if left_out:  # named, kept in the store, and never tried again: later updates are not blocked
                await run_in_threadpool(svc.review.mark_left_out, left_out)
            used = [f.id for f in pending if f.id not in left_out]
            if not used:
                raise HTTPException(422, {"message": "no pending image could join an update; each is left out "
                                                     "(see GET .../feedback)",
                                          "left_out": [{"feedback_id": i, "reason": r} for i, r in left_out.items()]})
            if outcome["file_sha256"] is not None:  # a new version (none when no bank row was added)
                entry.version += 1
                entry.file_sha256 = outcome["file_sha256"]
                entry.loaded_at = time.time()
                svc.metrics.updates.labels(entry.name).inc()
            outcome.pop("file_sha256")
            await run_in_threadpool(svc.review.mark_applied, used, entry.version)
            svc.publish(entry)
        return {"model": entry.name, "model_version": entry.version, **outcome,
                "left_out": [{"feedback_id": i, "reason": r} for i, r in left_out.items()]}

    @app.get("/v1/models/{name}/roc", tags=["review"], dependencies=[Depends(predict_access)])
    async def marked_roc(entry: Annotated[ModelEntry, Depends(model_entry)],
                         false_alarm_rate: Annotated[float | None, Query(ge=0, le=1)] = None,
                         miss_rate: Annotated[float | None, Query(ge=0, le=1)] = None):
        """The ROC of the results inspectors marked good and defect, scored again by the served model; what
        the current threshold does to them; with a target (one of false_alarm_rate, miss_rate), the proposed
        threshold."""
        if false_alarm_rate is not None and miss_rate is not None:
            raise HTTPException(422, "give one target: false_alarm_rate or miss_rate")
        async with entry.lock:  # the model cannot change while its marks are scored
            marked = await run_in_threadpool(marked_scores, entry, svc.review, svc.marked_scores)
        return review_report(entry, marked, false_alarm_rate=false_alarm_rate, miss_rate=miss_rate)

    @app.post("/v1/models/{name}/threshold", tags=["review"], dependencies=[Depends(require_token)])
    async def set_threshold(body: ThresholdIn, entry: Annotated[ModelEntry, Depends(model_entry)]):
        """Set the image threshold (a value, or the proposal for a target rate on the marked results): the model
        file is written (previous kept as .prev), swapped in as a new version, and the change is recorded in the
        review store (GET /v1/models/{name} lists the history)."""
        body = body.checked()
        async with entry.lock:
            marked = await run_in_threadpool(marked_scores, entry, svc.review, svc.marked_scores)
            try:
                outcome = await run_in_threadpool(
                    lambda: apply_threshold(entry, svc.review, marked, threshold=body.threshold,
                                            false_alarm_rate=body.false_alarm_rate, miss_rate=body.miss_rate))
            except NotEnoughMarks as err:
                raise HTTPException(409, str(err)) from None
            except (OSError, sqlite3.Error) as err:
                log.error("threshold of %s not changed: %s", entry.name, err)
                raise HTTPException(503, f"the threshold could not be saved ({err}); the model is unchanged") from None
            changed = outcome.pop("changed")
            if changed:  # else the file and the version stay
                svc.marked_scores.carry(entry.name, entry.file_sha256, outcome["file_sha256"])
                entry.version += 1
                entry.file_sha256 = outcome.pop("file_sha256")
                entry.loaded_at = time.time()
                svc.publish(entry)
        return {"model": entry.name, "model_version": entry.version, "threshold": entry.model.image_threshold_,
                "changed": changed, **outcome}

    @app.post("/v1/models/{name}/reload", tags=["models"], dependencies=[Depends(require_token)])
    async def reload(entry: Annotated[ModelEntry, Depends(model_entry)]):
        """Load the model file again (after `patchcore update` or a rollback by file) and swap it in."""
        async with entry.lock:
            model = await run_in_threadpool(svc.registry.load_model, entry.path)
            entry.model = model
            entry.version += 1
            entry.file_sha256 = await run_in_threadpool(file_digest, entry.path)
            entry.loaded_at = time.time()
            svc.publish(entry)
        return _summary(entry)

    # -------------------------------------------------------------- inspection page
    page = resources.files("patchcore.app.server") / "page"
    app.mount("/page", StaticFiles(directory=str(page), html=True), name="page")

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/page/")

    return app


def _summary(entry: ModelEntry) -> dict:
    m = entry.model
    return {"name": entry.name, "version": entry.version, "file": entry.path.name, "backbone": m.config.backbone,
            "bank_rows": int(m.memory_bank_.shape[0]), "threshold": m.image_threshold_,
            "pixel_threshold": m.pixel_threshold_, "input_size": list(m.input_size_),
            "n_train_images": m.n_train_images_, "loaded_at": entry.loaded_at}


def _png_base64(array: np.ndarray, size: tuple[int, int] | None = None) -> str:
    buffer = io.BytesIO()
    picture = Image.fromarray(array)
    if size is not None and (picture.height, picture.width) != tuple(size):
        picture = picture.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pictures(entry: ModelEntry, image, scored: ScoredImage, want_overlay: bool, want_heatmap: bool,
              want_map: bool, want_input: bool) -> dict:
    """The heatmap and overlay as predict_folder draws them (same colour scale), base64 PNG, and the map:
    each bounded in size (MAX_PICTURE_PIXELS, MAX_MAP_VALUES), so one response is bounded too."""
    anomaly_map = scored.anomaly_map.numpy()
    out = {}
    if want_map:
        reduced = _block_max(scored.anomaly_map, MAX_MAP_VALUES)
        out.update(map=np.round(reduced.numpy(), 4).tolist(), map_size=tuple(reduced.shape),
                   map_full_size=tuple(anomaly_map.shape))
    if not (want_heatmap or want_input or want_overlay):
        return out
    heat = colormap(normalise_map(anomaly_map, entry.model.pixel_threshold_))
    picture = entry.model.preprocess.geometry(image).permute(1, 2, 0).numpy()
    size = _bounded_size(picture.shape[:2], MAX_PICTURE_PIXELS)
    out["picture_size"] = size
    if want_heatmap:
        out["heatmap_png"] = _png_base64(heat, size)
    if want_input:
        out["input_png"] = _png_base64(picture, size)
    if want_overlay:
        mask = None if scored.mask is None else scored.mask.numpy()
        out["overlay_png"] = _png_base64(overlay(picture, heat, mask), size)
    return out


def _bounded_size(shape: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """(H, W) scaled down (aspect kept) to at most `max_pixels`; unchanged when already within."""
    height, width = int(shape[0]), int(shape[1])
    if height * width <= max_pixels:
        return height, width
    factor = math.sqrt(max_pixels / (height * width))
    return max(1, int(height * factor)), max(1, int(width * factor))


def _block_max(anomaly_map, max_values: int):
    """(H, W) map -> at most `max_values` values: maxima over blocks (a defect's peak is never averaged
    away); the map itself when it is small enough."""
    import torch.nn.functional as F

    height, width = anomaly_map.shape
    if height * width <= max_values:
        return anomaly_map
    size = _bounded_size((height, width), max_values)
    return F.adaptive_max_pool2d(anomaly_map[None, None].float(), size)[0, 0]


def _input_budget(entry: ModelEntry, max_input_pixels: int):
    """The per-request memory bound, checked on the upload's header before decoding: the model input the
    image would become (after the model's resize and crop) may have at most `max_input_pixels` pixels."""
    def check(height: int, width: int) -> None:
        try:
            rows, cols = entry.model.preprocess.output_size(height, width)
        except (PatchCoreError, ValueError, ZeroDivisionError) as err:
            raise UploadError(422, f"the model cannot take a {width} x {height} image ({err})") from None
        if rows * cols > max_input_pixels:
            raise UploadError(413, f"a {width} x {height} image is scored by model {entry.name!r} at {cols} x {rows} "
                                   f"= {rows * cols} pixels, over this server's per-request limit of "
                                   f"{max_input_pixels} model-input pixels (patchcore serve --max-input-pixels)")
    return check


def _update_and_save(entry: ModelEntry, pending, max_new: int | None) -> dict:
    """Worker thread: update the live model (predicts keep running on the old state until the swap), save
    the new file atomically keeping the previous one, re-score the corrected images. On a failed save the
    old state goes back in, so memory and disk never disagree."""
    model = entry.model
    previous = model.state_
    before = {f.id: f.score for f in pending}
    paths = [f.image_path for f in pending]
    try:
        model.update(paths, max_new=max_new)
    except InputError as err:  # no image could join: each is left out, named
        return {"left_out": {f.id: f"{f.image_path.name}: {err}" for f in pending}, "file_sha256": None}
    report = model.update_report_
    left_out = {}
    for f in pending:  # images the update skipped (unreadable, a size the model refuses): named and left out
        reason = next((text for text in report.skipped if str(f.image_path) in text), None)
        if reason is not None:
            left_out[f.id] = reason.replace(str(f.image_path), f.image_path.name)
    joined = [f for f in pending if f.id not in left_out]
    if not joined:
        model.set_state(previous)
        return {"left_out": left_out, "file_sha256": None}
    kept, digest = None, None
    if report.bank_after == report.bank_before:  # nothing new to learn: the file and the version stay
        model.set_state(previous)
    else:
        try:
            kept = save_keeping_previous(model, entry.path)
        except BaseException:
            model.set_state(previous)
            raise
        digest = file_digest(entry.path)
    rescored = model.predict([f.image_path for f in joined])
    return {
        "left_out": left_out, "file_sha256": digest,
        "previous_file": None if kept is None else kept.name,
        "images": report.n_images, "bank_rows_before": report.bank_before, "bank_rows_after": report.bank_after,
        "stopped_by": report.stopped_by, "radius": report.radius, "seconds": round(report.seconds, 3),
        "threshold": model.image_threshold_,
        "rescored": [{"feedback_id": f.id, "result_id": f.result_id, "score_before": before[f.id],
                      "score_after": float(rescored.scores[i]),
                      "label_after": None if rescored.labels is None else
                      ("defect" if bool(rescored.labels[i]) else "good")} for i, f in enumerate(joined)],
    }

