"""Writes the quantized checkpoints under tests/data/quant/ with the tools that write them in the wild, and the
reference each tool gives, so that CI checks r1serve's loaders without installing those tools.

The fixtures are one tiny random Qwen2 (hidden 128, 2 layers, vocab 512) quantized five ways:

- `w4a16`, `fp8-dynamic`, `w8a8`: llm-compressor's `oneshot` (GPTQ for W4A16 and W8A8, round-to-nearest for
  FP8_DYNAMIC) on a few random token sequences, saved compressed (compressed-tensors `pack-quantized`,
  `float-quantized`, `int-quantized`); the reference logits are transformers' with compressed-tensors
  decompressing the checkpoint (`run_compressed=False`, activations fake-quantized where the scheme says so).
  W4A16's GPTQ runs with llm-compressor's default `actorder: static` (columns visited in activation order,
  groups kept in column order: no `weight_g_idx`).
- `w4a16-actorder`: the same GPTQ W4A16 with `actorder: "group"` and group size 32 (so that the 128-column
  projections have 4 groups to reorder): groups follow the activation order and each projection stores
  `weight_g_idx` int32 [in] (the group of each input column). llm-compressor 0.14 refuses "group" (removed
  upstream), so this one is written with llmcompressor 0.13.0 (below).
- `awq-gemm`: AutoAWQ's own GEMM packer (`WQLinear_GEMM.from_linear`) on round-to-nearest scales and zero
  points; the reference logits are transformers' on AutoAWQ's own `dequantize_gemm` of those tensors.

Each folder holds config.json, model.safetensors and reference.safetensors (`input_ids` [1, 12], `logits`
[12, vocab] float32, `greedy_ids` [8]: transformers' greedy continuation of the first 6 input ids).

llm-compressor pins a transformers older than the project's, so run this in a venv of its own layered on the
project's (its torch), with AutoAWQ's source unpacked beside it (AutoAWQ needs no install: its packer is torch):

    python -m venv /tmp/llmc-venv
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/llmc-venv/lib/python3.11/site-packages/main.pth
    echo torch==2.13.0 > /tmp/c.txt && /tmp/llmc-venv/bin/pip install -c /tmp/c.txt llmcompressor
    pip download --no-deps autoawq==0.2.9 -d /tmp/qdl && tar xzf /tmp/qdl/autoawq-0.2.9.tar.gz -C /tmp/qdl
    /tmp/llmc-venv/bin/python dev/make_quant_fixtures.py --autoawq-src /tmp/qdl/autoawq-0.2.9 \
        --only w4a16 fp8-dynamic w8a8 awq-gemm

and the act-order fixture in a second venv, the same way with the last llm-compressor that writes g_idx:

    python -m venv /tmp/llmc13-venv
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/llmc13-venv/lib/python3.11/site-packages/main.pth
    /tmp/llmc13-venv/bin/pip install -c /tmp/c.txt llmcompressor==0.13.0
    /tmp/llmc13-venv/bin/python dev/make_quant_fixtures.py --only w4a16-actorder

Written with llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, AutoAWQ 0.2.9;
`w4a16-actorder` with llmcompressor 0.13.0, compressed-tensors 0.18.0, transformers 5.14.1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "quant"
TINY = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 512, "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.08,
}
TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizer"
GROUP_SIZE = 128
ACTORDER_GROUP_SIZE = 32
ACTORDER_SCHEME = {"group_0": {"targets": ["Linear"], "weights": {
    "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": ACTORDER_GROUP_SIZE,
    "actorder": "group"}}}
SCHEMES: dict[str, str | dict] = {"w4a16": "W4A16", "fp8-dynamic": "FP8_DYNAMIC", "w8a8": "W8A8",
                                  "w4a16-actorder": ACTORDER_SCHEME}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_model(dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, torch_dtype="bfloat16"))
    with torch.no_grad():  # norms away from 1 so that they are tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def reference_inputs() -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(7))


def write_reference(folder: Path, model) -> None:
    """The reference logits of `model` (float32) and its greedy continuation, beside the checkpoint."""
    input_ids = reference_inputs()
    with torch.no_grad():
        logits = model(input_ids).logits[0].float()
        out = model.generate(input_ids[:, :6], max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    save_file({"input_ids": input_ids, "logits": logits.contiguous(), "greedy_ids": out[0, 6:].contiguous()},
              str(folder / "reference.safetensors"))


def compressed_tensors_fixture(name: str, scheme: str | dict) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    base_model(torch.bfloat16).save_pretrained("base")  # oneshot wants a model that has a folder
    model = AutoModelForCausalLM.from_pretrained("base", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    calibration = Dataset.from_dict({"input_ids": torch.randint(3, 512, (16, 32), generator=gen).tolist(),
                                     "attention_mask": [[1] * 32] * 16})
    modifier = QuantizationModifier if scheme == "FP8_DYNAMIC" else GPTQModifier
    if isinstance(scheme, dict):  # a scheme of its own: GPTQ with these config groups
        recipe = GPTQModifier(config_groups=scheme, ignore=["lm_head"])
    else:
        recipe = modifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)  # oneshot wants one; the data is already token ids
    oneshot(model=model, processor=tokenizer, dataset=calibration, recipe=recipe, max_seq_length=32,
            num_calibration_samples=16)
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, save_compressed=True)
    for extra in folder.glob("recipe.yaml"):
        extra.unlink()
    reference = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    write_reference(folder, reference)


def rtn_asymmetric(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ's zero-point round-to-nearest per group: scales and zeros [N, K // G]."""
    groups = weight.float().reshape(weight.shape[0], -1, GROUP_SIZE)
    high, low = groups.amax(dim=-1), groups.amin(dim=-1)
    scales = ((high - low).clamp(min=1e-5) / 15).half()
    zeros = (-torch.round(low / scales.float())).clamp(0, 15)
    return scales, zeros


