"""One evaluation from start to end: load tasks and policies, check the server, resume, sample, summarize.

This is the order of operations and nothing more; each step lives in its own module. Everything that can be
wrong with the input (a dataset, a policy, the server, a resume with other settings) is found before the
first request, and every number written at the end is recomputed from `samples.jsonl` alone, so a resumed
or `--report-only` run reports exactly what a straight run would have.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1serve import __version__
from r1serve.client import AsyncLLMClient, ClientError
from r1serve.eval.config import EvalConfig
from r1serve.eval.datasets import Task, load_task
from r1serve.eval.grader_pool import GraderPool
from r1serve.eval.metrics import RunMetrics, run_metrics
from r1serve.eval.plots import write_plots
from r1serve.eval.policies import PromptPolicy, parse_policies
from r1serve.eval.probe import EvalSetupError, ServerModel, capped_max_tokens, probe_server
from r1serve.eval.records import LoadedSamples, SampleKey, SampleWriter, load_samples, settings_mismatch
from r1serve.eval.report import write_outputs
from r1serve.eval.runner import RunCounts, SampleRunner, SamplingSettings, WorkItem

SAMPLES_FILE = "samples.jsonl"
Log = Callable[[str], None]


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class EvalOutcome:
    """What a run produced: the metrics, the settings written with them, and where everything is."""

    metrics: RunMetrics
    settings: dict[str, Any]
    output_dir: Path
    counts: RunCounts = field(default_factory=RunCounts)
    notes: list[str] = field(default_factory=list)


def load_inputs(config: EvalConfig) -> tuple[list[Task], list[PromptPolicy]]:
    """Tasks and policies, with clear errors for bad files, fields or policy strings."""
    tasks = [load_task(name, data_dir=config.data_dir, problem_field=config.problem_field,
                       answer_field=config.answer_field, id_field=config.id_field,
                       answer_kind=config.answer_kind, limit=config.limit)  # type: ignore[arg-type]
             for name in config.task]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise EvalSetupError(f"two tasks share a name ({', '.join(names)}): name JSONL tasks with NAME=PATH")
    return tasks, parse_policies(list(config.policy))


def work_items(tasks: Sequence[Task], policies: Sequence[PromptPolicy], num_samples: int) -> list[WorkItem]:
    """Every (task, policy, problem, sample index) of the run, sample index outermost within a task, so
    that an interrupted run has whole sample sets rather than all samples of the first problems."""
    return [WorkItem(task, problem, policy, index) for task in tasks for index in range(num_samples)
            for policy in policies for problem in task.problems]


def _check_resume(loaded: LoadedSamples, selection: set[SampleKey], settings: SamplingSettings,
                  policies: Sequence[PromptPolicy]) -> None:
    done = [r for k, r in loaded.done().items() if k in selection]
    expected = {p.name: settings.generation(p) for p in policies}
    mismatches = settings_mismatch(done, expected)
    if mismatches:
        shown = "; ".join(mismatches[:5]) + (" ..." if len(mismatches) > 5 else "")
        raise EvalSetupError(f"the saved samples were made with other settings ({shown}): rerun with the same "
                             "settings to resume, or choose another --output-dir")


def _cap_note(config: EvalConfig, server: ServerModel, items: Sequence[WorkItem]) -> str | None:
    if server.max_model_len is None:
        return (f"the server does not report max_model_len: --max-tokens {config.max_tokens} is sent as is")
    caps = [capped_max_tokens(config.max_tokens, server.max_model_len, i.policy.messages(i.problem.problem))
            for i in items[:200]]
    if caps and min(caps) < config.max_tokens:
        return (f"--max-tokens {config.max_tokens} does not fit the server's context window of "
                f"{server.max_model_len} tokens: each request gets the window minus its (over-)estimated prompt, "
                f"{min(caps)} to {max(caps)} tokens here")
    return None


async def _server_notes(client: AsyncLLMClient) -> list[str]:
    try:
        info = await client.server_info()
    except ClientError:
        return []
    if info.dummy_weights:
        return ["the server runs random dummy weights (--load-format dummy): these accuracies test the pipeline, "
                "not the model"]
    return []


async def _sample(config: EvalConfig, tasks: list[Task], policies: list[PromptPolicy], out: Path,
                  log: Log) -> tuple[RunCounts, dict[str, Any], list[str]]:
    """Probe the server, skip what is done, run the rest; returns counts, server facts and notes."""
    client = AsyncLLMClient(config.base_url, api_key=config.api_key, model=config.model, timeout=config.timeout,
                            max_retries=config.max_retries, fold_system_prompt=False,
                            split_reasoning=config.split_reasoning)
    async with client:
        server = await probe_server(client, config.model)
        settings = SamplingSettings(server.model, config.temperature, config.top_p, config.max_tokens,
                                    config.max_thinking_tokens, config.seed, server.max_model_len, config.stream)
        items = work_items(tasks, policies, config.num_samples)
        loaded = load_samples(out / SAMPLES_FILE)
        _check_resume(loaded, {i.key for i in items}, settings, policies)
        done = loaded.done()
        pending = [i for i in items if i.key not in done]
        retried = sum(1 for i in pending if i.key in loaded.records)
        log(f"r1serve eval: {server.model} at {client.base_url}: {len(items)} samples, {len(items) - len(pending)} "
            f"already done, {len(pending)} to run ({retried} failed before and retried)")
        notes = [n for n in [_cap_note(config, server, pending or items)] if n] + await _server_notes(client)
        for note in notes:
            log(f"note: {note}")
        with GraderPool(config.grader_workers, config.grader_timeout) as grader, \
                SampleWriter(out / SAMPLES_FILE) as writer:
            runner = SampleRunner(client.chat_completion, grader, writer, settings,
                                  concurrency=config.concurrency, progress=config.progress)
            counts = await runner.run(pending)
    return counts, {"model": server.model, "max_model_len": server.max_model_len}, notes


def summarize(config: EvalConfig, tasks: list[Task], policies: list[PromptPolicy], out: Path,
              extra: dict[str, Any], notes: list[str]) -> tuple[RunMetrics, dict[str, Any], list[str]]:
    """Metrics of the selected samples in `samples.jsonl`; writes summary.json, report.md and the PNGs."""
    loaded = load_samples(out / SAMPLES_FILE)
    selection = {i.key for i in work_items(tasks, policies, config.num_samples)}
    ok = [r for k, r in loaded.done().items() if k in selection]
    failed = [r for k, r in loaded.failed().items() if k in selection]
    metrics = run_metrics(ok, failed, [t.name for t in tasks], [p.name for p in policies],
                          num_resamples=config.bootstrap_resamples, seed=config.seed)
    notes = list(notes)
    if failed:
        notes.append(f"{len(failed)} samples failed (recorded in {SAMPLES_FILE}, excluded from accuracy); "
                     "rerun the same command to retry them")
    if loaded.bad_lines:
        notes.append(f"{len(loaded.bad_lines)} unreadable lines in {SAMPLES_FILE} skipped (lines "
                     f"{', '.join(map(str, loaded.bad_lines[:10]))})")
    if any(r.tokens_estimated for r in ok):
        notes.append("the server does not count reasoning tokens: reasoning/answer tokens are estimated")
    if "model" not in extra and ok:
        extra = {**extra, "model": ok[0].generation.get("model")}
    settings = {**config.to_dict(), **extra, "data_sources": {t.name: t.source for t in tasks},
                "policy_templates": {p.name: {"system": p.system, "user": p.user_template} for p in policies},
                "r1serve_version": __version__}
    write_outputs(out, metrics, settings, notes)
    write_plots(metrics.groups, ok, out)
    return metrics, settings, notes


async def run_eval(config: EvalConfig, log: Log = log_stderr) -> EvalOutcome:
    """The whole evaluation; raises `EvalSetupError`/`DatasetError`/`PolicyError` before any request."""
    tasks, policies = load_inputs(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts, extra, notes = RunCounts(), {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, []
    if not config.report_only:
        counts, server_facts, notes = await _sample(config, tasks, policies, out, log)
        extra.update(server_facts)
    elif not (out / SAMPLES_FILE).exists():
        raise EvalSetupError(f"--report-only: no {out / SAMPLES_FILE} to report on")
    metrics, settings, notes = summarize(config, tasks, policies, out, extra, notes)
    return EvalOutcome(metrics, settings, out, counts, notes)
