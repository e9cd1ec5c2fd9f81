"""The RULER-style suite (tasks/ruler*.py, eval/ruler.py): RULER's prompt text, written out here from RULER's
constants; every generator's prompt fitted to its length, its answers recomputed by brute-force solvers that read
only the prompt text, its needles at the stated depths, and determinism; RULER's scoring and the read score on
hand-written cases; the CLI with scripted models (all right, all wrong), on a RULER jsonl written by hand, --resume,
a prompt killed mid-prefill and resumed from disk, and bad arguments."""

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import fot
from eval import ruler
from tasks import ruler as tasks_ruler
from tasks.ruler_books import BookHaystack
from tasks.ruler_prompt import CWE, NIAH_MANY, NIAH_ONE, VT, eval_strings, fit_units, insert_at_depths
from tasks.ruler_score import (
    first_line,
    infer_kind,
    match_all,
    match_part,
    postprocess,
    read_correct,
    string_match_all,
    string_match_part,
)

ROOT = Path(__file__).resolve().parents[1]
FOT_TINY = ROOT / "models" / "fot-tiny"
JSONL = ROOT / "tests" / "ruler_jsonl" / "512" / "data" / "niah_single_1" / "validation.jsonl"

# RULER's scripts/data/synthetic/constants.py, written out rather than imported
RULER_NIAH = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I "
              "will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
              "{type_needle_v} for {query} mentioned in the provided text?")
RULER_NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
RULER_VT = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
            "Question: Find all variables that are assigned the value {query} in the text above.")
RULER_VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                   "are assigned the value {query}, they are: ")
RULER_CWE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
             "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
RULER_CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
NEEDLE = re.compile(r"One of the special magic (numbers|uuids|words) for (\S+) is: (\S+)\.")
LENGTH = {"vt": 1536, "cwe": 1536}  # the one-shot examples take about 600 tokens with fot-tiny's tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from plumbing.tokenizer import load_tokenizer

    return load_tokenizer(FOT_TINY)


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return ruler.RulerEncoder(tokenizer)


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> Path:
    """A held-out parquet of generated 'books' (sentences of words and numbers), as make assets writes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    words = ("river", "window", "letter", "candle", "garden", "captain", "journey", "quiet", "old", "green", "under")
    texts = []
    for _ in range(2):
        sentences = [" ".join(words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(4, 12))))
                     .capitalize() + rng.choice([".", "!", "?"]) for _ in range(800)]
        texts.append(" ".join(sentences))
    path = tmp_path_factory.mktemp("books") / "heldout.parquet"
    pq.write_table(pa.table({"title": ["a", "b"], "split": ["heldout"] * 2, "text": texts}), path)
    return path


@pytest.fixture(scope="module")
def haystack(books) -> BookHaystack:
    return BookHaystack.from_parquet(books)


def count_with(encoder):
    return lambda built: len(encoder.ids(built.input, built.answer_prefix))


def sample(encoder, haystack, name, length=None, index=0, seed=0):
    length = length or LENGTH.get(name, 1024)
    return tasks_ruler.make_sample(tasks_ruler.TASKS[name], length, index, seed, count_with(encoder), haystack)[0]


# ----------------------------------------------------------------------------- brute-force solvers of the prompt text
def solve_niah(prompt: str) -> list[str]:
    """The values of the asked keys, read from the needles in the prompt and the question."""
    values: dict[str, list[str]] = {}
    for _, key, value in NEEDLE.findall(prompt):
        values.setdefault(key, []).append(value)
    asked = re.search(r"What (?:is|are all) the special magic \w+ for (.+) mentioned in the provided text\?",
                      prompt).group(1)
    keys = [k for k in re.split(r", and |, ", asked)]
    return [v for k in keys for v in values[k]]


def solve_vt(prompt: str) -> list[str]:
    """Every variable of the task's chain, by following the assignments after the one-shot example."""
    task = prompt[prompt.rindex("Memorize and track"):]
    value = re.search(r"assigned the value (\d+) in the text above", task).group(1)
    found = {v for v, val in re.findall(r"VAR (\w+) = (\d+)", task) if val == value}
    links = re.findall(r"VAR (\w+) = VAR (\w+)", task)
    while True:
        more = {a for a, b in links if b in found} - found
        if not more:
            return sorted(found)
        found |= more


