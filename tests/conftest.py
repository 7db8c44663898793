import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)

from tiny_models import DENSE_CASES, make_dense  # noqa: E402


@pytest.fixture(scope="session")
def dense_models(tmp_path_factory) -> dict[str, Path]:
    """Every tiny dense case, saved once per test session."""
    root = tmp_path_factory.mktemp("dense")
    return {name: make_dense(root / name, model_type, **fields) for name, (model_type, fields) in DENSE_CASES.items()}


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, 97, (2, 12), generator=generator)
