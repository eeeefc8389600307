"""One evaluation from start to end: load tasks and policies, check the servers, resume, sample, summarize.

This is the order of operations and nothing more; each step lives in its own module. Several endpoints
(`--url` given more than once) each get the same work items, the same seeds and the same sampling settings,
and run side by side, each with its own `--concurrency`. Everything that can be wrong with the input (a
dataset, a policy, any server, a resume with other settings) is found before the first request, and every
number written at the end is recomputed from `samples.jsonl` alone, so a resumed or `--report-only` run
reports exactly what a straight run would have.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
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
from r1serve.eval.records import LoadedSamples, SampleWriter, load_samples, settings_mismatch
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


def work_items(tasks: Sequence[Task], policies: Sequence[PromptPolicy], num_samples: int,
               endpoint: str = "") -> list[WorkItem]:
    """Every (task, policy, problem, sample index) of the run at one endpoint, sample index outermost within
    a task, so that an interrupted run has whole sample sets rather than all samples of the first problems."""
    return [WorkItem(task, problem, policy, index, endpoint) for task in tasks for index in range(num_samples)
            for policy in policies for problem in task.problems]


@dataclass
class _Target:
    """One endpoint of the run: its client, the model it serves, its settings and its work."""

    label: str
    client: AsyncLLMClient
    server: ServerModel
    settings: SamplingSettings
    items: list[WorkItem]
    pending: list[WorkItem] = field(default_factory=list)

    def facts(self) -> dict[str, Any]:
        return {"label": self.label, "url": self.client.base_url, "model": self.server.model,
                "max_model_len": self.server.max_model_len}


def _check_resume(loaded: LoadedSamples, targets: Sequence[_Target], policies: Sequence[PromptPolicy]) -> None:
    mismatches = []
    for target in targets:
        selection = {i.key for i in target.items}
        done = [r for k, r in loaded.done().items() if k in selection]
        expected = {p.name: target.settings.generation(p) for p in policies}
        prefix = f"{target.label}: " if len(targets) > 1 else ""
        mismatches += [prefix + m for m in settings_mismatch(done, expected)]
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


async def _open_targets(config: EvalConfig, tasks: list[Task], policies: list[PromptPolicy],
                        stack: AsyncExitStack) -> list[_Target]:
    """A client per endpoint, each probed (reachable, serving the model) before any request is sent."""
    targets = []
    for label, url in config.endpoints:
        client = AsyncLLMClient(url, api_key=config.api_key, model=config.model, timeout=config.timeout,
                                max_retries=config.max_retries, fold_system_prompt=False,
                                split_reasoning=config.split_reasoning)
        await stack.enter_async_context(client)
        try:
            server = await probe_server(client, config.model)
        except EvalSetupError as e:
            raise EvalSetupError(f"{label}: {e}" if len(config.endpoints) > 1 else str(e)) from e
        settings = SamplingSettings(server.model, config.temperature, config.top_p, config.max_tokens,
                                    config.max_thinking_tokens, config.seed, server.max_model_len, config.stream)
        targets.append(_Target(label, client, server, settings,
                               work_items(tasks, policies, config.num_samples, label)))
    return targets


async def _plan(config: EvalConfig, target: _Target, loaded: LoadedSamples, several: bool, log: Log) -> list[str]:
    """Set the target's pending items, log what it will run; returns its notes."""
    done = loaded.done()
    target.pending = [i for i in target.items if i.key not in done]
    retried = sum(1 for i in target.pending if i.key in loaded.records)
    prefix = f"{target.label}: " if several else ""
    log(f"r1serve eval: {prefix}{target.server.model} at {target.client.base_url}: {len(target.items)} samples, "
        f"{len(target.items) - len(target.pending)} already done, {len(target.pending)} to run ({retried} failed "
        "before and retried)")
    notes = [n for n in [_cap_note(config, target.server, target.pending or target.items)] if n]
    notes = [prefix + n for n in notes + await _server_notes(target.client)]
    for note in notes:
        log(f"note: {note}")
    return notes


async def _sample(config: EvalConfig, tasks: list[Task], policies: list[PromptPolicy], out: Path,
                  log: Log) -> tuple[RunCounts, dict[str, Any], list[str]]:
    """Probe the servers, skip what is done, run the rest; returns counts, server facts and notes."""
    loaded = load_samples(out / SAMPLES_FILE, legacy_endpoint=config.endpoint_labels[0])
    async with AsyncExitStack() as stack:
        targets = await _open_targets(config, tasks, policies, stack)
        _check_resume(loaded, targets, policies)
        notes = [n for t in targets for n in await _plan(config, t, loaded, len(targets) > 1, log)]
        with GraderPool(config.grader_workers, config.grader_timeout) as grader, \
                SampleWriter(out / SAMPLES_FILE) as writer:
            runners = [SampleRunner(t.client.chat_completion, grader, writer, t.settings,
                                    concurrency=config.concurrency, progress=config.progress,
                                    desc=f"eval {t.label}" if len(targets) > 1 else "eval") for t in targets]
            results = await asyncio.gather(*(r.run(t.pending) for r, t in zip(runners, targets, strict=True)))
    counts = RunCounts(sum(c.num_ok for c in results), sum(c.num_errors for c in results))
    first = targets[0].server
    facts = {"model": first.model, "max_model_len": first.max_model_len, "endpoints": [t.facts() for t in targets]}
    return counts, facts, notes


def report_labels(config: EvalConfig, loaded: LoadedSamples) -> tuple[str, ...]:
    """The endpoints to report on: the run's own, or, for `--report-only` without `--label`, the one endpoint
    that `samples.jsonl` holds; several others there are an error (the order chooses the baseline)."""
    labels = config.endpoint_labels
    found = sorted({r.endpoint for r in loaded.records.values()})
    if config.label or not config.report_only or set(labels) <= set(found) or not found:
        return labels
    if len(found) == 1:
        return tuple(found)
    raise EvalSetupError(f"{SAMPLES_FILE} holds the endpoints {', '.join(found)}: name the ones to report with "
                         "--label, the baseline first")


def summarize(config: EvalConfig, tasks: list[Task], policies: list[PromptPolicy], out: Path,
              extra: dict[str, Any], notes: list[str]) -> tuple[RunMetrics, dict[str, Any], list[str]]:
    """Metrics of the selected samples in `samples.jsonl`; writes summary.json, report.md and the PNGs."""
    loaded = load_samples(out / SAMPLES_FILE, legacy_endpoint=config.endpoint_labels[0])
    labels = report_labels(config, loaded)
    selection = {i.key for label in labels for i in work_items(tasks, policies, config.num_samples, label)}
    ok = [r for k, r in loaded.done().items() if k in selection]
    failed = [r for k, r in loaded.failed().items() if k in selection]
    metrics = run_metrics(ok, failed, [t.name for t in tasks], [p.name for p in policies],
                          num_resamples=config.bootstrap_resamples, seed=config.seed, endpoints=labels)
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
