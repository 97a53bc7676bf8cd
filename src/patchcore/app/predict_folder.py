"""Score a list of image files into an output folder: heatmaps, overlays, masks, optional raw maps,
and the scores table (scores.csv, scores.json).

Written as it goes, so a Ctrl-C, a crash or a full disk leaves usable results of what was scored:

- every image's heatmap, overlay, mask (and map) is written to a temporary name and renamed, so no
  half-written picture ever carries an output name;
- scores.csv gets each batch's rows after that batch's pictures, then a flush: a row means its
  pictures are complete;
- scores.json is rewritten atomically at the start (status "running"), at most every JSON_INTERVAL
  seconds during the run, and at the end with status "complete", "interrupted" (Ctrl-C) or "failed"
  (an error, named in "error"); "complete" and "interrupted" are also booleans. It is always valid JSON
  (no NaN: an image whose score is not finite is a failure, not a row).

An output folder that holds results of an earlier run (scores.csv, scores.json, outputs.txt, or pictures in the
output subfolders) is refused, or, with overwrite=True, those results are removed first: old and new
results never mix. Nothing else in the folder is touched.

Output names: the image's path below the common folder of all inputs, '/' -> '_', without its extension
(MVTec's test/crack/000.png and test/good/000.png become crack_000 and good_000); a name already taken
(compared case-insensitively, for case-insensitive file systems) gets _2, _3, ...; the same file given
twice (or through two paths) is scored once.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ImageReadError, InputError, OutputError
from ..estimator import PatchCore
from ..evaluation.progress import Progress, no_progress
from ..io.images import list_images
from ..io.model_file import atomic_write_bytes, probe_writable
from ..io.render import UNSEEN_GREY, colormap, normalise_map, overlay

SCORE_FILES = ("scores.csv", "scores.json")
# Every picture a run writes is listed here (flushed before it is written), so that --overwrite removes
# exactly the earlier run's files and nothing a user put in the same folders.
MANIFEST = "outputs.txt"
# Output subfolders and the suffix of what we write in each (the only files removed on overwrite).
OUTPUT_FOLDERS = {"heatmaps": ".png", "overlays": ".png", "masks": ".png", "maps": ".npy"}
CSV_FIELDS = ["file", "name", "score", "label"]
JSON_INTERVAL = 5.0  # seconds between scores.json rewrites during a run (it is rewritten whole)
MAX_NAME_BYTES = 200  # output names longer than this are shortened, with a hash of the full name
NAMING = ("output names are the image's path below the common folder of all inputs, '/' -> '_', without the "
          "extension (test/crack/000.png -> crack_000); a name already taken (case-insensitively) gets _2, "
          "_3, ...; the same file given twice is scored once")


# ---------------------------------------------------------------------------- inputs
def collect_inputs(items: Iterable[str | Path], *, exclude: Path | None = None) -> list[Path]:
    """Files as given, folders searched recursively (sorted), in order. Files inside `exclude` (the output
    folder, when it lies inside an input folder) are left out, so a run never scores its own pictures. A
    path that does not exist is kept: it is reported as unreadable, like any file that cannot be read."""
    excluded = exclude.resolve() if exclude is not None else None
    paths: list[Path] = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            found = list_images(item, recursive=True)
            if excluded is not None:
                found = [p for p in found if excluded not in p.resolve().parents]
                if not found:
                    raise InputError(f"{item}: no image files outside the output folder {exclude}")
            paths.extend(found)
        else:
            paths.append(item)
    return paths


def unique_inputs(paths: Iterable[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """The paths without repeats of the same file (by resolved path; order kept), and the repeats."""
    seen: dict[Path, Path] = {}
    unique, repeats = [], []
    for path in map(Path, paths):
        key = path.resolve()
        if key in seen:
            repeats.append({"file": display_path(path), "same_as": display_path(seen[key])})
        else:
            seen[key] = path
            unique.append(path)
    return unique, repeats


def output_names(paths: list[Path]) -> dict[Path, str]:
    """Unique, readable output names: the path below the inputs' common folder, '/' -> '_'
    (MVTec's test/crack/000.png and test/good/000.png become crack_000 and good_000). The same file
    (by resolved path) keeps one name; names differing only in case count as taken."""
    resolved = [Path(p).resolve() for p in paths]
    common = Path(os.path.commonpath([str(p.parent) for p in resolved])) if resolved else Path(".")
    names: dict[Path, str] = {}
    by_file: dict[Path, str] = {}
    used: set[str] = set()
    for path, full in zip(paths, resolved):
        if full in by_file:
            names[path] = by_file[full]
            continue
        base = _safe_name("_".join(full.relative_to(common).with_suffix("").parts) or full.stem or "image")
        if len(base.encode()) > MAX_NAME_BYTES:
            digest = hashlib.sha256(base.encode()).hexdigest()[:12]
            base = base.encode()[:MAX_NAME_BYTES - 13].decode(errors="ignore") + "_" + digest
        name, n = base, 1
        while name.casefold() in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name.casefold())
        names[path] = by_file[full] = name
    return names


def _safe_name(name: str) -> str:
    """An output name that is valid UTF-8 and has no control characters: bytes of a file name that are not
    UTF-8 become U+FFFD, control characters (a newline in a file name) '_'."""
    name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join("_" if ord(c) < 32 or ord(c) == 127 else c for c in name)


def display_path(path: str | Path) -> str:
    """A path as text for scores.csv and scores.json: always valid UTF-8 (bytes of a file name that are not
    UTF-8 are written as \\xNN), so every CSV and JSON reader can read the table."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------- the output folder
def earlier_outputs(output: Path) -> list[str]:
    """What in `output` is from an earlier run (our file names only)."""
    found = [name for name in SCORE_FILES + (MANIFEST,) if (output / name).exists()]
    for sub, suffix in OUTPUT_FOLDERS.items():
        folder = output / sub
        if folder.is_dir() and any(p.suffix == suffix for p in folder.iterdir()):
            found.append(sub + "/")
    return found


def check_output_folder(output: Path, *, overwrite: bool) -> None:
    """Before any work: `output` must be (or become) a writable folder, and hold no earlier results
    unless `overwrite`. OutputError otherwise. Nothing is created or removed here."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a folder; give a folder for the results")
    folder = output
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{folder}: is not a folder, so the output folder {output} cannot be made")
    if output.is_dir():
        for sub in list(OUTPUT_FOLDERS) + list(SCORE_FILES):
            target = output / sub
            if target.exists() and (target.is_dir() != (sub in OUTPUT_FOLDERS)):
                raise OutputError(f"{target}: is in the way of the results (a {'folder' if target.is_dir() else 'file'}"
                                  f" where a {'folder' if sub in OUTPUT_FOLDERS else 'file'} goes)")
        earlier = earlier_outputs(output)
        if earlier and not overwrite:
            raise OutputError(f"{output}: holds results of an earlier run ({', '.join(earlier)}); pass --overwrite "
                              f"to replace them, or choose another output folder")
    probe_writable(folder)


def earlier_files(output: Path) -> set[str]:
    """The pictures an earlier run wrote, as paths relative to `output`: those in its manifest, and (for
    runs without one) every output of each name in its scores.csv and scores.json."""
    files: set[str] = set()
    try:
        files.update(line for line in (output / MANIFEST).read_text(encoding="utf-8").splitlines() if line)
    except (OSError, UnicodeDecodeError):
        pass
    names: set[str] = set()
    try:
        with open(output / "scores.csv", newline="", encoding="utf-8") as handle:
            names.update(row.get("name") or "" for row in csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error):
        pass
    try:
        images = json.loads((output / "scores.json").read_text(encoding="utf-8")).get("images", [])
        names.update(item.get("name") or "" for item in images if isinstance(item, dict))
    except (OSError, ValueError, AttributeError):
        pass
    files.update(f for name in names if name and "/" not in name and name not in (".", "..")
                 for f in _output_files(name))
    return {f for f in files if _is_output_file(f)}


def _output_files(name: str) -> list[str]:
    return [f"{sub}/{name}{suffix}" for sub, suffix in OUTPUT_FOLDERS.items()]


def _is_output_file(relative: str) -> bool:
    """Only `<output folder>/<name><its suffix>`: a damaged manifest can never point elsewhere."""
    sub, _, name = relative.partition("/")
    return sub in OUTPUT_FOLDERS and name.endswith(OUTPUT_FOLDERS[sub]) and "/" not in name and \
        name not in (".", "..") and not name.startswith(".")


def clear_outputs(output: Path, names: Iterable[str] = ()) -> None:
    """Remove the results of an earlier run: its score files and the pictures it wrote (its manifest, or
    the names in its score tables), and the pictures this run is about to write (`names`), with their
    temporary files. Files a user put in the output folders stay, and so do those folders then."""
    files = earlier_files(output)
    files.update(f for name in names for f in _output_files(name))
    for relative in files:
        path = output / relative
        path.unlink(missing_ok=True)
        path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)
    for name in SCORE_FILES + (MANIFEST,):
        (output / name).unlink(missing_ok=True)
    for sub in OUTPUT_FOLDERS:
        folder = output / sub
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


# ---------------------------------------------------------------------------- scoring
def predict_to_folder(model: PatchCore, paths: list[Path], output: Path, *, progress: Progress = no_progress,
                      save_maps: bool = False, overwrite: bool = True,
                      full_resolution: bool = False) -> tuple[list[dict], list[ImageReadError]]:
    """Score `paths` batch by batch and write heatmaps, overlays, masks and the scores table as it goes.

    Earlier results in `output` are replaced (overwrite=True) or refused with an OutputError. Images of
    different sizes (resize none, or a shorter-side resize of different aspect ratios) are scored in
    same-size groups, each with maps at its own size. With `full_resolution`, heatmaps, overlays, masks
    and maps are at each input image's own size (the resize and crop undone); pixels the model never saw
    are grey in heatmaps and overlays, 128 in masks (0 good, 255 defect) and NaN in maps.
    Returns (rows, failures); failures are the files that could not be read or scored.
    """
    output = Path(output)
    for name in ("image_threshold_", "pixel_threshold_"):
        value = getattr(model, name)
        if value is not None and not math.isfinite(value):
            raise InputError(f"the {name[:-1].replace('_', ' ')} must be a finite number, got {value}")
    check_output_folder(output, overwrite=overwrite)
    unique, repeats = unique_inputs(paths)
    names = output_names(unique)
    if overwrite:
        clear_outputs(output, names.values())
    subfolders = ["heatmaps", "overlays"]
    if model.pixel_threshold_ is not None:
        subfolders.append("masks")
    if save_maps:
        subfolders.append("maps")
    for sub in subfolders:
        (output / sub).mkdir(parents=True, exist_ok=True)
    table = ScoresTable(output, model, n_inputs=len(unique), repeats=repeats, full_resolution=full_resolution)
    try:
        with progress(len(unique), "predict") as bar:
            for batch_paths, images, result, failures in _scored_batches(model, unique):
                table.will_write(names[path] for path in batch_paths)
                rows = [_write_outputs(output, model, names[path], path, image, result, i, save_maps,
                                       full_resolution)
                        for i, (path, image) in enumerate(zip(batch_paths, images))]
                failures += [ImageReadError(row["file"], row["error"]) for row in rows if "error" in row]
                table.add([row for row in rows if "error" not in row], failures)
                bar.update(len(batch_paths) + len(failures) - sum("error" in row for row in rows))
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (the CLI raises it as one): "terminated by SIGTERM"
        table.close("interrupted", str(err) or None)
        raise
    except OSError as err:
        table.close("failed", f"could not write results: {err}")
        raise OutputError(f"{output}: could not write results ({err}); scores.csv and scores.json hold the "
                          f"{len(table.rows)} images scored before") from err
    except BaseException as err:
        table.close("failed", f"{type(err).__name__}: {err}")
        raise
    table.close("complete")
    return table.rows, table.failures


def _scored_batches(model: PatchCore, paths: list[Path]) -> Iterator[tuple[list[Path], list[torch.Tensor],
                                                                          list, list[ImageReadError]]]:
    """(paths, decoded images, per-image results, failures) per batch, from `model.iter_predict` (which
    reports unreadable files and images the model cannot take, per file; each image's map at its own size).

    A run the model refuses while scoring (InputError) ends that stream: the next batch_size files are
    retried image by image (an image refused alone is a failure naming it), and the stream resumes after
    them."""
    done = 0
    while done < len(paths):
        try:
            with closing(model.iter_predict(paths[done:])) as stream:
                for batch in stream:
                    done += len(batch.paths) + len(batch.failures)
                    yield batch.paths, batch.images, _split(batch.result), list(batch.failures)
            return
        except InputError:
            retry = paths[done:done + model.config.batch_size]
            done += len(retry)
            for path in retry:
                yield _scored_alone(model, path)


def _scored_alone(model: PatchCore, path: Path) -> tuple[list[Path], list[torch.Tensor], list,
                                                          list[ImageReadError]]:
    try:
        for batch in model.iter_predict([path]):  # one file: one PredictedBatch
            return batch.paths, batch.images, _split(batch.result), list(batch.failures)
    except InputError as err:
        return [], [], [], [ImageReadError(path, f"cannot be scored: {err}")]
    return [], [], [], []


def _split(result) -> list[tuple]:
    """A batch result (or None: nothing scored) -> one (score, map, label, mask) per image, on the CPU."""
    if result is None:
        return []
    n = result.scores.shape[0]
    labels = [None] * n if result.labels is None else [bool(v) for v in result.labels.cpu()]
    masks = [None] * n if result.masks is None else [m.cpu() for m in result.masks]  # a tensor, or a list
    return list(zip(result.scores.cpu().tolist(), [m.cpu() for m in result.maps], labels, masks))


def _write_outputs(output: Path, model: PatchCore, name: str, path: Path, image: torch.Tensor, result: list,
                   i: int, save_maps: bool, full_resolution: bool = False) -> dict:
    score, anomaly_map, label, mask = result[i]
    if not math.isfinite(score):
        return {"file": display_path(path),
                "error": f"the model gave a non-finite anomaly score ({score}): is the model file damaged?"}
    if full_resolution:  # at the image's own size; NaN where the crop kept the model from looking
        anomaly_map = model.maps_at_original_size(anomaly_map[None], tuple(image.shape[-2:]))[0]
        picture = image.permute(1, 2, 0).numpy()
        unseen = torch.isnan(anomaly_map).numpy()
        if mask is not None:
            mask = (anomaly_map > model.pixel_threshold_).numpy()  # NaN compares False: never a defect
    else:
        picture = model.preprocess.geometry(image).permute(1, 2, 0).numpy()
        unseen = None
        mask = None if mask is None else mask.numpy()
    anomaly_map = anomaly_map.numpy()
    heat = colormap(normalise_map(anomaly_map, model.pixel_threshold_))
    _save_png(heat, output / "heatmaps" / f"{name}.png")
    _save_png(overlay(picture, heat, mask), output / "overlays" / f"{name}.png")
    if mask is not None:
        pixels = (mask * 255).astype(np.uint8)
        if unseen is not None:
            pixels[unseen] = UNSEEN_GREY
        _save_png(pixels, output / "masks" / f"{name}.png")
    if save_maps:
        _save_atomic(output / "maps" / f"{name}.npy", lambda handle: np.save(handle, anomaly_map))
    return {"file": display_path(path), "name": name, "score": score,
            "label": "" if label is None else ("defect" if label else "good")}


def _save_png(array: np.ndarray, path: Path) -> None:
    _save_atomic(path, lambda handle: Image.fromarray(array).save(handle, format="PNG"))


def _save_atomic(path: Path, write) -> None:
    """Write through a temporary name and rename (no fsync: this guards against interruption, not power loss)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------- the scores table
class ScoresTable:
    """scores.csv appended and flushed per batch; scores.json rewritten atomically (see the module doc)."""

    def __init__(self, output: Path, model: PatchCore, *, n_inputs: int, repeats: list[dict[str, str]],
                 full_resolution: bool = False):
        self.full_resolution = full_resolution
        self.output, self.model, self.n_inputs, self.repeats = output, model, n_inputs, repeats
        self.rows: list[dict] = []
        self.failures: list[ImageReadError] = []
        self._manifest = open(output / MANIFEST, "a", encoding="utf-8")
        self._handle = open(output / "scores.csv", "w", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._handle, fieldnames=CSV_FIELDS)
        self._csv.writeheader()
        self._handle.flush()
        self._written = 0.0
        self._write_json("running")

    def will_write(self, names: Iterable[str]) -> None:
        """Record the pictures of these names before they are written (the manifest --overwrite reads)."""
        self._manifest.writelines(f + "\n" for name in names for f in _output_files(name))
        self._manifest.flush()

    def add(self, rows: list[dict], failures: list[ImageReadError]) -> None:
        self.rows += rows
        self.failures += failures
        self._csv.writerows(rows)
        self._handle.flush()
        if time.monotonic() - self._written >= JSON_INTERVAL:
            self._write_json("running")

    def close(self, status: str, error: str | None = None) -> None:
        """Final scores.json. After a failure this is best effort: the original error is what matters."""
        try:
            self._manifest.close()
            self._handle.close()
            self._write_json(status, error)
        except (OSError, ValueError):
            if status == "complete":
                raise

    def _write_json(self, status: str, error: str | None = None) -> None:
        model = self.model
        summary = {
            "status": status, "complete": status == "complete", "interrupted": status == "interrupted",
            "error": error, "n_inputs": self.n_inputs, "n_scored": len(self.rows), "n_failed": len(self.failures),
            "image_threshold": model.image_threshold_, "pixel_threshold": model.pixel_threshold_,
            "map_geometry": {"input_size": list(model.input_size_), "resize": model.config.resize,
                             "crop": model.config.crop,
                             "outputs_at": ("each input image's own size (resize and crop undone; unseen "
                                            "pixels grey, 128 in masks, NaN in maps)" if self.full_resolution
                                            else "the model input geometry (after resize and crop)")},
            "naming": NAMING, "repeated_inputs": self.repeats,
            "images": self.rows, "failures": [{"file": display_path(f.path), "error": f.reason} for f in self.failures],
        }
        atomic_write_bytes(self.output / "scores.json", json.dumps(summary, indent=1, allow_nan=False).encode())
        self._written = time.monotonic()

