"""Kernel tuning as data: the files the sweeps write are read back as the kernels' tables (CPU, no Triton)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1serve.kernels.triton_linear import SKINNY_TABLE, SkinnyConfig
from r1serve.kernels.tuning import TUNING_DIR, TuningTable, device_slug, write_tuning_file


def _table(directory: Path) -> TuningTable[SkinnyConfig]:
    return TuningTable("skinny", ("form", "n", "k", "m"), lambda fields: SkinnyConfig(**fields), directory)


def _entry(m: int, config: dict | None) -> dict:
    return {"form": "plain", "n": 64, "k": 128, "m": m, "config": config, "us": 1.5, "baseline_us": 2.0}


def test_a_written_file_is_read_back_with_its_provenance(tmp_path: Path) -> None:
    path = write_tuning_file("skinny", "NVIDIA X1", "python sweep.py", [_entry(1, {"block_n": 2, "block_k": 256}),
                                                                         _entry(2, None)], tmp_path)
    assert path.name == "skinny-nvidia-x1.json"
    data = json.loads(path.read_text())
    assert data["device"] == "NVIDIA X1" and data["command"] == "python sweep.py" and len(data["date"]) == 10
    assert "commit" in data and data["entries"][0]["us"] == 1.5
    table = _table(tmp_path)
    assert table.lookup("NVIDIA X1", ("plain", 64, 128, 1)) == (True, SkinnyConfig(2, 256))
    assert table.lookup("NVIDIA X1", ("plain", 64, 128, 2)) == (True, None)  # measured: the alternative won
    assert table.lookup("NVIDIA X1", ("plain", 64, 128, 4)) == (False, None)  # not measured: the rule
    assert table.lookup("NVIDIA X2", ("plain", 64, 128, 1)) == (False, None)  # another device, no fallback


def test_a_sweep_writes_into_a_directory_it_makes(tmp_path: Path) -> None:
    path = write_tuning_file("quant", "NVIDIA X1", "sweep", [_entry(1, None)], tmp_path / "new" / "tuning")
    assert path.parent == tmp_path / "new" / "tuning" and json.loads(path.read_text())["entries"]


def test_a_partial_sweep_merges_into_the_device_file(tmp_path: Path) -> None:
    write_tuning_file("skinny", "NVIDIA X1", "first", [_entry(1, {"block_n": 2, "block_k": 256}),
                                                       _entry(2, {"block_n": 4, "block_k": 256})], tmp_path)
    path = write_tuning_file("skinny", "NVIDIA X1", "second", [_entry(2, None), _entry(4, None)], tmp_path,
                             keep=lambda e: e["m"] not in (2, 4))
    data = json.loads(path.read_text())
    assert data["command"] == "first ; then second"
    assert sorted((e["m"], e["config"]) for e in data["entries"]) == [
        (1, {"block_n": 2, "block_k": 256}), (2, None), (4, None)]
    again = write_tuning_file("skinny", "NVIDIA X1", "second", [_entry(4, None)], tmp_path, keep=lambda e: e["m"] != 4)
    assert json.loads(again.read_text())["command"] == "first ; then second"  # one run writing twice
    replaced = write_tuning_file("skinny", "NVIDIA X1", "third", [_entry(8, None)], tmp_path)
    assert [e["m"] for e in json.loads(replaced.read_text())["entries"]] == [8]  # without merge_keys: replaced


def test_the_fallback_file_serves_devices_without_their_own_entry(tmp_path: Path) -> None:
    write_tuning_file("skinny", "NVIDIA A", "a", [_entry(1, {"block_n": 4, "block_k": 512})], tmp_path,
                      fallback=True)
    write_tuning_file("skinny", "NVIDIA B", "b", [_entry(1, None)], tmp_path)
    table = _table(tmp_path)
    assert table.lookup("NVIDIA B", ("plain", 64, 128, 1)) == (True, None)
    assert table.lookup("NVIDIA C", ("plain", 64, 128, 1)) == (True, SkinnyConfig(4, 512))


def test_a_sweep_rewriting_the_fallback_file_keeps_it_the_fallback(tmp_path: Path) -> None:
    write_tuning_file("skinny", "NVIDIA A", "a", [_entry(1, None)], tmp_path, fallback=True)
    path = write_tuning_file("skinny", "NVIDIA A", "b", [_entry(2, None)], tmp_path, keep=lambda e: e["m"] != 2)
    assert json.loads(path.read_text())["fallback"] is True
    path = write_tuning_file("skinny", "NVIDIA A", "c", [_entry(2, None)], tmp_path, fallback=False)
    assert json.loads(path.read_text())["fallback"] is False
    assert json.loads(write_tuning_file("skinny", "NVIDIA N", "n", [], tmp_path).read_text())["fallback"] is False


def test_an_override_is_restored(tmp_path: Path) -> None:
    table = _table(tmp_path)
    restore = table.override("NVIDIA A", {("plain", 1, 2, 1): SkinnyConfig(1, 64)})
    assert table.lookup("NVIDIA A", ("plain", 1, 2, 1)) == (True, SkinnyConfig(1, 64))
    restore()
    assert table.lookup("NVIDIA A", ("plain", 1, 2, 1)) == (False, None)


def test_a_file_of_another_kernel_or_without_a_key_field_is_refused(tmp_path: Path) -> None:
    (tmp_path / "skinny-x.json").write_text(json.dumps({"kernel": "quant", "device": "x", "entries": []}))
    with pytest.raises(ValueError, match="expected 'skinny'"):
        _table(tmp_path).lookup("x", ("plain", 1, 1, 1))
    (tmp_path / "skinny-x.json").write_text(json.dumps({"kernel": "skinny", "device": "x", "entries": [{"n": 1}]}))
    with pytest.raises(ValueError, match="lacks"):
        _table(tmp_path).lookup("x", ("plain", 1, 1, 1))


def test_the_committed_files_carry_provenance_and_parse() -> None:
    files = sorted(TUNING_DIR.glob("*.json"))
    assert {p.name for p in files} >= {"skinny-nvidia-h100-80gb-hbm3.json", "skinny-nvidia-h200.json"}
    for path in files:
        data = json.loads(path.read_text())
        assert {"kernel", "device", "date", "commit", "command", "entries"} <= data.keys(), path
        assert path.name == f"{data['kernel']}-{device_slug(data['device'])}.json"
        assert sum(json.loads(p.read_text()).get("fallback", False) for p in files if p.name.startswith(
            data["kernel"])) <= 1
    assert SKINNY_TABLE.lookup("NVIDIA H200", ("plain", 17920, 1536, 1)) == (True, SkinnyConfig(1, 2048, tiles=16))
