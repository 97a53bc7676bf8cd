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
The scoring backend is pluggable (BACKENDS; the actor's code is app/ray_scoring.py): "torch" (the estimator, a
single model or an ensemble), "runtime" (the lean runtime, torch-free actors: `predict --ray --runtime onnx`
without pictures; the scores of `patchcore-score` and `predict --runtime onnx`) and "onnx" (the exported graph
behind the estimator's API, which can draw: `--runtime onnx --pictures`).
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from .._version import __version__
from ..errors import InputError, ModelFileError, OutputError
from ..io.model_file import atomic_write_bytes, read_model_format
from .predict_folder import (
    OUTPUT_FOLDERS,
    clear_outputs,
    display_path,
    earlier_outputs,
    output_names,
    unique_inputs,
)
from .ray_cluster import RaySession, file_sha256
from .ray_scoring import ChunkScorer, decode_chunk, runtime_backend, write_part
from .ray_torch_backends import onnx_backend, torch_backend

# What an actor scores with: the function that loads it, sent to the actors by reference (each imports only
# its module: a "runtime" actor never imports torch).
BACKENDS: dict[str, Callable] = {
    "torch": torch_backend,  # the estimator: a single model or an ensemble
    "runtime": runtime_backend,  # the lean runtime's graph and numpy scoring, torch-free (scores only)
    "onnx": onnx_backend,  # the same graph behind the estimator's API (draws pictures)
}
DRAWS_PICTURES = ("torch", "onnx")

DEFAULT_CHUNK = 64  # images per chunk: the unit of work, of retry and of output file
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
    if pictures and backend not in DRAWS_PICTURES:
        raise InputError(f"the {backend!r} backend writes scores only; pictures need one of {DRAWS_PICTURES}")
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
                      "backend": BACKENDS[backend], "backend_options": backend_options or {}, "device": device,
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
