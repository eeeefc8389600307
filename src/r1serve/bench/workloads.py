"""The prompts a benchmark sends: synthetic random ones of exact length, real math problems, prompts sharing
a long prefix, or the user's own JSONL.

A workload is a frozen `WorkloadSpec` (what the user asked for) turned into a list of `BenchRequest`s by
`build_requests(spec, count, seed, tokenizer)`, deterministically from the seed, so that every endpoint of a
comparison gets the very same prompts. `random` and `shared-prefix` ask for a fixed number of output tokens
(the server is asked to ignore EOS); `gsm8k`, `math500` and `jsonl` let the model decide how long to answer,
up to `--output-len` where given.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from r1serve.bench.tokens import BenchTokenizer, approximate_text
from r1serve.jsonl import iter_jsonl
from r1serve.prompts import math_prompt

WorkloadName = Literal["random", "gsm8k", "math500", "shared-prefix", "jsonl"]
WORKLOADS: tuple[str, ...] = ("random", "gsm8k", "math500", "shared-prefix", "jsonl")
DATASET_FIELDS = {"gsm8k": "question", "math500": "problem", "jsonl": "prompt"}


@dataclass(frozen=True)
class LengthRange:
    """A token length, fixed (`512`) or drawn uniformly from an inclusive range (`256:1024`)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low < 0 or self.high < self.low:
            raise ValueError(f"length range {self.low}:{self.high} is invalid (need 0 <= low <= high)")

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        low, sep, high = str(text).partition(":")
        try:
            return cls(int(low), int(high if sep else low))
        except ValueError as e:
            raise ValueError(f"length {text!r}: expected N or LOW:HIGH with integers ({e})") from e

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True)
class WorkloadSpec:
    """What to send. `input_len` is the whole prompt for `random`, the part after the prefix for
    `shared-prefix`."""

    name: WorkloadName = "random"
    input_len: LengthRange = LengthRange(1024, 1024)
    output_len: LengthRange | None = None  # None: random workloads use 128, datasets let the model decide
    dataset_path: Path | None = None
    prefix_len: int = 1024
    num_groups: int = 8

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"workload {self.name!r} is not one of {', '.join(WORKLOADS)}")
        if self.name in DATASET_FIELDS and self.dataset_path is None:
            raise ValueError(f"workload {self.name} needs --dataset-path (a JSONL file or its folder)")
        if self.prefix_len < 0 or self.num_groups < 1:
            raise ValueError(f"shared-prefix needs --prefix-len >= 0 and --num-groups >= 1, got "
                             f"{self.prefix_len} and {self.num_groups}")
        if self.output_len is not None and self.output_len.low < 1:
            raise ValueError(f"--output-len must be at least 1, got {self.output_len}")

    @property
    def fixed_output(self) -> bool:
        """Synthetic workloads ask for exactly their output length (`ignore_eos`); real prompts do not."""
        return self.name in ("random", "shared-prefix")


@dataclass(frozen=True)
class BenchRequest:
    """One prompt to send: the user text, its length in tokens if known, and the `max_tokens` to ask for."""

    prompt: str
    prompt_len: int | None
    max_tokens: int | None
    fixed_output: bool


DEFAULT_RANDOM_OUTPUT = LengthRange(128, 128)


def build_requests(
    spec: WorkloadSpec, count: int, seed: int, tokenizer: BenchTokenizer | None
) -> list[BenchRequest]:
    """`count` requests of the workload, the same for the same (spec, count, seed)."""
    if count < 1:
        raise ValueError(f"number of prompts must be at least 1, got {count}")
    rng = random.Random(seed)
    if spec.name == "random":
        return [_random_request(spec, rng, tokenizer) for _ in range(count)]
    if spec.name == "shared-prefix":
        return _shared_prefix_requests(spec, count, rng, tokenizer)
    return _dataset_requests(spec, count, rng, tokenizer)


def _text(num_tokens: int, rng: random.Random, tokenizer: BenchTokenizer | None) -> tuple[str, int]:
    if tokenizer is None:
        return approximate_text(num_tokens, rng), num_tokens
    return tokenizer.random_text(num_tokens, rng)


def _random_request(spec: WorkloadSpec, rng: random.Random, tokenizer: BenchTokenizer | None) -> BenchRequest:
    text, length = _text(spec.input_len.sample(rng), rng, tokenizer)
    max_tokens = (spec.output_len or DEFAULT_RANDOM_OUTPUT).sample(rng)
    return BenchRequest(prompt=text, prompt_len=length, max_tokens=max_tokens, fixed_output=True)


def _shared_prefix_requests(
    spec: WorkloadSpec, count: int, rng: random.Random, tokenizer: BenchTokenizer | None
) -> list[BenchRequest]:
    prefixes = [_text(spec.prefix_len, rng, tokenizer) for _ in range(spec.num_groups)]
    requests = []
    for i in range(count):
        prefix, prefix_len = prefixes[i % spec.num_groups]
        suffix, suffix_len = _text(spec.input_len.sample(rng), rng, tokenizer)
        max_tokens = (spec.output_len or DEFAULT_RANDOM_OUTPUT).sample(rng)
        requests.append(BenchRequest(prefix + suffix, prefix_len + suffix_len, max_tokens, fixed_output=True))
    rng.shuffle(requests)
    return requests


def _dataset_requests(
    spec: WorkloadSpec, count: int, rng: random.Random, tokenizer: BenchTokenizer | None
) -> list[BenchRequest]:
    assert spec.dataset_path is not None  # checked by WorkloadSpec
    rows = load_dataset_rows(spec.name, spec.dataset_path)
    order = list(range(len(rows)))
    rng.shuffle(order)
    requests = []
    for i in range(count):  # a seeded shuffle, cycled when more prompts are asked than the file holds
        prompt, row_max_tokens = rows[order[i % len(rows)]]
        max_tokens = spec.output_len.sample(rng) if spec.output_len else row_max_tokens
        prompt_len = tokenizer.count(prompt) if tokenizer else None
        requests.append(BenchRequest(prompt, prompt_len, max_tokens, fixed_output=False))
    return requests


def dataset_file(name: str, path: Path) -> Path:
    """The JSONL file of a dataset workload: `path`, or `path/test.jsonl`, or `path/<name>/test.jsonl`."""
    for candidate in (path, path / "test.jsonl", path / name / "test.jsonl"):
        if candidate.is_file():
            return candidate
    raise ValueError(f"--dataset-path {path}: no JSONL file for {name} there (tried {path}, "
                     f"{path / 'test.jsonl'}, {path / name / 'test.jsonl'})")


def load_dataset_rows(name: str, path: Path) -> list[tuple[str, int | None]]:
    """(user prompt, max_tokens or None) per record; math problems get the R1 math instruction appended."""
    file = dataset_file(name, Path(path))
    field = DATASET_FIELDS[name]
    rows = []
    for line_no, record in iter_jsonl(file):
        value = record.get(field)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{file}:{line_no}: no non-empty string field {field!r}")
        max_tokens = record.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"{file}:{line_no}: max_tokens must be a positive integer, got {max_tokens!r}")
        rows.append((value if name == "jsonl" else math_prompt(value), max_tokens))
    if not rows:
        raise ValueError(f"{file}: no records")
    return rows

