"""Score an archive on Ray Data: list the images in chunks -> decode (in the actors' threads, or in Ray
tasks) -> score in an actor pool (each actor loads the model once) -> one Parquet file per chunk of images.
Fault tolerant and resumable.

The output folder:

    OUT/job.json                 the model (path, sha256 of its bytes) and the options: a restart of the
                                 same job resumes it; another model or other options are refused
    OUT/scores/part-R-C.parquet  one file per chunk of images (run R, chunk C), one row per image: path,
                                 name, score, label, image_threshold, pixel_threshold, model_sha256, error
    OUT/summary.json             at the end: counts, and that every input is in exactly one row
    OUT/heatmaps|overlays|masks|maps/   with pictures=True: the same files as `patchcore predict`

Exactly once: a chunk is the unit of work and of output. The actor that scores a chunk writes its part
through a temporary name and renames it, so a part is there whole or not at all; Ray Data restarts a killed
actor (or one lost with its node) and retries its chunk, which writes the same file again. A restart of a
stopped job reads the paths already in its parts and scores only the others, in new chunks of a new run.

Scores equal `patchcore predict` on the same files: the actor scores the decoded images through the public
`predict` of the same estimator the single-process command loads, and writes pictures with its writer.
The scoring backend is pluggable (BACKENDS): "torch" (the estimator, a single model or an ensemble) and
"onnx" (the lean runtime's exported graph on onnxruntime or OpenVINO, as `predict --runtime onnx`).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from .._version import __version__
from ..errors import ImageReadError, InputError, ModelFileError, OutputError
from ..estimator.ensemble import load_model
from ..io.images import read_image
from ..io.model_file import atomic_write_bytes, read_model_format
from .predict_folder import (
    OUTPUT_FOLDERS,
    _scored_batches,
    _write_outputs,
    clear_outputs,
    display_path,
    earlier_outputs,
    output_names,
    unique_inputs,
)
from .ray_cluster import RaySession, file_sha256

DEFAULT_CHUNK = 64  # images per chunk: the unit of work, of retry and of output file
SCHEMA = pa.schema([("path", pa.string()), ("name", pa.string()), ("score", pa.float64()), ("label", pa.string()),
                    ("image_threshold", pa.float64()), ("pixel_threshold", pa.float64()),
                    ("model_sha256", pa.string()), ("error", pa.string())])
PART = re.compile(r"part-(\d+)-(\d+)\.parquet$")
DECODE_CPUS = 0.25  # booked per decoding task: decoding a chunk costs a fraction of scoring it
MAX_LISTED_FAILURES = 100  # in summary.json; every failure is a row of the Parquet parts


@dataclass
class RayPredictReport:
    n_inputs: int = 0
    n_already_done: int = 0  # rows found from an earlier, stopped run of the same job (resume)
    n_scored: int = 0  # rows with a score, over the whole job
    n_failed: int = 0  # rows with an error, over the whole job
    n_parts: int = 0
    actors: int = 0
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)  # the first MAX_LISTED_FAILURES


# ---------------------------------------------------------------------------- scoring backends
class EstimatorBackend:
    """What an actor scores with: a model loaded once, `score(images)` mapping uint8 (3, H, W) tensors to one
    (score, map, label, mask) or an error text each (an image the model cannot take), and `model`, which
    draws the pictures. Only the public estimator API is used, so the scores are those of `patchcore
    predict` with the same backend."""

    def __init__(self, model, *, image_threshold: float | None, pixel_threshold: float | None):
        self.model = model
        self.model.with_thresholds(image=image_threshold, pixel=pixel_threshold)

    def score(self, images: list[torch.Tensor]) -> list[tuple | str]:
        try:
            return _per_image(self.model.predict(images))
        except InputError as err:  # an image the model refuses (size, aspect, ...): find it, image by image
            if len(images) == 1:
                return [f"cannot be scored: {err}"]
            return [result for image in images for result in self.score([image])]

    def score_files(self, paths: list[str]) -> list[tuple]:
        """Decode and score files -> one (image, result or error text) per path, in order: the single-process
        writer's own loop (iter_predict, background decoding threads, its per-file checks and retries)."""
        found: dict[str, tuple] = {}
        for batch_paths, images, results, failures in _scored_batches(self.model, [Path(p) for p in paths]):
            found.update({str(p): (image, result) for p, image, result in zip(batch_paths, images, results)})
            found.update({str(Path(f.path)): (None, f.reason) for f in failures})
        return [found.get(str(Path(p)), (None, "not scored")) for p in paths]


