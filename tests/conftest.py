"""Shared test fixtures: where ../shared/data is, a tiny Qwen2 model folder with the real tokenizer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("R1SERVE_SHARED_DATA", REPO.parent / "shared" / "data"))
TOKENIZER_DIR = SHARED_DATA / "tokenizer"

# A tiny Qwen2 with the real vocabulary size, so that the real tokenizer's ids (151643+) are valid.
TINY_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "torch_dtype": "float32",
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
NO_TOKENIZER = (f"no real tokenizer at {TOKENIZER_DIR}: set R1SERVE_SHARED_DATA to a folder holding tokenizer/ "
                "(the model's tokenizer.json, tokenizer_config.json, generation_config.json)")


def require_tokenizer() -> Path:
    """The real tokenizer's folder, or a skip that says how to provide it."""
    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip(NO_TOKENIZER)
    return TOKENIZER_DIR


def write_model_dir(path: Path, config: dict | None = None, with_tokenizer: bool = True) -> Path:
    """A model folder holding config.json (and the real tokenizer files): enough for `--load-format dummy`."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or TINY_CONFIG, indent=2))
    if with_tokenizer:
        for name in TOKENIZER_FILES:
            shutil.copy(TOKENIZER_DIR / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tokenizer()
    return write_model_dir(tmp_path_factory.mktemp("models") / "DeepSeek-R1-Distill-Qwen-1.5B")


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random transformers Qwen2 saved as sharded safetensors, with the real tokenizer beside it."""
    tokenizer_dir = require_tokenizer()
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(**{k: v for k, v in TINY_CONFIG.items() if k != "architectures"})
    model = transformers.Qwen2ForCausalLM(hf_config).eval()
    path = tmp_path_factory.mktemp("hf") / "tiny-qwen2"
    model.save_pretrained(path, max_shard_size="20MB", safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"no shared data at {SHARED_DATA}: set R1SERVE_SHARED_DATA to the folder holding the "
                    "datasets and tokenizer/")
    return SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
