"""Periodic checkpoints (atomic, checksummed, resumable) and the final Hugging Face directory.

A periodic checkpoint is a directory ``step_00000123/`` in the run directory holding:

* the model and optimizer state as a ``torch.distributed.checkpoint`` (DCP) directory: every rank writes its own
  shards (FSDP2) or rank 0 writes everything (DDP, one process);
* ``rank{r}.pt``: that rank's data position and RNG states (torch, CUDA, numpy, python);
* ``trainer.pt``: step, scheduler state, world size; ``config.yaml``: the resolved run config;
* ``manifest.json``, written last: the size and sha256 of every other file, and the world size.

Durability: everything is written under ``.step_00000123.tmp/``. Every file is hashed and fsynced (the ranks
share the files between them), then rank 0 writes and fsyncs the manifest, fsyncs the directories, renames the
directory to ``step_00000123/`` and fsyncs the run directory. A directory ``step_*`` holding a manifest is
therefore complete even across a power loss; a crash mid-write leaves only a ``.tmp`` directory, removed on the
next resume.

Pruning renames a checkpoint to ``.step_*.deleting`` before deleting it, so a kill mid-delete never leaves a
partial ``step_*`` directory; the remains are removed on the next resume.

Resume verifies the newest checkpoint against its manifest (every byte) and falls back to older ones, logging one
line for each one skipped with the reason; a damaged one is renamed ``step_*.damaged`` (kept for inspection, never
listed again). A directory without a manifest is never complete: a half-deleted one, or one written before
checkpoints had manifests (``python -m train.checkpoint seal DIR`` checks such a one and writes its manifest).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from train.lr_schedule import load_lr_scheduler_state
from train.parallel import DistInfo, barrier, unwrap

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
DAMAGED_SUFFIX = ".damaged"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """Every ``step_*`` directory in ``out_dir``, complete or not, oldest first."""
    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those holding a manifest) in ``out_dir``, oldest first; not yet verified."""
    return [(step, p) for step, p in step_dirs(out_dir) if (p / MANIFEST).is_file()]


