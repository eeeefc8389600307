"""What logprobs cost a decode step, and what they cost requests that do not ask (nothing, by construction: a step
is planned for logprobs only while some live request asks, `SchedulerOutput.logprobs`).

Runs the real engine on a tiny dummy Qwen2 (CPU by default) with a batch of decoding requests, three ways: no
request asks; the same batch with the step flag forced on but no row asking (the planning pass alone); one
request asking for its sampled token's logprob and the top 5. Prints ms per step of each, then one JSON line.

    PYTHONPATH=src python benchmarks/logprobs_overhead.py --batch 16 --steps 40
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from r1serve import SamplingParams
from r1serve.config import EngineConfig
from r1serve.engine.llm_engine import LLMEngine

TINY = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "torch_dtype": "float32", "bos_token_id": 151643, "eos_token_id": 151643}


def step_ms(engine: LLMEngine, batch: int, steps: int, asking: int, force_flag: bool) -> float:
    """Mean wall ms per step of `steps` decode steps of `batch` requests, `asking` of them with logprobs=5."""
    for i in range(batch):
        params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True,
                                logprobs=5 if i < asking else None)
        engine.add_request([1000 + i] * 32, params)
    for _ in range(4):  # prefill and warm-up
        engine.step()
    if force_flag:
        engine.num_logprob_requests += 1  # the flag on with no row asking: the planning pass alone
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - start
    if force_flag:
        engine.num_logprob_requests -= 1
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    return 1000 * elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp()) / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    engine = LLMEngine(EngineConfig(model=str(folder), load_format="dummy", dtype="float32", device=args.device,
                                    kv_cache_space=0.1))
    rows = {"none asks": step_ms(engine, args.batch, args.steps, 0, False),
            "flag on, none asks": step_ms(engine, args.batch, args.steps, 0, True),
            "one asks (top 5)": step_ms(engine, args.batch, args.steps, 1, False),
            "none asks (again)": step_ms(engine, args.batch, args.steps, 0, False)}
    print(f"{'case':<22} {'ms/step':>8}")
    for name, ms in rows.items():
        print(f"{name:<22} {ms:8.3f}")
    print(json.dumps({"benchmark": "logprobs_overhead", **vars(args), "ms_per_step": rows}))


if __name__ == "__main__":
    main()
