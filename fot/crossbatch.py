"""Crossbatch training contexts: which batch rows a memory layer's queries may additionally attend to.

Shape legend: B batch rows, C additional contexts per row, G KV heads, T tokens per row, H head dim.

Layout ("k-packing"): k consecutive batch rows hold consecutive windows of one document, so row i with
in-pack offset o = i mod k is window o of its document. In training, a memory layer's queries of row i attend
causally to row i and, fully and differentiably, in the same softmax, to the keys/values of other rows of the
batch: rows of the same document before it (positives) and rows of other documents (negatives). Those keys
are the raw (pre-RoPE) projections, i.e. "at position 0", exactly as memory keys are at inference.

A ``CrossBatchPlan`` lists, for every row, C source rows and whether each is active. Two builders:

* ``reference_layout(batch, pack, crossbatch_range, stepping)``: the LongLLaMA layout. Row i looks at rows
  i-1 ... i-R. With stepping, row offset o gets min(o * ceil((R + 1) / (k - 1)) + 1, R + 1) - 1 contexts
  (k=4, R=3: 0, 2, 3, 3 contexts = (positives, negatives) (0,0), (1,1), (2,1), (3,0)). Rows never look
  below row 0 (no wrap-around: the leak mask).
* ``paper_layout(batch, pack, d)``: the FoT paper's crossbatch dimension d: each row that has a previous
  window gets that window (1 positive) plus the same-offset previous windows of the next d - 1 documents
  (negatives); the first window of a document gets no contexts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .types import LocalKV, MemoryKV


@dataclass
class CrossBatchPlan:
    """Additional contexts of every row.

    Attributes:
        sources_BC: int64 [B, C], the batch row of each context (any valid row when inactive).
        active_BC: bool [B, C], whether the row attends to that context.
        positive_BC: bool [B, C], whether an active context is of the same document (for logging).
        world_size, rank: with world_size > 1 the sources are rows of the *global* batch (the micro-batches
            of all ranks, rank-major: global row = rank * B + local row) and this rank's B rows are global rows
            rank * B ... rank * B + B - 1. Keys and values are then all-gathered across ranks, with gradients
            flowing back to the rank that owns each row (``torch.distributed.nn.functional.all_gather``).
    """

    sources_BC: torch.Tensor
    active_BC: torch.Tensor
    positive_BC: torch.Tensor
    world_size: int = 1
    rank: int = 0

    def local_rows(self, world_size: int, rank: int) -> "CrossBatchPlan":
        """This rank's rows of a plan built for the global batch of ``world_size`` equal micro-batches."""
        if self.world_size != 1:
            raise ValueError("local_rows() takes a plan built for the whole global batch.")
        if self.batch_size % world_size:
            raise ValueError(f"global batch of {self.batch_size} rows does not split into {world_size} ranks.")
        b = self.batch_size // world_size
        rows = slice(rank * b, (rank + 1) * b)
        return CrossBatchPlan(
            self.sources_BC[rows], self.active_BC[rows], self.positive_BC[rows], world_size=world_size, rank=rank
        )

    @property
    def batch_size(self) -> int:
        return self.sources_BC.shape[0]

    @property
    def num_contexts(self) -> int:
        return self.sources_BC.shape[1]

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positives per row, negatives per row), int64 [B] each."""
        pos = (self.active_BC & self.positive_BC).sum(1)
        return pos, self.active_BC.sum(1) - pos

    def to(self, device) -> "CrossBatchPlan":
        return CrossBatchPlan(
            self.sources_BC.to(device), self.active_BC.to(device), self.positive_BC.to(device),
            world_size=self.world_size, rank=self.rank,
        )  # fmt: skip

    def validate(self, batch_size: int) -> None:
        if self.sources_BC.shape != self.active_BC.shape or self.sources_BC.dim() != 2:
            raise ValueError("CrossBatchPlan: sources_BC and active_BC must both be [batch, contexts].")
        if self.batch_size != batch_size:
            raise ValueError(f"CrossBatchPlan is for a batch of {self.batch_size} rows, the input has {batch_size}.")
        pool = batch_size * self.world_size
        if self.num_contexts and (self.sources_BC.min() < 0 or self.sources_BC.max() >= pool):
            raise ValueError(f"CrossBatchPlan: source rows must be in [0, {pool - 1}].")
        rows = self.rank * batch_size + torch.arange(batch_size, device=self.sources_BC.device)[:, None]
        if bool((self.active_BC & (self.sources_BC == rows)).any()):
            raise ValueError("CrossBatchPlan: a row cannot be its own additional context.")
        if self.world_size > 1:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != self.world_size:
                raise ValueError(
                    f"CrossBatchPlan spans {self.world_size} ranks but torch.distributed is not initialised with "
                    "that world size; build it with local_rows() inside the process group."
                )

    def gather(self, k_raw_BGTH: torch.Tensor, v_BGTH: torch.Tensor, valid_BT: torch.Tensor | None) -> MemoryKV:
        """The additional keys/values of every row as a differentiable ``MemoryKV`` [B, G, C*T, H]."""
        k_pool, v_pool, valid_pool = self.row_pool(k_raw_BGTH, v_BGTH, valid_BT)
        return _gather_contexts(self.sources_BC, self.active_BC, k_pool, v_pool, valid_pool)

    def row_pool(self, k_raw_BGTH, v_BGTH, valid_BT):
        """The rows the sources index: this micro-batch, or every rank's (all-gathered, differentiably)."""
        if self.world_size == 1:
            return k_raw_BGTH, v_BGTH, valid_BT
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_gather

        k_pool = torch.cat(_contiguous_grads(all_gather(k_raw_BGTH.contiguous())), dim=0)
        v_pool = torch.cat(_contiguous_grads(all_gather(v_BGTH.contiguous())), dim=0)
        B, T = k_raw_BGTH.shape[0], k_raw_BGTH.shape[2]
        valid = valid_BT if valid_BT is not None else torch.ones(B, T, dtype=torch.bool, device=k_raw_BGTH.device)
        parts = [torch.empty_like(valid) for _ in range(self.world_size)]
        dist.all_gather(parts, valid.contiguous())
        valid_pool = torch.cat(parts, dim=0)
        return k_pool, v_pool, None if bool(valid_pool.all()) else valid_pool


