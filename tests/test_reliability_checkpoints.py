"""Fault injection into training checkpoints: damaged, truncated and missing files, a half-deleted checkpoint, a
kill during pruning, and the fsync order of a checkpoint write. Each resumed run must skip exactly the damaged
checkpoint (saying which and why), resume from the newest one that verifies, and end with the weights of an
uninterrupted run."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.checkpoint import MANIFEST, list_checkpoints, step_dirs, verify
from train.config import load_config
from train.parallel import DistInfo

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "configs" / "ci_tiny.yaml"
# 8 steps, a checkpoint every 2: the run directory ends with step_00000004, step_00000006 and final/
RUN = {"parallel.strategy": "none", "train.max_steps": 8, "run.save_every": 2, "run.keep_last": 2}
NEWEST, OLDER = "step_00000006", "step_00000004"
ONE_PROCESS = DistInfo(0, 0, 1, torch.device("cpu"), False)


def train_in_process(out: Path, **overrides) -> Path:
    from train.crossbatch import train

    return train(load_config(CI, {**RUN, "run.out_dir": str(out), **overrides}))


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(run: Path, reference: Path) -> None:
    got, want = load_file(run / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = train_in_process(tmp_path_factory.mktemp("uninterrupted") / "run")
    assert [s for s, _ in list_checkpoints(run)] == [4, 6]
    return run


def copy_run(uninterrupted: Path, tmp_path: Path) -> Path:
    """The uninterrupted run as it stood when its process died after the last checkpoint (no final/ yet)."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    shutil.rmtree(run / "final")
    return run


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


FAULTS = {
    "shard-byte-flipped": (lambda c: flip_byte(c / "dcp" / "__0_0.distcp"), "does not match its sha256"),
    "shard-truncated": (lambda c: truncate(c / "dcp" / "__0_0.distcp"), "dcp/__0_0.distcp has"),
    "shard-deleted": (lambda c: (c / "dcp" / "__0_0.distcp").unlink(), "dcp/__0_0.distcp is missing"),
    "dcp-metadata-byte-flipped": (lambda c: flip_byte(c / "dcp" / ".metadata"), "dcp/.metadata does not match"),
    "rank0-truncated": (lambda c: truncate(c / "rank0.pt"), "rank0.pt has"),
    "trainer-truncated": (lambda c: truncate(c / "trainer.pt"), "trainer.pt has"),
    "manifest-missing": (lambda c: (c / MANIFEST).unlink(), "has no manifest.json"),
    "manifest-truncated": (lambda c: truncate(c / MANIFEST), "manifest.json is unreadable"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_resume_skips_a_damaged_newest_checkpoint(fault, uninterrupted, tmp_path, caplog):
    damage, reason = FAULTS[fault]
    run = copy_run(uninterrupted, tmp_path)
    damage(run / NEWEST)
    assert verify(run / NEWEST, ONE_PROCESS) is not None and verify(run / OLDER, ONE_PROCESS) is None
    with caplog.at_level(logging.INFO):
        train_in_process(run, **{"run.resume": True})
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and NEWEST in skipped[0] and reason in skipped[0], skipped
    assert any(r.getMessage() == "resumed from step 4" for r in caplog.records)
    assert steps(run) == list(range(1, 9))  # steps 5-8 re-run once each
    assert_same_weights(run, uninterrupted)
    if fault.startswith("manifest-missing"):
        assert not (run / f"{NEWEST}.damaged").exists()  # not proven damaged: replaced by the rerun's own save
    else:
        assert verify(run / f"{NEWEST}.damaged", ONE_PROCESS) is not None  # kept for inspection, never listed
    assert [s for s, _ in list_checkpoints(run)] == [4, 6]  # step 6 written again by the resumed run


def test_resume_refuses_when_no_checkpoint_verifies(uninterrupted, tmp_path):
    run = copy_run(uninterrupted, tmp_path)
    flip_byte(run / NEWEST / "dcp" / "__0_0.distcp")
    truncate(run / OLDER / "rank0.pt")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"no checkpoint in .* verifies \(step_00000006: .*; step_00000004: "):
        train_in_process(run, **{"run.resume": True})
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing moved or rewritten


def test_a_kill_while_pruning_never_leaves_a_partial_checkpoint(uninterrupted, tmp_path, monkeypatch):
    """Pruning step 2 after the step-6 save dies halfway through deleting it (simulated kill)."""
    import train.checkpoint as checkpoint

    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        path = Path(path)
        if "step_00000002" in path.name and not path.name.endswith(".tmp"):
            real_rmtree(path / "dcp")  # half of the files are gone, trainer.pt and the rest remain
            raise KeyboardInterrupt("killed while pruning")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_in_process(run)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    for step, path in step_dirs(run):  # every directory named step_* is a whole checkpoint
        assert verify(path, ONE_PROCESS) is None, (step, sorted(p.name for p in path.iterdir()))
    assert [s for s, _ in step_dirs(run)] == [4, 6]
    train_in_process(run, **{"run.resume": True})
    assert not list(run.glob(".*.deleting"))  # the remains are removed on resume
    assert steps(run) == list(range(1, 9))
    assert_same_weights(run, uninterrupted)


def test_every_file_and_directory_is_synced_before_the_rename(tmp_path, monkeypatch):
    """Power-loss durability: the data of every file and the directory entries reach the disk before the rename
    publishes the checkpoint, and the rename itself is synced in the run directory."""
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *args, **kwargs):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    run = train_in_process(tmp_path / "run", **{"train.max_steps": 3, "run.save_final": False})
    publish = events.index(("rename", str(run / ".step_00000002.tmp"), str(run / "step_00000002")))
    before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    tmp = run / ".step_00000002.tmp"
    files = {str(tmp / rel) for rel in json.loads((run / "step_00000002" / MANIFEST).read_text())["files"]}
    assert files | {str(tmp / MANIFEST)} <= before, sorted(files - before)
    assert {str(tmp), str(tmp / "dcp")} <= before  # the directories' entries
    assert ("fsync", str(run)) in events[publish + 1:]  # the rename itself


