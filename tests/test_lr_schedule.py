"""train.lr_schedule: torch's schedulers against the closed form of the schedule, across a resume, and from a
checkpoint that holds the older LambdaLR state."""

import math
from types import SimpleNamespace

import pytest
import torch

from train.lr_schedule import build_lr_scheduler, load_lr_scheduler_state

CASES = [  # lr, warmup_steps, schedule, max_steps, min_lr_ratio
    (2e-5, 0, "constant", 30, 0.1),
    (1e-4, 10, "constant", 60, 0.1),
    (1e-3, 1, "constant", 20, 0.1),
    (1e-3, 0, "cosine", 100, 0.1),
    (1e-3, 1, "cosine", 100, 0.0),
    (7e-4, 20, "cosine", 2500, 0.1),
    (3e-4, 7, "cosine", 113, 0.25),
    (1e-3, 12, "cosine", 12, 0.1),  # all warmup
    (1e-3, 2, "cosine", 3, 0.5),
]


def expected_lr(step, lr, warmup, schedule, max_steps, floor):
    """The schedule written out: linear warmup to lr at step warmup-1, then constant or half a cosine period."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    t = (step - warmup) / max(1, max_steps - warmup)
    return lr * floor + (lr - lr * floor) * (1 + math.cos(math.pi * t)) / 2


def make(lr, warmup, schedule, max_steps, floor, groups=2):
    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(groups)]
    optimizer = torch.optim.AdamW([{"params": [p]} for p in params], lr=lr)
    cfg = SimpleNamespace(lr=lr, warmup_steps=warmup, schedule=schedule, min_lr_ratio=floor)
    return params, optimizer, build_lr_scheduler(optimizer, cfg, max_steps)


def run(params, optimizer, scheduler, steps):
    """The trainer's order: read the lr, optimizer step, scheduler step. Returns the lrs each group stepped with."""
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        assert scheduler.get_last_lr() == seen[-1]
        for p in params:
            p.grad = torch.full_like(p, 0.5)
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("case", CASES)
def test_every_step_matches_the_closed_form(case):
    lr, warmup, schedule, max_steps, floor = case
    params, optimizer, scheduler = make(*case)
    seen = run(params, optimizer, scheduler, max_steps)
    for step, lrs in enumerate(seen):
        want = expected_lr(step, lr, warmup, schedule, max_steps, floor)
        assert lrs[0] == lrs[1]
        assert lrs[0] == pytest.approx(want, rel=1e-12, abs=0), step
    end = lr * floor if schedule == "cosine" and warmup < max_steps else lr  # after the last step
    assert scheduler.get_last_lr()[0] == pytest.approx(end, rel=1e-12, abs=1e-20)


@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[6]])
def test_restored_state_continues_bitwise(case):
    max_steps, stop = case[3], case[3] // 3
    params, optimizer, scheduler = make(*case)
    straight = run(params, optimizer, scheduler, max_steps)

    params, optimizer, scheduler = make(*case)
    run(params, optimizer, scheduler, stop)
    saved = {"optim": optimizer.state_dict(), "sched": scheduler.state_dict(), "params": [p.detach().clone()
                                                                                         for p in params]}
    params, optimizer, scheduler = make(*case)  # a fresh process: new objects, then the checkpoint
    with torch.no_grad():
        for p, v in zip(params, saved["params"]):
            p.copy_(v)
    optimizer.load_state_dict(saved["optim"])
    load_lr_scheduler_state(scheduler, saved["sched"])
    assert run(params, optimizer, scheduler, max_steps - stop) == straight[stop:]


@pytest.mark.parametrize("case", [CASES[1], CASES[5]])
def test_lambda_lr_checkpoint_is_replayed_to_its_step(case):
    """A LambdaLR state (what checkpoints held before) restores to the same step of the same schedule."""
    lr, warmup, schedule, max_steps, floor = case
    stop = 15
    params = [torch.nn.Parameter(torch.ones(2))]
    optimizer = torch.optim.AdamW(params, lr=lr)
    old = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: expected_lr(s, lr, warmup, schedule, max_steps, floor) / lr)
    run(params, optimizer, old, stop)
    saved_optim, saved_sched = optimizer.state_dict(), old.state_dict()

    params, optimizer, scheduler = make(*case, groups=1)
    optimizer.load_state_dict(saved_optim)
    load_lr_scheduler_state(scheduler, saved_sched)
    for step, (got,) in enumerate(run(params, optimizer, scheduler, max_steps - stop), start=stop):
        assert got == pytest.approx(expected_lr(step, lr, warmup, schedule, max_steps, floor), rel=1e-12, abs=0)


def test_param_groups_must_share_optim_lr():
    p, q = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.AdamW([{"params": [p]}, {"params": [q], "lr": 1e-2}], lr=1e-3)
    cfg = SimpleNamespace(lr=1e-3, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    with pytest.raises(ValueError, match="optim.lr=0.001"):
        build_lr_scheduler(optimizer, cfg, 10)