def solve_cwe(prompt: str) -> list[str]:
    """The ten most frequent words of the task's (last) numbered list."""
    listed = prompt[prompt.rindex("Below is a numbered list"):].split("\n")[1]
    counts = Counter(re.findall(r"\d+\. (\S+)", listed)).most_common()
    assert counts[9][1] > counts[10][1]  # the ten are well defined
    return sorted(w for w, _ in counts[:10])


# ----------------------------------------------------------------------------- the prompt text
def test_templates_are_rulers():
    """The plural template is RULER's; the singular one is RULER's word-by-word rewrite of it."""
    assert NIAH_MANY == (RULER_NIAH.replace("{type_needle_v}", "{kind}"),
                         RULER_NIAH_PREFIX.replace("{type_needle_v}", "{kind}"))
    one = (RULER_NIAH + RULER_NIAH_PREFIX).replace("Some", "A").replace("are all", "is").replace("are", "is")
    assert NIAH_ONE[0] + NIAH_ONE[1] == one.replace("{type_needle_v}", "{kind}")
    assert VT == (RULER_VT, RULER_VT_PREFIX) and CWE == (RULER_CWE, RULER_CWE_PREFIX)


def test_eval_strings_find_every_prompt_but_not_the_noise(encoder, haystack):
    from tasks.heldout import eval_only_strings

    strings = eval_strings()
    assert set(strings) <= set(eval_only_strings())  # registered with the scan that keeps them out of training
    assert all(len(s) >= 20 for s in strings) and "One of the special magic" in strings
    assert not any("grass is green" in s for s in strings)
    for name in tasks_ruler.TASKS:
        s = sample(encoder, haystack, name)
        assert any(x in s.prompt for x in strings), name


# ----------------------------------------------------------------------------- generators
@pytest.mark.parametrize("name", list(tasks_ruler.TASKS))
def test_prompt_fits_its_length_and_answers_follow_from_its_text(encoder, haystack, name):
    task = tasks_ruler.TASKS[name]
    length = LENGTH.get(name, 1024)
    s, tokens = tasks_ruler.make_sample(task, length, 3, 7, count_with(encoder), haystack)
    budget = length - task.max_new_tokens
    assert tokens == len(encoder.ids(s.input, s.answer_prefix)) <= budget
    # the largest haystack that fits: one unit more is over the budget
    seed = tasks_ruler.task_seed(7, name, length, 3)
    more = task.generator.build(s.units + 1, seed, haystack, **({"length": length} if name == "cwe" else {}))
    assert count_with(encoder)(more) > budget
    assert tokens >= 0.85 * budget
    solver = solve_vt if name == "vt" else solve_cwe if name == "cwe" else solve_niah
    found = solver(s.prompt)
    assert sorted(found) == sorted(s.outputs)
    if name.startswith("niah") and name != "niah_multivalue":  # RULER's answers follow the question's keys
        assert found == s.outputs
    assert len(s.outputs) == {"niah_multivalue": 4, "niah_multiquery": 4, "vt": 5, "cwe": 10}.get(name, 1)


@pytest.mark.parametrize("name", ["niah_single_1", "niah_multikey_2", "vt", "niah_multikey_1", "niah_multivalue"])
def test_needles_lie_at_their_depths(encoder, haystack, name):
    s = sample(encoder, haystack, name, index=1)
    assert len(s.depths) == len(s.needles) == len(set(s.needles)) and s.depths == sorted(s.depths)
    assert all(0 <= d <= 1 for d in s.depths)
    if tasks_ruler.TASKS[name].needs_books:  # book sentences, the needles set between them
        lines = re.split(r"(?<=[.!?])\s+", s.input.split("\n")[1])
        units = len(lines) - len(s.needles)
        assert sum(len(line.split()) for line in lines if line not in s.needles) == s.units
    else:  # one haystack unit or needle a line, between the task's opening and its question
        task = s.input[s.input.rindex("Memorize and track"):] if name == "vt" else s.input
        lines = task.split("\n")[2 if name == "vt" else 1:-1]
        units = s.units
        assert len(lines) == s.units + len(s.needles)
    for k, (needle, depth) in enumerate(zip(s.needles, s.depths)):
        assert lines.index(needle) - k == int(units * depth)  # haystack units (sentences) before the k-th needle


