"""Score images without torch: an exported embedding graph + the model file's bank, thresholds and geometry.

The steps after the graph are the library's own functions, called with numpy arrays: exact 1-NN
(core/bank_index.py), eq. 7 and the maps (core/scoring.py), the size rules (io/sizing.py), decoding and its limits
(io/images.py), the resize (io/resize.py, the library's CPU kernel), the model file and its schema
(io/model_file.py, io/fitted_state.py).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from ..config import PatchCoreConfig
from ..core.bank_index import BankIndex
from ..core.knn import squared_norms
from ..core.scoring import anomaly_maps, region_patches, reweighted_image_scores
from ..core.tiling import tile_spans
from ..errors import ImageReadError, InputError, ModelFileError
from ..io import sizing
from ..io.fitted_state import FittedState, config_from_file
from ..io.images import iter_image_batches, read_image, to_rgb_uint8
from ..io.model_file import read_model_file
from ..io.resize import resize_crop_rgb
from .backends import Session
from .bundle import read_manifest

# The library's bound (estimator/model.py MAX_FORWARD_PIXELS); the input bounds are io/sizing.py's.
MAX_FORWARD_PIXELS = 4_000_000


class RuntimeResult(NamedTuple):
    """As PatchCoreResult, in numpy: scores (N,), maps (N, H, W) (a list of (H, W) when sizes differ),
    labels (N,) bool or None, masks like maps, bool, or None."""

    scores: np.ndarray
    maps: np.ndarray | list[np.ndarray]
    labels: np.ndarray | None
    masks: np.ndarray | list[np.ndarray] | None


@dataclass
class RuntimeBatch:
    """One batch of `iter_predict`: scored files, their result, files that failed, and each scored file at its
    model input (H', W', 3) uint8: resized and cropped, the picture its map aligns with."""

    paths: list[Path]
    result: RuntimeResult | None
    failures: list[ImageReadError]
    images: list[np.ndarray]


class Runtime:
    """A fitted PatchCore model scored through an exported graph. Safe to share between threads."""

    def __init__(self, config: PatchCoreConfig, state: FittedState, session: Session, manifest: dict):
        self.config, self.session, self.manifest = config, session, manifest
        self._state: tuple[FittedState, np.ndarray, np.ndarray, np.ndarray | None, BankIndex] | None = None
        self.set_state(state)
        self.mean = np.asarray(manifest["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(manifest["std"], dtype=np.float32).reshape(1, 3, 1, 1)
        self.strides = [int(s) for s in manifest["feature_strides"]]

    def set_state(self, state: FittedState) -> Runtime:
        """Install a learned state (the bank, T, thresholds, region) with what derives from it, swapped as one:
        a concurrent predict sees the old state or the new one."""
        bank = np.ascontiguousarray(np.asarray(state.memory_bank), dtype=np.float32)
        region = None if state.region is None else np.asarray(state.region, dtype=bool)
        # The search's query blocks in `threads` threads (BLAS at one thread, see load).
        index = BankIndex(bank, workers=self.session.threads or 1)
        self._state = (state, bank, squared_norms(bank), region, index)
        return self

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) -> distances (Q,), indices (Q,) of the nearest bank rows: the library's exact pruned search
        (core/bank_index.py), on numpy."""
        return self._state[4].search(queries)

    @property
    def state_(self) -> FittedState:
        return self._state[0]

    def with_thresholds(self, *, image: float | None = None, pixel: float | None = None) -> Runtime:
        """Override the decision thresholds (each on its own scale); None keeps the current one."""
        changes = {name: float(value) for name, value in (("image_threshold", image), ("pixel_threshold", pixel))
                   if value is not None}
        return self.set_state(self.state_.replace(**changes))

    @classmethod
    def load(cls, model_path: str | Path, export_dir: str | Path, *, backend: str = "onnxruntime",
             threads: int | None = None, precision: str = "fp32") -> Runtime:
        """Model file + export folder -> Runtime. The graph must have been exported for the weights the bank
        was computed with (ModelFileError otherwise). precision: fp32 (default); bf16 (OpenVINO computes in
        bf16); int8 (the statically quantised graph of `patchcore export --int8`). Reduced precision changes
        the scores: an explicit choice only (its measured effect: docs/RUNTIME.md)."""
        tensors, header = read_model_file(model_path, tensor_schema=FittedState.TENSORS,
                                          optional_tensors=FittedState.OPTIONAL_TENSORS, as_numpy=True)
        config = config_from_file(header, model_path)
        state = FittedState.from_file(tensors, header, model_path)
        manifest = read_manifest(export_dir)
        if manifest["backbone_weights_sha256"] != state.backbone_weights_sha256:
            raise ModelFileError(f"{export_dir}: exported for other backbone weights than {model_path} was fitted "
                                 f"with ({manifest['backbone_weights_sha256'][:12]}... vs "
                                 f"{state.backbone_weights_sha256[:12]}...): export this model")
        if manifest["embedding_dim"] != state.memory_bank.shape[1]:
            raise ModelFileError(f"{export_dir}: the graph gives {manifest['embedding_dim']}-d features, the bank "
                                 f"of {model_path} is {state.memory_bank.shape[1]}-d: export this model")
        graph, digest = manifest["graph"], manifest.get("graph_sha256")
        if precision == "int8":
            variant = manifest.get("int8")
            if not isinstance(variant, dict) or not isinstance(variant.get("graph"), str):
                raise ModelFileError(f"{export_dir}: no int8 graph here (patchcore export --int8 writes one)")
            graph, digest, precision = variant["graph"], variant.get("sha256"), "fp32"
        if "/" in graph or "\\" in graph or graph.startswith("."):
            raise ModelFileError(f"{export_dir}: graph names must name a file in the export folder, got {graph!r}")
        graph_path = Path(export_dir) / graph
        if not graph_path.is_file():
            raise ModelFileError(f"{graph_path}: no such graph file")
        if digest:
            if hashlib.sha256(graph_path.read_bytes()).hexdigest() != digest:
                raise ModelFileError(f"{graph_path}: its sha256 is not the one export.json records (changed or "
                                     f"damaged): export again")
        if threads is not None:
            # numpy's BLAS at one thread: its threads spin on a loaded 2-core machine (small GEMMs, the maps, ran
            # 100x slower with 2 threads than with 1; the search 2x slower than with 1). The search uses the
            # threads instead by searching query blocks in parallel (BankIndex workers), elementwise passes too.
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=1, user_api="blas")
        return cls(config, state, Session(graph_path, backend, threads=threads, precision=precision), manifest)

    # ------------------------------------------------------------------ geometry (io/sizing.py rules)
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return sizing.resized_size(height, width, self.config.resize, scale=self.config.scale,
                                   align=self.config.feature_strides[-1])

    def check_size(self, height: int, width: int) -> None:
        """InputError if an H x W image cannot be scored: empty, too large once resized, smaller than the
        crop, of another aspect than an exact-size model's (io/sizing.py, the library's check), of another
        model-input size than a region model's or a fixed-size graph's."""
        box = sizing.check_model_input(height, width, self.config.resize, self.config.crop, scale=self.config.scale,
                                       align=self.config.feature_strides[-1], exact_aspect=True)
        fixed = self.manifest.get("input_size")
        region = self._state[3]
        if region is not None and (box[2], box[3]) != region.shape:
            raise InputError(f"a {height} x {width} image becomes {box[2]} x {box[3]} at the model input, the "
                             f"inspection region is {region.shape[0]} x {region.shape[1]}: a region model takes "
                             "images of its training size")
        if fixed is not None and [box[2], box[3]] != list(fixed):
            raise InputError(f"a {height} x {width} image gives a {box[2]} x {box[3]} model input; the exported "
                             f"graph takes {fixed[0]} x {fixed[1]} only")

    def model_input(self, image: np.ndarray) -> np.ndarray:
        """A decoded (H, W, 3) uint8 image -> its model input (H', W', 3) uint8: resize, centre crop (the library's
        Preprocess geometry and CPU kernel). Thread-safe: iter_predict runs it in the decoding threads."""
        size = self.resized_size(*image.shape[:2])
        return resize_crop_rgb(image, size, sizing.crop_box(size, self.config.crop))

    def preprocess(self, images: list[np.ndarray], *, at_input: bool = False) -> np.ndarray:
        """Same-size uint8 (H, W, 3) images -> normalised float32 (B, 3, H', W'): resize, centre crop, normalise
        (the library's Preprocess, step for step). `at_input`: already resized and cropped, only normalised."""
        if not at_input:
            self.check_size(*images[0].shape[:2])
            images = [self.model_input(image) for image in images]
        x = np.stack(images).transpose(0, 3, 1, 2).astype(np.float32)
        x /= np.float32(255.0)
        x -= self.mean
        x /= self.std
        return x

    # ------------------------------------------------------------------ features
    def embed(self, x: np.ndarray) -> np.ndarray:
        """normalised (B, 3, H', W') -> (B, h, w, D) patch features, in one pass or tile by tile."""
        finest, deepest = self.strides[0], self.strides[-1]
        height, width = x.shape[-2:]
        grid = sizing.feature_grid((height, width), finest)
        tile = self.config.tile_size
        if tile is None:
            features = self.session.run(x)
        else:
            try:
                rows = tile_spans(height, tile, self.config.tile_overlap, align=deepest, stride=finest)
                cols = tile_spans(width, tile, self.config.tile_overlap, align=deepest, stride=finest)
            except ValueError as err:
                raise InputError(f"cannot tile a {height}x{width} model input: {err}") from None
            grid = (height // finest, width // finest)
            features = None
            for r in rows:
                for c in cols:
                    part = self.session.run(x[..., r.start:r.end, c.start:c.end])
                    if features is None:
                        features = np.empty((x.shape[0], *grid, part.shape[-1]), dtype=np.float32)
                    top, left = r.keep_from - r.start // finest, c.keep_from - c.start // finest
                    features[:, r.keep_from:r.keep_to, c.keep_from:c.keep_to] = \
                        part[:, top:top + r.keep_to - r.keep_from, left:left + c.keep_to - c.keep_from]
        if tuple(features.shape[1:3]) != grid:
            raise ModelFileError(f"the graph gave a {features.shape[1:3]} feature grid for a {height}x{width} input, "
                                 f"expected {grid}: export this model again")
        return features

    # ------------------------------------------------------------------ scoring
    def score_stack(self, images: list[np.ndarray] | np.ndarray, *, state: FittedState | None = None,
                    at_input: bool = False) -> RuntimeResult:
        """Same-size (H, W, 3) uint8 images -> RuntimeResult: exact 1-NN of every patch, eq. 7, maps (the
        library's functions). `state`: score against this learned state (installed first if it is new)."""
        if state is not None and state is not self._state[0]:
            self.set_state(state)
        state, bank, bank_sq_norms, region, index = self._state  # read once: one state for the whole batch
        x = self.preprocess(images, at_input=at_input)
        features = self.embed(x)
        batch, h, w, dim = features.shape
        queries = features.reshape(batch, h * w, dim)
        if dim != bank.shape[1]:
            raise ModelFileError(f"feature size {dim} does not match the memory bank's {bank.shape[1]}")
        dist, idx = index.search(queries.reshape(-1, dim))  # exact 1-NN, pruned as in the library
        dist, idx = dist.reshape(batch, h * w), idx.reshape(batch, h * w)
        if region is not None:  # outside the inspection region every patch scores zero
            dist = dist * region_patches(region, (h, w)).reshape(-1).astype(np.float32)
        scores = reweighted_image_scores(queries, dist, idx, bank, bank_sq_norms,
                                         self.config.reweight_neighbours, state.distance_scale)
        maps = anomaly_maps(dist, (h, w), tuple(x.shape[-2:]), self.config.blur_sigma)
        if region is not None:
            maps = maps * region.astype(np.float32)
        labels = None if state.image_threshold is None else scores > state.image_threshold
        masks = None if state.pixel_threshold is None else maps > state.pixel_threshold
        return RuntimeResult(scores, maps, labels, masks)

    def _stacks(self, images: list[np.ndarray]) -> Iterator[tuple[int, int]]:
        """[start, end) runs of consecutive same-size images, at most batch_size and MAX_FORWARD_PIXELS each."""
        start = 0
        while start < len(images):
            size = images[start].shape[:2]
            per_part = max(1, min(self.config.batch_size, MAX_FORWARD_PIXELS // (size[0] * size[1])))
            end = start + 1
            while end < len(images) and end - start < per_part and images[end].shape[:2] == size:
                end += 1
            yield start, end
            start = end

    def predict(self, images) -> RuntimeResult:
        """Score one image or a sequence (paths, (H, W, 3) / (H, W) uint8 arrays, PIL images). An unreadable
        file raises ImageReadError naming it (iter_predict reports and goes on)."""
        if isinstance(images, (str, Path, np.ndarray, Image.Image)):
            images = [images]
        images = list(images)
        if images and all(isinstance(image, (str, Path)) for image in images):
            # Files: decoded in background threads while the graph scores the batch before (as the library's
            # predict does), and the first unreadable one raised as before.
            parts = []
            for batch in self.iter_predict(images):
                if batch.failures:
                    raise batch.failures[0]
                if batch.result is not None:
                    parts.append(batch.result)
            return _concat(parts)
        decoded = [self._decode(image) for image in images]
        if not decoded:
            raise InputError("no images to score")
        return _concat([self.score_stack(decoded[a:b]) for a, b in self._stacks(decoded)])

    def _decode(self, image) -> np.ndarray:
        if isinstance(image, (str, Path)):
            return read_image(image, check=self.check_size)
        if isinstance(image, Image.Image):
            if image.width == 0 or image.height == 0:
                raise InputError(f"empty PIL image ({image.width} x {image.height})")
            return to_rgb_uint8(image)
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.dtype != np.uint8:
            raise InputError(f"image arrays must be uint8 (H, W) or (H, W, 1|3|4), got {arr.dtype} {arr.shape}")
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        elif arr.shape[2] == 4:
            arr = to_rgb_uint8(Image.fromarray(np.ascontiguousarray(arr), "RGBA"))
        self.check_size(arr.shape[0], arr.shape[1])
        return np.ascontiguousarray(arr)

    def iter_predict(self, paths: Sequence[str | Path], *, workers: int = 2) -> Iterator[RuntimeBatch]:
        """Stream batches from files decoded in background threads; unreadable files are reported, not raised."""
        # Each file is decoded and resized to its model input in the background threads: both release the GIL,
        # so on two cores they overlap the graph and the search of the batch before (bottle, 2 threads: the
        # resize was 3.9 of the 4.7 ms/img of preprocessing, serial with the graph when done here).
        # Only the model input is kept (the decoded image is dropped in its thread): a batch holds 16 x 150 KB,
        # not 16 x 2.4 MB, on bottle.
        for batch in iter_image_batches(paths, self.config.batch_size, workers=workers, check=self.check_size,
                                        as_tensors=False, prepare=self.model_input, keep_decoded=False):
            if not batch.images:
                yield RuntimeBatch([], None, batch.failures, [])
                continue
            failures = batch.failures
            for a, b in self._stacks(batch.images):  # runs of one model-input size
                yield RuntimeBatch(batch.paths[a:b], self.score_stack(batch.images[a:b], at_input=True), failures,
                                   batch.images[a:b])
                failures = []


def _concat(parts: list[RuntimeResult]) -> RuntimeResult:
    scores = np.concatenate([p.scores for p in parts])
    labels = None if parts[0].labels is None else np.concatenate([p.labels for p in parts])
    if len({p.maps.shape[1:] for p in parts}) == 1:
        maps = np.concatenate([p.maps for p in parts])
        masks = None if parts[0].masks is None else np.concatenate([p.masks for p in parts])
    else:  # images of different sizes: one map each, at its own model-input size
        maps = [m for p in parts for m in p.maps]
        masks = None if parts[0].masks is None else [m for p in parts for m in p.masks]
    return RuntimeResult(scores, maps, labels, masks)
