"""Training data: document-aware packing, determinism per seed and rank, resumable position, file sources through
`datasets`, the synthetic sources, and the sentencepiece tokenizer round trip through AutoTokenizer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.copying import SyntheticRepeat
from tasks.document import Document
from tasks.lookup import SyntheticLookup
from tasks.passkey import passkey_text
from train.config import load_config
from train.data import IGNORE, PackedBatches, RankView, TextDocuments, build_batches, load_text_dataset

ROOT = Path(__file__).resolve().parents[1]


def lookup(doc_tokens=96, answers_only=False, seed=0):
    return SyntheticLookup(64, doc_tokens, 4, 4, 0.3, answers_only, seed)


def test_k_consecutive_rows_hold_consecutive_windows_of_one_document():
    src = RankView(lookup(doc_tokens=150), rank=0, world=1)  # 150 tokens = 2 segments of 4 x 16 + 22 (padded)
    stream = PackedBatches(src, lanes=3, pack=4, window=16, pad_id=0, min_segment_tokens=8)
    seen = {lane: [] for lane in range(3)}
    for _ in range(5):
        b = stream.next_batch()
        assert b.input_ids.shape == (12, 16)
        for lane in range(3):
            rows = b.input_ids[lane * 4 : lane * 4 + 4]  # k consecutive rows = one segment, in order
            seen[lane].append(rows.reshape(-1))
    for lane in range(3):
        doc0, doc1 = src.get(0, lane).ids, src.get(0, lane + 3).ids  # lane p reads documents p, p + P, ...
        stream_ids = torch.cat(seen[lane]).numpy()
        assert np.array_equal(stream_ids[:150], doc0)
        assert (stream_ids[150:192] == 0).all()  # the last segment is padded, never filled from another document
        assert np.array_equal(stream_ids[192:320], doc1[:128])
    # documents of one micro-batch are distinct: a negative is never another part of the same document
    firsts = [src.get(0, lane).ids[:8].tolist() for lane in range(3)]
    assert len({tuple(f) for f in firsts}) == 3


def test_padding_masks_and_labels():
    src = RankView(lookup(doc_tokens=40), 0, 1)
    b = PackedBatches(src, lanes=2, pack=2, window=32, pad_id=0, min_segment_tokens=8).next_batch()
    assert b.attention_mask is not None and b.tokens == 80
    assert b.attention_mask.view(2, 64)[:, :40].all() and not b.attention_mask.view(2, 64)[:, 40:].any()
    assert (b.labels.view(2, 64)[:, 40:] == IGNORE).all()
    assert torch.equal(b.labels[b.attention_mask.bool()], b.input_ids[b.attention_mask.bool()])
    # a tail shorter than min_segment_tokens is dropped: 40 tokens, segments of 64, minimum 41
    stream = PackedBatches(src, lanes=1, pack=2, window=32, pad_id=0, min_segment_tokens=41)
    with pytest.raises(ValueError, match="no document is long enough"):
        stream.next_batch()


def test_short_first_row_puts_a_partial_window_first_and_loses_no_token():
    src = RankView(lookup(doc_tokens=100), 0, 1)
    stream = PackedBatches(src, lanes=2, pack=4, window=16, pad_id=0, min_segment_tokens=4,
                           first_row_tokens=(3, 10), seed=7)
    got = {lane: [] for lane in range(2)}
    for _ in range(6):
        b = stream.next_batch()
        mask = b.attention_mask.view(2, 4, 16).bool()
        for lane in range(2):
            got[lane].append((b.input_ids.view(2, 4, 16)[lane], mask[lane], b.labels.view(2, 4, 16)[lane]))
    lengths = set()
    for lane in range(2):
        # lane p reads documents p, p + 2, ...; each is 100 tokens: a segment of L + 48, then the rest
        (ids0, m0, lab0), (ids1, m1, lab1) = got[lane][0], got[lane][1]
        L = int(m0[0].sum())
        lengths.add(L)
        assert 3 <= L <= 10 and m0[0, :L].all() and not m0[0, L:].any()  # row 0: L real tokens, then padding
        assert m0[1:].all() and (ids0[0, L:] == 0).all() and (lab0[0, L:] == IGNORE).all()
        doc = src.get(0, lane).ids
        assert np.array_equal(torch.cat([ids0[0, :L], ids0[1:].reshape(-1)]).numpy(), doc[: L + 48])
        rest = doc[L + 48 :]  # the second segment: full rows from row 0, padded at the end
        assert np.array_equal(ids1.reshape(-1)[: len(rest)].numpy(), rest) and int(m1.sum()) == len(rest)
    assert len(lengths) == 2  # drawn per document
    # the same documents draw the same lengths after a resume from the stream's state
    again = PackedBatches(src, lanes=2, pack=4, window=16, pad_id=0, min_segment_tokens=4,
                          first_row_tokens=(3, 10), seed=7)
    again.load_state_dict(json.loads(json.dumps(PackedBatches(src, 2, 4, 16, 0, 4).state_dict())))
    assert torch.equal(again.next_batch().attention_mask.view(2, 4, 16)[:, 0].sum(1),
                       torch.tensor([int(got[0][0][1][0].sum()), int(got[1][0][1][0].sum())]))
    with pytest.raises(ValueError, match="first_row_tokens"):
        PackedBatches(src, 2, 4, 16, 0, 4, first_row_tokens=(0, 16))


def test_answers_only_labels():
    src = lookup(doc_tokens=300, answers_only=True)
    doc = src.get(0, 0)
    assert len(doc.ids) == 300 and doc.loss_mask.any()
    # every supervised token is a value of a query, and repeats the value of the earlier definition
    ids = doc.ids.tolist()
    for start in [i for i, t in enumerate(ids) if t == SyntheticLookup.Q and i + 10 <= 300]:
        key, value = ids[start + 1 : start + 5], ids[start + 6 : start + 10]
        assert doc.loss_mask[start + 6 : start + 10].all()
        defs = [i for i, t in enumerate(ids[:start]) if t == SyntheticLookup.K and ids[i + 1 : i + 5] == key]
        assert defs and ids[defs[0] + 6 : defs[0] + 10] == value
    b = PackedBatches(RankView(src, 0, 1), 1, 2, 150, 0, 1).next_batch()
    assert ((b.labels != IGNORE) == torch.from_numpy(doc.loss_mask).view(2, 150)).all()


def recurrence_offsets(doc, min_offset, max_offset):
    """Brute force: the offsets o in range for which every supervised token equals the token o back."""
    where = np.flatnonzero(doc.loss_mask)
    return [o for o in range(min_offset, max_offset + 1) if np.array_equal(doc.ids[where], doc.ids[where - o])]


def test_repeat_documents_hold_one_recurrence_at_the_drawn_offset():
    fixed = SyntheticRepeat(2000, 128, (6, 20), 24, [0], True, seed=0)
    mixed = SyntheticRepeat(2000, 128, (6, 20), 24, [0, 8, 80], True, seed=0)
    offsets = []
    for i in range(200):
        doc = fixed.get(0, i)
        assert doc.ids.dtype == np.int64 and len(doc.ids) == 128 and doc.ids[0] == 1
        assert doc.ids[1:].min() >= SyntheticRepeat.FIRST and doc.ids.max() < 2000
        assert 5 <= doc.loss_mask.sum() <= 19  # the recurrence after its first token
        assert 24 in recurrence_offsets(doc, 24, 24)  # J = 0: always exactly min_offset back
        doc = mixed.get(0, i)
        found = recurrence_offsets(doc, 24, 104)
        assert found
        offsets.append(found[0])
        # the span itself: the supervised run and the token before it, copied from offset back
        where = np.flatnonzero(doc.loss_mask)
        assert np.array_equal(np.diff(where), np.ones(len(where) - 1))
        assert doc.ids[where[0] - 1] == doc.ids[where[0] - 1 - found[0]]
    assert min(offsets) == 24 and max(offsets) > 64  # the jitters are mixed per document
    assert np.array_equal(mixed.get(0, 5).ids, mixed.get(0, 5).ids)  # deterministic per (epoch, index)
    assert not np.array_equal(mixed.get(0, 5).ids, mixed.get(1, 5).ids)
    assert SyntheticRepeat(2000, 128, (6, 20), 24, [0], False, 0).get(0, 0).loss_mask is None


def test_gated_repeat_advances_on_the_loss_and_resumes_exactly():
    def offsets(source, indices):
        return [recurrence_offsets(source.get(0, i), 24, 104)[0] - 24 for i in indices]

    gated = SyntheticRepeat(2000, 128, (6, 20), 24, [0, 40, 80], True, seed=0, gate=1.0, gate_steps=3)
    assert offsets(gated, range(8)) == [0] * 8  # level 0: J = 0
    for loss in [2.0, 0.5, 0.5]:  # the mean of the last 3 is 1.0, not below the gate
        gated.after_step(loss)
    assert gated.level_starts == [0] and offsets(gated, range(8, 12)) == [0] * 4
    gated.after_step(0.5)  # mean 0.5 < 1.0: level 1 from the next document on
    assert gated.level_starts == [0, 12]
    jittered = offsets(gated, range(12, 60))
    assert max(jittered) > 10 and max(jittered) <= 40
    assert offsets(gated, range(8)) == [0] * 8  # documents of the earlier level are unchanged
    state = json.loads(json.dumps(gated.state_dict()))  # plain data, as in a checkpoint
    for loss in [0.1, 0.1, 0.1]:
        gated.after_step(loss)
    assert gated.level_starts == [0, 12, 60] and max(offsets(gated, range(60, 120))) > 40
    for loss in [0.1] * 10:  # the last level holds
        gated.after_step(loss)
    assert len(gated.level_starts) == 3
    resumed = SyntheticRepeat(2000, 128, (6, 20), 24, [0, 40, 80], True, seed=0, gate=1.0, gate_steps=3)
    resumed.load_state_dict(state)
    assert [np.array_equal(resumed.get(0, i).ids, SyntheticRepeat(2000, 128, (6, 20), 24, [0, 40, 80], True, 0,
                                                                  1.0, 3).get(0, i).ids) for i in range(12)] == [True] * 12
    assert offsets(resumed, range(12, 60)) == jittered


def test_gated_repeat_level_travels_with_the_stream_state():
    spec = load_config(ROOT / "configs/demo_stage0.yaml", {"data.synthetic_gate_steps": 2})
    stream = build_batches(spec, None, 2000, 128, 0, 1)
    stream.next_batch()
    stream.after_step(0.1)
    stream.after_step(0.1)
    state = json.loads(json.dumps(stream.state_dict()))
    rows = spec.train.micro_batch_size
    assert state["source"]["level_starts"] == [0, rows]  # one micro-batch of documents at level 0
    expected = [stream.next_batch().input_ids for _ in range(2)]
    resumed = build_batches(spec, None, 2000, 128, 0, 1)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, resumed.next_batch().input_ids) for x in expected)
    fresh = build_batches(spec, None, 2000, 128, 0, 1)  # without the level: the same positions, other documents
    fresh.load_state_dict({"lanes": state["lanes"]})
    assert not torch.equal(fresh.next_batch().input_ids, expected[0])


def test_repeat_errors_name_the_fix():
    with pytest.raises(ValueError, match="raise data.synthetic_doc_tokens"):
        SyntheticRepeat(2000, 128, (6, 20), 24, [96], True, 0)  # 1 + 24 + 96 + 20 > 128
    with pytest.raises(ValueError, match="min offset"):
        SyntheticRepeat(2000, 128, (6, 30), 24, [0], True, 0)  # the recurrence would overlap the span
    with pytest.raises(ValueError, match="span_tokens is a range"):
        load_config(ROOT / "configs/demo_stage0.yaml", {"data.synthetic_span_tokens": [6]})
    with pytest.raises(ValueError, match="synthetic_jitter_gate must be a positive loss"):
        load_config(ROOT / "configs/demo_stage0.yaml", {"data.synthetic_jitter_gate": 0})


def test_repeat_config_streams_without_a_tokenizer():
    spec = load_config(ROOT / "configs/demo_stage0.yaml")
    assert spec.data.tokenizer is None and spec.data.synthetic_kind == "repeat"
    batch = build_batches(spec, None, 2000, 128, 0, 1).next_batch()
    assert batch.input_ids.shape == (spec.train.micro_batch_size, 128)
    supervised = batch.labels != IGNORE
    assert supervised.any(dim=1).all() and (supervised.sum(dim=1) <= 19).all()


def stream_for(spec, rank=0, world=1):
    return build_batches(spec, None, 64, 32, rank, world)


def test_deterministic_per_seed_and_rank_and_resumable():
    spec = load_config(ROOT / "configs/ci_tiny.yaml")
    a, b = stream_for(spec), stream_for(spec)
    first = [a.next_batch().input_ids for _ in range(3)]
    assert all(torch.equal(x, b.next_batch().input_ids) for x in first)
    other_rank = stream_for(spec, rank=1, world=2).next_batch().input_ids
    assert not torch.equal(other_rank, stream_for(spec, rank=0, world=2).next_batch().input_ids)
    other_seed = stream_for(load_config(ROOT / "configs/ci_tiny.yaml", {"train.seed": 1})).next_batch().input_ids
    assert not torch.equal(other_seed, first[0])
    state = a.state_dict()
    expected = [a.next_batch().input_ids for _ in range(3)]
    resumed = stream_for(spec)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state is plain data
    assert all(torch.equal(x, resumed.next_batch().input_ids) for x in expected)


class CharTokenizer:
    """A stand-in tokenizer: one id per character (ids 3..), BOS 1, EOS 2, pad 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 60) for c in text]}