# ----------------------------------------------------------------------------- durability
def fsync_dir(path: Path) -> None:
    """Make the directory's entries (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_and_sync(path: Path) -> str:
    """sha256 of a file, after which the file's data is on disk (fsync also flushes pages another writer left)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        os.fsync(f.fileno())
    return digest


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (itself included)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def remove_dir(path: Path) -> None:
    """Delete a directory so that a kill at any moment leaves no partial directory under its name: rename it to
    ``.NAME.deleting`` (atomic, made durable), then delete that."""
    doomed = path.with_name(f".{path.name}.deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    path.rename(doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed)


def relative_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _gather(obj, info: DistInfo) -> list:
    if not info.initialized:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj, info: DistInfo):
    if not info.initialized:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def write_manifest(directory: Path, info: DistInfo, world: int) -> None:
    """Hash and fsync every file of ``directory`` (each rank a share), then write and fsync ``manifest.json``
    on rank 0. Collective."""
    names = _broadcast(relative_files(directory) if info.is_main else None, info)
    mine = {rel: {"bytes": (directory / rel).stat().st_size, "sha256": hash_and_sync(directory / rel)}
            for rel in names[info.rank::info.world]}
    entries = {}
    for part in _gather(mine, info):
        entries.update(part)
    if info.is_main:
        manifest = {"world": world, "files": dict(sorted(entries.items()))}
        with open(directory / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        for sub in sorted({(directory / rel).parent for rel in names} | {directory}, reverse=True):
            fsync_dir(sub)


def read_manifest(path: Path) -> tuple[dict | None, str | None]:
    """``(manifest, None)``, or ``(None, why it is missing or unusable)``."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        ok = isinstance(manifest["world"], int) and all(
            isinstance(e["bytes"], int) and isinstance(e["sha256"], str) for e in files.values())
    except FileNotFoundError:
        return None, (f"it has no {MANIFEST} (a half-deleted checkpoint, or one written before checkpoints had "
                      f"manifests: python -m train.checkpoint seal {path} checks such a one and writes it)")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return None, f"its {MANIFEST} is unreadable ({type(err).__name__}: {err})"
    if not ok:
        return None, f"its {MANIFEST} is malformed"
    return manifest, None


def file_problem(path: Path, rel: str, entry: dict) -> str | None:
    """Why ``path/rel`` does not match its manifest entry, or None when it does."""
    target = path / rel
    if not target.is_file():
        return f"{rel} is missing"
    size = target.stat().st_size
    if size != entry["bytes"]:
        return f"{rel} has {size} bytes, the manifest says {entry['bytes']}"
    if hash_and_sync(target) != entry["sha256"]:
        return f"{rel} does not match its sha256 in the manifest"
    return None


def verify(path: Path, info: DistInfo) -> str | None:
    """None when every file of the checkpoint at ``path`` matches its manifest, else the reason (the same on
    every rank). Collective: each rank checks a share of the files."""
    manifest, problem = read_manifest(path)
    if manifest is None:
        return problem
    names = sorted(manifest["files"])
    mine = [p for rel in names[info.rank::info.world] if (p := file_problem(path, rel, manifest["files"][rel]))]
    problems = sorted(p for part in _gather(mine, info) for p in part)
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, data, config_yaml: str,
                    info: DistInfo, keep_last: int) -> Path:
    """Write ``step_{step}/`` durably and atomically (see the module docstring); returns its path."""
    final = out_dir / step_dir_name(step)
    tmp = out_dir / f".{step_dir_name(step)}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options(model))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"), no_dist=not info.initialized)
    torch.save({"data": data.state_dict(), "rng": rng_state()}, tmp / f"rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "world": info.world}, tmp / "trainer.pt")
        (tmp / "config.yaml").write_text(config_yaml)
    barrier(info)
    write_manifest(tmp, info, info.world)
    if info.is_main:
        if final.exists():  # the same step again, after a resume from an older checkpoint
            remove_dir(final)
        tmp.rename(final)
        fsync_dir(out_dir)
        for _, old in list_checkpoints(out_dir)[:-keep_last]:
            remove_dir(old)
    barrier(info)
    return final


def clean_partial(out_dir: Path) -> None:
    """Remove what a kill can leave behind: unfinished writes and unfinished deletions."""
    for stale in [*out_dir.glob(".step_*.tmp"), *out_dir.glob(".*.deleting")]:
        shutil.rmtree(stale, ignore_errors=True)


def newest_verified(out_dir: Path, info: DistInfo) -> tuple[int, Path | None]:
    """The newest checkpoint that verifies against its manifest, as ``(step, path)``, or ``(0, None)`` when the
    run directory holds no ``step_*`` directory at all. Each newer one is skipped with one logged line naming it
    and why; a damaged one (its manifest readable) is renamed ``step_*.damaged``. Raises ``ValueError``, changing
    nothing, when there are checkpoints but none verifies (starting afresh would discard the run). Collective."""
    skipped = []
    for step, path in reversed(step_dirs(out_dir)):
        problem = verify(path, info)
        if problem is None:
            _set_aside(skipped, out_dir, info)
            return step, path
        skipped.append((path, problem))
    if skipped:
        reasons = "; ".join(f"{path.name}: {problem}" for path, problem in skipped)
        raise ValueError(f"run.resume=true, but no checkpoint in {out_dir} verifies ({reasons}); restore a good "
                         "checkpoint there, or start afresh in another run.out_dir.")
    return 0, None


def _set_aside(skipped: list[tuple[Path, str]], out_dir: Path, info: DistInfo) -> None:
    """Log one line per skipped checkpoint, and rename the damaged ones ``step_*.damaged`` (rank 0)."""
    barrier(info)  # every rank has read the directories before rank 0 moves them
    if info.is_main:
        for path, problem in skipped:
            where = ""
            if (path / MANIFEST).is_file():
                damaged = path.with_name(path.name + DAMAGED_SUFFIX)
                if damaged.exists():
                    remove_dir(damaged)
                path.rename(damaged)
                fsync_dir(out_dir)
                where = f" (moved to {damaged.name})"
            logger.warning("resume: skipping checkpoint %s%s: %s", path.name, where, problem)
    barrier(info)


def load_latest(out_dir: Path, model, optimizer, scheduler, data, info: DistInfo) -> int:
    """Restore the newest checkpoint that verifies (``newest_verified``); returns its step (0 when there is
    none)."""
    if info.is_main:
        clean_partial(out_dir)
    barrier(info)
    step, path = newest_verified(out_dir, info)
    if path is None:
        logger.warning("run.resume=true but %s holds no checkpoint; starting from step 0", out_dir)
        return 0
    manifest, _ = read_manifest(path)
    if manifest["world"] != info.world:
        raise ValueError(f"{path} was written by {manifest['world']} processes, this run has {info.world}; resume "
                         "with the same --nproc_per_node (the data position is saved per rank).")
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    options = _state_options(model)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "dcp"), no_dist=not info.initialized)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)
    load_lr_scheduler_state(scheduler, trainer["scheduler"])
    per_rank = torch.load(path / f"rank{info.rank}.pt", weights_only=False)
    data.load_state_dict(per_rank["data"])
    set_rng_state(per_rank["rng"])
    return step


def _state_options(model) -> StateDictOptions:
    """Adapter runs checkpoint only what trains: the frozen base comes from ``checkpoint:`` again on resume, so a
    LoRA checkpoint is megabytes (small enough to carry a run across machines) instead of the whole model."""
    adapter = is_adapter(unwrap(model))
    return StateDictOptions(ignore_frozen_params=adapter, strict=not adapter)


def is_adapter(model) -> bool:
    """A peft model: ``save_pretrained`` writes only its adapter (``adapter_config.json`` + weights)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def save_final(out_dir: Path, model, tokenizer, info: DistInfo) -> Path | None:
    """Write ``final/`` in HF format (``save_pretrained`` + tokenizer); every rank must call it (FSDP2 gathers).

    With LoRA (``adapter.kind: lora``) ``final/`` holds only the adapter, whose ``adapter_config.json`` names the
    base (the run's ``checkpoint:``). ``LongLlamaForCausalLM.from_pretrained(final)`` then loads base and adapter
    (transformers' PEFT integration), with the run's ``model:`` fields passed as overrides when the base's own
    config differs; ``peft.PeftModel.from_pretrained(base, final)`` does the same by hand."""
    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = out_dir / "final"
    if info.is_main:
        raw = unwrap(model)
        tmp = out_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        raw.config.use_cache = True  # trained without a cache; generate() from final/ must use one
        raw.generation_config.use_cache = True
        raw.save_pretrained(tmp, state_dict={k: v.contiguous() for k, v in full_sd.items()})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        if path.exists():
            remove_dir(path)
        tmp.rename(path)
        fsync_dir(out_dir)
    barrier(info)
    return path


# ----------------------------------------------------------------------------- checkpoints written before manifests
def seal(path: Path) -> int:
    """Check a checkpoint directory written before checkpoints had manifests and write its manifest, so resume
    accepts it; returns the number of files vouched for. Raises ``ValueError`` naming what is missing or damaged.

    The checks are structural (no checksums existed): ``trainer.pt``, ``config.yaml``, one ``rank{r}.pt`` per
    process of the run, and every DCP shard the ``.metadata`` names, each at least as long as the data it holds;
    the ``.pt`` files must unpickle. A damaged byte inside a shard is not detectable here."""
    path = Path(path)
    if not path.is_dir() or not _STEP_DIR.match(path.name):
        raise ValueError(f"{str(path)!r} is not a checkpoint directory step_NNNNNNNN/ of a run.")
    if (path / MANIFEST).exists():
        raise ValueError(f"{path} already has a {MANIFEST}; resume verifies it.")
    try:
        world = torch.load(path / "trainer.pt", weights_only=False)["world"]
        for r in range(world):
            torch.load(path / f"rank{r}.pt", weights_only=False)
        metadata = dcp.FileSystemReader(str(path / "dcp")).read_metadata()
    except Exception as err:  # noqa: BLE001 - any failure to read them means the checkpoint is not whole
        raise ValueError(f"{path} is not whole: {type(err).__name__}: {err}") from None
    if not (path / "config.yaml").is_file():
        raise ValueError(f"{path} is not whole: config.yaml is missing.")
    ends: dict[str, int] = {}
    for item in metadata.storage_data.values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for rel, end in sorted(ends.items()):
        shard = path / "dcp" / rel
        if not shard.is_file() or shard.stat().st_size < end:
            raise ValueError(f"{path} is not whole: dcp/{rel} is missing or shorter than the {end} bytes it holds.")
    write_manifest(path, DistInfo(0, 0, 1, torch.device("cpu"), False), world)
    fsync_dir(path.parent)
    return len(read_manifest(path)[0]["files"])


def main(argv: list[str] | None = None) -> None:
    from plumbing.cli import ArgumentParser, user_errors

    parser = ArgumentParser(prog="python -m train.checkpoint", description=seal.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    seal_cmd = commands.add_parser("seal", help="check a checkpoint written before manifests and write its manifest")
    seal_cmd.add_argument("dirs", nargs="+", type=Path, help="step_NNNNNNNN directories")
    args = parser.parse_args(argv)
    with user_errors(parser.prog):
        for path in args.dirs:
            print(f"{path}: manifest written for {seal(path)} files")


if __name__ == "__main__":
    main(sys.argv[1:])