def test_samples_are_deterministic_per_seed(encoder, haystack):
    for name in ("niah_multikey_2", "niah_multiquery", "vt", "cwe"):
        a, b = sample(encoder, haystack, name, seed=3), sample(encoder, haystack, name, seed=3)
        assert a == b
        assert sample(encoder, haystack, name, seed=4).input != a.input
        assert sample(encoder, haystack, name, index=1, seed=3).input != a.input
    # a task's prompts do not depend on which other tasks run, or in what order
    tasks = [tasks_ruler.TASKS[n] for n in ("vt", "niah_single_1")]
    one = ruler.make_samples(encoder, tasks, [1536], 2, 5, haystack)
    two = ruler.make_samples(encoder, tasks[::-1], [1536], 2, 5, haystack)
    assert sorted(one, key=lambda s: (s.task, s.index)) == sorted(two, key=lambda s: (s.task, s.index))


def test_chat_template_wraps_the_input_and_keeps_the_answer_prefix(tokenizer):
    import copy

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = ("{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}"
                          "{% if add_generation_prompt %}<bot>{% endif %}")
    assert ruler.RulerEncoder(chat, chat=True).text("Q?", " The answer is") == "<user>Q?</user><bot> The answer is"
    assert ruler.RulerEncoder(chat).text("Q?", " The answer is") == "Q? The answer is"


def test_noise_haystack_replaces_the_books(encoder):
    task = tasks_ruler.task_for("niah_multivalue", "noise")
    s, _ = tasks_ruler.make_sample(task, 1024, 0, 0, count_with(encoder))
    assert task.generator.haystack == "noise" and not task.needs_books
    assert "The grass is green." in s.input and sorted(solve_niah(s.prompt)) == sorted(s.outputs)


def test_fit_units_finds_the_largest_count_within_budget():
    costs = {n: 10 + 3 * n + (n % 5 == 0) for n in range(1, 10000)}  # not quite monotone

    def build(n):
        return n

    for budget in (13, 100, 1000, 4000):
        for guess in (None, 1, 50, 1500):
            _, units, tokens = fit_units(build, costs.__getitem__, budget, guess)
            assert tokens <= budget and costs[units + 1] > budget
    _, units, tokens = fit_units(build, costs.__getitem__, 5)  # nothing fits: the minimum, over budget
    assert (units, tokens) == (1, 13)


def test_insert_at_depths():
    assert insert_at_depths(list("abcd"), ["X", "Y"], [0.0, 0.5]) == ["X", "a", "b", "Y", "c", "d"]
    assert insert_at_depths(list("abcd"), ["X"], [1.0]) == ["a", "b", "c", "d", "X"]


def test_books_must_be_held_out(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"split": ["heldout", "train"], "text": ["a " * 600, "b " * 600]}), path)
    with pytest.raises(ValueError, match="must be held out from training"):
        BookHaystack.from_parquet(path)
    with pytest.raises(ValueError, match="make assets, or pass --haystack noise"):
        BookHaystack.from_parquet(tmp_path / "missing.parquet")


# ----------------------------------------------------------------------------- scoring
def test_rulers_metrics_on_hand_written_cases():
    refs = [["7654321"], ["1111111", "2222222", "3333333", "4444444"], ["ABCDE"]]
    preds = ["The number is 7654321.", "1111111, 3333333 and 9999999", "abcde"]  # containment ignores case
    assert [match_all(p, r) for p, r in zip(preds, refs)] == [1.0, 0.5, 1.0]
    assert string_match_all(preds, refs) == round(100 * 2.5 / 3, 2) == 83.33
    assert string_match_part(["Paris, France", "in Rome"], [["paris", "Lyon"], ["Milan"]]) == 50.0
    assert match_part("lyon", ["Paris", "LYON"]) == 1.0 and match_part("", ["x"]) == 0.0
    assert match_all("76543210", ["7654321"]) == 1.0  # RULER counts a longer number that contains the answer
    assert postprocess("  \x00 1234567\x07tail \n") == "1234567\ntail"


