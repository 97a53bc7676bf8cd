"""A whole (simulated) node lost in the middle of a Ray scoring job and of a Ray fit: the job still finishes,
every image exactly once, the same scores and model bytes as the single process (ray.cluster_utils.Cluster:
a head and worker nodes as separate raylets on this machine)."""
from __future__ import annotations

import hashlib
import threading
import time

import pytest

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
pq = pytest.importorskip("pyarrow.parquet")

from conftest import small_config  # noqa: E402

from patchcore import PatchCore  # noqa: E402
from patchcore.app.predict_folder import display_path  # noqa: E402
from patchcore.app.ray_fit import RayPatchCore  # noqa: E402
from patchcore.app.ray_predict import predict_on_ray  # noqa: E402
from patchcore.evaluation.synthetic import make_category  # noqa: E402

JOB_TIMEOUT = 240


@pytest.fixture()
def cluster():
    if ray.is_initialized():  # another module's local instance: one Ray per process
        ray.shutdown()
    env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    first = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, runtime_env=env, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, first
    ray.shutdown()
    cluster.shutdown()


def config():
    return small_config(backbone="resnet18_random", resize=64, batch_size=4)


def test_a_lost_node_still_scores_every_image_exactly_once(cluster, tmp_path):
    cluster, first = cluster
    category = make_category(tmp_path / "cat", n_train=12, n_test_good=16, n_test_per_defect=6, size=64, seed=5)
    model_file = tmp_path / "cat.model"
    PatchCore(config(), device="cpu").fit(sorted((category / "train" / "good").glob("*.png"))).save(model_file)
    tests = sorted((category / "test").rglob("*.png"))
    scores = PatchCore.load(model_file, device="cpu").predict(tests).scores.tolist()
    expected = dict(zip(map(display_path, tests), scores))
    out, result = tmp_path / "out", {}

    def job():
        try:
            result["report"] = predict_on_ray(model_file, tests, out, actors=1, chunk_size=2)
        except BaseException as err:
            result["error"] = err

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline and thread.is_alive():
        if (out / "scores").is_dir() and list((out / "scores").glob("part-*.parquet")):
            break
        time.sleep(0.02)
    parts_before = len(list((out / "scores").glob("part-*.parquet")))
    cluster.add_node(num_cpus=2)  # where the work goes on
    cluster.remove_node(first)  # the node with the actor and the decoded chunks in its object store
    thread.join(JOB_TIMEOUT)
    assert not thread.is_alive(), "the job did not finish after its node was lost"
    if "error" in result:
        raise result["error"]
    assert parts_before < 17, "the node was lost after the last chunk: nothing left to redo"
    rows = pq.read_table(out / "scores").to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(expected)  # every image exactly once
    assert all(r["score"] == expected[r["path"]] for r in rows)


def test_a_fit_survives_a_lost_node(cluster, tmp_path):
    """The features of the lost node's chunks are recomputed from their lineage; the model is the same."""
    cluster, first = cluster
    category = make_category(tmp_path / "cat", n_train=24, n_test_good=1, n_test_per_defect=1, size=64, seed=6)
    train = sorted((category / "train" / "good").glob("*.png"))
    PatchCore(config(), device="cpu").fit(train).save(tmp_path / "plain.model")
    model = RayPatchCore(config(), device="cpu", chunk_images=4)
    lost = threading.Event()
    original = model._extract_training_features

    def extract_then_lose_the_node(*args):
        training = original(*args)  # every chunk's features now sit on the first worker node
        cluster.add_node(num_cpus=2)
        cluster.remove_node(first)
        lost.set()
        return training

    model._extract_training_features = extract_then_lose_the_node
    model.fit(train).save(tmp_path / "ray.model")
    assert lost.is_set()
    digest = [hashlib.sha256((tmp_path / f"{k}.model").read_bytes()).hexdigest() for k in ("plain", "ray")]
    assert digest[0] == digest[1]
