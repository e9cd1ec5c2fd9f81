"""Periodic checkpoints (atomic, resumable) and the final Hugging Face directory.

A periodic checkpoint is a directory ``step_00000123/`` in the run directory holding:

* the model and optimizer state as a ``torch.distributed.checkpoint`` (DCP) directory: every rank writes its own
  shards (FSDP2) or rank 0 writes everything (DDP, one process);
* ``rank{r}.pt``: that rank's data position and RNG states (torch, CUDA, numpy, python);
* ``trainer.pt``: step, scheduler state, world size; ``config.yaml``: the resolved run config.

Atomicity: all of it is written under ``.step_00000123.tmp/``; after a barrier rank 0 renames the directory to
``step_00000123/``. A directory named ``step_*`` is therefore always complete, and a crash mid-write leaves
only a ``.tmp`` directory, removed on the next resume.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
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


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``out_dir``, oldest first."""
    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / "trainer.pt").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


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
    """Write ``step_{step}/`` atomically (see the module docstring); returns its path."""
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
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load_latest(out_dir: Path, model, optimizer, scheduler, data, info: DistInfo) -> int:
    """Restore the newest complete checkpoint; returns its step (0 when there is none)."""
    if info.is_main:
        for stale in out_dir.glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    checkpoints = list_checkpoints(out_dir)
    barrier(info)
    if not checkpoints:
        logger.warning("run.resume=true but %s holds no complete checkpoint; starting from step 0", out_dir)
        return 0
    step, path = checkpoints[-1]
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    if trainer["world"] != info.world:
        raise ValueError(f"{path} was written by {trainer['world']} processes, this run has {info.world}; resume "
                         "with the same --nproc_per_node (the data position is saved per rank).")
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
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    barrier(info)
    return path