@pytest.mark.parametrize("answer, refs, kind, right", [
    (" 7654321.", ["7654321"], "number", True),
    (" 7654321.\nThe special magic number for x is 1234567.", ["7654321"], "number", True),  # first line only
    (":\n 7654321.\n1234567", ["7654321"], "number", True),  # the first line that names a number
    (" are:\n\n", ["7654321"], "number", False),
    (":\n1. 1111111\n2) 2222222\nThe end: 3333333", ["1111111", "2222222"], "number", True),  # a numbered list
    (":\n1. 1111111\n\n2. 2222222", ["1111111", "2222222"], "number", False),  # a list ends at a blank line
    (":\n1. 1.\n2. 2.", ["1111111"], "number", False),
    (" 11.", ["11"], "number", True),
    (" 76543210.", ["7654321"], "number", False),
    (" 1234567, 7654321", ["7654321"], "number", False),  # another number of the kind
    (" 4444444, 1111111, 3333333 and 2222222.", ["1111111", "2222222", "3333333", "4444444"], "number", True),
    (" 1111111, 2222222 and 3333333.", ["1111111", "2222222", "3333333", "4444444"], "number", False),
    (" ABCDE BCDEF CDEFG", ["ABCDE", "BCDEF", "CDEFG"], "var", True),
    (" VAR ABCDE, VAR BCDEF, CDEFG", ["ABCDE", "BCDEF", "CDEFG"], "var", True),
    (" ABCDE BCDEF", ["ABCDE", "BCDEF", "CDEFG"], "var", False),
    (" 3F2504E0-4F89-41D3-9A0C-0305E82C3301", ["3f2504e0-4f89-41d3-9a0c-0305e82c3301"], "uuid", True),
    ("", ["7654321"], "number", False),
])
def test_read_score_on_hand_written_cases(answer, refs, kind, right):
    assert read_correct(answer, refs, kind) is right


def test_read_score_of_words_counts_only_listed_words():
    prompt = "Below is a numbered list of words.\n1. apple 2. pear 3. apple 4. plum\nQuestion: ..."
    assert read_correct(" 1. apple 2. pear and more", ["apple", "pear"], "word", prompt=prompt)
    assert not read_correct(" 1. apple 2. plum", ["apple", "pear"], "word", prompt=prompt)
    assert read_correct(" Paris.", ["paris", "Lyon"], "text", "part") and not read_correct(" Paris or Rome",
                                                                                            ["paris"], "text", "part")
    assert first_line("\n\n  x\ny") == "x"
    assert [infer_kind(r, prompt) for r in (["12"], ["ABCDE"], ["apple", "pear"], ["tame-harbor"], ["Paris"])] == \
        ["number", "var", "word", "key", "text"]


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    """A tiny random fot model (window 64, one memory layer) saved with fot-tiny's tokenizer."""
    config = fot.LongLlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, last_context_length=32, mem_layers=[1], mem_dtype="float32",
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    fot.LongLlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class ScriptedModel:
    """Stands in for a model: generate() appends ``answer(prompt ids)`` and counts its calls."""

    def __init__(self, answer, config):
        self.answer, self.config, self.calls = answer, config, []

    def generate(self, input_ids, attention_mask=None, max_new_tokens=None, **kw):
        self.calls.append(tuple(input_ids[0].tolist()))
        new = self.answer(tuple(input_ids[0].tolist()))[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new], dtype=torch.long)], dim=1)


def knowing(encoder, samples, model_dir):
    """A model that answers each prompt with its references, as a list on one line."""
    script = {tuple(encoder.ids(s.input, s.answer_prefix)):
              encoder.tokenizer(" " + ", ".join(s.outputs), add_special_tokens=False)["input_ids"] for s in samples}
    return ScriptedModel(script.__getitem__, fot.LongLlamaConfig.from_pretrained(model_dir))


ARGS = ["--tasks", "niah_single_1", "niah_multivalue", "vt", "cwe", "--lengths", "1536", "--samples", "2",
        "--haystack", "noise", "--seed", "3", "--device", "cpu", "--threads", "1"]


def generated(encoder, haystack_name="noise"):
    tasks = [tasks_ruler.task_for(n, haystack_name) for n in ("niah_single_1", "niah_multivalue", "vt", "cwe")]
    return ruler.make_samples(encoder, tasks, [1536], 2, 3, None)


