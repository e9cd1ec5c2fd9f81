"""The synthetic_mix training source (tasks/mix.py and its families): its documents, answers and lengths, and the
held-out check: a sample of the real training stream holds no evaluation string and no held-out book text."""

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.books import BookHaystack
from tasks.document import Target
from tasks.heldout import Scanner, eval_only_strings, literal_fragments
from tasks.lookup import LOOKUP_HEADER, lookup_line
from tasks.mix import FAMILIES, SyntheticMix, mask_runs, training_texts
from tasks.passkey import TEMPLATES, GeneratedFiller, RepeatedFiller
from train.config import load_config
from train.data import build_batches

ROOT = Path(__file__).resolve().parents[1]

BOOKS = ROOT / "assets" / "books" / "train.parquet"
HELDOUT = ROOT / "assets" / "books" / "heldout.parquet"
STAGE_7S_DATA = yaml.safe_load((ROOT / "configs" / "demo_stage7s.yaml").read_text())["data"]
STAGE_8_DATA = yaml.safe_load((ROOT / "configs" / "demo_stage8.yaml").read_text())["data"]
STAGE_9_DATA = yaml.safe_load((ROOT / "configs" / "demo_stage9.yaml").read_text())["data"]
STAGE_10_DATA = yaml.safe_load((ROOT / "configs" / "demo_stage10.yaml").read_text())["data"]
WORDS = ("river", "window", "morning", "letter", "candle", "garden", "soldier", "captain", "mother", "journey",
         "silver", "quiet", "old", "green", "little", "under", "beside", "after", "before", "through")


def evaluation_strings() -> list[str]:
    """Every evaluation string, read from the templates independently of tasks/heldout.py's scan: the eval-only
    list, each template's task line, question, answer stem and key-line fragments, the sentences of repeated
    fillers, the literal fragments of generated haystacks and the lookup header."""
    from tasks.passkey_probe import PROBE_TEMPLATES  # issue 33's one-off check is an evaluation too

    out = set(eval_only_strings()) | {LOOKUP_HEADER}
    for template in (*TEMPLATES.values(), *PROBE_TEMPLATES.values()):
        p, h = template.phrasing, template.haystack
        out |= {p.intro, p.question, p.question.split("? ")[-1], *literal_fragments(p.key_line)}
        if isinstance(h, RepeatedFiller):
            out |= {s.strip() + "." for s in h.text.split(".") if s.strip()}
        if isinstance(h, GeneratedFiller):
            out |= {f for pattern in h.patterns for f in literal_fragments(pattern)}
    return sorted(out)


def leaks(text: str) -> list[str]:
    lower = text.lower()
    found = [s for s in evaluation_strings() if s.lower() in lower]
    line = re.escape(lookup_line(111, 222)).replace("111", r"\d+").replace("222", r"\d+")
    return found + re.findall(line, text, re.IGNORECASE)


