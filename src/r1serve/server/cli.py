"""`r1serve serve` (and `python -m r1serve.server`): command-line flags generated from `ServerSettings`.

Each field of `ServerSettings` becomes one flag (`max_model_len` -> `--max-model-len`, booleans also get a
`--no-...` form, lists are repeatable, literals list their choices), with the field's description and
default as its help. Only the flags given are passed on, so the defaults live in one place; the settings
model then validates them together and a problem is reported as a usage error naming the flag (exit 2).
"""

from __future__ import annotations

import argparse
import difflib
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from r1serve.server.settings import ServerSettings

PROG = "r1serve serve"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """`X | None` -> X."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else str
    return annotation


def _argument_kwargs(info: FieldInfo) -> dict[str, Any]:
    """argparse keyword arguments for one settings field."""
    annotation = _base_type(info.annotation)
    default = [] if info.default_factory is not None else info.default
    shown = "off" if default is None or default == [] else default
    help_ = info.description or ""
    if "default" not in help_:
        help_ += f" (default: {shown})"
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_.replace("%", "%%")}
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif get_origin(annotation) is list:  # repeatable, and several values after one flag (as vLLM takes them)
        kwargs.update(action="extend", nargs="+", type=get_args(annotation)[0], metavar="NAME")
    elif get_origin(annotation) is Literal:
        kwargs["choices"] = list(get_args(annotation))
    else:
        kwargs["type"] = str if annotation is Path else annotation
    return kwargs


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line naming the problem (not the whole usage), exit status 2; an unknown flag comes with the
        closest known one."""
        if message.startswith("unrecognized arguments:"):
            message += self._suggestion(message.split(":", 1)[1].split())
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def _suggestion(self, words: list[str]) -> str:
        known = [flag for action in self._actions for flag in action.option_strings]
        for word in (w.split("=", 1)[0] for w in words if w.startswith("--")):
            close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
            if close:
                return f"; did you mean {close[0]}?"
        return ""


def build_parser() -> argparse.ArgumentParser:
    """The parser of `r1serve serve`, one flag per `ServerSettings` field."""
    parser = _Parser(
        prog=PROG, description="OpenAI-compatible server for DeepSeek-R1-Distill-Qwen, with the R1 usage rules "
                               "built in (docs/serving.md).")
    for name, info in ServerSettings.model_fields.items():
        parser.add_argument(_flag(name), dest=name, **_argument_kwargs(info))
    return parser


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        loc = item.get("loc") or ()
        lines.append(f"{_flag(str(loc[0]))}: {message}" if loc else message)
    return "; ".join(lines)


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    """`ServerSettings` from command-line flags; exits with status 2 and a message naming the flag if invalid."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    try:
        return ServerSettings(**given)
    except (ValidationError, ValueError) as exc:
        parser.error(_explain(exc) if isinstance(exc, ValidationError) else str(exc))
        raise  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> int:
    """Entry point of `r1serve serve`: parse the flags, then run the server until it is stopped."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        settings = parse_settings(args)
    except SystemExit as exc:  # --help, or a usage error already printed
        return int(exc.code or 0)
    if settings.data_parallel_size > 1:  # N replicas of this command behind a router
        from r1serve.server.data_parallel import run_data_parallel

        return run_data_parallel(settings, args)
    from r1serve.server.launcher import run_server

    return run_server(settings)
