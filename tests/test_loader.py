"""The loader: checkpoints the tests write with transformers' save_pretrained (single file and sharded) give
transformers' logits; the offline hub error; dummy weights seeded; the config, device and dtype rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_CONFIG
from r1serve.config import DEFAULT_MODEL, EngineConfig, ModelConfig
from r1serve.model.loader import (
    ModelNotFoundError,
    load_model,
    load_model_config,
    resolve_model_path,
)
from test_model import HF_CONFIG, PROMPTS, PagedRunner, make_hf_model

CPU = torch.device("cpu")


def load_from(path: Path, load_format: str = "auto", seed: int = 0, dtype: torch.dtype = torch.float32):
    config = EngineConfig(model=str(path), load_format=load_format, device="cpu", seed=seed)
    model_path = resolve_model_path(config.model, None, allow_missing=load_format == "dummy")
    model_config = load_model_config(config, model_path)
    return load_model(config, model_config, model_path, CPU, dtype, backend=None)


def assert_same_logits(model, hf) -> None:
    runner = PagedRunner(model)
    seqs = [runner.add_sequence() for _ in PROMPTS[:2]]
    ours = runner.step(dict(zip(seqs, PROMPTS[:2], strict=True)))
    with torch.no_grad():
        for prompt, got in zip(PROMPTS[:2], ours, strict=True):
            torch.testing.assert_close(got, hf(torch.tensor([prompt])).logits[0], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(seed=5)


def test_sharded_checkpoint_logs_a_line_per_shard(hf_model, tmp_path, caplog):
    hf_model.save_pretrained(tmp_path, max_shard_size="200KB", safe_serialization=True)
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    with caplog.at_level("INFO", logger="r1serve"):
        model = load_from(tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Loading checkpoint shards")]
    assert lines == [f"Loading checkpoint shards: {i}/{len(shards)} ({p.name})" for i, p in enumerate(shards, 1)]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert_same_logits(model, hf_model)


def test_single_file_checkpoint_loads(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    assert_same_logits(load_from(tmp_path), hf_model)


def test_tied_checkpoint_loads_with_one_shared_weight(tmp_path):
    hf = make_hf_model(tied=True, seed=6)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_from(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_logits(model, hf)


def test_checkpoint_cast_to_bfloat16(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    model = load_from(tmp_path, dtype=torch.bfloat16)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight, hf_model.model.layers[0].mlp.down_proj.weight.to(torch.bfloat16))
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32


def test_checkpoint_that_does_not_fit_is_refused(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"missing tensors model\.layers\.2\."):
        load_from(tmp_path)


def test_folder_without_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights in .*--load-format dummy"):
        load_from(tmp_path)


def test_dummy_weights_are_seeded(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    first = load_from(tmp_path, "dummy", seed=0).state_dict()
    again = load_from(tmp_path, "dummy", seed=0).state_dict()
    other = load_from(tmp_path, "dummy", seed=1).state_dict()
    name = "model.layers.1.self_attn.qkv_proj.weight"
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[name], other[name])
    assert torch.equal(first["model.norm.weight"], torch.ones(HF_CONFIG["hidden_size"]))
    assert 0.015 < float(first[name].std()) < 0.025


def test_dummy_default_model_uses_builtin_config():
    config = EngineConfig(load_format="dummy")
    model_config = load_model_config(config, None)
    assert model_config.hidden_size == 1536 and model_config.num_hidden_layers == 28
    assert model_config.num_parameters() == 1_777_088_000
    local_name = EngineConfig(model="/models/DeepSeek-R1-Distill-Qwen-1.5B", load_format="dummy")
    renamed = load_model_config(local_name, None)
    assert renamed == model_config
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model_config(EngineConfig(model="someone/other-model", load_format="dummy"), None)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model_config(EngineConfig(model=DEFAULT_MODEL, load_format="auto"), None)


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"), None, allow_missing=False)
    assert resolve_model_path(str(tmp_path / "nope"), None, allow_missing=True) is None
    assert resolve_model_path(str(tmp_path), None, allow_missing=False) == tmp_path.resolve()


OFFLINE_SCRIPT = """
from r1serve.model.loader import resolve_model_path
assert resolve_model_path("nobody-r1serve/not-a-model", None, allow_missing=True) is None
resolve_model_path("nobody-r1serve/not-a-model", None, allow_missing=False)
"""


@pytest.mark.slow
def test_hub_id_offline_and_not_cached_is_one_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("r1serve.model.loader.ModelNotFoundError:")
    assert "'nobody-r1serve/not-a-model'" in last and "--load-format dummy" in last and "local path" in last


def test_model_config_from_saved_checkpoint(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    config = load_model_config(EngineConfig(model=str(tmp_path)), tmp_path)
    assert config == ModelConfig.from_hf_dict({**HF_CONFIG, "torch_dtype": config.torch_dtype})


def test_building_the_model_imports_no_compiler_stack(tmp_path: Path) -> None:
    """The model is built on the meta device without running torch's ops there (random initialisers, the
    rotary table): on meta tensors those go through torch's compiler stack, ~1.5 s of import (and Triton where
    installed, which then reports leaked objects at exit)."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    code = ("import sys; from r1serve import LLM; LLM(sys.argv[1], load_format='dummy', device='cpu', "
            "kv_cache_space=0.05); print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "leaked" not in out.stderr
