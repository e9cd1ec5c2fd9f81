"""Rank-0 run logging: ``metrics.jsonl``, optional wandb, a tqdm progress bar.

``metrics.jsonl`` holds one JSON object per logged step: ``step`` (1-based, optimizer steps done), ``loss``,
``lr``, ``tokens_per_s``, ``tokens`` (non-padding tokens of the step, all ranks), ``grad_norm``, ``positives`` and
``negatives`` (mean additional contexts per row of each kind), ``d`` (paper layout). On resume the file is cut
back to the steps of the checkpoint, so a resumed run's file has every step exactly once.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the records after ``last_step`` (steps re-run after a resume)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if record.get("step", math.inf) <= last_step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


class RunLogger:
    """Writes metrics on rank 0 only; every method is a no-op elsewhere."""

    def __init__(self, out_dir: Path, spec, config_dict: dict, is_main: bool, start_step: int, total: int):
        self.is_main = is_main
        self.path = out_dir / "metrics.jsonl"
        self.wandb = None
        self.bar = None
        if not is_main:
            return
        truncate_metrics(self.path, start_step)
        self.file = self.path.open("a")
        if spec.log.wandb:
            self.wandb = start_wandb(spec, config_dict, out_dir)
        if spec.log.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def advance(self, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def close(self) -> None:
        if not self.is_main:
            return
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(spec, config_dict: dict, out_dir: Path):
    try:
        import wandb
    except ImportError as err:
        raise ImportError("log.wandb=true needs the wandb package: pip install wandb (or pip install -e "
                          "'.[train]'), or set log.wandb=false.") from err
    id_file = out_dir / "wandb_id"  # one wandb run per run directory, continued on resume
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(project=spec.log.wandb_project, name=spec.log.wandb_run_name, mode=spec.log.wandb_mode,
                      config=config_dict, dir=str(out_dir), id=run_id, resume="allow")