@pytest.mark.parametrize("fmt", ["jsonl", "txt", "parquet"])
def test_file_sources_shard_and_cycle(tmp_path, fmt):
    texts = [f"document number {i} " * (3 + i) for i in range(6)]
    if fmt == "jsonl":
        (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    elif fmt == "txt":
        for i, t in enumerate(texts):
            (tmp_path / f"doc{i}.txt").write_text(t)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet")
    spec = load_config(ROOT / "configs/ci_tiny.yaml",
                       {"data.source": "files", "data.paths": [str(tmp_path / f"*.{fmt}")], "data.tokenizer": "x"})
    ds = load_text_dataset(spec.data)
    assert sorted(ds["text"]) == sorted(texts)
    tok = CharTokenizer()
    ranks = [TextDocuments(ds, "text", tok, 0, r, 2, True, True) for r in range(2)]
    got = [[tuple(d.get(0, i).ids) for i in range(len(d))] for d in ranks]
    expected = {tuple([1] + tok(t)["input_ids"] + [2]) for t in texts}
    assert set(got[0]) | set(got[1]) == expected and not set(got[0]) & set(got[1])  # disjoint shards
    assert got[0] != [tuple(ranks[0].get(1, i).ids) for i in range(3)]  # a new permutation each epoch
    stream = PackedBatches(ranks[0], lanes=1, pack=2, window=64, pad_id=0, min_segment_tokens=4)
    for _ in range(8):  # more segments than the shard holds: wraps into the next epoch
        stream.next_batch()
    assert stream.state[0]["epoch"] >= 1


def test_file_errors(tmp_path):
    spec = load_config(ROOT / "configs/ci_tiny.yaml",
                       {"data.source": "files", "data.paths": [str(tmp_path / "*.json")], "data.tokenizer": "x"})
    with pytest.raises(ValueError, match="matches no file"):
        load_text_dataset(spec.data)
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (tmp_path / "b.csv").write_text("body\nx\n")
    spec.data.paths = [str(tmp_path / "*")]
    with pytest.raises(ValueError, match="cannot infer one format"):
        load_text_dataset(spec.data)
    spec.data.paths = [str(tmp_path / "a.jsonl")]
    with pytest.raises(ValueError, match="text_field='text' is not a column"):
        load_text_dataset(spec.data)
    with pytest.raises(ValueError, match="fewer than the 4 document packs"):
        PackedBatches(TextDocuments(list(range(3)), "t", None, 0, 0, 1, True, True), 4, 2, 8, 0, 1)
    bad = RankView(lookup(), 0, 1)
    with pytest.raises(ValueError, match="vocab_size"):
        PackedBatches(bad, 1, 2, 48, 0, 1, vocab_size=10).next_batch()


def test_tokenizer_round_trip_through_auto_tokenizer(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from train.tokenizer import synthetic_texts, train_tokenizer

    tok = train_tokenizer(synthetic_texts("passkey", 100, 0), tmp_path / "tok", vocab_size=400)
    assert (tmp_path / "tok" / "tokenizer.model").is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model"))
    text = passkey_text(300, np.random.default_rng(1))
    assert loaded(text, add_special_tokens=False)["input_ids"] == sp.encode(text)  # exactly the trained pieces
    assert loaded.decode(sp.encode(text)) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert len(loaded) == len(tok) <= 400
    assert "".join(loaded.convert_ids_to_tokens(loaded("31415", add_special_tokens=False)["input_ids"])) == "▁31415"
    assert Document(np.zeros(1, np.int64)).loss_mask is None


def test_passkey_answers_only_marks_the_key_repetition_and_the_answer(tmp_path):
    from transformers import AutoTokenizer

    from tasks.passkey import SyntheticPasskey
    from train.tokenizer import synthetic_texts, train_tokenizer

    train_tokenizer(synthetic_texts("passkey", 100, 0), tmp_path / "tok", vocab_size=400)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    src = SyntheticPasskey(tok, 300, seed=3, answers_only=True)
    full = SyntheticPasskey(tok, 300, seed=3, answers_only=False)
    for i in range(20):
        doc = src.get(0, i)
        assert np.array_equal(doc.ids, full.get(0, i).ids) and full.get(0, i).loss_mask is None
        assert len(doc.ids) <= 300 and doc.ids[-1] == tok.eos_token_id  # the overhead estimate keeps the answer
        text = tok.decode(doc.ids, skip_special_tokens=True)
        key = text.split("The pass key is ")[1].split(".")[0]
        # an independent reading of the mask: the marked pieces, joined, are the key, then " key." and EOS
        marked = tok.convert_ids_to_tokens(doc.ids[doc.loss_mask].tolist())
        assert "".join(marked) == f"{key}▁{key}.</s>"
        first = [j for j in range(len(doc.ids)) if doc.loss_mask[j]][0]
        # the first marked token is the key's second digit-run in the info line, not its first occurrence
        assert tok.decode(doc.ids[:first]).rstrip().endswith(f"{key}. Remember it.")
