"""Evaluation problems: the built-in tasks (GSM8K, MATH-500, AIME 2024) and any JSONL file, as `Problem`s.

An evaluation is only as trustworthy as the answers it grades against, so loading is strict: a missing file,
a line that is not a JSON object, a record without the expected field or with an empty answer each raise a
`DatasetError` naming the file, the line and the fields that are there. Built-in tasks are read from a local
data folder (`--data-dir`, `$R1SERVE_DATA_DIR`, or `../shared/data` beside a checkout); a Hugging Face
`datasets` id (`hf:owner/name`) is used only when that package is installed, without adding a dependency.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from r1serve.jsonl import iter_jsonl as read_jsonl

AnswerKind = Literal["numeric", "math"]

GSM8K_MARKER = "#### "
_NUMBER = re.compile(r"^[-+]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?$")


class DatasetError(ValueError):
    """A dataset could not be loaded; the message names the file, the line or the field at fault."""


@dataclass(frozen=True)
class Problem:
    """One problem: `id` is stable across runs (it keys resumed samples), `answer` is the gold answer."""

    task: str
    id: str
    problem: str
    answer: str


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's records live and how to read a problem, a gold answer and an id from one record."""

    name: str
    problem_field: str
    answer_field: str
    answer_kind: AnswerKind
    id_field: str | None = None  # None: the 0-based line number
    gsm8k_answer: bool = False  # the gold answer is the text after "#### " in answer_field
    local_path: str | None = None  # relative to the data folder
    hf_id: str | None = None
    hf_config: str | None = None
    hf_split: str = "test"


BUILTIN_TASKS: dict[str, TaskSpec] = {
    "gsm8k": TaskSpec("gsm8k", "question", "answer", "numeric", gsm8k_answer=True,
                      local_path="gsm8k/test.jsonl", hf_id="openai/gsm8k", hf_config="main"),
    "math500": TaskSpec("math500", "problem", "answer", "math", id_field="unique_id",
                        local_path="math500/test.jsonl", hf_id="HuggingFaceH4/MATH-500"),
    "aime24": TaskSpec("aime24", "problem", "answer", "math", id_field="id",
                       local_path="aime24/test.jsonl", hf_id="HuggingFaceH4/aime_2024", hf_split="train"),
}


def default_data_dirs() -> list[Path]:
    """Folders searched for the built-in tasks' files, in order."""
    dirs = []
    if os.environ.get("R1SERVE_DATA_DIR"):
        dirs.append(Path(os.environ["R1SERVE_DATA_DIR"]))
    repo = Path(__file__).resolve().parents[3]  # src/r1serve/eval/datasets.py -> checkout root
    dirs += [Path.cwd() / "data", repo.parent / "shared" / "data"]
    return dirs


def is_number(text: str) -> bool:
    """True for a plain decimal number, thousands separators allowed (`1,000.5`, `-3`)."""
    return bool(_NUMBER.match(text.strip()))


def gsm8k_gold(answer_text: str) -> str | None:
    """The final answer of a GSM8K reference solution: what follows the last `#### `, without commas."""
    if GSM8K_MARKER not in answer_text:
        return None
    return answer_text.rsplit(GSM8K_MARKER, 1)[1].strip().replace(",", "")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number from 1, record) for each non-blank line; a bad line raises a DatasetError naming it."""
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    yield from read_jsonl(path, DatasetError)


def problem_from_record(spec: TaskSpec, record: Mapping[str, Any], where: str, index: int) -> Problem:
    """Build a Problem from one record; a missing field or empty answer raises a DatasetError at `where`."""
    for name in (spec.problem_field, spec.answer_field, spec.id_field):
        if name is not None and name not in record:
            raise DatasetError(
                f"{where}: no field {name!r} (fields present: {', '.join(sorted(record)) or 'none'}); "
                "choose others with --problem-field / --answer-field"
            )
    raw_answer = record[spec.answer_field]
    answer = gsm8k_gold(str(raw_answer)) if spec.gsm8k_answer else str(raw_answer).strip()
    if spec.gsm8k_answer and answer is None:
        raise DatasetError(f"{where}: field {spec.answer_field!r} has no '####' final answer")
    if not answer:
        raise DatasetError(f"{where}: field {spec.answer_field!r} is empty")
    problem = record[spec.problem_field]
    if not isinstance(problem, str) or not problem.strip():
        raise DatasetError(f"{where}: field {spec.problem_field!r} must be a non-empty string")
    pid = str(record[spec.id_field]) if spec.id_field else str(index)
    return Problem(task=spec.name, id=pid, problem=problem, answer=answer)


def load_jsonl(spec: TaskSpec, path: Path) -> list[Problem]:
    """Every problem of a JSONL file; ids must be unique (they key the resumable samples)."""
    problems = [problem_from_record(spec, rec, f"{path}:{lineno}", i)
                for i, (lineno, rec) in enumerate(iter_jsonl(path))]
    if not problems:
        raise DatasetError(f"{path}: no records")
    seen: set[str] = set()
    for p in problems:
        if p.id in seen:
            raise DatasetError(f"{path}: duplicate problem id {p.id!r} in field {spec.id_field!r}")
        seen.add(p.id)
    return problems


def load_hf(spec: TaskSpec) -> list[Problem]:
    """Problems from the Hugging Face hub through the optional `datasets` package."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise DatasetError(
            f"task {spec.name!r}: the hub dataset {spec.hf_id!r} needs the `datasets` package "
            "(pip install datasets) and a network; or pass a local JSONL file"
        ) from e
    try:
        rows = datasets.load_dataset(spec.hf_id, spec.hf_config, split=spec.hf_split)
    except Exception as e:  # noqa: BLE001 - the hub raises many types; the message is what matters
        raise DatasetError(f"task {spec.name!r}: could not load {spec.hf_id!r} from the hub: {e}") from e
    return [problem_from_record(spec, rec, f"{spec.hf_id} row {i}", i) for i, rec in enumerate(rows)]