def torch_backend(model_path: str, *, device: str, threads: int | None, **options) -> EstimatorBackend:
    """The torch estimator (a single model or an ensemble), as `patchcore predict`."""
    if threads:
        torch.set_num_threads(threads)
    return EstimatorBackend(load_model(model_path, device=device), **options)


def onnx_backend(model_path: str, *, device: str, threads: int | None, export_dir: str | None = None,
                 engine: str = "onnxruntime", precision: str = "fp32", **options) -> EstimatorBackend:
    """The lean runtime's exported graph (onnxruntime or OpenVINO; `patchcore export`), as `patchcore predict
    --runtime onnx`: the embedding runs in the graph, the rest is the library's."""
    from ..estimator.exported import ExportedPatchCore

    if threads:
        torch.set_num_threads(threads)
    model = ExportedPatchCore.load(model_path, export_dir=export_dir, backend=engine, threads=threads,
                                   precision=precision)
    return EstimatorBackend(model, **options)


BACKENDS: dict[str, Callable[..., EstimatorBackend]] = {"torch": torch_backend, "onnx": onnx_backend}


def _per_image(result) -> list[tuple]:
    """A PatchCoreResult -> one (score, map, label, mask) per image, on the CPU (maps may be a list)."""
    n = result.scores.shape[0]
    labels = [None] * n if result.labels is None else [bool(v) for v in result.labels.cpu()]
    masks = [None] * n if result.masks is None else [m.cpu() for m in result.masks]
    return list(zip(result.scores.cpu().tolist(), [m.cpu() for m in result.maps], labels, masks))


# ---------------------------------------------------------------------------- the pipeline stages
def decode_chunk(row: dict) -> dict:
    """Ray Data task: a chunk's files -> decoded uint8 (H, W, 3) arrays, or an error text per file."""
    images, errors = [], []
    for path in row["paths"]:
        try:
            images.append(read_image(path))
            errors.append("")
        except ImageReadError as err:
            images.append(None)
            errors.append(err.reason)
    return {**row, "images": images, "errors": errors}


