"""eval/lookup.py: the dictionary generator (deterministic, unique keys, requested size, queried pairs in memory
only, checked against the model's own cache), value scoring on hand-made strings, the CLI end to end on
models/fot-tiny, and bad inputs."""

import json
from pathlib import Path

import pytest
import torch

import fot
from eval import lookup
from eval.passkey import PromptEncoder
from plumbing.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FOT_TINY = ROOT / "models" / "fot-tiny"
WINDOW = 128  # models/fot-tiny's max_position_embeddings


@pytest.fixture(scope="module")
def encoder():
    return PromptEncoder(load_tokenizer(FOT_TINY))


def build(encoder, size=1024, trial=0, seed=0, queries=6):
    return lookup.build_dictionary(encoder, size, trial, seed, WINDOW, queries)


# ----------------------------------------------------------------------------- the generator
def test_dictionaries_are_deterministic_per_seed(encoder):
    a = build(encoder)
    assert a == build(encoder)
    for other in (build(encoder, seed=1), build(encoder, trial=1)):
        assert other.pairs != a.pairs and [q.key for q in other.queries] != [q.key for q in a.queries]


@pytest.mark.parametrize("size", [300, 1000, 4096, 12000])
def test_dictionary_size_keys_and_lines(encoder, size):
    d = build(encoder, size, queries=2)
    keys = [k for k, _ in d.pairs]
    assert len(set(keys)) == len(keys)
    assert all(10000 <= k < 100000 for k in keys) and all(1000 <= v < 10000 for _, v in d.pairs)
    longest_line = max(end - start for start, end in d.spans)
    assert size - longest_line - 1 <= d.tokens <= size  # at most one line short of the request
    assert d.ids == encoder.encode(d.text) and d.ids[0] == encoder.tokenizer.bos_token_id
    lines = d.text.split("\n")
    assert lines[0] == lookup.LOOKUP_HEADER and len(lines) == len(d.pairs) + 1
    for (k, v), line, (start, end) in zip(d.pairs, lines[1:], d.spans):
        assert line == f"key {k} value {v}"
        assert encoder.tokenizer.decode(d.ids[start:end]).strip() == line  # the spans name the right tokens
    assert d.spans[-1][1] == d.tokens


def test_queries_ask_pairs_that_lie_in_memory_only(encoder):
    d = build(encoder, 2048, queries=20)
    assert len({q.key for q in d.queries}) == 20
    tok = encoder.tokenizer
    for q in d.queries:
        assert d.pairs[q.line] == (q.key, q.value) and q.span == d.spans[q.line]
        assert q.span[1] <= d.tokens - WINDOW  # no window that holds the query can hold the pair
        assert q.method == "tail"
        assert d.ids + q.query_ids + q.answer_ids == encoder.encode(f"{d.text}\nkey {q.key} value {q.value}")
        assert tok.decode(q.query_ids).strip() == f"key {q.key} value" and tok.decode(q.answer_ids).strip() == str(
            q.value)
    # every pair far enough back can be drawn: the queries are not bunched at the start
    lines = sorted(q.line for q in d.queries)
    eligible = sum(end <= d.tokens - WINDOW for _, end in d.spans)
    assert lines[-1] > eligible // 2


def test_the_models_cache_holds_queried_pairs_in_memory(encoder):
    """After the prefill and after the query and its answer, the pair's tokens are in memory, not local."""
    model = fot.LongLlamaForCausalLM.from_pretrained(FOT_TINY).eval()
    d = build(encoder, 1024, queries=4)
    with torch.no_grad():
        cache = model(torch.tensor([d.ids]), use_cache=True, logits_to_keep=1).cache
        assert cache.seen_tokens == d.tokens and cache.memory_length == d.tokens - cache.local_length
        for q in d.queries:
            assert q.span[1] <= cache.memory_length
            after = cache.copy()
            model(torch.tensor([q.query_ids + q.answer_ids]), cache=after, use_cache=True,
                  attention_mask=torch.ones(1, d.tokens + len(q.query_ids) + len(q.answer_ids), dtype=torch.long))
            assert q.span[1] <= after.seen_tokens - after.local_length <= after.memory_length
            assert cache.seen_tokens == d.tokens  # the copy, not the prefilled cache, was extended


def test_too_few_pairs_in_memory_is_a_clear_error(encoder):
    with pytest.raises(ValueError, match="fewer than --queries 50; use a larger size or fewer queries"):
        build(encoder, 300, queries=50)


# ----------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("generated, value, expected", [
    (" 9071", 9071, True),
    ("9071", 9071, True),
    ("9071\nkey 1", 9071, True),
    (" 9071.", 9071, True),
    ("\n 9071 ", 9071, True),
    (" 90712", 9071, False),  # a longer number is another value
    (" 907", 9071, False),
    (" 09071", 9071, False),
    ("x9071", 9071, False),
    (" 9072", 9071, False),
    ("", 9071, False),
    (" key 9071", 9071, False),
])
def test_value_matches(generated, value, expected):
    assert lookup.value_matches(generated, value) is expected


