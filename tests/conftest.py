# ruff: noqa: I001  (hobbit_tools before anything that loads torch)
from pathlib import Path

import pytest

import hobbit_tools  # noqa: F401  - first, as the CLI: its environment for torch (OpenMP, MKL)
from tiny_models import train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(d)
    return d
