"""Structured output on CUDA: the masks applied by xgrammar's Triton kernel to the logits on the device, then the
Triton sampler, CUDA graphs for decode; constrained rows follow their grammar, free rows in the same batch draw
what they draw alone (the byte-level tokenizer: no files needed)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from r1serve import LLM, SamplingParams, StructuredOutput
from test_engine_gpu import GPU_CONFIG

pytestmark = pytest.mark.gpu
pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    path = tmp_path_factory.mktemp("gpu-so") / "gpu-qwen2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(GPU_CONFIG))
    return LLM(str(path), load_format="dummy", device="cuda", max_model_len=1024, max_num_seqs=16)


def test_constrained_and_free_rows_share_cuda_steps(llm: LLM) -> None:
    prompt = list(range(1000, 1040))
    free = [SamplingParams(max_tokens=24, ignore_eos=True, seed=s) for s in (1, 2, 3)]
    alone = [o.outputs[0].token_ids for o in llm.generate([prompt] * 3, free)]
    specs = [("regex", "[a-f]{12}", 0.0), ("choice", '["north", "south"]', 0.6), ("regex", "[0-9]{4}-[0-9]{2}", 1.0)]
    guided = [SamplingParams(max_tokens=40, seed=7 + i, temperature=t, structured_output=StructuredOutput(kind, spec))
              for i, (kind, spec, t) in enumerate(specs)]  # type: ignore[arg-type]
    outs = llm.generate([prompt] * 6, free + guided)
    assert [o.outputs[0].token_ids for o in outs[:3]] == alone
    patterns = ["[a-f]{12}", "north|south", "[0-9]{4}-[0-9]{2}"]
    for out, pattern in zip(outs[3:], patterns, strict=True):
        assert re.fullmatch(pattern, out.outputs[0].text), out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop"


def test_a_constrained_request_alone_ends_by_its_grammar_and_by_length(llm: LLM) -> None:
    """Its last step's sampling is deferred and runs when the engine reads the tokens, outside `execute`: it
    must sample (and copy to the pinned host buffer) there too, not fail the request."""
    prompt = list(range(1000, 1040))
    params = [SamplingParams(max_tokens=40, seed=3, structured_output=StructuredOutput("regex", "[a-f]{12}")),
              SamplingParams(max_tokens=8, seed=4, structured_output=StructuredOutput("regex", "[a-f]{30}"))]
    for param, reason, length in zip(params, ("stop", "length"), (12, 8), strict=True):
        out = llm.generate([prompt], [param])[0].outputs[0]
        assert (out.finish_reason, len(out.text)) == (reason, length), (out.finish_reason, out.text)