def _contiguous_grads(parts):
    """all_gather's backward sends the gradients through all_to_all, which with gloo mixes up non-contiguous
    tensors; the context gather hands back strided (token-major) gradients, so make them contiguous first."""
    for part in parts:
        if part.requires_grad:
            part.register_hook(lambda grad: grad.contiguous())
    return parts


def _gather_contexts(sources_BC, active_BC, k_raw_BGTH, v_BGTH, valid_BT, score_bias: float = 0.0) -> MemoryKV:
    B, C = sources_BC.shape
    _, G, T, H = k_raw_BGTH.shape
    flat = sources_BC.reshape(-1)
    # Projections come out token-major ([B, T, G, H] memory, seen as [B, G, T, H]): gathering rows of that
    # layout gives [B*C, T, G, H] = [B, C*T, G, H] in one copy, and [B, G, C*T, H] is a view of it.
    k_BGXH = k_raw_BGTH.transpose(1, 2)[flat].reshape(B, C * T, G, H).transpose(1, 2)
    v_BGXH = v_BGTH.transpose(1, 2)[flat].reshape(B, C * T, G, H).transpose(1, 2)
    if valid_BT is None and bool(active_BC.all()):
        return MemoryKV(k_BGXH, v_BGXH, None, score_bias)  # every key is valid: no mask to build, read or broadcast
    valid_BCT = active_BC[:, :, None].expand(B, C, T)
    if valid_BT is not None:
        valid_BCT = valid_BCT & valid_BT[flat].view(B, C, T)
    return MemoryKV(k_BGXH, v_BGXH, valid_BCT.reshape(B, C * T), score_bias)


