"""The `r1serve` command: one entry point whose subcommands each live in the module that owns the job.

Each subcommand module exposes `main(argv: list[str] | None) -> int`; this file only dispatches, so that
`r1serve chat` does not pay for importing the engine and `r1serve serve --help` lists the server's own flags.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("r1serve.server.cli", "start the OpenAI-compatible server"),
    "chat": ("r1serve.client.chat_cli", "chat with a running server in the terminal"),
    "check": ("r1serve.client.check", "verify a running deployment"),
    "eval": ("r1serve.eval.cli", "measure accuracy on GSM8K / MATH-500 / AIME 2024"),
    "bench": ("r1serve.bench.cli", "measure serving performance of OpenAI-compatible endpoints"),
}


def _usage() -> str:
    lines = ["usage: r1serve <command> [options]", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `r1serve <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from r1serve import __version__

        print(__version__)
        return 0
    if args[0] not in SUBCOMMANDS:
        print(f"r1serve: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[args[0]][0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
