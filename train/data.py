"""Documents, tokenization and document-aware packing for crossbatch training.

Layout. A micro-batch of B rows holds P = B / k document packs: rows p*k ... p*k + k - 1 are k consecutive
windows of W tokens of ONE document (the layout ``fot.crossbatch`` expects). A document is cut into segments of
k * W tokens; each segment fills one pack. A last, partial segment is right-padded (labels -100, attention
mask 0) when it holds at least ``data.min_segment_tokens`` tokens and dropped otherwise. With
``data.first_row_tokens: [lo, hi]`` the first segment of a document holds only L ~ U[lo, hi] tokens in its row 0
(right-padded) and full rows after it: the later windows then see a short window in memory, as at inference, where
the last memory window of a prompt is usually partial.

Lanes. Pack slot p of every micro-batch is a "lane" that reads its own sequence of documents, segment after
segment, so the packs of one micro-batch always come from P different documents: a negative is never a later
part of the same document (which would leak its future). Lane p of rank r reads, in epoch e, the documents
``perm_e[r::world][p], [p + P], [p + 2P], ...`` where ``perm_e`` is a permutation seeded by (seed, e): the order
is deterministic per seed and rank. A lane's position is (epoch, counter, segment); the list of lane positions
is the data state saved in checkpoints, and resuming re-reads only the current document of each lane.

Sources: the task sources of tasks/ (``tasks.lookup.SyntheticLookup``, FoT's dictionary lookup as token ids;
``tasks.copying.SyntheticRepeat``, a recurring span as token ids; ``tasks.passkey.SyntheticPasskey``, the passkey
format as text; ``tasks.mix.SyntheticMix``, long-range tasks in varied surface forms over book text, none of the
evaluations' strings) and ``TextDocuments`` (local text/json/jsonl/parquet files or a hub dataset through
``datasets``, optionally mixed with passkey documents).

Shape legend: B rows, W tokens per row, k rows per document pack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from plumbing.files import resolve_files
from tasks.books import BookHaystack
from tasks.copying import SyntheticRepeat
from tasks.document import Document, encode
from tasks.heldout import Scanner
from tasks.lookup import SyntheticLookup
from tasks.mix import SyntheticMix
from tasks.passkey import SyntheticPasskey

IGNORE = -100


@dataclass
class Batch:
    """One micro-batch: ``input_ids`` and ``labels`` int64 [B, W], ``attention_mask`` int64 [B, W] or None when
    there is no padding. ``tokens``: the number of non-padding tokens. ``loss_weights``: float32 [B, W], each
    label's weight in the loss (``data.mix_answer_end_weight``), or None when every label weighs 1."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    tokens: int
    loss_weights: torch.Tensor | None = None