def crossbatch_attention(
    q_BNTH: torch.Tensor,
    local: LocalKV,
    k_raw_BGTH: torch.Tensor,
    v_BGTH: torch.Tensor,
    valid_BT: torch.Tensor | None,
    plan: CrossBatchPlan,
    attend,
    grouping=None,
    score_bias: float = 0.0,
) -> torch.Tensor:
    """A memory layer's training attention: each row attends causally to itself and, in the same softmax, to
    its active contexts. Rows are grouped by their number of active contexts and each group attends only to
    those (inactive contexts cost nothing; a row with none runs plain causal attention). ``attend`` is the
    dense attention of ``fot.attention.ATTENTION_FUNCTIONS`` the forward plan chose. ``score_bias``
    (``mem_score_bias``) is subtracted from every context key's score, as inference subtracts it from memory's."""
    k_pool, v_pool, valid_pool = plan.row_pool(k_raw_BGTH, v_BGTH, valid_BT)
    n_active_B = plan.active_BC.sum(1)
    counts = torch.unique(n_active_B).tolist()
    if len(counts) == 1 and counts[0] == plan.num_contexts:  # every row uses every context
        memory = _gather_contexts(plan.sources_BC, plan.active_BC, k_pool, v_pool, valid_pool, score_bias)
        return attend(q_BNTH, local, memory, grouping=grouping)
    outputs, order = [], []
    for count in counts:
        rows = (n_active_B == count).nonzero().squeeze(1)
        sub_local = LocalKV(
            local.k_BGSH[rows], local.v_BGSH[rows], None if local.valid_BS is None else local.valid_BS[rows]
        )
        memory = None
        if count:
            # the active contexts of each row first, in plan order (a stable sort of "inactive")
            cols = torch.argsort((~plan.active_BC[rows]).to(torch.int8), dim=1, stable=True)[:, :count]
            sources = plan.sources_BC[rows].gather(1, cols)
            active = torch.ones_like(sources, dtype=torch.bool)
            memory = _gather_contexts(sources, active, k_pool, v_pool, valid_pool, score_bias)
        outputs.append(attend(q_BNTH[rows], sub_local, memory, grouping=grouping))
        order.append(rows)
    inverse = torch.argsort(torch.cat(order))
    return torch.cat(outputs, dim=0)[inverse]


def _check_layout(batch_size: int, pack: int) -> None:
    if pack <= 0 or batch_size <= 0:
        raise ValueError(f"batch size ({batch_size}) and pack ({pack}) must be positive.")
    if batch_size % pack:
        raise ValueError(
            f"batch size {batch_size} is not a multiple of the document pack k={pack}: every document occupies "
            f"k consecutive rows; use a batch size divisible by {pack}."
        )


def reference_layout(batch_size: int, pack: int, crossbatch_range: int, stepping: bool = True) -> CrossBatchPlan:
    """LongLLaMA's layout: row i may look at rows i-1 ... i-R (see the module docstring)."""
    _check_layout(batch_size, pack)
    if crossbatch_range < 0:
        raise ValueError(f"crossbatch range R must be >= 0, got {crossbatch_range}.")
    R = crossbatch_range
    rows = torch.arange(batch_size)[:, None]
    offsets = torch.arange(1, R + 1)[None, :]
    sources = rows - offsets  # [B, R]
    step = math.ceil((R + 1) / max(pack - 1, 1))
    in_pack = rows % pack
    if pack == 1 or not stepping:
        n_visible = torch.full_like(rows, R + 1)
    else:
        n_visible = torch.clamp(in_pack * step + 1, max=R + 1)
    n_visible = torch.minimum(n_visible, rows + 1)  # never below row 0
    active = offsets < n_visible  # context c (offset c+1) is visible when c + 1 < n_visible
    positive = offsets <= in_pack  # the previous rows of the same document
    return CrossBatchPlan(sources.clamp(min=0), active, positive & active)


def paper_layout(batch_size: int, pack: int, d: int) -> CrossBatchPlan:
    """The paper's crossbatch dimension d: 1 positive + (d - 1) negatives for rows with a previous window."""
    _check_layout(batch_size, pack)
    n_docs = batch_size // pack
    if d < 1 or d > n_docs:
        raise ValueError(f"crossbatch d={d} must be in [1, number of documents in the batch = {n_docs}].")
    rows = torch.arange(batch_size)[:, None]
    in_pack, doc = rows % pack, rows // pack
    others = torch.arange(d)[None, :]  # 0: own document, m > 0: the m-th next document
    source_doc = (doc + others) % n_docs
    sources = source_doc * pack + (in_pack - 1).clamp(min=0)
    active = (in_pack > 0).expand(-1, d)
    positive = (others == 0).expand(batch_size, -1)
    return CrossBatchPlan(sources, active, positive & active)