class ChunkScorer:
    """Ray Data actor: holds one backend (the model, loaded once) and writes one Parquet part per chunk."""

    def __init__(self, *, model_path: str, model_sha256: str, output: str, backend: str, backend_options: dict,
                 device: str, threads: int | None, image_threshold: float | None, pixel_threshold: float | None,
                 pictures: bool, save_maps: bool, full_resolution: bool):
        if file_sha256(model_path) != model_sha256:  # the file changed since the job started: not this job
            raise OutputError(f"{model_path}: the model file changed since this job started")
        self.backend = BACKENDS[backend](model_path, device=device, threads=threads, image_threshold=image_threshold,
                                         pixel_threshold=pixel_threshold, **backend_options)
        self.model_sha256, self.output = model_sha256, Path(output)
        self.pictures, self.save_maps, self.full_resolution = pictures, save_maps, full_resolution

    def __call__(self, batch: dict) -> dict:
        out = {"part": [], "n": [], "n_failed": []}
        for i in range(len(batch["chunk"])):
            paths, names = list(batch["paths"][i]), list(batch["names"][i])
            if "images" in batch:  # decoded by the pipeline's tasks
                rows = self.score_chunk(paths, names, list(batch["images"][i]), list(batch["errors"][i]))
            else:  # decoded here, in the actor's threads
                rows = self.score_decoded(paths, names, self.backend.score_files(paths))
            name = f"part-{int(batch['run'][i]):04d}-{int(batch['chunk'][i]):07d}.parquet"
            write_part(self.output / "scores" / name, rows)
            out["part"].append(name)
            out["n"].append(len(rows))
            out["n_failed"].append(sum(r["error"] is not None for r in rows))
        return {k: np.array(v) for k, v in out.items()}

    def score_chunk(self, paths: list[str], names: list[str], images: list, errors: list[str]) -> list[dict]:
        rows: list[dict | None] = [None] * len(paths)
        kept, tensors = [], []
        for i, (image, error) in enumerate(zip(images, errors)):
            if error:
                rows[i] = self._row(paths[i], names[i], error=error)
            else:
                kept.append(i)
                tensors.append(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        results = self.backend.score(tensors) if tensors else []
        scored = self.score_decoded([paths[i] for i in kept], [names[i] for i in kept], list(zip(tensors, results)))
        for i, row in zip(kept, scored):
            rows[i] = row
        return rows

    def score_decoded(self, paths: list[str], names: list[str], scored: list[tuple]) -> list[dict]:
        """(image, result or error text) per path -> the rows (and the pictures, when asked)."""
        model = self.backend.model
        rows: list[dict | None] = [None] * len(paths)
        for i, (tensor, result) in enumerate(scored):
            if isinstance(result, str):
                rows[i] = self._row(paths[i], names[i], error=result)
                continue
            score, label = result[0], result[2]
            if self.pictures:  # the single-process writer's own function: the same files
                written = _write_outputs(self.output, model, names[i], Path(paths[i]), tensor, [result], 0,
                                         self.save_maps, self.full_resolution)
                if "error" in written:
                    rows[i] = self._row(paths[i], names[i], error=written["error"])
                    continue
            elif not math.isfinite(score):
                rows[i] = self._row(paths[i], names[i], error=f"the model gave a non-finite anomaly score ({score})")
                continue
            rows[i] = self._row(paths[i], names[i], score=score,
                                label=None if label is None else ("defect" if label else "good"))
        return rows

    def _row(self, path: str, name: str, *, score: float | None = None, label: str | None = None,
             error: str | None = None) -> dict:
        model = self.backend.model
        return {"path": path, "name": name, "score": score, "label": label,
                "image_threshold": model.image_threshold_, "pixel_threshold": model.pixel_threshold_,
                "model_sha256": self.model_sha256, "error": error}


def write_part(path: Path, rows: list[dict]) -> None:
    """One chunk's rows -> a Parquet file, whole or not at all (temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------- the job
def read_manifest(path: Path) -> list[Path]:
    """A CSV (column 'path', or the first column) or Parquet (column 'path') list of images; relative
    paths are relative to the manifest's folder."""
    try:
        if path.suffix.lower() == ".parquet":
            column = pq.read_table(path, columns=["path"]).column("path").to_pylist()
        else:
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path)
            column = table.column("path" if "path" in table.column_names else 0).to_pylist()
    except (OSError, KeyError, pa.ArrowException) as err:
        raise InputError(f"{path}: not a manifest of image paths (a CSV or Parquet file with a 'path' column): "
                         f"{err}") from None
    return [p if p.is_absolute() else path.parent / p for p in map(Path, column)]


def job_description(model_path: Path, model_sha256: str, *, image_threshold, pixel_threshold, pictures: bool,
                    save_maps: bool, full_resolution: bool) -> dict:
    """What makes two runs the same job (so that one may resume the other)."""
    return {"model": str(model_path.resolve()), "model_sha256": model_sha256,
            "image_threshold": image_threshold, "pixel_threshold": pixel_threshold, "pictures": pictures,
            "save_maps": save_maps, "full_resolution": full_resolution}


