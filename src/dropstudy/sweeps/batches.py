"""A sweep trained as batches: its grid points in batches of at most sweep.max_members members,
each batch one `execute.train_members` call; and `dropstudy resume SWEEP_DIR` of such a sweep,
each unfinished batch continuing as the batch it was."""

from __future__ import annotations

from pathlib import Path

from dropstudy.runs.execute import Batch, Member, RunResult, train_members
from dropstudy.store.rundir import ENDED, RunDir, batch_record


def sweep_batches(sweep_dir: Path) -> list[list[Path]]:
    """The batches of a batched sweep under `sweep_dir`, each its members' run dirs in order
    (from each member's provenance.json); [] when it holds no batched members."""
    found: dict[int, list[Path]] = {}
    for provenance in sorted(sweep_dir.glob("*/provenance.json")):
        batch = batch_record(RunDir.existing(provenance.parent).read_provenance())
        if batch and "run_dirs" in batch:
            found.setdefault(batch["number"], [sweep_dir / d for d in batch["run_dirs"]])
    return [found[n] for n in sorted(found)]


def sweep_of_member(run_dir: Path) -> Path | None:
    """The sweep dir when `run_dir` is a member of a batched sweep, else None."""
    batch = batch_record(RunDir.existing(run_dir).read_provenance())
    if not batch or "run_dirs" not in batch:
        return None
    sweep_dir = run_dir
    for _ in Path(batch["run_dirs"][batch["index"]]).parts:
        sweep_dir = sweep_dir.parent
    return sweep_dir


def resume_batch(run_dirs: list[Path]) -> list[RunResult]:
    """Continue an interrupted batch as the batch it was: every member from its checkpoint, the
    diverged and finished ones along but off the record, so the result equals a batch that never
    stopped. RunDirError when a member's record cannot be used (nothing is changed then)."""
    members = []
    for run_dir in run_dirs:
        run = RunDir.existing(run_dir)
        members.append(Member(run.read_config(), run_dir, run.read_overrides()))
    provenance = batch_record(RunDir.existing(run_dirs[0]).read_provenance()) or {"number": 0}
    return train_members(members, Batch(group=provenance.get("group"), extra_tags=("sweep",),
                                        sweep=(provenance["number"], run_dirs[0].parent)), resume=True)


def resume_sweep(batches: list[list[Path]]) -> list[RunResult]:
    """`dropstudy resume SWEEP_DIR` of a batched sweep (its `sweep_batches`): every batch with a
    member that has not finished continues as the batch it was; a batch that ended is left alone."""
    results: list[RunResult] = []
    for run_dirs in batches:
        if all(RunDir.existing(d).read_status()[0] in ENDED for d in run_dirs):
            continue
        batch_results = resume_batch(run_dirs)
        results.extend(batch_results)
        if any(r.status == "interrupted" for r in batch_results):
            break
    return results
