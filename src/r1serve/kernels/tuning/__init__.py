"""Measured kernel configs as data: one JSON file per (kernel, device) in this folder, written by the sweep
scripts and read once, on a kernel's first lookup.

Why: a config table is a measurement, not code. A file says what was measured where and how (device, date,
commit, command) and carries each entry's timings, so a new device's sweep adds a file instead of editing a
kernel module, and the kernels hold only the rules for shapes nobody measured. A file's `entries` are
{key fields..., "config": {...} or null, "us": ..., "baseline_us": ...}: `config` is what runs for that key
(null: the alternative the sweep compared against, e.g. cuBLAS, was faster), `us` the config's time and
`baseline_us` the alternative's, null where unrecorded. A device's own file is looked up first; a file marked
`"fallback": true` serves every device for the keys its own file lacks.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

__all__ = ["TUNING_DIR", "TuningTable", "device_slug", "dumps", "write_tuning_file"]

TUNING_DIR = Path(__file__).resolve().parent
C = TypeVar("C")
_ABSENT = object()


def device_slug(device: str) -> str:
    """A device name as a file name part: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "any"


class TuningTable(Generic[C]):
    """One kernel's measured configs per device, keyed by a tuple of the entries' `key_fields`; `parse` turns an
    entry's config dict into the kernel's config object (once, at load)."""

    def __init__(self, kernel: str, key_fields: tuple[str, ...], parse: Callable[[dict[str, Any]], C],
                 directory: Path = TUNING_DIR) -> None:
        self.kernel, self.key_fields, self.parse, self.directory = kernel, key_fields, parse, directory
        self._tables: dict[str, dict[tuple, C | None]] | None = None
        self._fallback = ""

    def _load(self) -> dict[str, dict[tuple, C | None]]:
        if self._tables is None:
            self._tables = {}
            for path in sorted(self.directory.glob(f"{self.kernel}-*.json")):
                data = json.loads(path.read_text())
                if data.get("kernel") != self.kernel:
                    raise ValueError(f"{path}: kernel {data.get('kernel')!r}, expected {self.kernel!r}")
                self._tables[data["device"]] = {self._key(e, path): self._config(e) for e in data["entries"]}
                if data.get("fallback"):
                    self._fallback = data["device"]
        return self._tables

    def _key(self, entry: dict[str, Any], path: Path) -> tuple:
        missing = [f for f in self.key_fields if f not in entry]
        if missing:
            raise ValueError(f"{path}: an entry lacks {missing}: {entry}")
        return tuple(entry[f] for f in self.key_fields)

    def _config(self, entry: dict[str, Any]) -> C | None:
        return None if entry.get("config") is None else self.parse(entry["config"])

    def lookup(self, device: str, key: tuple, own: bool = False) -> tuple[bool, C | None]:
        """(measured, config): the device's own entry, else (unless `own`) the fallback file's; (False, None) if
        none has the key (the kernel's rule applies)."""
        tables = self._load()
        for name in (device,) if own else (device, self._fallback):
            found = tables.get(name, {}).get(key, _ABSENT)
            if found is not _ABSENT:
                return True, found  # type: ignore[return-value]
        return False, None

    def override(self, device: str, entries: dict[tuple, C | None]) -> Callable[[], None]:
        """Replaces this device's entries for the given keys in this process (a benchmark's variant or a sweep's
        result); returns how to restore them."""
        table = self._load().setdefault(device, {})
        old = dict(table)
        table.update(entries)

        def restore() -> None:
            table.clear()
            table.update(old)
        return restore


def _head_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_tuning_file(kernel: str, device: str, command: str, entries: Iterable[dict[str, Any]],
                      directory: Path = TUNING_DIR, fallback: bool | None = None,
                      keep: Callable[[dict[str, Any]], bool] | None = None) -> Path:
    """Writes `<kernel>-<device slug>.json` with today's date and the checkout's commit, making the directory if it
    is missing; returns its path. With `keep`, the entries of the device's existing file for which it is true
    come first and its command is followed by this one (a sweep of some shapes or rows adds to the file instead
    of replacing it). `fallback` None keeps what the existing file says (False for a new file)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / f"{kernel}-{device_slug(device)}.json"
    entries = list(entries)
    old = json.loads(path.read_text()) if path.exists() else None
    if fallback is None:
        fallback = bool(old and old.get("fallback"))
    if keep is not None and old is not None:
        entries = [e for e in old["entries"] if keep(e)] + entries
        if not old["command"].endswith(command):  # (a second write of the same run: one mention)
            command = f"{old['command']} ; then {command}"
        else:
            command = old["command"]
    data = {"kernel": kernel, "device": device, "date": datetime.date.today().isoformat(),
            "commit": _head_commit(directory), "command": command, "fallback": fallback, "entries": entries}
    path.write_text(dumps(data))
    return path


def dumps(data: dict[str, Any]) -> str:
    """A tuning file's text: one line per field, one line per entry (diffs show which entries changed)."""
    head = [f" {json.dumps(name)}: {json.dumps(value)}," for name, value in data.items() if name != "entries"]
    rows = ",\n".join(f"  {json.dumps(entry)}" for entry in data["entries"])
    return "{\n" + "\n".join(head) + f'\n "entries": [\n{rows}\n ]\n}}\n'