def prepare_output(output: Path, job: dict, *, overwrite: bool) -> None:
    """Create OUT for a new job, resume the same job, or refuse (OutputError) anything else there."""
    job_file = output / "job.json"
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a folder; give a folder for the results")
    if overwrite and output.is_dir():
        clear_outputs(output)
        for name in ("job.json", "summary.json"):
            (output / name).unlink(missing_ok=True)
        if (output / "scores").is_dir():
            for part in (output / "scores").iterdir():
                if PART.match(part.name) or part.name.endswith(".tmp"):
                    part.unlink()
    elif job_file.is_file():
        earlier = json.loads(job_file.read_text())
        if {k: earlier.get(k) for k in job} != job:
            changed = ", ".join(k for k in job if earlier.get(k) != job[k])
            raise OutputError(f"{output}: holds results of another job (different {changed}); pass --overwrite "
                              f"to replace them, or choose another output folder")
    elif output.is_dir() and (earlier_outputs(output) or (output / "scores").exists()):
        raise OutputError(f"{output}: holds results of an earlier run; pass --overwrite to replace them, or "
                          f"choose another output folder")
    (output / "scores").mkdir(parents=True, exist_ok=True)
    (output / "summary.json").unlink(missing_ok=True)  # written again, by the run that completes the job
    for tmp in (output / "scores").glob(".part-*.tmp"):  # what a stopped run was writing: never a result
        tmp.unlink(missing_ok=True)
    if not job_file.is_file():
        atomic_write_bytes(job_file, json.dumps({**job, "package_version": __version__}, indent=1).encode())


def written_parts(output: Path) -> list[Path]:
    return sorted(p for p in (output / "scores").iterdir() if PART.match(p.name))