def fake_books(path: Path) -> Path:
    """A parquet of generated 'books' for machines without assets/ (seeded word salad, sentences and numbers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    books = []
    for _ in range(4):
        sentences = []
        for _ in range(600):
            words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(4, 12)))]
            number = f" {int(rng.integers(1, 999))}" if rng.random() < 0.2 else ""
            sentences.append(" ".join(words).capitalize() + number + ".")
        books.append(" ".join(sentences))
    pq.write_table(pa.table({"title": [f"b{i}" for i in range(4)], "text": books}), path)
    return path


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> Path:
    return BOOKS if BOOKS.is_file() else fake_books(tmp_path_factory.mktemp("books") / "train.parquet")


@pytest.fixture(scope="module")
def haystack(books) -> BookHaystack:
    return BookHaystack.from_files([str(books)], "text", Scanner())


@pytest.fixture(scope="module")
def tokenizer(haystack, tmp_path_factory):
    from transformers import AutoTokenizer

    from train.tokenizer import train_tokenizer

    lines = [line for t in training_texts(haystack, 150, 0) for line in t.split("\n") if line.strip()]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter(lines), out, vocab_size=500)
    return AutoTokenizer.from_pretrained(out)


def mix_spec(books: Path, tokenizer_dir: str, **data):
    overrides = {"data.source": "synthetic_mix", "data.paths": [str(books)], "data.tokenizer": tokenizer_dir,
                 "data.pack": 4, "data.window": 64, "data.synthetic_doc_tokens": 256, "train.micro_batch_size": 16,
                 "crossbatch.layout": "none", "parallel.strategy": "none", "train.device": "cpu"}
    overrides.update({f"data.{k}": v for k, v in data.items()})
    return load_config(None, overrides)


def stream_texts(tokenizer, spec, batches: int) -> list[str]:
    """The decoded text of every document pack (k consecutive rows) of ``batches`` micro-batches of the trainer's
    own stream (train.data.build_batches)."""
    stream = build_batches(spec, tokenizer, 4096, spec.data.window, rank=0, world=1)
    out = []
    for _ in range(batches):
        b = stream.next_batch()
        for pack in b.input_ids.view(-1, spec.data.pack * spec.data.window):
            out.append(tokenizer.decode(pack.tolist(), skip_special_tokens=True))
    return out


# ----------------------------------------------------------------------------- held out of training
@pytest.mark.parametrize("data", [
    {},
    # configs/demo_stage4.yaml's changes: number-keyed dictionaries (the lookup eval's keys) and short first windows
    {"mix_lookup_keys": ["number"], "first_row_tokens": [8, 64]},
    # configs/demo_stage5.yaml's changes: record haystacks dense with numbers, keys named without a value
    {"mix_haystacks": {"records": 1.0}, "mix_mentions": 1.0},
    # tally haystacks: named quantities with numbers, phrased like key lines
    {"mix_haystacks": {"tallies": 1.0}, "mix_mentions": 1.0},
    # configs/demo_stage7s.yaml's data (the shipped model's last stage), with its mix of families
    {key: value for key, value in STAGE_7S_DATA.items() if key.startswith("mix")},
    # configs/demo_stage8.yaml's: stage 7s's with intros that name the asked key; recall documents only, at most
    # 4 keys (6 keys, their mentions and the intro do not always fit these 256-token documents)
    {**{key: value for key, value in STAGE_8_DATA.items() if key.startswith("mix")}, "mix_named_intros": 1.0,
     "mix_max_keys": 4, "mix": {"recall": 1.0}},
    # configs/demo_stage9.yaml's: stage 8's with short recall documents (opening line, key line and question in
    # one or two windows)
    {key: value for key, value in STAGE_9_DATA.items() if key.startswith("mix")},
    # configs/demo_stage10.yaml's: stage 8's with record haystacks at 0.6
    {key: value for key, value in STAGE_10_DATA.items() if key.startswith("mix")},
])
def test_training_stream_holds_no_evaluation_string(books, tokenizer, data):
    spec = mix_spec(books, tokenizer.name_or_path, **{"mix": {f: 1.0 for f in FAMILIES}, **data})
    texts = stream_texts(tokenizer, spec, batches=75)  # 300 documents of up to 256 tokens
    assert len(texts) == 300 and sum(len(t) for t in texts) > 300 * 200
    found = {s for t in texts for s in leaks(t)}
    assert not found, f"evaluation strings in the training stream: {sorted(found)}"


def test_the_scan_catches_a_polluted_generator(haystack, tokenizer):
    """A generator that slips held-out template text into its documents: the stream scan above finds it, and
    SyntheticMix's own guard refuses to emit such documents."""

    class Polluted(SyntheticMix):
        def parts(self, family, rng, budget):
            name = list(TEMPLATES)[int(rng.integers(len(TEMPLATES)))]
            prompt = TEMPLATES[name].render(int(rng.integers(1, 50000)), 80, 80, seed=int(rng.integers(1000)))
            return [prompt.split("\n")[int(rng.integers(5))], "\n", *super().parts(family, rng, budget)]

    unguarded = Polluted(tokenizer, haystack, 256, {"recall": 1.0}, seed=0, scanner=Scanner([], []))
    texts = [tokenizer.decode(unguarded.get(0, i).ids.tolist(), skip_special_tokens=True) for i in range(20)]
    assert sum(bool(leaks(t)) for t in texts) >= 15  # a few template lines are mostly haystack sentences
    guarded = Polluted(tokenizer, haystack, 256, {"recall": 1.0}, seed=0)
    with pytest.raises(ValueError, match="without an evaluation string"):
        for i in range(20):
            guarded.get(0, i)
    assert Scanner().find("some text. THE SKY IS BLUE. more") == "THE SKY IS BLUE."
    assert Scanner().find(f"x {lookup_line(5, 7)} y") == lookup_line(5, 7)


