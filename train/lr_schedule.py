"""The learning-rate schedule, built from torch's schedulers.

``optim.warmup_steps = w`` ramps the lr linearly over the first w steps (``lr * (s + 1) / w`` at 0-based step s,
so step w - 1 runs at the full lr). ``optim.schedule: constant`` then holds ``optim.lr``; ``cosine`` anneals from
``optim.lr`` at step w to ``optim.lr * optim.min_lr_ratio`` at ``train.max_steps``:

    lr(s) = lr * (m + (1 - m) * (1 + cos(pi * (s - w) / max(1, max_steps - w))) / 2),   m = min_lr_ratio

The warmup is ``LinearLR``, the cosine ``CosineAnnealingLR``, joined by ``SequentialLR`` at step w. torch computes
both recursively from the previous lr, so the values match the closed form above to about 1e-13 relative, and a
resumed run matches an uninterrupted one bitwise as long as the scheduler's state travels with the optimizer's
(``train/checkpoint.py`` saves both). That state includes the schedule's length and floor: a resumed run keeps
the schedule it started with.
"""

from __future__ import annotations

import warnings

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int) -> LRScheduler:
    """The schedule of ``optim_cfg`` (``train.config.OptimConfig``) over ``max_steps`` optimizer steps.

    Every param group must start at ``optim_cfg.lr``: the cosine floor is an absolute lr, shared by all groups.
    """
    lrs = {group["lr"] for group in optimizer.param_groups}
    if lrs != {optim_cfg.lr}:
        raise ValueError(f"every param group must start at optim.lr={optim_cfg.lr} (found lr {sorted(lrs)}); the "
                         "cosine floor optim.lr * optim.min_lr_ratio is shared by all groups.")
    warmup = optim_cfg.warmup_steps
    # Factor (s + 1) / w at step s < w, then 1. With w <= 1 it is 1 throughout.
    ramp = LinearLR(optimizer, start_factor=1.0 / max(warmup, 1), end_factor=1.0, total_iters=max(warmup - 1, 0))
    if optim_cfg.schedule == "constant":
        return ramp
    floor = optim_cfg.lr * optim_cfg.min_lr_ratio
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, max_steps - warmup), eta_min=floor)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def load_lr_scheduler_state(scheduler: LRScheduler, state: dict) -> None:
    """Restore ``scheduler`` from ``state`` (its ``state_dict()`` at the checkpoint).

    Checkpoints written before the schedule was built from torch's schedulers hold a ``LambdaLR``'s state
    (``lr_lambdas``), which says only how many steps were taken; the schedule is then replayed to that step.
    """
    if "lr_lambdas" not in state:
        scheduler.load_state_dict(state)
        return
    # torch's schedulers scale the current lr, which the optimizer's state has already set to the checkpoint's:
    # start the replay from the lr of step 0, which the fresh scheduler still holds.
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": replaying is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(state["last_epoch"]):
            scheduler.step()
