"""The nano workload's step split in benchmarks/step_profile.py: prefill, decode by batch size, the draining tail."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_profile  # noqa: E402


def test_decode_steps_split_by_batch_and_the_tail_after_the_last_prefill() -> None:
    steps = [(("prefill", 4), 0.1), (("decode", 4), 0.01), (("prefill", 3), 0.1), (("decode", 3), 0.02),
             (("decode", 200), 0.03), (("read", 0), 0.001)]
    split = step_profile.step_split(steps)
    assert (split["prefill_steps"], split["decode_steps"], split["tail_steps"]) == (2, 3, 2)
    assert abs(split["tail_s"] - 0.05) < 1e-12 and abs(split["decode_s"] - 0.06) < 1e-12
    buckets = {b["batch"]: b for b in split["decode_by_batch"]}
    assert set(buckets) == {"1-16", "193-255"}
    assert buckets["1-16"]["steps"] == 2 and abs(buckets["1-16"]["tok_per_s"] - 7 / 0.03) < 1e-9
    assert buckets["193-255"]["ms_per_step"] == 30.0


def test_a_run_without_prefill_is_all_tail() -> None:
    split = step_profile.step_split([(("decode", 256), 0.5), (("decode", 256), 0.5)])
    assert split["tail_steps"] == 2 and split["decode_by_batch"][0]["batch"] == "256"