def awq_fixture(autoawq_src: Path) -> None:
    package = types.ModuleType("awq")  # AutoAWQ's modules without its __init__ (which imports its model zoo)
    package.__path__ = [str(autoawq_src / "awq")]
    sys.modules["awq"] = package
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm

    model = base_model(torch.float16)
    tensors = {name: p.detach().clone().contiguous() for name, p in model.state_dict().items()}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in PROJECTIONS:
            continue
        scales, zeros = rtn_asymmetric(module.weight.data)
        packed = WQLinear_GEMM.from_linear(module, 4, GROUP_SIZE, scales=scales.t().contiguous(),
                                           zeros=zeros.t().contiguous())
        del tensors[f"{name}.weight"]
        tensors.update({f"{name}.qweight": packed.qweight, f"{name}.qzeros": packed.qzeros,
                        f"{name}.scales": packed.scales})
        dense = dequantize_gemm(packed.qweight, packed.qzeros, packed.scales, 4, GROUP_SIZE)  # [in, out]
        module.weight.data = dense.t().contiguous().half()
    folder = OUT / "awq-gemm"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = {**TINY, "torch_dtype": "float16", "quantization_config": {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True,
        "modules_to_not_convert": None}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_reference(folder, model.float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--autoawq-src", type=Path, help="AutoAWQ's unpacked source distribution (for awq-gemm)")
    parser.add_argument("--only", nargs="+", choices=[*SCHEMES, "awq-gemm"], default=[*SCHEMES, "awq-gemm"],
                        help="the fixtures to write (default: all)")
    args = parser.parse_args()
    if "awq-gemm" in args.only and args.autoawq_src is None:
        parser.error("awq-gemm needs --autoawq-src")
    with tempfile.TemporaryDirectory() as tmp:  # llm-compressor writes its logs under the working directory
        import os

        os.chdir(tmp)
        for name, scheme in SCHEMES.items():
            if name in args.only:
                compressed_tensors_fixture(name, scheme)
        if "awq-gemm" in args.only:
            awq_fixture(args.autoawq_src)
    for folder in sorted(OUT.iterdir()):
        print(folder.name, sorted(f.name for f in folder.iterdir()))


if __name__ == "__main__":
    main()
