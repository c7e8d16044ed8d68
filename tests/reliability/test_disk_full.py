"""A full disk, for real: a small tmpfs mounted in a private user and mount namespace
(`unshare --user --map-root-user --mount`; skipped where the machine does not allow it).

Default: a checkpoint that does not fit raises DiskFull, removes its staging folder and leaves
the previous checkpoint intact (it still verifies). Slow: a whole run on a too-small disk stops
with one line and exit status 2, the checkpoint it published still verifies, and once the
disk is larger the same command finishes with exports bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import subprocess_env
from faults import export_differences, one_line_error, reference_run, train_cmd

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _in_small_disk(mount: Path, size_mb: int, script: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `script` (sh) with a `size_mb` tmpfs mounted at `mount`, in a private namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    mount.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs {mount} && umount {mount}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f"mount -t tmpfs -o size={size_mb}m tmpfs {mount} && {script}"],
                          cwd=ROOT, env=subprocess_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=timeout)


CHECKPOINT_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from accelerate import Accelerator
    from train.checkpoint import Counters, complete_checkpoints, save_checkpoint
    from train.errors import DiskFull
    from train.manifest import manifest_problems

    phase_dir = Path(sys.argv[1]) / "stages/8step/0_mse"
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(512, 512)  # 1 MiB of weights, ~3 MiB with Adam's state
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(2, 512)).sum().backward()
    optimizer.step()
    save_checkpoint(accelerator, phase_dir, Counters(0, 1, 0, 0), keep_last=1)
    try:
        save_checkpoint(accelerator, phase_dir, Counters(0, 2, 0, 0), keep_last=1)
        error = None
    except DiskFull as err:
        error = str(err)
    print(json.dumps({"error": error, "left": sorted(p.name for p in phase_dir.iterdir()),
                      "published": [s for s, _ in complete_checkpoints(phase_dir)],
                      "problems": manifest_problems(phase_dir / "checkpoint-1")}))
""")


def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one_intact(tmp_path):
    script = tmp_path / "checkpoint.py"
    script.write_text(CHECKPOINT_SCRIPT)
    mount = tmp_path / "disk"
    result = _in_small_disk(mount, 5, f"{sys.executable} {script} {mount}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["error"] and report["error"].startswith("no space left on device (writing ")
    assert "it resumes from the last complete checkpoint, which is intact" in report["error"]
    assert report["left"] == ["checkpoint-1"]  # no staging folder left behind
    assert report["published"] == [1] and report["problems"] == []


@pytest.fixture(scope="module")
def reference(digits_cache, tmp_path_factory):
    return reference_run(digits_cache, tmp_path_factory)


@pytest.mark.slow
def test_a_run_on_a_full_disk_stops_in_one_line_and_resumes_when_space_returns(reference, tmp_path):
    mount, saved = tmp_path / "disk", tmp_path / "saved"
    run = mount / "run"
    cmd = " ".join(train_cmd(reference.config, run, reference.cache))
    verify = (f"{sys.executable} -c \"import json, sys; from pathlib import Path; "
              f"from train.manifest import manifest_problems; "
              f"print(json.dumps({{str(p): manifest_problems(p) for p in Path('{run}').rglob('checkpoint-*') "
              f"if p.is_dir() and p.name.split('-')[-1].isdigit()}}))\"")
    script = (f"{cmd} 2> {tmp_path}/full.err; echo $? > {tmp_path}/full.rc; "
              f"{verify} > {tmp_path}/checkpoints.json; "
              f"mount -o remount,size=400m {mount} && "
              f"{cmd} 2> {tmp_path}/resumed.err; echo $? > {tmp_path}/resumed.rc; "
              f"cp -a {run} {saved}")
    # The 8-step stage and the shared files take ~6 MB, a checkpoint of the 2-step stage's first
    # phase ~10 MB: checkpoint-1 fits in 21 MB, checkpoint-2 does not.
    result = _in_small_disk(mount, 21, script)
    assert result.returncode == 0, result.stderr[-3000:]
    full_err = (tmp_path / "full.err").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "2", full_err[-3000:]
    line = one_line_error(full_err)
    assert line.startswith("error: no space left on device (writing "), line
    checkpoints = json.loads((tmp_path / "checkpoints.json").read_text())
    assert checkpoints and all(problems == [] for problems in checkpoints.values()), checkpoints
    resumed_err = (tmp_path / "resumed.err").read_text()
    assert (tmp_path / "resumed.rc").read_text().strip() == "0", resumed_err[-3000:]
    print("full disk stopped at:", line, "| checkpoints kept:", sorted(checkpoints))
    assert export_differences(reference.run, saved) == []
