"""Prompt policies: how a problem becomes the chat messages sent to the server, so that they can be compared.

The R1 authors evaluate with the math instruction in the user turn and no system prompt (`paper`); users often
put the instruction in a system message instead (`system`), write it in Chinese (`paper-zh`), leave it out
(`none`), or write their own (`custom:TEMPLATE` with `{problem}`, or `custom-NAME:@file.txt`). Several
policies run in one evaluation on the same problems and seeds, so their accuracies can be compared pairwise.
Note that r1serve's server folds a system message into the first user turn (usage rule 1), so against it the
`system` policy means "instruction before the problem"; against other servers it is a real system segment.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from r1serve.prompts import MATH_PROMPT_EN, MATH_PROMPT_ZH, math_prompt

PLACEHOLDER = "{problem}"
BUILTIN_POLICIES = ("paper", "paper-zh", "system", "none")
_CUSTOM = re.compile(r"^custom(?:-(?P<name>[A-Za-z0-9_.]+))?:(?P<template>.*)$", re.DOTALL)

Message = dict[str, str]


class PolicyError(ValueError):
    """A policy string could not be understood; the message says which forms there are."""


@dataclass(frozen=True)
class PromptPolicy:
    """A named way to turn a problem into messages: an optional system text and a user template."""

    name: str
    user_template: str  # contains {problem} once
    system: str | None = None

    def __post_init__(self) -> None:
        if PLACEHOLDER not in self.user_template:
            raise PolicyError(f"policy {self.name!r}: the template must contain {PLACEHOLDER}")

    def messages(self, problem: str) -> list[Message]:
        """The chat messages for `problem` (plain substitution: LaTeX braces in templates stay as written)."""
        user = self.user_template.replace(PLACEHOLDER, problem)
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": user}]

    @property
    def fingerprint(self) -> str:
        """A short hash of what the policy sends; resumed samples must have been made with the same one."""
        text = f"{self.system or ''}\x00{self.user_template}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def builtin_policy(name: str) -> PromptPolicy:
    """One of `paper`, `paper-zh`, `system`, `none`."""
    if name == "paper":
        return PromptPolicy(name, math_prompt(PLACEHOLDER, "en"))
    if name == "paper-zh":
        return PromptPolicy(name, math_prompt(PLACEHOLDER, "zh"))
    if name == "system":
        return PromptPolicy(name, PLACEHOLDER, system=MATH_PROMPT_EN)
    if name == "none":
        return PromptPolicy(name, PLACEHOLDER)
    raise PolicyError(
        f"unknown policy {name!r}: use one of {', '.join(BUILTIN_POLICIES)}, "
        "custom:TEMPLATE (with {problem}), custom-NAME:TEMPLATE or custom-NAME:@file.txt"
    )


def parse_policy(spec: str) -> PromptPolicy:
    """A policy from its command-line form; `custom...:@path` reads the template from a file."""
    match = _CUSTOM.match(spec)
    if match is None:
        return builtin_policy(spec)
    name = "custom" + (f"-{match['name']}" if match["name"] else "")
    template = match["template"]
    if template.startswith("@"):
        path = Path(template[1:]).expanduser()
        if not path.is_file():
            raise PolicyError(f"policy {name!r}: template file not found: {path}")
        template = path.read_text(encoding="utf-8")
    return PromptPolicy(name, template)


def parse_policies(specs: list[str]) -> list[PromptPolicy]:
    """Several policies; two with the same name are an error (name them with custom-NAME:...)."""
    policies = [parse_policy(s) for s in specs]
    names = [p.name for p in policies]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PolicyError(f"policy names must be unique, repeated: {', '.join(duplicates)} "
                          "(name custom policies with custom-NAME:TEMPLATE)")
    return policies


__all__ = ["BUILTIN_POLICIES", "MATH_PROMPT_EN", "MATH_PROMPT_ZH", "PolicyError", "PromptPolicy",
           "parse_policies", "parse_policy"]
