"""Quantized checkpoints written by the tools themselves (tests/data/quant, see dev/make_quant_fixtures.py):
r1serve's logits match each tool's own decompression, greedy outputs are equal, a layout read wrongly fails
the bound, and every malformed checkpoint is one ValueError naming the tensor or setting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from r1serve import LLM, SamplingParams
from r1serve.config import EngineConfig
from r1serve.kernels.quant_reference import pack_int4
from r1serve.model.loader import load_model, load_model_config
from r1serve.model.quant.formats import AWQ_ORDER, unpack_awq
from r1serve.model.quant.layers import Int4Linear, PerChannelLinear
from test_model import PagedRunner

pytest.importorskip("compressed_tensors")

DATA = Path(__file__).parent / "data" / "quant"
CPU = torch.device("cpu")
# (fixture, packed module type, max |logit difference| to the tool's reference). W8A8's activations are
# rounded per token as compressed-tensors' fake quantization rounds them (amax / 127.5, -128..127,
# kernels/quant_reference.py); what is left is the order of the float32 sums (integer products scaled once
# against a product of dequantized operands), which moves a few values across a rounding boundary.
FIXTURES = [("awq-gemm", Int4Linear, 5e-3), ("w4a16", Int4Linear, 1e-4), ("fp8-dynamic", PerChannelLinear, 1e-4),
            ("w8a8", PerChannelLinear, 1e-2), ("w4a16-actorder", Int4Linear, 1e-4)]


def load(path: Path, quantization: str | None = None):
    config = EngineConfig(model=str(path), device="cpu", quantization=quantization)
    return load_model(config, load_model_config(config, path), path, CPU, torch.float32)


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    runner = PagedRunner(model)
    seq = runner.add_sequence()
    return runner.step({seq: input_ids[0].tolist()})[0]


def kl(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean KL(ref || ours) per position."""
    return torch.nn.functional.kl_div(ours.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


@pytest.mark.parametrize(("name", "module_type", "atol"), FIXTURES)
def test_logits_match_the_tools_own_decompression(name, module_type, atol):
    ref = load_file(str(DATA / name / "reference.safetensors"))
    model = load(DATA / name)
    projections = [m for m in model.modules() if isinstance(m, module_type)]
    assert len(projections) == 4 * model.config.num_hidden_layers  # qkv, o, gate_up, down: all packed
    assert not any(n.endswith("_proj.weight") for n, _ in model.named_parameters())  # no dense copy kept
    got = logits_of(model, ref["input_ids"])
    assert (got - ref["logits"]).abs().max().item() < atol
    assert torch.equal(got.argmax(-1), ref["logits"].argmax(-1))
    assert kl(got, ref["logits"]) < 1e-3


@pytest.mark.parametrize("name", ["awq-gemm", "w4a16", "fp8-dynamic", "w8a8", "w4a16-actorder"])
def test_engine_greedy_output_equals_the_reference(name):
    ref = load_file(str(DATA / name / "reference.safetensors"))
    llm = LLM(str(DATA / name), device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=16, max_num_seqs=2)
    out = llm.generate([ref["input_ids"][0, :6].tolist()], SamplingParams(temperature=0, max_tokens=8,
                                                                          ignore_eos=True))
    assert out[0].outputs[0].token_ids == ref["greedy_ids"].tolist()


def int4_modules(model) -> list[Int4Linear]:
    return [m for m in model.modules() if isinstance(m, Int4Linear)]


def test_act_order_fixture_reads_each_projections_inputs_in_group_order():
    config = json.loads((DATA / "w4a16-actorder" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    model = load(DATA / "w4a16-actorder")
    assert model.quant.act_order and "act order" in model.quant.describe()
    for module in int4_modules(model):  # GPTQ orders q/k/v (and gate/up) alike: one order per fused module
        assert module.input_perm is not None and module.input_perm.shape == (1, module.in_features)
        assert not torch.equal(module.input_perm[0], torch.arange(module.in_features))
        assert torch.equal(module.input_perm[0].sort().values, torch.arange(module.in_features))


def test_act_order_ignored_fails_the_bound():
    ref = load_file(str(DATA / "w4a16-actorder" / "reference.safetensors"))
    model = load(DATA / "w4a16-actorder")
    for module in int4_modules(model):
        module.input_perm = None  # the sorted layout read with x's columns as they come
    got = logits_of(model, ref["input_ids"])
    assert (got - ref["logits"]).abs().max().item() > 100 * FIXTURES[-1][2]


def test_weight_actorder_checkpoint_needs_no_permutation():
    config = json.loads((DATA / "w4a16" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["actorder"] == "static"  # llm-compressor's default
    model = load(DATA / "w4a16")
    assert not model.quant.act_order
    assert all(module.input_perm is None for module in int4_modules(model))


def _relabel_k_proj_groups(tensors: dict[str, torch.Tensor]) -> None:
    """Layer 0's k_proj with its group ids reversed (g -> G - 1 - g) and its scale columns to match: the same
    weights, in another column order than q_proj's and v_proj's."""
    prefix = "model.layers.0.self_attn.k_proj"
    g_idx = tensors[f"{prefix}.weight_g_idx"]
    num_groups = int(g_idx.max()) + 1
    tensors[f"{prefix}.weight_g_idx"] = (num_groups - 1 - g_idx).contiguous()
    tensors[f"{prefix}.weight_scale"] = tensors[f"{prefix}.weight_scale"].flip(1).contiguous()


def test_fused_shards_in_different_orders_run_one_product_each(tmp_path):
    ref = load_file(str(DATA / "w4a16-actorder" / "reference.safetensors"))
    model = load(copy_fixture("w4a16-actorder", tmp_path, tensor_edit=_relabel_k_proj_groups))
    qkv = model.get_submodule("model.layers.0.self_attn.qkv_proj")
    assert qkv.input_perm.shape == (3, qkv.in_features)
    assert torch.equal(qkv.input_perm[0], qkv.input_perm[2]) and not torch.equal(qkv.input_perm[0],
                                                                                  qkv.input_perm[1])
    got = logits_of(model, ref["input_ids"])
    assert (got - ref["logits"]).abs().max().item() < FIXTURES[-1][2]


def test_dummy_weights_of_an_act_order_config_are_quantized_in_column_order():
    path = DATA / "w4a16-actorder"
    config = EngineConfig(model=str(path), device="cpu", load_format="dummy")
    model = load_model(config, load_model_config(config, path), path, CPU, torch.float32)
    assert model.quant.group_size == 32 and not model.quant.act_order
    assert all(module.input_perm is None for module in int4_modules(model))


def _unequal_groups(tensors: dict[str, torch.Tensor]) -> None:
    name = "model.layers.1.mlp.down_proj.weight_g_idx"
    tensors[name] = tensors[name].clone()
    tensors[name][tensors[name] == 1] = 0  # group 0 twice its size, group 1 empty


def test_g_idx_with_unequal_groups_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"down_proj\.weight_g_idx does not put 32 input columns in each of the 8"):
        load(copy_fixture("w4a16-actorder", tmp_path, tensor_edit=_unequal_groups))


def test_missing_g_idx_is_named(tmp_path):
    drop = "model.layers.0.self_attn.o_proj.weight_g_idx"
    folder = copy_fixture("w4a16-actorder", tmp_path, tensor_edit=lambda tensors: tensors.pop(drop))
    with pytest.raises(ValueError, match=r"missing tensors model\.layers\.0\.self_attn\.o_proj\.weight_g_idx"):
        load(folder)


def test_g_idx_in_a_checkpoint_without_act_order_is_unexpected(tmp_path):
    folder = copy_fixture("w4a16-actorder", tmp_path, config_edit=lambda q: q["config_groups"]["group_0"][
        "weights"].update(actorder="weight"))
    with pytest.raises(ValueError, match=r"unexpected checkpoint tensor model\.layers\.\d\.\w+\.\w+\.weight_g_idx"):
        load(folder)


def copy_fixture(name: str, dst: Path, config_edit=None, tensor_edit=None) -> Path:
    folder = dst / name
    shutil.copytree(DATA / name, folder)
    if config_edit is not None:
        config = json.loads((folder / "config.json").read_text())
        config_edit(config["quantization_config"])
        (folder / "config.json").write_text(json.dumps(config))
    if tensor_edit is not None:
        tensors = load_file(str(folder / "model.safetensors"))
        tensor_edit(tensors)
        save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _awq_order_ignored(tensors: dict[str, torch.Tensor]) -> None:
    """Repacks every AWQ qweight sequentially, as a loader that ignored AutoAWQ's interleave would read it."""
    for name in [n for n in tensors if n.endswith(".qweight")]:
        tensors[name] = pack_int4(unpack_awq(tensors[name]))


def test_awq_order_read_wrongly_fails_the_bound(tmp_path):
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    ref = load_file(str(DATA / "awq-gemm" / "reference.safetensors"))
    got = logits_of(load(copy_fixture("awq-gemm", tmp_path, tensor_edit=_awq_order_ignored)), ref["input_ids"])
    assert (got - ref["logits"]).abs().max().item() > 10 * FIXTURES[0][2]
    assert kl(got, ref["logits"]) > 1e-2


def test_transposed_awq_scales_are_refused_by_shape(tmp_path):
    def transpose(tensors):
        name = "model.layers.0.mlp.down_proj.scales"
        tensors[name] = tensors[name].T.contiguous()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.scales has shape \(128, 2\)"):
        load(copy_fixture("awq-gemm", tmp_path, tensor_edit=transpose))


@pytest.mark.parametrize(("name", "edit", "message"), [
    ("awq-gemm", lambda q: q.update(bits=8), "AWQ bits 8 is not supported"),
    ("awq-gemm", lambda q: q.update(group_size=48), "group_size 48 is not supported"),
    ("awq-gemm", lambda q: q.update(version="gemv"), "AWQ version 'gemv'"),
    ("awq-gemm", lambda q: q.update(quant_method="gptq"), "quant_method 'gptq' is not supported"),
    ("w4a16", lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=96), "group_size 96"),
    ("w4a16", lambda q: q.update(format="marlin-24") or q["config_groups"]["group_0"].update(format="marlin-24"),
     "format 'marlin-24' is not supported"),
    ("w8a8", lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=False, strategy="tensor",
                                                                                   observer="minmax"),
     "only dynamic"),
    ("w8a8", lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4), "int weights of 8 bits"),
    ("w4a16-actorder", lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="channel", group_size=None),
     "actorder 'group' needs strategy 'group'"),
])
def test_unsupported_settings_are_named(tmp_path, name, edit, message):
    with pytest.raises(ValueError, match=message):
        load(copy_fixture(name, tmp_path, config_edit=edit))


