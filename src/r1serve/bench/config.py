"""The settings of one benchmark invocation, validated once and frozen, and written into every result file.

`BenchConfig` is what `r1serve bench` parses its flags into and what the runner reads; `to_dict()` is the
`settings` block of the JSON result, which holds everything needed to run the same benchmark again (the
command line is stored beside it). Sweeps are explicit: `points` lists every load point in order, and
`sweep` names the variable that changes between them, for the tables and the throughput plot.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from r1serve.bench.load import LoadPoint
from r1serve.bench.request import EndpointKind
from r1serve.bench.workloads import WorkloadSpec

SweepVariable = Literal["concurrency", "request_rate"]
PromptTemplate = Literal["auto", "r1", "none"]


@dataclass(frozen=True)
class BenchConfig:
    """Everything one `r1serve bench` run does. URLs are base URLs without `/v1`."""

    urls: tuple[str, ...]
    points: tuple[LoadPoint, ...]
    workload: WorkloadSpec = WorkloadSpec()
    endpoint: EndpointKind = "completions"
    sweep: SweepVariable | None = None
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    tokenizer: str | None = None
    num_warmups: int = 1
    num_workers: int = 1  # bench processes sharing each load point (see workers.py)
    seed: int = 0
    temperature: float | None = None
    ignore_eos: bool = True
    prompt_template: PromptTemplate = "auto"
    extra_body: dict[str, Any] = field(default_factory=dict)
    goodput_slos_ms: dict[str, float] = field(default_factory=dict)
    timeout_s: float = 3600.0
    output: Path | None = None
    plots: bool = True
    progress: bool = True
    save_detailed: bool = False

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("give at least one --url")
        if not self.points:
            raise ValueError("no load point to run")
        if self.num_workers < 1:
            raise ValueError(f"--num-workers must be at least 1, got {self.num_workers}")
        if self.num_warmups < 0:
            raise ValueError(f"--num-warmups must be >= 0, got {self.num_warmups}")
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"--endpoint must be completions or chat, got {self.endpoint!r}")
        if self.prompt_template not in ("auto", "r1", "none"):
            raise ValueError(f"--prompt-template must be auto, r1 or none, got {self.prompt_template!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout must be positive, got {self.timeout_s}")

    def completion_template(self) -> str | None:
        """The prompt template for /v1/completions: the R1 chat format for math datasets under `auto`."""
        from r1serve.bench.request import R1_TEMPLATE

        if self.endpoint != "completions" or self.prompt_template == "none":
            return None
        if self.prompt_template == "r1" or self.workload.name in ("gsm8k", "math500"):
            return R1_TEMPLATE
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (the API key is left out; infinite rates are written as the string "inf")."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "api_key"}
        out["workload"] = {**dataclasses.asdict(self.workload), "input_len": str(self.workload.input_len),
                           "output_len": str(self.workload.output_len) if self.workload.output_len else None,
                           "dataset_path": str(self.workload.dataset_path) if self.workload.dataset_path
                           else None}
        out["points"] = [point_dict(p) for p in self.points]
        out["urls"] = list(self.urls)
        out["output"] = str(self.output) if self.output else None
        out["api_key_set"] = self.api_key is not None
        return out


def point_dict(point: LoadPoint) -> dict[str, Any]:
    rate = point.request_rate
    return {"concurrency": point.concurrency, "request_rate": rate if math.isfinite(rate) else "inf",
            "num_prompts": point.num_prompts, "duration_s": point.duration_s}