def test_training_stream_holds_no_held_out_book_text(books, tokenizer):
    if not (BOOKS.is_file() and HELDOUT.is_file()):
        pytest.skip("assets/books/{train,heldout}.parquet are absent: build them with make assets")
    import pyarrow.parquet as pq

    def lines(texts):
        return {ln.strip() for t in texts for ln in t.split("\n") if len(ln.strip()) >= 40}

    heldout = pq.read_table(HELDOUT, columns=["text"]).column("text").to_pylist()
    # every line of the held-out books that no training book holds as well (some quotations are in both)
    probes = lines(heldout) - lines(pq.read_table(BOOKS, columns=["text"]).column("text").to_pylist())
    assert len(probes) > 5000
    spec = mix_spec(books, tokenizer.name_or_path, mix={"books": 2.0, "copy": 1.0, "recall": 1.0})
    assert not probes & lines(stream_texts(tokenizer, spec, batches=50))
    # the same probe on documents drawn from the held-out books finds them
    leaked = SyntheticMix(tokenizer, BookHaystack(heldout, Scanner()), 256, {"books": 1.0}, seed=0)
    assert probes & lines(tokenizer.decode(leaked.get(0, i).ids.tolist(), skip_special_tokens=True) for i in range(20))
    with pytest.raises(ValueError, match="held-out books are for evaluation only"):
        BookHaystack.from_files([str(HELDOUT)], "text", Scanner())


# ----------------------------------------------------------------------------- documents
def test_documents_answers_lengths_and_determinism(haystack, tokenizer):
    mix = SyntheticMix(tokenizer, haystack, 256, {f: 1 for f in FAMILIES}, seed=3)
    families = set()
    for i in range(60):
        family, text, ids, mask = mix.sample(0, i)
        families.add(family)
        assert 0.9 * 192 <= len(ids) <= 256 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids.tolist(), skip_special_tokens=True) == text
        if family == "books":
            assert mask[1:].all()
            continue
        if family == "repeat":  # every recurrence of the span after its first carries the loss
            runs = [tokenizer.decode(ids[a:b].tolist()).strip() for a, b in mask_runs(mask)]
            assert runs and all(text.count(r) >= 2 for r in runs)
            continue
        # answers only: the marked tokens are the answers, which follow the last haystack, near the end
        assert 0 < mask.sum() < len(ids) // 2
        first = int(np.flatnonzero(mask)[0])
        assert first > len(ids) // 3
        answer = tokenizer.decode(ids[first : first + int(mask[first:].argmin() or len(ids))].tolist()).strip()
        if family == "copy":
            assert text.count(answer) == 2  # the marked span and its copy
        else:
            assert text.count(answer) >= 2  # the answer is stated earlier in the document
    assert families == set(FAMILIES)
    again = SyntheticMix(tokenizer, haystack, 256, {f: 1 for f in FAMILIES}, seed=3)
    assert all(np.array_equal(mix.get(1, i).ids, again.get(1, i).ids) for i in range(10))
    assert not np.array_equal(mix.get(1, 0).ids, mix.get(2, 0).ids)


def test_varied_surface_forms(haystack, tokenizer):
    """Many key-line phrasings, value formats and questions, not one template."""
    mix = SyntheticMix(tokenizer, haystack, 256, {"recall": 1.0}, seed=0)
    answers, questions = set(), set()
    for i in range(80):
        _, text, ids, mask = mix.sample(0, i)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
        for a, b in zip(edges[::2], edges[1::2]):
            answers.add(tokenizer.decode(ids[a:b].tolist()).strip())
            before = tokenizer.decode(ids[max(0, a - 12) : a].tolist()).split("\n")[-1]
            questions.add(re.sub(r"\w+", "w", before)[-12:])
    shapes = {("digits" if a.isdigit() else "code" if re.fullmatch(r"[A-Z0-9./-]+", a) else "words") for a in answers}
    assert shapes == {"digits", "code", "words"} and len({len(a) for a in answers if a.isdigit()}) >= 6
    assert len(questions) >= 8