def predict_on_ray(model_path: str | Path, paths: list[Path], output: str | Path, *, address: str | None = "local",
                   num_cpus: int | None = None, actors: int = 1, threads: int | None = None,
                   chunk_size: int = DEFAULT_CHUNK, device: str = "cpu", backend: str = "torch",
                   backend_options: dict | None = None,
                   image_threshold: float | None = None, pixel_threshold: float | None = None,
                   pictures: bool = False, save_maps: bool = False, full_resolution: bool = False,
                   overwrite: bool = False, decode: str = "actor",
                   progress: Callable[[int], None] | None = None) -> RayPredictReport:
    """Score `paths` with the model at `model_path` on Ray (module doc). Returns the job's report.

    decode="actor": each actor decodes its chunks in background threads while it scores (the single-process
    path; no pixels cross processes); decode="tasks": Ray Data tasks decode and hand the pixels to the
    actors through the object store (for GPU actors that the CPU decoding would starve)."""
    started = time.perf_counter()
    model_path, output = Path(model_path), Path(output)
    if backend not in BACKENDS:
        raise InputError(f"unknown scoring backend {backend!r}; available: {', '.join(BACKENDS)}")
    if decode not in ("actor", "tasks"):
        raise InputError(f"decode must be 'actor' or 'tasks', got {decode!r}")
    if actors < 1 or chunk_size < 1:
        raise InputError("--actors and --chunk-size must be at least 1")
    if not model_path.is_file():
        raise InputError(f"{model_path}: no such model file")
    sha = file_sha256(model_path)
    if read_model_format(model_path) is None:  # from the header alone: the actors do the full load, once each
        raise ModelFileError(f"{model_path}: not a patchcore model file")
    unique, _ = unique_inputs(paths)
    if not unique:
        raise InputError("no images to score")
    shown = [display_path(p) for p in unique]
    names = dict(zip(shown, output_names(unique).values())) if pictures else dict.fromkeys(shown, "")
    job = job_description(model_path, sha, image_threshold=image_threshold, pixel_threshold=pixel_threshold,
                          pictures=pictures, save_maps=save_maps, full_resolution=full_resolution)
    job["backend"] = {"name": backend, **(backend_options or {})}  # other scores: another job
    prepare_output(output, job, overwrite=overwrite)
    if pictures:
        for sub in OUTPUT_FOLDERS:
            if sub != "maps" or save_maps:
                (output / sub).mkdir(exist_ok=True)
    parts = written_parts(output)
    done = set(_column(parts, "path"))
    run = 1 + max((int(PART.match(p.name).group(1)) for p in parts), default=-1)
    pending = [p for p in shown if p not in done]
    chunks = [{"run": run, "chunk": i // chunk_size, "paths": pending[i:i + chunk_size],
               "names": [names[p] for p in pending[i:i + chunk_size]]}
              for i in range(0, len(pending), chunk_size)]
    report = RayPredictReport(n_inputs=len(unique), n_already_done=len(unique) - len(pending), actors=actors)
    if chunks:
        with RaySession(address, num_cpus=num_cpus):
            cpus = RaySession.cluster_cpus()
            per_actor = threads or max(1, cpus // actors)
            scorer = {"model_path": str(model_path.resolve()), "model_sha256": sha, "output": str(output.resolve()),
                      "backend": backend, "backend_options": backend_options or {}, "device": device,
                      "threads": per_actor,
                      "image_threshold": image_threshold, "pixel_threshold": pixel_threshold,
                      "pictures": pictures, "save_maps": save_maps, "full_resolution": full_resolution}
            # Ray's CPU counts are bookkeeping, not limits: each actor books what its threads use, less a
            # share kept free so that decoding tasks can always run beside the actors (they would wait
            # for a free CPU forever if the actors booked every one).
            booked = max(DECODE_CPUS, min(per_actor, cpus / actors - DECODE_CPUS))
            ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
            if decode == "tasks":
                ds = ds.map(decode_chunk, num_cpus=DECODE_CPUS)
            ds = ds.map_batches(ChunkScorer, fn_constructor_kwargs=scorer, batch_size=1,
                                compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=booked,
                                num_gpus=1 if device == "cuda" else 0)
            for result in ds.iter_rows():
                if progress is not None:
                    progress(int(result["n"]))
    report.seconds = time.perf_counter() - started
    return _finish(output, shown, report)


def _column(parts: list[Path], name: str) -> list:
    values: list = []
    for part in parts:
        values += pq.read_table(part, columns=[name]).column(name).to_pylist()
    return values


def _drop_repeats(parts: list[Path]) -> None:
    """A path in two parts: a chunk a stopped run was still writing when the resumed run listed what was done.
    Both rows come from the same job (job.json), so the first part (by run, then chunk) keeps it and the
    others are rewritten without it, atomically."""
    owner: dict[str, Path] = {}
    extra: dict[Path, set[str]] = {}
    for part in parts:  # sorted: run, then chunk
        for path in pq.read_table(part, columns=["path"]).column("path").to_pylist():
            if path in owner:
                extra.setdefault(part, set()).add(path)
            else:
                owner[path] = part
    for part, paths in extra.items():
        rows = [row for row in pq.read_table(part).to_pylist() if row["path"] not in paths]
        if rows:
            write_part(part, rows)
        else:
            part.unlink()


def _finish(output: Path, shown: list[str], report: RayPredictReport) -> RayPredictReport:
    """Check that every input is in exactly one row, and write summary.json."""
    _drop_repeats(written_parts(output))
    parts = written_parts(output)
    table = pa.concat_tables([pq.read_table(p, columns=["path", "error"]) for p in parts]) if parts else None
    got = [] if table is None else table.column("path").to_pylist()
    errors = [] if table is None else table.column("error").to_pylist()
    missing, extra = set(shown) - set(got), len(got) - len(set(got))
    if missing or extra or set(got) - set(shown):
        raise OutputError(f"{output}: the results do not hold every input exactly once ({len(missing)} missing, "
                          f"{extra} repeated, {len(set(got) - set(shown))} not asked for); run again to resume")
    report.n_parts = len(parts)
    report.n_failed = sum(e is not None for e in errors)
    report.n_scored = len(got) - report.n_failed
    report.failures = [{"file": p, "error": e} for p, e in zip(got, errors) if e is not None][:MAX_LISTED_FAILURES]
    summary = {"status": "complete", "complete": True, "exactly_once_checked": True, **asdict(report),
               "scores": str(output / "scores")}
    atomic_write_bytes(output / "summary.json", json.dumps(summary, indent=1, allow_nan=False).encode())
    return report
