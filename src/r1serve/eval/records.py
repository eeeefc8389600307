"""`samples.jsonl`: one line per finished sample, appended and flushed as it finishes, read back on resume.

The file is the run's ground truth: metrics, the report and the plots are all computed from it, so an
interrupted or crashed run loses nothing that finished, and a rerun skips every key (endpoint label, task,
policy, problem id, sample index) whose latest line succeeded. A line that records an error counts as not
done, so reruns retry it. A half-written last line (a killed process) is skipped with a warning rather than
failing the run.
Each line also carries the settings that produced it, so a resume with different settings is refused.
Lines written before endpoints had labels belong to the run's first endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

SampleKey = tuple[str, str, str, str, int]  # endpoint, task, policy, problem id, sample index

# The settings that must match for a saved sample to count as done in a rerun.
GENERATION_KEYS = ("model", "temperature", "top_p", "max_tokens", "max_thinking_tokens", "seed",
                   "policy_fingerprint")


@dataclass
class SampleRecord:
    """Everything about one sample: its key, how it was generated, what came back, and the grader's decision."""

    task: str
    policy: str
    problem_id: str
    sample_index: int
    gold: str
    seed: int | None
    endpoint: str = ""  # the endpoint's label (--label, default host:port)
    generation: dict[str, Any] = field(default_factory=dict)  # GENERATION_KEYS and the effective max_tokens
    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    answer_tokens: int | None = None
    tokens_estimated: bool = False  # reasoning/answer split estimated from text lengths
    latency_s: float | None = None
    ttft_s: float | None = None
    grade: dict[str, Any] | None = None  # grading.Grade as a dict
    error: str | None = None
    finished_at: float | None = None

    @property
    def key(self) -> SampleKey:
        return (self.endpoint, self.task, self.policy, self.problem_id, self.sample_index)

    @property
    def ok(self) -> bool:
        return self.error is None and self.grade is not None

    @property
    def correct(self) -> bool:
        return bool(self.grade and self.grade.get("correct"))

    @property
    def extracted(self) -> str | None:
        return self.grade.get("extracted") if self.grade else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SampleRecord:
        names = {f.name for f in fields(cls)}
        missing = {"task", "policy", "problem_id", "sample_index", "gold", "seed"} - set(data)
        if missing:
            raise ValueError(f"missing fields {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class LoadedSamples:
    """The latest record per key, and how many lines could not be read."""

    records: dict[SampleKey, SampleRecord]
    bad_lines: list[int]

    def done(self) -> dict[SampleKey, SampleRecord]:
        return {k: r for k, r in self.records.items() if r.ok}

    def failed(self) -> dict[SampleKey, SampleRecord]:
        return {k: r for k, r in self.records.items() if not r.ok}


def load_samples(path: Path, legacy_endpoint: str = "") -> LoadedSamples:
    """Read `samples.jsonl` (absent: empty). A later line for a key replaces an earlier one, except that an
    error never replaces a success. A line without an endpoint gets `legacy_endpoint`."""
    records: dict[SampleKey, SampleRecord] = {}
    bad: list[int] = []
    if not path.exists():
        return LoadedSamples(records, bad)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                data.setdefault("endpoint", legacy_endpoint)
                record = SampleRecord.from_dict(data)
            except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
                bad.append(lineno)
                continue
            previous = records.get(record.key)
            if previous is None or record.ok or not previous.ok:
                records[record.key] = record
    return LoadedSamples(records, bad)


def settings_mismatch(records: Iterable[SampleRecord], expected: dict[str, dict[str, Any]]) -> list[str]:
    """Descriptions of saved samples whose generation settings differ from `expected[policy]`."""
    problems: set[str] = set()
    for record in records:
        want = expected.get(record.policy)
        if want is None:
            continue
        for name in GENERATION_KEYS:
            if record.generation.get(name) != want.get(name):
                problems.add(f"policy {record.policy}: {name} was {record.generation.get(name)!r}, "
                             f"now {want.get(name)!r}")
    return sorted(problems)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


class SampleWriter:
    """Appends records to `samples.jsonl`, one flushed line each (the run's only writer)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        needs_newline = path.exists() and path.stat().st_size > 0 and not _ends_with_newline(path)
        self._file: TextIO = path.open("a", encoding="utf-8")
        if needs_newline:  # a half-written line from a killed run: keep it apart from the next record
            self._file.write("\n")
        self.num_written = 0

    def append(self, record: SampleRecord) -> None:
        self._file.write(record.to_json() + "\n")
        self._file.flush()
        self.num_written += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