def test_loss_on_all_tokens_and_value_kinds(haystack, tokenizer):
    answers = SyntheticMix(tokenizer, haystack, 256, {"recall": 1.0}, seed=5, value_kinds=["number"])
    everything = SyntheticMix(tokenizer, haystack, 256, {"recall": 1.0}, seed=5, value_kinds=["number"], loss_on="all")
    for i in range(20):
        _, text, ids, mask = answers.sample(0, i)
        _, text_all, ids_all, mask_all = everything.sample(0, i)
        assert text == text_all and np.array_equal(ids, ids_all)  # the same document, only the mask differs
        assert mask_all[1:].all() and 0 < mask.sum() < len(ids) // 2
        assert all(tokenizer.decode(ids[a:b].tolist()).strip().isdigit() for a, b in mask_runs(mask))
    one = SyntheticMix(tokenizer, haystack, 256, {"recall": 1.0}, seed=5, value_kinds=["number"], max_keys=1)
    four = SyntheticMix(tokenizer, haystack, 256, {"recall": 1.0}, seed=5, value_kinds=["number"], max_keys=4)
    asked = lambda mix: [len(mask_runs(mix.sample(0, i)[3])) for i in range(30)]  # noqa: E731
    assert set(asked(one)) == {1} and max(asked(four)) > 1  # one key is asked once; more keys, more questions
    with pytest.raises(ValueError, match="data.mix_max_keys"):
        SyntheticMix(tokenizer, haystack, 256, {"recall": 1.0}, seed=0, max_keys=0)
    with pytest.raises(ValueError, match="data.mix_values"):
        SyntheticMix(tokenizer, haystack, 256, {"recall": 1.0}, seed=0, value_kinds=["numbr"])
    with pytest.raises(ValueError, match="data.mix_loss"):
        SyntheticMix(tokenizer, haystack, 256, {"recall": 1.0}, seed=0, loss_on="some")


def test_lookup_key_kinds():
    """``data.mix_lookup_keys`` picks the dictionaries' key kind: numbers give every line a digit key; words none."""
    from tasks.lookup import LOOKUP_HEADERS, lookup_parts

    def dictionary_lines(key_kinds, seed):
        parts = lookup_parts(np.random.default_rng(seed), 300, value_kinds=("word",), key_kinds=key_kinds)
        block = next(p for p in parts if isinstance(p, str) and p.strip() not in LOOKUP_HEADERS)  # the dictionary
        return [line for line in block.split("\n") if line]

    for seed in range(20):
        assert all(re.search(r"\b\d+\b", line) for line in dictionary_lines(("number",), seed))
        assert not any(re.search(r"\d", line) for line in dictionary_lines(("word", "pair"), seed))


def test_lookup_key_kinds_errors(haystack, tokenizer):
    with pytest.raises(ValueError, match="data.mix_lookup_keys"):
        SyntheticMix(tokenizer, haystack, 256, {"lookup": 1.0}, seed=0, lookup_keys=["numbers"])
    mix = SyntheticMix(tokenizer, haystack, 256, {"lookup": 1.0}, seed=0, lookup_keys=["number", "number", "word"])
    assert mix.lookup_keys == ("number", "number", "word")


def test_haystack_styles(haystack, tokenizer):
    """``data.mix_haystacks``: the default draws as documents always have (a quarter repeated, the rest books);
    "records" gives a haystack far denser in numbers than book passages, except in a books document; bad weights
    raise."""
    from tasks.mix import haystack_style

    rng, old = np.random.default_rng(3), np.random.default_rng(3)
    assert [haystack_style(rng) for _ in range(400)] == [
        "repeated" if old.random() < 0.25 else "books" for _ in range(400)]
    rng = np.random.default_rng(4)
    drawn = [haystack_style(rng, {"records": 0.5, "books": 0.5}) for _ in range(400)]
    assert set(drawn) == {"records", "books"} and 150 < drawn.count("records") < 250

    def digit_share(families, haystacks):
        mix = SyntheticMix(tokenizer, haystack, 256, families, seed=1, haystacks=haystacks)
        text = "".join(mix.sample(0, i)[1] for i in range(20))
        return sum(c.isdigit() for c in text) / len(text), text

    records, text = digit_share({"copy": 1.0}, {"records": 1.0})
    books, _ = digit_share({"copy": 1.0}, {"books": 1.0})
    assert records > max(0.08, 2 * books), (records, books)
    assert digit_share({"books": 1.0}, {"records": 1.0})[0] < records / 2  # the books family stays book text
    assert len(set(re.findall(r"\b\d{5}\b", text))) > 20  # many five-digit numbers, like the passkeys
    for bad in ({"record": 1.0}, {"books": -1.0, "records": 2.0}, {"books": 0.0}, {}):
        with pytest.raises(ValueError, match="data.mix_haystacks"):
            SyntheticMix(tokenizer, haystack, 256, {"copy": 1.0}, seed=0, haystacks=bad)