class ScriptedCache:
    """Stands in for a prefilled cache: room for any query, and forks that are itself."""

    def __init__(self, seen: int):
        self.seen_tokens, self.free_tokens = seen, 10**6

    def fork(self):
        return self

    copy = fork


class ScriptedModel:
    """Stands in for a model: a forward returns a ``ScriptedCache``; generate() appends the scripted tokens of each
    query."""

    def __init__(self, script: dict):
        self.script = script

    def __call__(self, input_ids, **kwargs):
        return type("Output", (), {"cache": ScriptedCache(input_ids.shape[1])})()

    def generate(self, input_ids, attention_mask=None, cache=None, max_new_tokens=None, **kwargs):
        assert attention_mask.shape[1] == cache.seen_tokens + input_ids.shape[1]
        new = self.script[tuple(input_ids[0].tolist())][:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


def test_the_answer_as_read_is_the_first_number_with_no_digit_after_it(encoder):
    """Scripted models that give the value and stop, give it and start the next line, or give it and keep writing
    digits: the protocol counts all three right, the score as read only the first two."""
    dictionaries = lookup.make_dictionaries(encoder, [512], trials=1, queries=4, seed=3, window=WINDOW)
    queries = [q for d in dictionaries[512] for q in d.queries]
    tok = encoder.tokenizer
    newline, key, digit = tok.convert_tokens_to_ids(["<0x0A>", "▁ke", "7"])
    assert tok.unk_token_id not in (newline, key, digit)
    for tail, read in (([], 100.0), ([newline, key], 100.0), ([digit, newline], 0.0)):
        model = ScriptedModel({tuple(q.query_ids): q.answer_ids + tail for q in queries})
        (row,) = lookup.evaluate(model, dictionaries, tok)
        assert (row["accuracy"], row["accuracy_read"], row["correct_read"]) == (100.0, read, 4 * bool(read))
        for q, got in zip(queries, row["dictionaries"][0]["queries"]):
            assert got["predicted_ids"] == q.answer_ids and got["read_ids"] == tail[:lookup.READ_TOKENS]
            assert got["read_text"] == tok.decode(q.answer_ids + tail, skip_special_tokens=True)
            assert got["correct"] and got["correct_read"] == bool(read)


# ----------------------------------------------------------------------------- the CLI
def test_cli_end_to_end_on_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "out"
    report = lookup.main(["--model", str(FOT_TINY), "--sizes", "512", "256", "--trials", "2", "--queries", "2",
                          "--settings", "memory", "no-memory", "--threads", "2", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "memory" in printed and "no-memory" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (saved["task"], saved["sizes"], saved["window"], saved["queries"]) == ("lookup", [256, 512], WINDOW, 2)
    assert saved["settings"]["no-memory"]["mem_layers"] == [] and saved["answer_tokenization"] == {"tail": 8}
    tok = load_tokenizer(FOT_TINY)
    for rows in saved["results"].values():
        assert [r["size"] for r in rows] == [256, 512]
        for r in rows:
            queries = [q for d in r["dictionaries"] for q in d["queries"]]
            assert r["n"] == len(queries) == 4 and r["correct"] == sum(q["correct"] for q in queries)
            assert r["accuracy"] == 100.0 * r["correct"] / 4
            assert r["accuracy_read"] == 100.0 * r["correct_read"] / 4
            assert r["max_tokens"] <= r["size"]
            for q in queries:
                assert q["predicted_text"] == tok.decode(q["predicted_ids"], skip_special_tokens=True)
                assert q["correct"] == lookup.value_matches(q["predicted_text"], q["value"])
                assert q["correct_read"] == lookup.is_correct_read(q["read_text"], q["value"])
                assert len(q["predicted_ids"]) <= len(q["answer_ids"]) and q["distance"] >= WINDOW
    keys = {n: [q["key"] for r in rows for d in r["dictionaries"] for q in d["queries"]]
            for n, rows in saved["results"].items()}
    assert keys["memory"] == keys["no-memory"]  # every setting sees the same dictionaries and queries
    assert (out / "lookup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--sizes", "128", "512"], "must be longer than the model's window (128 tokens)"),
    (["--sizes", "512", "512"], "lists a size twice"),
    (["--queries", "0"], "--queries must be >= 1"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--read-tokens", "0"], "--read-tokens must be >= 1"),
    (["--sizes", "300", "--queries", "40"], "fewer than --queries 40"),
    (["--last-context-length", "129"], "must be in [1, 128]"),
    (["--settings", "bogus"], "unknown setting 'bogus'"),
])
def test_bad_inputs_are_clear_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        lookup.main(["--model", str(FOT_TINY), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_keys_run_out_is_a_clear_error(encoder):
    with pytest.raises(ValueError, match="distinct five-digit keys"):
        build(encoder, 2_000_000, queries=1)