def guess_answer_kind(problems: list[Problem]) -> AnswerKind:
    """`numeric` when every gold answer is a plain number (then GSM8K-style fallbacks apply), else `math`."""
    return "numeric" if all(is_number(p.answer) for p in problems) else "math"


@dataclass(frozen=True)
class Task:
    """A loaded task: its spec, its problems (in file order) and where they came from."""

    spec: TaskSpec
    problems: tuple[Problem, ...]
    source: str

    @property
    def name(self) -> str:
        return self.spec.name


def _name_for_path(path: Path) -> str:
    generic = {"test", "train", "validation", "dev", "data"}
    return path.parent.name if path.stem in generic and path.parent.name else path.stem


def _resolve_builtin(spec: TaskSpec, data_dir: Path | None) -> tuple[list[Problem], str]:
    dirs = [data_dir] if data_dir is not None else default_data_dirs()
    for folder in dirs:
        path = folder / str(spec.local_path)
        if path.is_file():
            return load_jsonl(spec, path), str(path)
    try:
        import datasets  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        looked = ", ".join(str(d / str(spec.local_path)) for d in dirs)
        raise DatasetError(
            f"task {spec.name!r}: no local file (looked for {looked}) and the `datasets` package is not "
            f"installed for the hub id {spec.hf_id!r}; pass --data-dir, set R1SERVE_DATA_DIR, "
            "or give a JSONL path"
        ) from None
    return load_hf(spec), f"hf:{spec.hf_id}"


def load_task(
    name: str, *, data_dir: str | Path | None = None, problem_field: str | None = None,
    answer_field: str | None = None, id_field: str | None = None, answer_kind: AnswerKind | None = None,
    limit: int | None = None,
) -> Task:
    """Load a task: a built-in name (gsm8k, math500, aime24), `hf:owner/name[@split]`, a JSONL path, or
    `NAME=PATH` to name a JSONL task. Field options override the spec's; `limit` keeps the first problems."""
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be at least 1, got {limit}")
    overrides = {k: v for k, v in (("problem_field", problem_field), ("answer_field", answer_field),
                                   ("id_field", id_field)) if v is not None}
    folder = Path(data_dir) if data_dir is not None else None
    if name in BUILTIN_TASKS:
        spec = _replace(BUILTIN_TASKS[name], overrides, answer_kind)
        problems, source = _resolve_builtin(spec, folder)
    elif name.startswith("hf:"):
        hub, _, split = name[3:].partition("@")
        spec = _replace(TaskSpec(hub.split("/")[-1], "problem", "answer", answer_kind or "math", hf_id=hub,
                                 hf_split=split or "test"), overrides, answer_kind)
        problems, source = load_hf(spec), name
    else:
        task_name, _, raw_path = name.rpartition("=") if "=" in name else ("", "", name)
        path = Path(raw_path).expanduser()
        if not path.exists():
            known = ", ".join(BUILTIN_TASKS)
            raise DatasetError(f"unknown task {name!r}: not one of {known}, not hf:ID, and no file {path}")
        spec = _replace(TaskSpec(task_name or _name_for_path(path), "problem", "answer", "math"), overrides,
                        answer_kind)
        problems, source = load_jsonl(spec, path), str(path)
        if answer_kind is None:
            spec = _replace(spec, {}, guess_answer_kind(problems))
    return Task(spec=spec, problems=tuple(problems[:limit] if limit else problems), source=source)


def _replace(spec: TaskSpec, overrides: Mapping[str, str], answer_kind: AnswerKind | None) -> TaskSpec:
    changes: dict[str, Any] = dict(overrides)
    if answer_kind is not None:
        if answer_kind not in ("numeric", "math"):
            raise DatasetError(f"answer kind must be 'numeric' or 'math', got {answer_kind!r}")
        changes["answer_kind"] = answer_kind
    return dataclasses.replace(spec, **changes)