def test_cli_scores_a_knowing_model_100_and_a_wrong_one_0(model_dir, encoder, monkeypatch, tmp_path, capsys):
    samples = generated(encoder)
    knows = knowing(encoder, samples, model_dir)
    monkeypatch.setattr(ruler, "load_model", lambda *args: knows)
    report = ruler.main(["--model", str(model_dir), "--settings", "memory", "--out", str(tmp_path / "a"), *ARGS])
    rows = report["results"]["memory"]
    assert [(r["task"], r["length"], r["n"], r["score"], r["read"]) for r in rows] == \
        [(n, 1536, 2, 100.0, 100.0) for n in ("niah_single_1", "niah_multivalue", "vt", "cwe")]
    assert len(knows.calls) == 8 and report["average"]["memory"][1536]["score"] == 100.0
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["results"]["memory"][0]["samples"][0]["outputs"] == samples[0].outputs
    assert saved["max_new_tokens"] == {"niah_single_1": 128, "niah_multivalue": 128, "vt": 30, "cwe": 120}
    assert (tmp_path / "a" / "ruler.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "100.0 / 100.0" in capsys.readouterr().out

    wrong = ScriptedModel(lambda ids: encoder.tokenizer(" 0000000, ZZZZZ, none", add_special_tokens=False)
                          ["input_ids"], knows.config)
    monkeypatch.setattr(ruler, "load_model", lambda *args: wrong)
    report = ruler.main(["--model", str(model_dir), "--settings", "memory", *ARGS])
    assert all(r["score"] == 0.0 and r["read"] == 0.0 for r in report["results"]["memory"])


def without_timings(report: dict) -> dict:
    """A report's results without the seconds and peak RSS, which belong to the process that scored each prompt."""
    timings = ("seconds", "peak_rss_bytes")
    return {n: [{k: [{f: x for f, x in t.items() if f not in timings} for t in v] if k == "samples" else v
                 for k, v in r.items() if k not in timings} for r in rows] for n, rows in report["results"].items()}


def test_cli_resume_scores_only_the_missing_samples(model_dir, encoder, monkeypatch, tmp_path):
    samples = generated(encoder)
    knows = knowing(encoder, samples, model_dir)
    monkeypatch.setattr(ruler, "load_model", lambda *args: knows)
    out = tmp_path / "run"
    args = ["--model", str(model_dir), "--settings", "memory", "no-memory", "--out", str(out), *ARGS]
    full = ruler.main(args)
    lines = (out / "trials.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 1 + 2 + 16  # the run, each setting, each answer
    (out / "trials.jsonl").write_text("".join(lines[:7]) + lines[7][:20])  # killed while writing the 7th line
    knows.calls.clear()
    with pytest.raises(SystemExit) as exc:  # finished trials are never overwritten without --resume
        ruler.main(args)
    assert exc.value.code == 2
    resumed = ruler.main([*args, "--resume"])
    assert len(knows.calls) == 16 - 5  # five answers were logged whole
    assert without_timings(resumed) == without_timings(full)
    with pytest.raises(SystemExit):  # other arguments: refused
        ruler.main([*args[:-2], "--seed", "4", "--resume"])


def test_cli_runs_rulers_jsonl_unchanged(model_dir, encoder, monkeypatch, tmp_path):
    rows = [json.loads(line) for line in JSONL.read_text().splitlines()]
    samples = tasks_ruler.read_jsonl(JSONL)
    assert [(s.task, s.length, s.max_new_tokens, s.metric, s.kind) for s in samples] == \
        [("niah_single_1", 512, 128, "all", "number")] * 3
    assert [s.prompt for s in samples] == [r["input"] + r["answer_prefix"] for r in rows]
    assert [solve_niah(s.prompt) for s in samples] == [r["outputs"] for r in rows]
    knows = knowing(encoder, samples, model_dir)
    monkeypatch.setattr(ruler, "load_model", lambda *args: knows)
    report = ruler.main(["--model", str(model_dir), "--settings", "memory", "--jsonl", str(JSONL), "--device", "cpu"])
    assert [(r["task"], r["length"], r["n"], r["score"], r["read"]) for r in report["results"]["memory"]] == \
        [("niah_single_1", 512, 3, 100.0, 100.0)]
    qa = tmp_path / "qa_1" / "validation.jsonl"  # RULER scores QA with string_match_part
    qa.parent.mkdir()
    qa.write_text(json.dumps({"input": "Question: capital of France?", "outputs": ["Paris", "Paris, France"],
                              "answer_prefix": " Answer:"}) + "\n")
    (s,) = tasks_ruler.read_jsonl(qa)
    assert (s.task, s.max_new_tokens, s.metric, s.kind) == ("qa_1", 32, "part", "text")


def test_cli_end_to_end_on_a_random_model(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    report = ruler.main(["--model", str(model_dir), "--tasks", "niah_single_1", "niah_multikey_2", "--lengths", "256",
                         "--samples", "1", "--max-new-tokens", "6", "--settings", "memory", "no-memory", "--device",
                         "cpu", "--threads", "1", "--show", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "--- niah_single_1 at 256" in printed and "[...]" in printed
    for rows in report["results"].values():
        for r in rows:
            assert r["n"] == 1 and 200 <= r["mean_tokens"] <= 256 - 6
            (s,) = r["samples"]
            assert s["new_tokens"] <= 6 and s["score"] == match_all(postprocess(s["answer"]), s["outputs"])
    assert report["settings"]["no-memory"]["mem_layers"] == [] and report["window"] == 64


def test_a_prompt_killed_mid_prefill_resumes_from_disk_with_the_answers_of_one_call(model_dir, tmp_path,
                                                                                     monkeypatch):
    """--offload-dir with --prefill-segment: each prompt's memory is filled in segments into files; a run killed
    inside the second prompt's prefill resumes that prompt from its files (its first segment is not run again) and
    scores every sample as the run without segments does; each prompt's files are deleted once it is scored."""
    import fot.prefill

    args = ["--model", str(model_dir), "--tasks", "niah_single_1", "--lengths", "256", "--samples", "2",
            "--max-new-tokens", "6", "--haystack", "noise", "--settings", "memory", "--device", "cpu", "--threads",
            "1"]
    whole = ruler.main([*args, "--out", str(tmp_path / "whole")])
    out, offload = tmp_path / "out", tmp_path / "offload"
    extra = ["--out", str(out), "--offload-dir", str(offload), "--prefill-segment", "64"]
    real = fot.prefill.prefill
    firsts = []

    def killed_in_second_prompt(model, ids, cache=None, **kwargs):
        def on_segment(c):
            kwargs["on_segment"](c)  # the job's checkpoint
            if c.seen_tokens == 64:
                firsts.append(c)
                if len(firsts) == 2:  # the second prompt's first segment is on disk
                    raise KeyboardInterrupt
        return real(model, ids, cache, **{**kwargs, "on_segment": on_segment})

    with monkeypatch.context() as m:
        m.setattr(fot.prefill, "prefill", killed_in_second_prompt)
        with pytest.raises(KeyboardInterrupt):
            ruler.main([*args, *extra])
    jobs = json.loads((offload / "jobs.json").read_text())
    assert [job["tokens"] for job in jobs.values()] == [64]
    assert len((out / "trials.jsonl").read_text().splitlines()) == 1 + 1 + 1  # the run, the setting, one answer
    starts = []
    with monkeypatch.context() as m:
        m.setattr(fot.prefill, "prefill", lambda *a, **k: starts.append(a[2].seen_tokens) or real(*a, **k))
        resumed = ruler.main([*args, *extra, "--resume"])
    assert starts == [64]  # only the killed prompt ran, from its files
    assert without_timings(resumed) == without_timings(whole)
    assert json.loads((offload / "jobs.json").read_text()) == {} and os.listdir(offload / "memory") == []


@pytest.mark.parametrize("args, message", [
    (["--tasks", "bogus"], "--tasks ['bogus']: unknown"),
    (["--tasks", "vt", "--prefill-segment", "100"], "a positive multiple of the model's window (64 tokens)"),
    (["--tasks", "vt", "--offload-dir", "{missing}", "--settings", "memory", "hf:2048"],
     "has no fot memory to prefill"),
    (["--tasks", "all", "vt"], "--tasks all already includes every task"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--tasks", "cwe", "--lengths", "150"], "--lengths 150: cwe generates 120 tokens"),
    (["--lengths", "4096", "4096"], "--lengths lists a length twice"),
    (["--max-new-tokens", "vt=x"], "--max-new-tokens 'vt=x': write N or TASK=N"),
    (["--tasks", "vt", "--max-new-tokens", "cwe=5"], "'cwe' is not among the tasks run"),
    (["--tasks", "niah_single_2", "--books", "{missing}"], "--books"),
    (["--jsonl", "{missing}"], "--jsonl"),
    (["--jsonl", "{jsonl}", "--tasks", "vt"], "--tasks and --jsonl exclude each other"),
    (["--jsonl", "{jsonl}", "--lengths", "4096"], "--lengths and --jsonl exclude each other"),
    (["--jsonl", "{jsonl}", "--max-new-tokens", "vt=3"], "with --jsonl give one N >= 1"),
    (["--jsonl-metric", "part"], "--jsonl-metric applies to --jsonl files only"),
    (["--tasks", "vt", "--chat-template"], "--chat-template: the tokenizer"),
    (["--tasks", "vt", "--settings", "bogus"], "unknown setting 'bogus'"),
])
def test_bad_arguments_exit_2_naming_the_flag(args, message, model_dir, tmp_path, capsys):
    paths = dict(missing=tmp_path / "missing.parquet", jsonl=JSONL)
    with pytest.raises(SystemExit) as exc:
        ruler.main(["--model", str(model_dir), *[a.format(**paths) for a in args]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
