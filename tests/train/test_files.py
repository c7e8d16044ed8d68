"""train/files.py: the staging files of interrupted writes are removed on start, and nothing else."""

from __future__ import annotations

from train.files import atomic_dir, atomic_file, remove_orphans


def test_orphans_of_interrupted_writes_are_removed_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    orphans = [
        run / "stages/2step/0_adv_conditional/checkpoint-7.tmp/model.safetensors",  # save_checkpoint
        run / "stages/2step/final.tmp/unet.safetensors",  # atomic_dir (a final)
        run / "export/.tiny_lightning_2step_unet.safetensors.k3j2h1.tmp",  # atomic_file (an export)
        run / "export/.manifest.json.4242.tmp",  # a manifest being rewritten
        run / "samples/.2step_final.png.x8y7.tmp",  # a grid
        run / ".metrics.jsonl.tmp",
    ]
    kept = [
        run / "stages/2step/0_adv_conditional/checkpoint-6/model.safetensors",
        run / "export/tiny_lightning_2step_unet.safetensors",
        run / "notes.tmp.txt",  # a user's file that only looks like one
        run / "wandb/run-1/files/output.log.tmp",  # wandb's own folder is not walked
    ]
    for path in orphans + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    removed = remove_orphans(run)
    staged = [p.parent if p.parent.name.endswith(".tmp") else p for p in orphans]  # folders whole
    assert sorted(removed) == sorted(staged)
    assert not any(p.exists() for p in staged)
    assert all(p.is_file() for p in kept)
    assert remove_orphans(run) == []


def test_atomic_writes_leave_no_orphan_when_they_complete(tmp_path):
    with atomic_file(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    with atomic_dir(tmp_path / "final") as tmp:
        (tmp / "unet.safetensors").write_text("x")
    assert remove_orphans(tmp_path) == []
    assert (tmp_path / "a.json").is_file() and (tmp_path / "final" / "unet.safetensors").is_file()