class Killed(BaseException):
    """Stands for a SIGKILL at one point of a checkpoint write: nothing after it runs."""


# (function in train.checkpoint's namespace, the file it writes (None: any call), its call that writes step 6, kill
# before or after that call, step resumed from); DCP also calls torch.save, for its non-tensor items
STAGES = {
    "after-dcp-shards": ("dcp.save", None, 3, "after", 4),
    "after-rank-file": ("torch.save", "rank0.pt", 3, "after", 4),
    "after-trainer-file": ("torch.save", "trainer.pt", 3, "after", 4),
    "after-manifest": ("write_manifest", None, 3, "after", 4),
    "after-rename-before-pruning": ("list_checkpoints", None, 3, "before", 6),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_kill_at_each_stage_of_a_checkpoint_write_resumes_exactly(stage, uninterrupted, tmp_path, monkeypatch,
                                                                    caplog):
    import train.checkpoint as checkpoint

    name, target, nth, when, resumed_from = STAGES[stage]
    owner = checkpoint
    for part in name.split(".")[:-1]:
        owner = getattr(owner, part)
    attr = name.split(".")[-1]
    real, calls = getattr(owner, attr), []

    def dying(*args, **kwargs):
        if target is not None and not (len(args) > 1 and Path(str(args[1])).name == target):
            return real(*args, **kwargs)
        calls.append(1)
        if len(calls) == nth and when == "before":
            raise Killed(stage)
        out = real(*args, **kwargs)
        if len(calls) == nth:
            raise Killed(stage)
        return out

    monkeypatch.setattr(owner, attr, dying)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train_in_process(run)
    monkeypatch.setattr(owner, attr, real)
    with caplog.at_level(logging.INFO):
        train_in_process(run, **{"run.resume": True})
    assert any(r.getMessage() == f"resumed from step {resumed_from}" for r in caplog.records)
    assert not any("skipping checkpoint" in r.getMessage() for r in caplog.records)
    assert not list(run.glob(".step_*"))  # the unfinished write is removed
    assert steps(run) == list(range(1, 9))
    assert_same_weights(run, uninterrupted)


def test_resume_with_another_process_count_is_refused(uninterrupted, tmp_path):
    run = copy_run(uninterrupted, tmp_path)
    manifest = json.loads((run / NEWEST / MANIFEST).read_text())
    (run / NEWEST / MANIFEST).write_text(json.dumps({**manifest, "world": 2}))  # as written by 2 processes
    with pytest.raises(ValueError, match="written by 2 processes, this run has 1; resume with the same"):
        train_in_process(run, **{"run.resume": True})


def test_seal_vouches_only_for_a_whole_checkpoint_written_before_manifests(uninterrupted, tmp_path):
    from train.checkpoint import seal

    run = copy_run(uninterrupted, tmp_path)
    for name in (NEWEST, OLDER):
        (run / name / MANIFEST).unlink()  # as the trainer wrote checkpoints before manifests
    assert seal(run / NEWEST) == 5 and verify(run / NEWEST, ONE_PROCESS) is None
    truncate(run / OLDER / "dcp" / "__0_0.distcp")
    with pytest.raises(ValueError, match="is not whole: dcp/__0_0.distcp is missing or shorter than"):
        seal(run / OLDER)
    with pytest.raises(ValueError, match="already has a manifest.json"):
        seal(run / NEWEST)
    assert not (run / OLDER / MANIFEST).exists()
