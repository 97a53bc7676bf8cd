"""Scoring and fitting on Ray (app/ray_predict.py, app/ray_fit.py) against the single-process paths, on a
local Ray instance (2 CPUs, no dashboard): the same scores, the same model file bytes, every image exactly
once after a killed actor, and a stopped job resumed. Node loss: tests/test_ray_cluster.py."""
from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from child import NO_TORCH  # noqa: E402
from conftest import small_config  # noqa: E402

from patchcore import PatchCore  # noqa: E402
from patchcore.app.cli import main  # noqa: E402
from patchcore.app.predict_folder import display_path, predict_to_folder  # noqa: E402
from patchcore.app.ray_fit import RayPatchCore, fit_many_on_ray  # noqa: E402
from patchcore.app.ray_predict import predict_on_ray  # noqa: E402
from patchcore.errors import OutputError  # noqa: E402
from patchcore.evaluation.synthetic import make_category  # noqa: E402

JOB_TIMEOUT = 240  # seconds: a job that hangs fails the test instead of the CI run


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    category = make_category(root / "cat", n_train=14, n_test_good=12, n_test_per_defect=8, size=64, seed=3)
    tests = sorted((category / "test").rglob("*.png"))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return category, tests + [root / "broken.png", root / "missing.png"]


def config(**overrides):
    return small_config(backbone="resnet18_random", resize=64, batch_size=4, **overrides)


@pytest.fixture(scope="module")
def model_file(data, tmp_path_factory):
    category, _ = data
    path = tmp_path_factory.mktemp("model") / "cat.model"
    PatchCore(config(), device="cpu").fit(sorted((category / "train" / "good").glob("*.png"))).save(path)
    return path


@pytest.fixture(scope="module")
def reference(model_file, data, tmp_path_factory):
    """What single-process `patchcore predict` writes for the same files: {file: score or None}, the folder."""
    out = tmp_path_factory.mktemp("single")
    rows, failures = predict_to_folder(PatchCore.load(model_file, device="cpu"), data[1], out)
    scores = {row["file"]: (row["score"], row["label"]) for row in rows}
    scores.update({display_path(f.path): None for f in failures})
    return scores, out


def read_rows(output: Path) -> list[dict]:
    return pq.read_table(output / "scores").to_pylist()


def assert_matches(rows: list[dict], reference: dict) -> None:
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(reference), "every input exactly once"
    for row in rows:
        expected = reference[row["path"]]
        if expected is None:
            assert row["error"] and row["score"] is None
        else:
            assert row["error"] is None
            assert (row["score"], row["label"]) == expected  # bit for bit, as single-process predict


@pytest.mark.parametrize("decode", ["actor", "tasks"])
def test_predict_on_ray_equals_single_process(local_ray, model_file, data, reference, tmp_path, decode):
    scores, single = reference
    report = predict_on_ray(model_file, data[1], tmp_path / "out", actors=2, chunk_size=3, pictures=True,
                            decode=decode)
    rows = read_rows(tmp_path / "out")
    assert_matches(rows, scores)
    assert report.n_failed == 2 and report.n_scored == len(data[1]) - 2
    assert {r["model_sha256"] for r in rows} == {hashlib.sha256(model_file.read_bytes()).hexdigest()}
    model = PatchCore.load(model_file, device="cpu")
    assert {r["image_threshold"] for r in rows} == {model.image_threshold_}
    for name in ("heatmaps", "overlays", "masks"):  # the same pictures, byte for byte
        ours = sorted(p.name for p in (tmp_path / "out" / name).iterdir())
        assert ours == sorted(p.name for p in (single / name).iterdir()) and ours
        for file in ours[:5]:
            assert (tmp_path / "out" / name / file).read_bytes() == (single / name / file).read_bytes()


