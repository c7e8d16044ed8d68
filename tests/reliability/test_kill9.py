"""kill -9 at seeded random moments (during steps, checkpoint writes, finals and exports), then
the same command again: the exports are bitwise equal to an uninterrupted run's, and nothing
is ever set aside as damaged (a killed write never leaves a published file torn).

The default run kills one run twice; `-m slow` runs five more trials of two kills each (N = 10).
The k-th kill of a trial falls within the first 0.6/k of the work (after the run has locked its
directory, so not in the imports), and every kill must land before the run ends.
About half the moments are "write" moments: after a random delay the test waits for a staging file
or folder (`*.tmp`: a checkpoint, final, export or manifest being written) and kills then.
"""

from __future__ import annotations

import pytest
from faults import (
    export_differences,
    kill_at,
    reference_run,
    run_train,
    seeded_moments,
    start_train,
)

pytestmark = pytest.mark.e2e
KILLS_PER_TRIAL = 2


@pytest.fixture(scope="module")
def reference(digits_cache, tmp_path_factory):
    return reference_run(digits_cache, tmp_path_factory)


def _trial(reference, tmp_path, seed: int) -> list[str]:
    out = tmp_path / "run"
    moments = seeded_moments(seed, KILLS_PER_TRIAL, reference.work_s)
    report = []
    for moment in moments:
        proc = start_train(reference.config, out, reference.cache, log=tmp_path / "killed.log")
        report.append(f"{moment.kind}@{moment.at_s:.1f}s: {kill_at(proc, out, moment)}")
    result = run_train(reference.config, out, reference.cache)
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"seed {seed}: " + "; ".join(report))
    assert export_differences(reference.run, out) == [], report
    assert not list(out.rglob("*.corrupt*")), "a kill left a damaged published file"
    assert "is damaged" not in result.stderr
    assert all("killed at" in r for r in report), report  # every kill landed before the end
    return report


def test_two_kills_then_rerun_give_bitwise_equal_exports(reference, tmp_path):
    _trial(reference, tmp_path, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_more_seeded_kills_give_bitwise_equal_exports(reference, tmp_path, seed):
    _trial(reference, tmp_path, seed)