def test_missing_tensor_is_named(tmp_path):
    drop = "model.layers.1.self_attn.k_proj.weight_scale"
    folder = copy_fixture("w4a16", tmp_path, tensor_edit=lambda tensors: tensors.pop(drop))
    with pytest.raises(ValueError, match=r"missing tensors model\.layers\.1\.self_attn\.k_proj\.weight_scale"):
        load(folder)


def test_wrong_shape_is_named(tmp_path):
    def shrink(tensors):
        name = "model.layers.0.self_attn.o_proj.weight"
        tensors[name] = tensors[name][:, :64].contiguous()
    with pytest.raises(ValueError, match=r"o_proj\.weight has shape \(128, 64\), the model expects \(128, 128\)"):
        load(copy_fixture("fp8-dynamic", tmp_path, tensor_edit=shrink))


def test_dense_tensor_in_a_quantized_checkpoint_is_unexpected(tmp_path):
    def densify(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(256, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"unexpected checkpoint tensor model\.layers\.0\.mlp\.up_proj\.weight"):
        load(copy_fixture("w4a16", tmp_path, tensor_edit=densify))


@pytest.mark.parametrize(("name", "flag"), [("awq-gemm", "fp8"), ("w4a16", "awq"), ("fp8-dynamic", "int8")])
def test_flag_that_contradicts_the_checkpoint_is_refused(name, flag):
    with pytest.raises(ValueError, match=f"--quantization {flag} does not match the checkpoint"):
        load(DATA / name, quantization=flag)


def test_flag_naming_the_checkpoints_method_loads():
    assert load(DATA / "awq-gemm", quantization="awq").quant.checkpoint_format == "awq-gemm"