def _actor_pids() -> set[int]:
    """Processes of this machine whose title names the scoring actor (Ray sets ray::<class> titles)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ChunkScorer" in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the actor's process through /proc")
def test_a_killed_actor_still_scores_every_image_exactly_once(local_ray, model_file, data, reference, tmp_path):
    out = tmp_path / "out"
    inputs = data[1]
    chunks = -(-len(inputs) // 2)  # 19 chunks of 2: the kill lands mid-job
    result: dict = {}

    def job():
        try:
            result["report"] = predict_on_ray(model_file, inputs, out, actors=1, chunk_size=2)
        except BaseException as err:  # re-raised below, in the test's thread
            result["error"] = err

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    deadline = time.monotonic() + JOB_TIMEOUT
    killed = None
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        parts = list((out / "scores").glob("part-*.parquet")) if (out / "scores").is_dir() else []
        pids = _actor_pids()
        if parts and pids:
            killed, parts_before = pids, len(parts)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    thread.join(JOB_TIMEOUT)
    assert not thread.is_alive(), "the job did not finish after its actor was killed"
    assert killed, "the job ended before an actor could be killed"
    assert parts_before < chunks, "killed after the last chunk: nothing left to retry"
    if "error" in result:
        raise result["error"]
    assert_matches(read_rows(out), reference[0])
    assert result["report"].n_parts == chunks


def test_a_stopped_job_resumes_where_it_stopped(local_ray, model_file, data, reference, tmp_path):
    out = tmp_path / "out"
    seen = []

    def stop_after_two_chunks(n: int) -> None:
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt  # as Ctrl-C in the driver

    with pytest.raises(KeyboardInterrupt):
        predict_on_ray(model_file, data[1], out, chunk_size=4, progress=stop_after_two_chunks)
    done = len(read_rows(out))
    assert 8 <= done < len(data[1])
    (out / "scores" / ".part-0000-0000009.parquet.123.tmp").write_bytes(b"half")  # what a killed writer leaves
    with pytest.raises(OutputError, match="another job"):  # other options: not the same job
        predict_on_ray(model_file, data[1], out, chunk_size=4, image_threshold=1.0)
    report = predict_on_ray(model_file, data[1], out, chunk_size=4)
    assert report.n_already_done >= done  # (a chunk in flight when it stopped may land a little later)
    assert_matches(read_rows(out), reference[0])
    assert not list((out / "scores").glob("*.tmp"))
    again = predict_on_ray(model_file, data[1], out, chunk_size=4)  # nothing left: nothing scored twice
    assert again.n_already_done == len(data[1])
    assert_matches(read_rows(out), reference[0])


def test_cli_predict_ray_reads_a_manifest(local_ray, model_file, data, reference, tmp_path, capsys):
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in data[1]))
    code = main(["predict", str(model_file), str(manifest), "-o", str(tmp_path / "out"), "--ray", "--quiet"])
    assert code == 1  # two unreadable files: rows with an error, exit 1 as without --ray
    assert_matches(read_rows(tmp_path / "out"), reference[0])
    assert "2 file(s) could not be read" in capsys.readouterr().err


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("overrides", [{}, {"tile_size": 32, "tile_overlap": 16}], ids=["plain", "tiles"])
def test_fit_on_ray_writes_the_same_model_file(local_ray, data, tmp_path, overrides):
    category, _ = data
    train = sorted((category / "train" / "good").glob("*.png")) + [data[1][-2]]  # with an unreadable file
    PatchCore(config(**overrides), device="cpu").fit(train).save(tmp_path / "plain.model")
    on_ray = RayPatchCore(config(**overrides), device="cpu", chunk_images=4).fit(train)
    on_ray.save(tmp_path / "ray.model")
    assert _digest(tmp_path / "ray.model") == _digest(tmp_path / "plain.model")
    assert on_ray.fit_report_.skipped == [f"{data[1][-2]}: " + on_ray.fit_report_.skipped[0].split(": ", 1)[1]]


def test_cli_fit_ray_equals_plain_fit(local_ray, data, tmp_path):
    train = str(data[0] / "train" / "good")
    options = ["--backbone", "resnet18_random", "--resize", "64", "--crop", "none", "--batch-size", "4", "--quiet"]
    assert main(["fit", train, "-o", str(tmp_path / "plain.model"), *options]) == 0
    assert main(["fit", train, "-o", str(tmp_path / "ray.model"), "--ray", "--chunk-images", "4", *options]) == 0
    assert _digest(tmp_path / "ray.model") == _digest(tmp_path / "plain.model")


def test_fit_many_fits_each_category_and_reports_failures(local_ray, data, tmp_path):
    root = tmp_path / "root"
    (root / "broken").mkdir(parents=True)
    (root / "good_one").symlink_to(data[0])  # MVTec layout: good_one/train/good
    (root / "broken" / "only.png").write_bytes(b"not an image")
    rows = fit_many_on_ray(root, tmp_path / "models", config())
    assert [(r["category"], r["status"]) for r in rows] == [("broken", "failed"), ("good_one", "fitted")]
    assert "no readable training image" in rows[0]["error"]
    plain = tmp_path / "plain.model"
    PatchCore(config(), device="cpu").fit(sorted((data[0] / "train" / "good").glob("*.png"))).save(plain)
    assert _digest(tmp_path / "models" / "good_one.model") == _digest(plain)
    summary = (tmp_path / "models" / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("category,status") and len(summary) == 3
    assert "1 of 2 models fitted" in (tmp_path / "models" / "summary.md").read_text()


def test_without_the_extra_the_cli_says_how_to_get_it(monkeypatch):
    import sys

    import patchcore.app
    from patchcore.app import ray_commands
    from patchcore.errors import InputError

    for name in [m for m in sys.modules if m == "ray" or m.startswith(("ray.", "patchcore.app.ray_"))]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("ray_predict", "ray_fit", "ray_cluster"):
        monkeypatch.delattr(patchcore.app, name, raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(InputError, match=r"pip install 'patchcore\[ray\]'"):
        ray_commands._engine("predict")


@pytest.fixture(scope="module")
def exported(model_file, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from patchcore.estimator.export import export_model

    export = tmp_path_factory.mktemp("export") / "cat.onnx"
    export_model(PatchCore.load(model_file, device="cpu"), model_file, export, static_size=True)
    return export


def test_the_lean_runtime_scores_in_torch_free_actors(local_ray, model_file, data, exported, tmp_path):
    """backend 'runtime' (`predict --ray --runtime onnx`): the scores and labels of the torch-free runtime on the
    same files, bit for bit (and of `predict --runtime onnx`, the estimator over the same graph)."""
    from patchcore.estimator.exported import ExportedPatchCore
    from patchcore.runtime import Runtime

    readable = data[1][:-2]
    runtime = Runtime.load(model_file, exported, threads=1)
    single = {}
    for batch in runtime.iter_predict(readable):
        labels = batch.result.labels.tolist()
        single.update({display_path(p): (s, "defect" if lab else "good")
                       for p, s, lab in zip(batch.paths, batch.result.scores.tolist(), labels)})
    estimator = ExportedPatchCore.load(model_file, export_dir=exported, threads=1).predict(readable).scores.tolist()
    report = predict_on_ray(model_file, data[1], tmp_path / "out", threads=1, chunk_size=8, backend="runtime",
                            backend_options={"export_dir": str(exported)})
    rows = {r["path"]: r for r in read_rows(tmp_path / "out")}
    assert {p: (rows[p]["score"], rows[p]["label"]) for p in single} == single
    assert [rows[display_path(p)]["score"] for p in readable] == estimator
    assert all(rows[display_path(p)]["error"] for p in data[1][-2:]) and report.n_failed == 2
    assert {r["image_threshold"] for r in rows.values()} == {runtime.state_.image_threshold}
    with pytest.raises(Exception, match="scores only"):
        predict_on_ray(model_file, data[1], tmp_path / "pictures", backend="runtime", pictures=True)


def test_the_exported_graph_draws_pictures_in_the_actors(local_ray, model_file, data, exported, tmp_path):
    """backend 'onnx' (`--runtime onnx --pictures`): the estimator over the exported graph, as `predict --runtime
    onnx` does, with its pictures."""
    from patchcore.estimator.exported import ExportedPatchCore

    readable = data[1][:-2]
    single = ExportedPatchCore.load(model_file, export_dir=exported, threads=1).predict(readable).scores.tolist()
    predict_on_ray(model_file, data[1], tmp_path / "out", threads=1, chunk_size=8, backend="onnx", pictures=True,
                   backend_options={"export_dir": str(exported)})
    rows = {r["path"]: r for r in read_rows(tmp_path / "out")}
    assert [rows[display_path(p)]["score"] for p in readable] == single
    assert len(list((tmp_path / "out" / "heatmaps").glob("*.png"))) == len(readable)


def test_cli_ray_runtime_onnx_is_torch_free_unless_pictures_are_asked(local_ray, model_file, data, exported, tmp_path):
    """`predict --ray --runtime onnx`: the torch-free backend for scores; with --pictures, the graph behind the
    estimator's API (which draws). Both give the same scores."""
    import json

    inputs = [str(p) for p in data[1][:6]]
    for name, extra in (("scores", []), ("pictures", ["--pictures"])):
        code = main(["predict", str(model_file), *inputs, "-o", str(tmp_path / name), "--ray", "--runtime", "onnx",
                     "--export", str(exported), "--quiet", *extra])
        assert code == 0
    assert json.loads((tmp_path / "scores" / "job.json").read_text())["backend"]["name"] == "runtime"
    assert json.loads((tmp_path / "pictures" / "job.json").read_text())["backend"]["name"] == "onnx"
    scores = {r["path"]: r["score"] for r in read_rows(tmp_path / "scores")}
    assert scores == {r["path"]: r["score"] for r in read_rows(tmp_path / "pictures")} and len(scores) == 6
    assert len(list((tmp_path / "pictures" / "heatmaps").glob("*.png"))) == 6