# ----------------------------------------------------------------------------- text sources
def load_text_dataset(cfg):
    """A ``datasets.Dataset`` of documents (map-style, so a position can be resumed by index)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("text data needs the `datasets` package: pip install -e '.[train]'") from err
    if cfg.source == "hub":
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.split)
    else:
        files, fmt = resolve_files(cfg.paths, cfg.format)
        kwargs = {"sample_by": cfg.text_sample_by} if fmt == "text" else {}
        ds = datasets.load_dataset(fmt, data_files={cfg.split: files}, split=cfg.split, **kwargs)
    if cfg.text_field not in ds.column_names:
        raise ValueError(f"data.text_field={cfg.text_field!r} is not a column of the dataset; columns: "
                         f"{ds.column_names}.")
    return ds


class TextDocuments:
    """Documents from a ``datasets.Dataset``, in a seeded permutation per epoch, sharded across ranks, tokenized
    on access. A ``passkey_fraction`` of document slots (chosen by a hash of the slot) are passkey documents."""

    def __init__(self, dataset, text_field: str, tokenizer, seed: int, rank: int, world: int, add_bos: bool,
                 add_eos: bool, passkey: SyntheticPasskey | None = None, passkey_fraction: float = 0.0):
        self.dataset, self.text_field, self.tokenizer = dataset, text_field, tokenizer
        self.seed, self.rank, self.world = seed, rank, world
        self.add_bos, self.add_eos = add_bos, add_eos
        self.passkey, self.passkey_fraction = passkey, passkey_fraction
        self._perm_epoch, self._perm = None, None
        self.n = len(range(rank, len(dataset), world))

    def __len__(self) -> int:
        return self.n

    def _rank_order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            perm = np.random.default_rng([self.seed, epoch, 7]).permutation(len(self.dataset))
            self._perm, self._perm_epoch = perm[self.rank :: self.world], epoch
        return self._perm

    def get(self, epoch: int, index: int) -> Document:
        if self.passkey is not None and self.passkey_fraction > 0:
            u = np.random.default_rng([self.seed, epoch, index, self.rank, 31]).random()
            if u < self.passkey_fraction:
                return self.passkey.get(epoch, index * self.world + self.rank)
        text = self.dataset[int(self._rank_order(epoch)[index])][self.text_field]
        return Document(encode(self.tokenizer, text or "", self.add_bos, self.add_eos))


class RankView:
    """An unbounded source seen by one rank: document i of the rank is document i * world + rank."""

    def __init__(self, source, rank: int, world: int):
        self.source, self.rank, self.world = source, rank, world

    def __len__(self) -> int:
        return len(self.source)

    def get(self, epoch: int, index: int) -> Document:
        return self.source.get(epoch, index * self.world + self.rank)

    def state_dict(self) -> dict | None:
        return self.source.state_dict() if hasattr(self.source, "state_dict") else None

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None:
            self.source.load_state_dict(state)

    def after_step(self, loss: float) -> None:
        if hasattr(self.source, "after_step"):
            self.source.after_step(loss)


# ----------------------------------------------------------------------------- packing
class PackedBatches:
    """Micro-batches of ``lanes`` document packs of ``pack`` rows of ``window`` tokens (see the module docstring).

    ``state_dict()`` / ``load_state_dict()`` save and restore the position of every lane.
    """

    def __init__(self, documents, lanes: int, pack: int, window: int, pad_id: int, min_segment_tokens: int,
                 vocab_size: int | None = None, first_row_tokens: tuple[int, int] | None = None, seed: int = 0):
        if len(documents) < lanes:
            raise ValueError(
                f"each rank sees {len(documents)} documents, fewer than the {lanes} document packs of a micro-batch "
                "(train.micro_batch_size / data.pack); use more data, fewer ranks or a smaller micro-batch.")
        self.documents, self.lanes, self.pack, self.window = documents, lanes, pack, window
        self.pad_id, self.min_segment_tokens, self.vocab_size = pad_id, max(1, min_segment_tokens), vocab_size
        if first_row_tokens is not None:
            lo, hi = first_row_tokens
            if not 1 <= lo <= hi <= window:
                raise ValueError(f"data.first_row_tokens={list(first_row_tokens)}: need 1 <= lo <= hi <= the window "
                                 f"({window}).")
        self.first_row_tokens, self.seed = first_row_tokens, seed
        self.state = [{"epoch": 0, "counter": 0, "segment": 0} for _ in range(lanes)]
        self._cache: list[tuple[tuple, Document] | None] = [None] * lanes

    @property
    def segment_tokens(self) -> int:
        return self.pack * self.window

    def state_dict(self) -> dict:
        state = {"lanes": [dict(s) for s in self.state]}
        source = self.documents.state_dict() if hasattr(self.documents, "state_dict") else None
        if source is not None:  # a source with state of its own (a gated curriculum)
            state["source"] = source
        return state

    def load_state_dict(self, state: dict) -> None:
        if len(state["lanes"]) != self.lanes:
            raise ValueError(f"the checkpoint's data state has {len(state['lanes'])} lanes, this run has {self.lanes}; "
                             "resume with the same train.micro_batch_size and data.pack.")
        self.state = [dict(s) for s in state["lanes"]]
        self._cache = [None] * self.lanes
        if "source" in state and hasattr(self.documents, "load_state_dict"):
            self.documents.load_state_dict(state["source"])

    def after_step(self, loss: float) -> None:
        """Tell the source the step's training loss (a gated curriculum advances on it)."""
        if hasattr(self.documents, "after_step"):
            self.documents.after_step(loss)

    def _document(self, lane: int) -> Document:
        s = self.state[lane]
        key = (s["epoch"], s["counter"])
        cached = self._cache[lane]
        if cached is None or cached[0] != key:
            doc = self.documents.get(s["epoch"], lane + s["counter"] * self.lanes)
            if self.vocab_size is not None and len(doc.ids) and int(doc.ids.max()) >= self.vocab_size:
                raise ValueError(f"a token id ({int(doc.ids.max())}) is >= the model's vocab_size ({self.vocab_size});"
                                 " the tokenizer and the model do not match.")
            cached = self._cache[lane] = (key, doc)
        return cached[1]

    def _first_row(self, lane: int) -> int:
        """Real tokens in row 0 of the current document's first segment: the window, or with ``first_row_tokens`` a
        length drawn per document (seeded by the document's identity, so a resumed run draws the same)."""
        if self.first_row_tokens is None:
            return self.window
        s = self.state[lane]
        rng = np.random.default_rng([self.seed, s["epoch"], lane + s["counter"] * self.lanes, 53])
        return int(rng.integers(self.first_row_tokens[0], self.first_row_tokens[1] + 1))

    def _spans(self, n_tokens: int, first_row: int) -> list[tuple[int, int]]:
        """The document's segments as (start, end) token offsets: the first holds ``first_row`` tokens in its row 0
        and full rows after it, the others k full rows; a last partial one is kept if it reaches
        ``min_segment_tokens``."""
        spans, start = [], 0
        capacity = first_row + (self.pack - 1) * self.window
        while start < n_tokens:
            end = min(start + capacity, n_tokens)
            if end - start < capacity and end - start < self.min_segment_tokens:
                break
            spans.append((start, end))
            start, capacity = end, self.segment_tokens
        return spans

    def _next_document(self, lane: int) -> None:
        s = self.state[lane]
        s["counter"] += 1
        s["segment"] = 0
        if lane + s["counter"] * self.lanes >= len(self.documents):
            s["epoch"], s["counter"] = s["epoch"] + 1, 0

    def _next_segment(self, lane: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """The lane's next segment: ids and labels int64 [k * W] (padded), which of them are real (bool) and the
        labels' loss weights (float32, or None when all are 1)."""
        for _ in range(1000):  # documents skipped in a row before giving up
            doc = self._document(lane)
            s = self.state[lane]
            first_row = self._first_row(lane)
            spans = self._spans(len(doc.ids), first_row)
            if s["segment"] < len(spans):
                break
            self._next_document(lane)
        else:
            raise ValueError("no document is long enough (1000 in a row were shorter than data.min_segment_tokens): "
                             "lower data.min_segment_tokens or check the data.")
        start, end = spans[s["segment"]]
        ids = doc.ids[start:end]
        labels = ids.copy()
        if doc.loss_mask is not None:
            labels[~doc.loss_mask[start:end]] = IGNORE
        # Where the real tokens go in the k * W slots: after a short row 0 (first segment only), then contiguous.
        short = self.window - first_row if s["segment"] == 0 else 0
        slots = np.arange(len(ids))
        slots[slots >= first_row] += short
        s["segment"] += 1
        ids_X = np.full(self.segment_tokens, self.pad_id, np.int64)
        labels_X = np.full(self.segment_tokens, IGNORE, np.int64)
        valid_X = np.zeros(self.segment_tokens, bool)
        ids_X[slots], labels_X[slots], valid_X[slots] = ids, labels, True
        weights_X = None
        if doc.loss_weight is not None:
            weights_X = np.ones(self.segment_tokens, np.float32)
            weights_X[slots] = doc.loss_weight[start:end]
        return ids_X, labels_X, valid_X, weights_X

    def next_batch(self) -> Batch:
        ids, labels, valid, weights = zip(*(self._next_segment(lane) for lane in range(self.lanes)))
        B, W = self.lanes * self.pack, self.window
        ids_BW = torch.from_numpy(np.stack(ids)).view(B, W)  # lane p's segment -> rows p*k ... p*k + k - 1
        labels_BW = torch.from_numpy(np.stack(labels)).view(B, W)
        valid_BW = torch.from_numpy(np.stack(valid)).view(B, W)
        mask = None if bool(valid_BW.all()) else valid_BW.long()
        weights_BW = None
        if any(w is not None for w in weights):
            ones = np.ones(self.segment_tokens, np.float32)
            weights_BW = torch.from_numpy(np.stack([ones if w is None else w for w in weights])).view(B, W)
        return Batch(ids_BW, labels_BW, mask, int(valid_BW.sum()), weights_BW)


# ----------------------------------------------------------------------------- factory
def build_mix(d, tokenizer, doc_tokens: int, seed: int):
    """The ``synthetic_mix`` source of a data config (books from ``d.paths``)."""
    scanner = Scanner()
    haystack = BookHaystack.from_files(d.paths, d.text_field, scanner)
    return SyntheticMix(tokenizer, haystack, doc_tokens, d.mix, seed, add_bos=d.add_bos, add_eos=d.add_eos,
                        scanner=scanner, loss_on=d.mix_loss,
                        value_kinds=d.mix_values, max_keys=d.mix_max_keys, lookup_keys=d.mix_lookup_keys,
                        haystacks=d.mix_haystacks, mentions=d.mix_mentions,
                        named_intros=d.mix_named_intros, short_recall=d.mix_short_recall,
                        short_recall_tokens=tuple(d.mix_short_recall_tokens), answer_ends=d.mix_answer_ends,
                        answer_end_weight=d.mix_answer_end_weight)


def build_batches(spec, tokenizer, vocab_size: int, window: int, rank: int, world: int) -> PackedBatches:
    """The micro-batch stream of this rank for a run config."""
    d = spec.data
    seed = spec.train.seed
    doc_tokens = d.synthetic_doc_tokens or d.pack * window
    pad_id = 0
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        pad_id = tokenizer.pad_token_id
    passkey = None
    if tokenizer is not None:
        passkey = SyntheticPasskey(tokenizer, doc_tokens, seed + 1, d.add_bos, d.add_eos,
                                   d.source == "synthetic" and d.synthetic_answers_only)
    if d.source == "synthetic_mix":
        documents = RankView(build_mix(d, tokenizer, doc_tokens, seed), rank, world)
    elif d.source == "synthetic":
        if d.synthetic_kind == "lookup":
            source = SyntheticLookup(vocab_size, doc_tokens, d.synthetic_key_tokens, d.synthetic_value_tokens,
                                     d.synthetic_query_prob, d.synthetic_answers_only, seed)
        elif d.synthetic_kind == "repeat":
            source = SyntheticRepeat(vocab_size, doc_tokens, tuple(d.synthetic_span_tokens), d.synthetic_min_offset,
                                     d.synthetic_jitters, d.synthetic_answers_only, seed, d.synthetic_jitter_gate,
                                     d.synthetic_gate_steps)
        else:
            source = passkey
        documents = RankView(source, rank, world)
    else:
        dataset = load_text_dataset(d)
        documents = TextDocuments(dataset, d.text_field, tokenizer, seed, rank, world, d.add_bos, d.add_eos,
                                  passkey if d.passkey_fraction > 0 else None, d.passkey_fraction)
    lanes = spec.train.micro_batch_size // d.pack
    return PackedBatches(documents, lanes, d.pack, window, pad_id, d.min_segment_tokens, vocab_size,
                         tuple(d.first_row_tokens) if d.first_row_tokens else None, seed)
