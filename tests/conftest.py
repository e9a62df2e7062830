import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    """A small random dVAE tokenizer file (vocabulary 64): MIM tests need targets, not a good tokenizer."""
    import torch
    from beit_scale.models.dvae import DVAE, DVAEConfig, save_tokenizer
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.safetensors"
    save_tokenizer(DVAE(DVAEConfig(vocab_size=64, image_size=112, hidden_dim=16)), path)
    return path


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process launcher calls export RANK/WORLD_SIZE/MASTER_* into os.environ; tests that start
    subprocesses (Slurm jobs, CLIs) must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
