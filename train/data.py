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

Sources: ``SyntheticLookup`` (the FoT dictionary-lookup format, token ids, no files and no tokenizer),
``SyntheticPasskey`` (the passkey format as text), ``TextDocuments`` (local text/json/jsonl/parquet files or
a hub dataset through ``datasets``, optionally mixed with passkey documents) and ``train.synthetic.SyntheticMix``
(long-range tasks in varied surface forms over book text, none of the evaluations' strings).

Shape legend: B rows, W tokens per row, k rows per document pack.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.templates import GRASS, LANDMARK_PHRASING, TEMPLATES, eval_only_strings

logger = logging.getLogger(__name__)

IGNORE = -100
_UNBOUNDED = 1 << 40  # synthetic sources have no end


@dataclass
class Document:
    """Token ids int64 [N] and, optionally, a bool [N] mask of the tokens that carry loss."""

    ids: np.ndarray
    loss_mask: np.ndarray | None = None


@dataclass
class Batch:
    """One micro-batch: ``input_ids`` and ``labels`` int64 [B, W], ``attention_mask`` int64 [B, W] or None when
    there is no padding. ``tokens``: the number of non-padding tokens."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    tokens: int


# ----------------------------------------------------------------------------- synthetic sources
class SyntheticLookup:
    """The FoT dictionary-lookup format as token ids: no files, no tokenizer.

    A document is BOS followed by items. A definition is ``<k> key <v> value`` with a fresh random key; a query
    is ``<q> key <v> value`` repeating an earlier definition, chosen uniformly among all earlier ones, so its
    value can only be predicted by looking back up to the whole document (long-range dependencies across
    windows). Ids: 0 pad, 1 BOS, 2 EOS, 3 ``<k>``, 4 ``<v>``, 5 ``<q>``, 6 ... vocab_size - 1 payload.
    With ``answers_only`` only the values of queries carry loss (the paper's setup).
    """

    K, V, Q, FIRST = 3, 4, 5, 6

    def __init__(self, vocab_size: int, doc_tokens: int, key_tokens: int, value_tokens: int, query_prob: float,
                 answers_only: bool, seed: int):
        if vocab_size <= self.FIRST + 1:
            raise ValueError(f"the synthetic lookup source needs vocab_size > {self.FIRST + 1}, got {vocab_size}.")
        self.vocab_size, self.doc_tokens = vocab_size, doc_tokens
        self.key_tokens, self.value_tokens = key_tokens, value_tokens
        self.query_prob, self.answers_only, self.seed = query_prob, answers_only, seed

    def __len__(self) -> int:
        return _UNBOUNDED

    def get(self, epoch: int, index: int) -> Document:
        rng = np.random.default_rng([self.seed, epoch, index, 17])
        ids, mask = [np.array([1])], [np.zeros(1, bool)]
        defined: list[tuple[np.ndarray, np.ndarray]] = []
        total = 1
        while total < self.doc_tokens:
            if len(defined) >= 4 and rng.random() < self.query_prob:
                key, value = defined[rng.integers(len(defined))]
                marker, answer = self.Q, True
            else:
                key = rng.integers(self.FIRST, self.vocab_size, self.key_tokens)
                value = rng.integers(self.FIRST, self.vocab_size, self.value_tokens)
                defined.append((key, value))
                marker, answer = self.K, False
            ids.append(np.concatenate([[marker], key, [self.V], value]))
            item_mask = np.zeros(len(ids[-1]), bool)
            if answer:
                item_mask[-self.value_tokens:] = True
            mask.append(item_mask)
            total += len(ids[-1])
        ids_N = np.concatenate(ids).astype(np.int64)[: self.doc_tokens]  # exactly doc_tokens tokens
        return Document(ids_N, np.concatenate(mask)[: self.doc_tokens] if self.answers_only else None)


class SyntheticRepeat:
    """Random token ids in which one span recurs once: the task that forms a copying circuit (an induction head).

    A document is BOS and ``doc_tokens - 1`` random ids; a span of ``span_tokens`` ids (drawn from that range)
    is written at a random start and again ``offset`` tokens later, with ``offset = min_offset + U[0, J]`` and
    the jitter J drawn per document from ``jitters``. With J = 0 the copy is always the same distance back, which
    a model learns by position alone; the larger J, the more only the content (the token before) can say where
    the copy comes from. Drawing J per document from a list mixes easy and hard documents in every batch. With
    ``answers_only`` only the recurrence after its first token carries loss (the only predictable tokens).
    Ids: 0 pad, 1 BOS, 2 EOS, 3-5 unused (the lookup kind's markers), 6 ... vocab_size - 1 payload.

    With ``gate`` the jitters are levels instead, taken in order: every document uses the current level, and
    ``after_step(loss)`` moves to the next once the mean training loss of the last ``gate_steps`` steps is below
    ``gate``. Measured on the demo architecture (train/README.md, "The demo model"), this curriculum forms the
    content-based copy in about 1,250 steps where drawing J per document had not started to in 850. A level
    holds from the first document index requested after it was reached, and those starts are the source's
    ``state_dict()``, so a resumed run regenerates exactly the documents it would have seen.
    """

    FIRST = SyntheticLookup.FIRST

    def __init__(self, vocab_size: int, doc_tokens: int, span_tokens: tuple[int, int], min_offset: int,
                 jitters: list[int], answers_only: bool, seed: int, gate: float | None = None, gate_steps: int = 25):
        lo, hi = span_tokens
        if vocab_size <= self.FIRST + 1:
            raise ValueError(f"the synthetic repeat source needs vocab_size > {self.FIRST + 1}, got {vocab_size}.")
        if not 1 <= lo <= hi or min_offset < hi or not jitters or min(jitters) < 0:
            raise ValueError(f"synthetic repeat: need 1 <= span {lo} <= {hi} <= min offset {min_offset} and "
                             f"jitters >= 0, got jitters {jitters}.")
        if 1 + min_offset + max(jitters) + hi > doc_tokens:
            raise ValueError(f"synthetic repeat: a document of {doc_tokens} tokens cannot hold a span of {hi} "
                             f"recurring {min_offset} + {max(jitters)} tokens later; lower the offset or jitters, "
                             "or raise data.synthetic_doc_tokens.")
        self.vocab_size, self.doc_tokens, self.span_tokens = vocab_size, doc_tokens, (lo, hi)
        self.min_offset, self.jitters = min_offset, list(jitters)
        self.answers_only, self.seed = answers_only, seed
        self.gate, self.gate_steps = gate, gate_steps
        self.level_starts = [0]  # document index from which each reached level holds
        self.recent: list[float] = []
        self.requested = -1  # the highest document index handed out

    def __len__(self) -> int:
        return _UNBOUNDED

    def state_dict(self) -> dict:
        return {"level_starts": list(self.level_starts), "recent": list(self.recent), "requested": self.requested}

    def load_state_dict(self, state: dict) -> None:
        self.level_starts, self.recent = list(state["level_starts"]), list(state["recent"])
        self.requested = state["requested"]

    def after_step(self, loss: float) -> None:
        """Gate the curriculum on the step's (all-reduced) training loss; nothing without ``gate``."""
        if self.gate is None or len(self.level_starts) == len(self.jitters):
            return
        self.recent = (self.recent + [loss])[-self.gate_steps :]
        if len(self.recent) == self.gate_steps and sum(self.recent) / self.gate_steps < self.gate:
            self.level_starts.append(self.requested + 1)
            self.recent = []
            logger.info("repeat: the mean loss of %d steps fell below %g; jitter level %d (J = %d) from document %d",
                        self.gate_steps, self.gate, len(self.level_starts) - 1, self.jitters[len(self.level_starts) - 1],
                        self.requested + 1)

    def jitter(self, index: int, rng: np.random.Generator) -> int:
        if self.gate is None:
            return self.jitters[rng.integers(len(self.jitters))]
        return self.jitters[sum(1 for start in self.level_starts if start <= index) - 1]

    def get(self, epoch: int, index: int) -> Document:
        self.requested = max(self.requested, index)
        rng = np.random.default_rng([self.seed, epoch, index, 31])
        ids = rng.integers(self.FIRST, self.vocab_size, self.doc_tokens)
        ids[0] = 1
        length = int(rng.integers(self.span_tokens[0], self.span_tokens[1] + 1))
        offset = self.min_offset + int(rng.integers(0, self.jitter(index, rng) + 1))
        start = int(rng.integers(1, self.doc_tokens - offset - length + 1))
        ids[start + offset : start + offset + length] = ids[start : start + length]
        if not self.answers_only:
            return Document(ids.astype(np.int64))
        mask = np.zeros(self.doc_tokens, bool)
        mask[start + offset + 1 : start + offset + length] = True
        return Document(ids.astype(np.int64), mask)


# The passkey format is eval/templates.py's "landmark" template, the one place both sides read it from.
FILLER, PASSKEY_INTRO = GRASS.text, LANDMARK_PHRASING.intro
EVAL_ONLY = tuple(eval_only_strings())  # held-out evaluation text: training must never emit it


def passkey_prompt(n_garbage: int, rng: np.random.Generator) -> tuple[str, int]:
    """A passkey prompt in the Landmark / LongLLaMA format (see FACTS, "Passkey") and its key: the split point
    is drawn first, then the key; prefix and suffix are both character prefixes of the filler, as in the
    evaluation's ``landmark`` template, so the model trains on exactly the format it is tested on."""
    n_prefix = int(rng.integers(0, n_garbage + 1))
    key = int(rng.integers(1, 50000))
    prompt = TEMPLATES["landmark"].render(key, n_prefix, n_garbage - n_prefix, seed=0)
    assert not any(s in prompt for s in EVAL_ONLY), "a passkey document holds held-out evaluation text"
    return prompt, key


def passkey_text(n_garbage: int, rng: np.random.Generator) -> str:
    """A whole passkey document: the prompt followed by its answer."""
    prompt, key = passkey_prompt(n_garbage, rng)
    return f"{prompt} {key}."


class SyntheticPasskey:
    """Passkey documents (text, tokenized with ``tokenizer``) of about ``doc_tokens/2 ... doc_tokens`` tokens.

    With ``answers_only`` only the retrievals of the key carry loss: its repetition inside the info line
    ("... Remember it. K is the pass key.", a copy from a few tokens back that teaches the copying circuit first)
    and the answer after the final question (a copy from anywhere, often an earlier window). This concentrates
    the signal on retrieval instead of on predicting the filler; the key's first occurrence is random and never
    carries loss.
    """

    def __init__(self, tokenizer, doc_tokens: int, seed: int, add_bos: bool = True, add_eos: bool = True,
                 answers_only: bool = False):
        self.tokenizer, self.doc_tokens, self.seed = tokenizer, doc_tokens, seed
        self.add_bos, self.add_eos, self.answers_only = add_bos, add_eos, answers_only
        n = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
        self.chars_per_token = len(FILLER) / max(n, 1)
        # tokens of a document without filler (intro, info line, question, a 5-digit answer, BOS/EOS), + 2 spare
        self.overhead = len(encode(tokenizer, f"{passkey_prompt(0, np.random.default_rng(0))[0]} 49999.",
                                   add_bos, add_eos)) + 2
        self.digit_ids = None
        if answers_only:
            digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
            unk = getattr(tokenizer, "unk_token_id", None)
            if any(i is None or i == unk for i in digits):
                raise ValueError("answers-only passkey documents need a tokenizer with one piece per digit "
                                 "(sentencepiece split_digits=True, as train/tokenizer.py trains).")
            self.digit_ids = dict(zip("0123456789", digits))

    def __len__(self) -> int:
        return _UNBOUNDED

    def get(self, epoch: int, index: int) -> Document:
        rng = np.random.default_rng([self.seed, epoch, index, 29])
        tokens = int(rng.integers(max(self.doc_tokens // 2, 16), self.doc_tokens + 1))
        prompt, key = passkey_prompt(max(int((tokens - self.overhead) * self.chars_per_token), 0), rng)
        ids = encode(self.tokenizer, f"{prompt} {key}.", self.add_bos, self.add_eos)[: self.doc_tokens]
        if not self.answers_only:
            return Document(ids)
        n_prompt = len(encode(self.tokenizer, prompt, self.add_bos, False))
        mask = np.zeros(len(ids), bool)
        mask[n_prompt:] = True  # the key, the period and EOS
        key_ids = np.array([self.digit_ids[c] for c in str(key)])
        starts = [i for i in range(min(n_prompt, len(ids)) - len(key_ids) + 1)
                  if ids[i] == key_ids[0] and np.array_equal(ids[i : i + len(key_ids)], key_ids)]
        if len(starts) != 2 and n_prompt < len(ids):  # the info line holds the key twice, nothing else has digits
            raise ValueError(f"expected the pass key {key} twice in the prompt's tokens, found it {len(starts)} "
                             "times; is the tokenizer splitting digits?")
        if len(starts) == 2:
            mask[starts[1] : starts[1] + len(key_ids)] = True  # the repetition inside the info line
        return Document(ids, mask)


# ----------------------------------------------------------------------------- text sources
def encode(tokenizer, text: str, add_bos: bool, add_eos: bool) -> np.ndarray:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if add_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return np.asarray(ids, dtype=np.int64)


_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def resolve_files(paths: list[str], fmt: str) -> tuple[list[str], str]:
    """Expand globs; infer the ``datasets`` builder from the extensions when ``fmt`` is "auto"."""
    files: list[str] = []
    for pattern in paths:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise ValueError(f"data.paths: {pattern!r} matches no file.")
        files += [f for f in matched if Path(f).is_file()]
    if fmt != "auto":
        return files, fmt
    kinds = {_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"data.format=auto cannot infer one format from {sorted({Path(f).suffix for f in files})}; "
                         "use files of one kind (.txt, .json/.jsonl, .parquet) or set data.format.")
    return files, kinds.pop()


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

    def _next_segment(self, lane: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The lane's next segment: ids and labels int64 [k * W] (padded) and which of them are real (bool)."""
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
        return ids_X, labels_X, valid_X

    def next_batch(self) -> Batch:
        ids, labels, valid = zip(*(self._next_segment(lane) for lane in range(self.lanes)))
        B, W = self.lanes * self.pack, self.window
        ids_BW = torch.from_numpy(np.stack(ids)).view(B, W)  # lane p's segment -> rows p*k ... p*k + k - 1
        labels_BW = torch.from_numpy(np.stack(labels)).view(B, W)
        valid_BW = torch.from_numpy(np.stack(valid)).view(B, W)
        mask = None if bool(valid_BW.all()) else valid_BW.long()
        return Batch(ids_BW, labels_BW, mask, int(valid_BW.sum()))


# ----------------------------------------------------------------------------- factory
def build_mix(d, tokenizer, doc_tokens: int, seed: int):
    """The ``synthetic_mix`` source of a data config (books from ``d.paths``)."""
    from train.synthetic import BookHaystack, Scanner, SyntheticMix

    scanner = Scanner()
    haystack = BookHaystack.from_files(d.paths, d.text_field, scanner)
    return SyntheticMix(tokenizer, haystack, doc_tokens, d.mix, seed, add_bos=d.add_bos, add_eos=d.add_eos,
                        scanner=scanner, loss_on=d.mix_loss,
                        value_kinds=d.mix_values, max_keys=d.mix_max_keys, lookup_keys=d.mix_lookup_keys,
                        haystacks=d.mix_haystacks, mentions=d.mix_mentions,
                        named_intros=d.mix_named_intros, short_recall=d.mix_short_recall,
                        short_recall_tokens=tuple(d.mix_short_recall_tokens))


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