def test_tallies_name_no_key_and_draw_records_as_before():
    """"tallies": about half the lines give a named quantity a number, like a key line; no quantity's name is one a
    recall key can take (so a tally never answers a document's question), and records without tallies draw
    exactly as before."""
    from tasks.records import MEASURES, TALLY_LINES, records
    from tasks.words import THINGS

    text = records(20000, np.random.default_rng(5), tallies=0.5)
    heads = [line.split("{")[0] for line in TALLY_LINES if not line.startswith("{")]
    lines = re.split(r"(?<=\.) (?=[A-Z])", text)
    tallied = [line for line in lines if any(m in line for m in MEASURES)]
    assert 0.3 < len(tallied) / len(lines) < 0.7, (len(tallied), len(lines))
    assert any(line.startswith(h) for line in tallied for h in heads)
    assert not any(thing in text for thing in THINGS)  # no recall key's thing, so never a key's name
    assert not set(MEASURES) & {w for thing in THINGS for w in thing.split()}
    assert records(3000, np.random.default_rng(9)) == records(3000, np.random.default_rng(9), tallies=0.0)
    assert not any(m in records(3000, np.random.default_rng(9)) for m in (" toll ", " quota "))


def test_mentions_name_a_key_without_its_value():
    """``mentions``: each key is named once more with words, never its value, after "the <name> is"; the question
    still asks for the value of the key line; off, no mention line and the same draws as before."""
    from tasks.recall import MENTION_LINES, recall_parts

    pattern = re.compile("|".join(re.escape(m).replace(r"\{name\}", "(.+)").replace(r"\{Name\}", "(.+)")
                                  for m in MENTION_LINES), re.IGNORECASE)
    for seed in range(30):
        parts = recall_parts(np.random.default_rng(seed), 300, mentions=1.0)
        text = [p for p in parts if isinstance(p, str)]
        named = [next(g for g in m.groups() if g) for m in map(pattern.fullmatch, text) if m]
        values = [p.text.strip() for p in parts if isinstance(p, Target)]
        key_lines = [t for t in text if any(v in t for v in values) and not pattern.fullmatch(t)]
        assert named and len(key_lines) >= len(values)
        others = [t for t in text if not pattern.fullmatch(t)]
        for name in named:  # a mention names a key of this document (its key line names it too) and no value
            assert any(name.lower() in line.lower() for line in others)
        assert not any(v in t for t in text if pattern.fullmatch(t) for v in values if not v.isalpha())
    plain, before = recall_parts(np.random.default_rng(7), 300), recall_parts(np.random.default_rng(7), 300, mentions=0)
    assert plain == before and not any(isinstance(p, str) and pattern.fullmatch(p) for p in plain)
    with pytest.raises(ValueError, match="data.mix_mentions"):
        SyntheticMix.__init__(object.__new__(SyntheticMix), None, None, 256, {"recall": 1.0}, 0, mentions=1.5)


def test_named_intros_open_with_the_asked_key_and_no_value():
    """``named_intros``: the document's first line names the first asked key after "the <name> is" (or "a <name>
    is"), with words and no value; the key line and the question are still there; off, the same draws as before."""
    from tasks.recall import NAMED_INTROS, recall_parts

    pattern = re.compile("|".join(re.escape(m).replace(r"\{name\}", "(.+)") for m in NAMED_INTROS))
    opened = 0
    for seed in range(40):
        parts = recall_parts(np.random.default_rng(seed), 300, named_intros=1.0)
        first = parts[0]
        assert isinstance(first, str) and first.endswith("\n")
        m = pattern.fullmatch(first[:-1])
        assert m, first
        name = next(g for g in m.groups() if g)
        text = [p for p in parts if isinstance(p, str)]
        values = [p.text.strip() for p in parts if isinstance(p, Target)]
        question = next(i for i, p in enumerate(parts) if isinstance(p, Target)) - 1
        assert name.lower() in parts[question].lower()  # the first question asks for the key the intro names
        assert sum(name.lower() in t.lower() for t in text[1:]) >= 2  # its key line and its question
        assert not any(v in first for v in values if not v.isalpha())
        opened += 1
    assert opened == 40
    firsts = [recall_parts(np.random.default_rng(s), 300, named_intros=0.5)[0] for s in range(60)]
    assert 15 < sum(isinstance(f, str) and pattern.fullmatch(f[:-1]) is not None for f in firsts) < 45
    for seed in range(10):  # off: the same document as without the option
        plain = recall_parts(np.random.default_rng(seed), 300, mentions=0.5)
        assert plain == recall_parts(np.random.default_rng(seed), 300, mentions=0.5, named_intros=0.0)
    with pytest.raises(ValueError, match="data.mix_named_intros"):
        SyntheticMix.__init__(object.__new__(SyntheticMix), None, None, 256, {"recall": 1.0}, 0, named_intros=-0.1)


