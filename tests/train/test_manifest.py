"""train/manifest.py on real files: a manifest lists every file with its size and hash, and
finds each kind of damage; the export folder's manifest is kept file by file; set_aside keeps
what it moves."""

from __future__ import annotations

import json

from train.files import set_aside
from train.manifest import (
    MANIFEST_FILE,
    file_problem,
    manifest_problems,
    update_manifest,
    write_manifest,
)


def _folder(tmp_path):
    folder = tmp_path / "final"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"a" * 1000)
    (folder / "sub" / "b.json").write_text('{"step": 3}')
    write_manifest(folder)
    return folder


def test_manifest_lists_every_file_and_finds_each_damage(tmp_path):
    folder = _folder(tmp_path)
    recorded = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    assert sorted(recorded) == ["a.bin", "sub/b.json"] and recorded["a.bin"]["size"] == 1000
    assert manifest_problems(folder) == []
    (folder / "a.bin").write_bytes(b"a" * 999 + b"b")  # same size, one byte changed
    assert manifest_problems(folder) == ["a.bin: contents differ from the manifest's hash (garbled)"]
    (folder / "a.bin").write_bytes(b"a" * 10)
    assert manifest_problems(folder) == ["a.bin: 10 bytes, the manifest says 1000"]
    (folder / "sub" / "b.json").unlink()
    assert "b.json: missing" in manifest_problems(folder)
    (folder / MANIFEST_FILE).write_text("{not json")
    assert manifest_problems(folder) == [f"{MANIFEST_FILE}: unreadable"]
    (folder / MANIFEST_FILE).unlink()
    assert manifest_problems(folder) == [f"{MANIFEST_FILE}: missing"]
    assert manifest_problems(tmp_path / "nothing") == ["nothing: missing"]


def test_export_manifest_is_kept_file_by_file(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    one, two = export / "one.safetensors", export / "two.json"
    one.write_bytes(b"1" * 100)
    two.write_text("{}")
    update_manifest(export, add=[one, two])
    assert file_problem(one) is None and file_problem(two) is None
    update_manifest(export, drop=[one])  # about to be replaced: unlisted meanwhile, not stale
    one.write_bytes(b"2" * 50)
    assert file_problem(one) is None
    update_manifest(export, add=[one])
    one.write_bytes(b"3" * 50)
    assert file_problem(one) == "one.safetensors: contents differ from the manifest's hash (garbled)"
    two.unlink()
    assert file_problem(two) == "two.json: missing"
    assert file_problem(tmp_path / "elsewhere.safetensors") == "elsewhere.safetensors: missing"


def test_set_aside_keeps_every_copy(tmp_path):
    for n in range(3):
        (tmp_path / "checkpoint-4").mkdir()
        (tmp_path / "checkpoint-4" / "n").write_text(str(n))
        set_aside(tmp_path / "checkpoint-4")
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["checkpoint-4.corrupt", "checkpoint-4.corrupt-2", "checkpoint-4.corrupt-3"]
    assert (tmp_path / "checkpoint-4.corrupt-3" / "n").read_text() == "2"
