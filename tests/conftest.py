"""Shared fixtures: tiny demo datasets, and a private cache so tests never touch ~/.cache."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from tfcovid.data import demo  # noqa: E402

# The files with real fits, heaviest first (seconds per file in a CI run on 2 cores: resilience
# 301, run_guards 277, recipes 276, ...). `--dist loadfile --no-loadscope-reorder` (pyproject)
# hands files out in collection order, so these go first and the cheap files fill in behind
# them: no worker is left running one long file alone at the end (xdist's default order, by
# number of tests, put these last).
HEAVY_FIRST = ("test_resilience.py", "test_run_guards.py", "test_recipes.py", "test_pipeline.py",
               "test_bounds.py", "test_decide.py", "test_dicom.py", "test_explain.py",
               "test_distribute.py", "test_splits.py", "test_imbalance.py", "test_device_augment.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TFCOVID_HOME", str(tmp_path_factory.getbasetemp() / "tfcovid-home"))


@pytest.fixture(scope="session")
def binary_tree(tmp_path_factory):
    """A tiny binary demo ImageFolder tree (4 train images per class, 2 per class elsewhere)."""
    return demo.make_demo_data(tmp_path_factory.mktemp("data") / "binary", "binary", per_class=4,
                               image_size=(40, 72))


@pytest.fixture(scope="session")
def multilabel_tree(tmp_path_factory):
    """A tiny three-label demo ImageFolder tree."""
    return demo.make_demo_data(tmp_path_factory.mktemp("data") / "multilabel", "multilabel",
                               per_class=4, image_size=(40, 72))
