"""Shared fixtures: tiny demo datasets, and a private cache so tests never touch ~/.cache."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from tfcovid.data import demo  # noqa: E402


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
