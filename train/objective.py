"""The crossbatch objective of a step: which ``fot.crossbatch`` plan a micro-batch trains with.

* ``layout: reference``: ``reference_layout(B, k, R, stepping)``, the same plan every step; or, with
  ``ranges: [r_0, ..., r_{k-1}]``, row offset o looks at rows i-1 ... i-r_o (``ranges_layout``): the first
  min(o, r_o) are positives, the rest negatives. LongLLaMA 7B's ¼(0,0), ¼(1,2), ¼(2,5), ¼(3,4) is
  ``ranges: [0, 3, 7, 7]``; 3B's ¼(0,0), ¼(1,1), ¼(2,1), ¼(3,0) is ``[0, 2, 3, 3]`` = R=3 with stepping.
* ``layout: paper``: ``paper_layout(B, k, d)`` with d from the schedule:
  - ``constant``: d;
  - ``switch``: d before ``switch_step`` (or ``switch_fraction * max_steps``), ``d_after`` from then on
    (the paper: d=2, then d=64 for the last 10% of steps);
  - ``sampled``: d drawn per step from ``d_choices`` with a generator seeded by (seed, step), so every rank
    and a resumed run draw the same d (the paper's fine-tuning: d in {2, 128}).
* ``layout: none``: no additional contexts: each row is a plain causal window.

Steps are 0-based here (the step being computed).
"""

from __future__ import annotations

import numpy as np
import torch

from fot.crossbatch import CrossBatchPlan, paper_layout, reference_layout


def empty_plan(batch_size: int) -> CrossBatchPlan:
    """A plan with no additional contexts: memory layers attend only causally to their own row."""
    none_BC = torch.zeros(batch_size, 0, dtype=torch.long)
    return CrossBatchPlan(none_BC, none_BC.bool(), none_BC.bool())


def ranges_layout(batch_size: int, pack: int, ranges: list[int]) -> CrossBatchPlan:
    """Row i (offset o = i mod k) attends to rows i-1 ... i-ranges[o], never below row 0 (the leak mask)."""
    if len(ranges) != pack or min(ranges) < 0:
        raise ValueError(f"crossbatch.ranges={ranges} must list k={pack} non-negative ranges, one per row offset.")
    if batch_size % pack:
        raise ValueError(f"batch size {batch_size} is not a multiple of the document pack k={pack}.")
    C = max(ranges)
    rows_B1 = torch.arange(batch_size)[:, None]
    back_1C = torch.arange(1, C + 1)[None, :]  # context c is row i - (c + 1)
    sources_BC = rows_B1 - back_1C
    range_B1 = torch.tensor(ranges)[rows_B1 % pack]
    active_BC = (back_1C <= range_B1) & (sources_BC >= 0)
    positive_BC = (back_1C <= rows_B1 % pack) & active_BC
    return CrossBatchPlan(sources_BC.clamp(min=0), active_BC, positive_BC)


class Objective:
    """The plan of every step. With ``gather_across_ranks`` and several ranks, the plan is built for the global
    batch (all ranks' micro-batches, rank-major) and this rank takes its rows: negatives then come from every
    rank, and the model all-gathers the memory layers' keys and values (differentiably)."""

    def __init__(self, cfg, batch_size: int, pack: int, max_steps: int, seed: int, world_size: int = 1,
                 rank: int = 0):
        self.cfg, self.pack, self.max_steps, self.seed = cfg, pack, max_steps, seed
        self.across = bool(getattr(cfg, "gather_across_ranks", False)) and world_size > 1
        self.world_size, self.rank = world_size, rank
        self.batch_size = batch_size * world_size if self.across else batch_size
        self._cache: dict[tuple, CrossBatchPlan] = {}

    def d_at(self, step: int) -> int | None:
        """The paper layout's d at a 0-based step (None for the other layouts)."""
        cfg = self.cfg
        if cfg.layout != "paper":
            return None
        if cfg.schedule == "constant":
            return cfg.d
        if cfg.schedule == "switch":
            at = cfg.switch_step if cfg.switch_step is not None else int(round(cfg.switch_fraction * self.max_steps))
            return cfg.d if step < at else cfg.d_after
        rng = np.random.default_rng([self.seed, step, 101])
        return int(cfg.d_choices[rng.integers(len(cfg.d_choices))])

    def plan(self, step: int) -> CrossBatchPlan:
        cfg = self.cfg
        if cfg.layout == "none":
            key = ("none",)
        elif cfg.layout == "reference" and cfg.ranges is not None:
            key = ("ranges", tuple(cfg.ranges))
        elif cfg.layout == "reference":
            key = ("reference", cfg.range, cfg.stepping)
        else:
            key = ("paper", self.d_at(step))
        if key not in self._cache:
            if key[0] == "none":
                plan = empty_plan(self.batch_size)
            elif key[0] == "ranges":
                plan = ranges_layout(self.batch_size, self.pack, list(key[1]))
            elif key[0] == "reference":
                plan = reference_layout(self.batch_size, self.pack, cfg.range, cfg.stepping)
            else:
                plan = paper_layout(self.batch_size, self.pack, key[1])
            self._cache[key] = plan.local_rows(self.world_size, self.rank) if self.across else plan
        return self._cache[key]