def test_the_runtime_backend_finds_a_file_however_its_path_is_spelled(model_file, data, exported, monkeypatch):
    from patchcore.app.ray_scoring import runtime_backend

    backend = runtime_backend(str(model_file), device="cpu", threads=1, export_dir=str(exported),
                              image_threshold=None, pixel_threshold=None)
    first = data[1][0]
    monkeypatch.chdir(first.parent.parent)
    results = backend.score_files([f"./{first.parent.name}/{first.name}", f"{first.parent.name}//{first.name}"])
    assert [isinstance(result, str) for _, result in results] == [False, False]
    assert results[0][1][0] == results[1][1][0]


def test_a_runtime_actor_scores_where_torch_cannot_be_imported(model_file, data, exported, tmp_path):
    """The actor's own code (app/ray_scoring.py, backend 'runtime') in a process where `import torch` fails: it
    loads the model, scores a chunk decoded in its threads and one decoded by tasks, and writes their parts."""
    import json
    import subprocess
    import sys
    import textwrap

    paths = [display_path(p) for p in data[1][:5]] + [display_path(data[1][-1])]
    (tmp_path / "out" / "scores").mkdir(parents=True)
    script = NO_TORCH + textwrap.dedent(f"""
        import json
        from patchcore.app.ray_scoring import ChunkScorer, decode_chunk, runtime_backend
        from patchcore.app.ray_cluster import file_sha256
        scorer = ChunkScorer(model_path={str(model_file)!r}, model_sha256=file_sha256({str(model_file)!r}),
                             output={str(tmp_path / "out")!r}, backend=runtime_backend,
                             backend_options={{"export_dir": {str(exported)!r}}}, device="cpu", threads=1,
                             image_threshold=None, pixel_threshold=None, pictures=False, save_maps=False,
                             full_resolution=False)
        chunk = {{"run": [0], "chunk": [0], "paths": [{paths!r}], "names": [[""] * {len(paths)}]}}
        decoded = decode_chunk({{"run": 0, "chunk": 1, "paths": {paths!r}, "names": [""] * {len(paths)}}})
        scorer(chunk)
        scorer({{k: [v] for k, v in decoded.items()}})
        print(json.dumps({{"torch": [m for m in sys.modules if m.split(".")[0] in ("torch", "timm")]}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["torch"] == []
    parts = [pq.read_table(p).to_pylist() for p in sorted((tmp_path / "out" / "scores").glob("part-*.parquet"))]
    assert len(parts) == 2 and [r["path"] for r in parts[0]] == paths
    assert [(r["score"], r["error"] is None) for r in parts[0]] == [(r["score"], r["error"] is None) for r in parts[1]]
    assert parts[0][-1]["error"] and all(r["score"] > 0 for r in parts[0][:-1])


def test_a_row_written_twice_is_kept_once(tmp_path):
    """A chunk a stopped run was still writing when the resumed run listed what was done: the first part
    keeps the row, the later part is rewritten without it."""
    from patchcore.app.ray_predict import _finish, write_part

    def row(path):
        return {"path": path, "name": "", "score": 1.0, "label": None, "image_threshold": None,
                "pixel_threshold": None, "model_sha256": "x", "error": None}

    (tmp_path / "scores").mkdir()
    write_part(tmp_path / "scores" / "part-0000-0000003.parquet", [row("a"), row("b")])
    write_part(tmp_path / "scores" / "part-0001-0000000.parquet", [row("b"), row("c")])
    write_part(tmp_path / "scores" / "part-0001-0000001.parquet", [row("a")])
    from patchcore.app.ray_predict import RayPredictReport

    report = _finish(tmp_path, ["a", "b", "c"], RayPredictReport(n_inputs=3))
    assert sorted(read_rows(tmp_path)[i]["path"] for i in range(3)) == ["a", "b", "c"]
    assert len(read_rows(tmp_path)) == 3 and report.n_parts == 2 and report.n_scored == 3