def test_short_recall_documents(haystack, tokenizer):
    """``short_recall``: that share of recall documents is drawn from ``short_recall_tokens`` (growing only to fit
    their keys), other families keep their lengths, and off the documents are exactly as before."""
    def lengths(mix, family, n=40):
        out = []
        for i in range(200):
            fam, _, ids, mask = mix.sample(0, i)
            if fam == family:
                assert mask.any()  # the answers are still there
                out.append(len(ids))
            if len(out) == n:
                return np.asarray(out)
        raise AssertionError(f"fewer than {n} {family} documents in 200")

    weights = {"recall": 1.0, "lookup": 1.0}
    mix = SyntheticMix(tokenizer, haystack, 392, weights, seed=3, max_keys=2, short_recall=1.0,
                       short_recall_tokens=(96, 160))
    short = lengths(mix, "recall")
    assert np.median(short) <= 160 and short.max() <= 240 and short.min() >= 0.92 * 96 - 2
    assert lengths(mix, "lookup").min() >= 0.92 * 294  # lookup documents keep 3/4 to all of 392 tokens
    half = lengths(SyntheticMix(tokenizer, haystack, 392, weights, seed=3, max_keys=2, short_recall=0.5,
                                short_recall_tokens=(96, 160)), "recall")
    assert 8 <= (half <= 240).sum() <= 32
    off = SyntheticMix(tokenizer, haystack, 392, weights, seed=3, max_keys=2, short_recall=0.0)
    plain = SyntheticMix(tokenizer, haystack, 392, weights, seed=3, max_keys=2)
    for i in range(10):
        assert off.sample(0, i)[1] == plain.sample(0, i)[1]
    with pytest.raises(ValueError, match="data.mix_short_recall="):
        SyntheticMix(tokenizer, haystack, 392, weights, seed=3, short_recall=1.2)
    for bad in [(16, 100), (200, 100), (96, 500), (96,)]:
        with pytest.raises(ValueError, match="data.mix_short_recall_tokens"):
            SyntheticMix(tokenizer, haystack, 392, weights, seed=3, short_recall=0.5, short_recall_tokens=bad)


def test_config_errors(haystack, tokenizer):
    with pytest.raises(ValueError, match="synthetic_mix needs data.paths"):
        load_config(None, {"data.source": "synthetic_mix", "data.tokenizer": "x"})
    with pytest.raises(ValueError, match="unknown"):
        SyntheticMix(tokenizer, haystack, 256, {"recal": 1.0}, seed=0)
    with pytest.raises(ValueError, match="not all zero"):
        SyntheticMix(tokenizer, haystack, 256, {"recall": 0.0}, seed=0)


def test_the_answer_end_weight_reaches_the_trainers_batches(books, tokenizer):
    """data.mix_answer_end_weight: the trainer's micro-batches carry loss weights, w on the "." after each answer
    (labels of every answer end) and 1 on every other label; with weight 1 they carry none."""
    spec = mix_spec(books, tokenizer.name_or_path, mix={"recall": 1.0, "lookup": 1.0}, mix_answer_ends="period",
                    mix_answer_end_weight=0.2)
    batch = build_batches(spec, tokenizer, 4096, spec.data.window, rank=0, world=1).next_batch()
    assert batch.loss_weights is not None and batch.loss_weights.shape == batch.labels.shape
    light = batch.loss_weights == 0.2
    assert int(light.sum()) >= 4 and bool((batch.labels[light] != -100).all())
    assert {tokenizer.decode([t]) for t in batch.labels[light].tolist()} == {"."}
    assert bool((batch.loss_weights[~light] == 1.0).all())
    plain = mix_spec(books, tokenizer.name_or_path, mix={"recall": 1.0, "lookup": 1.0}, mix_answer_ends="period")
    assert build_batches(plain, tokenizer, 4096, plain.data.window, rank=0, world=1).next_batch().loss_weights is None
