"""Fixtures shared by every test package: the tiny random Llama and the bundled real model."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_finish(session):
    """Every test has a node id of its own: pytest-xdist (`make test`) keys tests by node id and
    runs one of the tests that share one (tests/reliability/conftest.py)."""
    shared = sorted(n for n, c in Counter(item.nodeid for item in session.items).items() if c > 1)
    if shared:
        raise pytest.UsageError(f"tests that share a node id (xdist would run one of each): {shared}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 4-layer random Llama (hidden 64, byte-level vocab) in a Hugging Face folder."""
    from server.engine.testing import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", num_layers=4, max_position_embeddings=512)


@pytest.fixture(scope="session")
def real_model_dir():
    """The bundled SmolLM2-135M-Instruct, prepared once into the cache."""
    from server.engine.model_files import prepare_model

    return prepare_model(None, progress=False)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
