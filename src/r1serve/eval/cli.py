"""`r1serve eval`: parse the options, run the evaluation, print the table and the reproduction line.

Exit codes: 0 done (even if some requests failed: they are counted in the table and retried on a rerun),
2 bad input or an unusable server (one clear line on stderr), 130 interrupted by Ctrl-C (what finished is
saved; the same command resumes).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from r1serve.eval.config import EvalConfig, parse_config
from r1serve.eval.datasets import DatasetError
from r1serve.eval.evaluate import SAMPLES_FILE, run_eval
from r1serve.eval.policies import PolicyError
from r1serve.eval.probe import EvalSetupError
from r1serve.eval.records import load_samples
from r1serve.eval.report import reproduction_line, terminal_report

EXIT_INTERRUPTED = 130


def _interrupted_message(config: EvalConfig) -> str:
    path = Path(config.output_dir) / SAMPLES_FILE
    try:
        num_done = len(load_samples(path).done())
    except OSError:
        num_done = 0
    return (f"\nr1serve eval: interrupted. {num_done} finished samples are saved in {path}; "
            "run the same command again to resume.")


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(sys.argv[1:] if argv is None else list(argv))
    except ValueError as e:
        print(f"r1serve eval: {e}", file=sys.stderr)
        return 2
    try:
        outcome = asyncio.run(run_eval(config))
    except KeyboardInterrupt:
        print(_interrupted_message(config), file=sys.stderr)
        return EXIT_INTERRUPTED
    except (EvalSetupError, DatasetError, PolicyError) as e:
        print(f"r1serve eval: {e}", file=sys.stderr)
        return 2
    print(terminal_report(outcome.metrics))
    for note in outcome.notes:
        print(f"note: {note}")
    print(f"report: {outcome.output_dir / 'report.md'}")
    print(reproduction_line(outcome.metrics, outcome.settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
