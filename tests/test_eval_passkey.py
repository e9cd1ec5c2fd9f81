"""eval/passkey.py: the prompt against an independent restatement of Landmark's generate_prompt, exact token
lengths and key depths for every template, the held-out templates and their leak check, exact-match scoring with
scripted models, the CLI end to end on a tiny random model and on models/fot-tiny, and bad inputs."""

import re
import shlex

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fot
from eval import passkey
from eval.common import parse_setting
from tasks.heldout import MIN_FRAGMENT, eval_only_strings, literal_fragments
from tasks.lookup import LOOKUP_HEADER
from tasks.passkey import DEFAULT_TEMPLATE, DIARY, LEDGER, TEMPLATES, TOWN, GeneratedFiller, resolve_templates

ROOT = Path(__file__).resolve().parents[1]
FOT_TINY = ROOT / "models" / "fot-tiny"

# The protocol's text, written out here rather than imported, so a change in eval/passkey.py shows up.
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz "
        "you about the important information there.")
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def landmark_prompt(n_garbage: int, n_prefix: int, key: int) -> str:
    """Landmark Attention's generate_prompt with its two random draws given."""
    garbage_inf = " ".join([GARBAGE] * 2000)
    lines = [TASK, garbage_inf[:n_prefix], f"The pass key is {key}. Remember it. {key} is the pass key.",
             garbage_inf[: n_garbage - n_prefix], QUESTION]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from train.tokenizer import synthetic_texts, train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(synthetic_texts("passkey", 100, 0), out, vocab_size=400)
    return out


@pytest.fixture(scope="module")
def encoder(tokenizer_dir):
    from transformers import AutoTokenizer

    return passkey.PromptEncoder(AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir, tmp_path_factory):
    """A tiny random fot model (window 64, one memory layer) saved with the tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = fot.LongLlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, last_context_length=32, mem_layers=[1], mem_dtype="float32",
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    fot.LongLlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- the prompt
def test_protocol_text_matches_the_trainers_passkey_documents():
    from tasks.passkey import FILLER, PASSKEY_INTRO

    assert (passkey.TASK, passkey.FILLER, passkey.QUESTION) == (TASK, GARBAGE, QUESTION)
    assert (PASSKEY_INTRO, FILLER) == (TASK, GARBAGE)


@pytest.mark.parametrize("n_garbage", [0, 1, 89, 90, 91, 500, 20000])
def test_prompt_equals_landmark_generate_prompt(n_garbage):
    for trial in range(20):
        p = passkey.build_prompt(n_garbage, passkey.trial_rng(7, n_garbage, trial))
        assert p.text == landmark_prompt(n_garbage, p.n_prefix, p.key)
        lines = p.text.split("\n")
        assert len(lines) == 5
        assert len(lines[1]) == p.n_prefix and len(lines[3]) == n_garbage - p.n_prefix
        assert lines[1] == GARBAGE[: len(lines[1])] or lines[1].startswith(GARBAGE + " ")  # both from the start
        assert lines[3] == GARBAGE[: len(lines[3])] or lines[3].startswith(GARBAGE + " ")


def test_prompt_draws_split_then_key_from_the_seeded_generator():
    rng = np.random.default_rng([3, 1024, 5])
    n_prefix, key = int(rng.integers(0, 1001)), int(rng.integers(1, 50000))
    p = passkey.build_prompt(1000, passkey.trial_rng(3, 1024, 5))
    assert (p.n_prefix, p.key) == (n_prefix, key)


def test_key_and_split_ranges():
    keys, splits = [], []
    for trial in range(3000):
        p = passkey.build_prompt(10, passkey.trial_rng(0, 256, trial))
        keys.append(p.key)
        splits.append(p.n_prefix)
    assert min(keys) >= 1 and max(keys) < 50000 and max(keys) > 45000 and min(keys) < 5000
    assert set(splits) == set(range(11))  # uniform over [0, n_garbage], both ends included


def test_prompts_are_reproducible_per_length_and_trial():
    a = passkey.build_prompt(700, passkey.trial_rng(0, 512, 4))
    assert a == passkey.build_prompt(700, passkey.trial_rng(0, 512, 4))
    others = [passkey.trial_rng(0, 512, 5), passkey.trial_rng(0, 1024, 4), passkey.trial_rng(1, 512, 4)]
    assert all(passkey.build_prompt(700, rng).key != a.key for rng in others)


# ----------------------------------------------------------------------------- tokens
@pytest.mark.parametrize("length", [128, 200, 1000, 4096, 16384])
def test_calibrated_prompts_have_the_requested_token_count(encoder, length):
    trials = passkey.make_trials(encoder, [length], trials=4, seed=0)[length]
    counts = [t.tokens for t in trials]
    assert counts == [length] * 4  # exact: fit_prompt adjusts each trial's filler
    assert all(t.prompt_ids[0] == encoder.tokenizer.bos_token_id for t in trials)


def test_a_length_below_the_fixed_lines_warns(encoder, caplog):
    trials = passkey.make_trials(encoder, [64], trials=2, seed=0)[64]
    assert all(t.n_garbage == 0 for t in trials)  # this 400-piece tokenizer needs ~98 tokens without filler
    assert "the prompt without filler already has" in caplog.text


def test_answer_tokens_are_the_tail_of_prompt_plus_key(encoder):
    trial = passkey.make_trials(encoder, [300], trials=1, seed=0)[300][0]
    assert trial.answer_method == "tail"
    assert encoder.tokenizer.decode(trial.answer_ids).strip() == str(trial.key)


def test_key_token_is_where_the_key_line_puts_the_answer(encoder):
    positions = []
    for depth in (0.0, 0.5, 1.0):
        trial = passkey.make_trials(encoder, [600], trials=1, seed=3, depths=[depth])[600][0]
        pos = passkey.key_token(trial)
        assert trial.prompt_ids[pos:pos + len(trial.answer_ids)] == trial.answer_ids
        assert str(trial.key) not in encoder.tokenizer.decode(trial.prompt_ids[:pos])  # the key line's own run
        positions.append(pos)
    assert positions[0] < 100 < positions[1] < positions[2] - 100  # the key moves with the depth


class MergingTokenizer:
    """Characters as ids, except that "s " before a digit becomes one token: prompt tokens are then not a prefix
    of prompt + " " + K's tokens."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            if text[i : i + 2] == "s " and text[i + 2 : i + 3].isdigit():
                ids.append(999)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_answer_tokens_fall_back_to_the_key_alone():
    enc = passkey.PromptEncoder(MergingTokenizer())
    prompt = passkey.build_prompt(100, passkey.trial_rng(0, 64, 0))
    ids = enc.encode(prompt.text)
    assert ids[0] == 1 and ids.count(1) == 1  # BOS added once
    answer, method = enc.answer_ids(prompt.text, ids, 4321)
    assert (answer, method) == ([ord(c) for c in "4321"], "separate")


# ----------------------------------------------------------------------------- templates
# The key line of each phrasing and the question's end, written out here rather than read from tasks/passkey.py.
KEY_LINES = {
    "landmark": r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.",
    "code": r"Attention: the secret code is (\d+)\. Once more, the secret code is (\d+)\.",
    "number": r"Write this down: the special number is (\d+)\. Again, (\d+) is the special number\.",
}
QUESTION_ENDS = {"landmark": "The pass key is", "code": "The secret code is", "number": "The special number is"}


@pytest.fixture(scope="module")
def tiny_encoder():
    """The shipped model's tokenizer (sentencepiece, 1000 pieces, trained on landmark text only)."""
    from plumbing.tokenizer import load_tokenizer

    return passkey.PromptEncoder(load_tokenizer(FOT_TINY))


def test_the_registry_has_three_haystacks_and_two_phrasings_beyond_landmark():
    assert passkey.TEMPLATES["landmark"].render(7, 3, 5, 0) == landmark_prompt(8, 3, 7)
    haystacks = {t.haystack.name for t in TEMPLATES.values()} - {"grass"}
    phrasings = {t.phrasing.name for t in TEMPLATES.values()} - {"landmark"}
    assert len(haystacks) >= 3 and len(phrasings) >= 2
    assert resolve_templates(["all"]) == list(TEMPLATES)
    assert DEFAULT_TEMPLATE == "landmark"


@pytest.mark.parametrize("name", list(passkey.KNOWN_TEMPLATES))
def test_every_template_hits_the_exact_length_with_the_key_at_the_depth(tiny_encoder, name):
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    trials = passkey.make_trials(tiny_encoder, [256, 3000], 2, seed=4, templates=[name], depths=depths)
    tok = tiny_encoder.tokenizer
    for length, ts in trials.items():
        assert [t.tokens for t in ts] == [length] * len(ts)
        assert [(t.template, t.depth) for t in ts] == [(name, d) for d in depths for _ in range(2)]
        for t in ts:
            rebuilt = passkey.build_prompt(t.n_garbage, passkey.trial_rng(4, length, t.trial), name, t.depth)
            assert tiny_encoder.encode(rebuilt.text) == t.prompt_ids and rebuilt.key == t.key
            lines = rebuilt.text.split("\n")
            assert len(lines[1]) == round(t.depth * t.n_garbage) and len(lines[1]) + len(lines[3]) == t.n_garbage
            if length == 3000:  # the share of filler tokens before the key line is the depth
                before, after = (len(tok(line, add_special_tokens=False)["input_ids"]) for line in (lines[1], lines[3]))
                assert abs(before / (before + after) - t.depth) < 0.03, (t.depth, before, after)
    uniform = passkey.make_trials(tiny_encoder, [700], 6, seed=4, templates=[name])[700]
    assert [t.tokens for t in uniform] == [700] * 6 and len({t.n_prefix for t in uniform}) == 6


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_the_answer_is_recoverable_from_every_template(tiny_encoder, name):
    phrasing = TEMPLATES[name].phrasing.name
    trials = passkey.make_trials(tiny_encoder, [400, 1500], 5, seed=9, templates=[name])
    for t in trials[400] + trials[1500]:
        text = tiny_encoder.tokenizer.decode(t.prompt_ids, skip_special_tokens=True)
        found = re.findall(KEY_LINES[phrasing], text)
        assert found == [(str(t.key), str(t.key))]  # the key line, once, with the trial's key twice
        assert text.endswith("\n" + TEMPLATES[name].phrasing.question)
        assert text.endswith(QUESTION_ENDS[phrasing])
        assert t.answer_method == "tail"
        assert tiny_encoder.tokenizer.decode(t.answer_ids).strip() == str(t.key)


def test_the_probe_template_is_named_only_and_its_strings_are_held_out():
    """tasks/passkey_probe.py's keeper-log: left out of "all" (make demo, validation), run when named, and every one
    of its strings is an evaluation string that the training scan refuses."""
    from tasks.heldout import Scanner, forbidden_strings
    from tasks.passkey_probe import PROBE_TEMPLATES

    probe = PROBE_TEMPLATES["keeper-log"]
    assert "keeper-log" not in resolve_templates(["all"]) and "keeper-log" not in TEMPLATES
    assert passkey.template_names(["all", "keeper-log"]) == [*TEMPLATES, "keeper-log"]
    held_out, forbidden = set(eval_only_strings()), set(forbidden_strings())
    p, fragments = probe.phrasing, [f for pattern in probe.haystack.patterns for f in literal_fragments(pattern)]
    assert len(fragments) >= len(probe.haystack.patterns)
    assert {p.intro, p.question, *literal_fragments(p.key_line), *fragments} <= held_out
    assert "The supply locker opens with" in forbidden  # the answer stem, as for every phrasing
    text = probe.render(12345, 400, 300, seed=3)
    for line in text.split("\n"):
        assert Scanner().find(line) is not None, line  # each of its five lines alone is caught


def test_templates_differ_and_pair_their_keys():
    rng = lambda: passkey.trial_rng(1, 2048, 3)  # noqa: E731
    prompts = {name: passkey.build_prompt(3000, rng(), name) for name in TEMPLATES}
    assert len({p.text for p in prompts.values()}) == len(prompts)
    assert len({p.key for p in prompts.values()}) == 1  # trial t has the same key in every template
    parts = {name: (t.phrasing.name, t.haystack.name) for name, t in TEMPLATES.items()}
    assert len(set(parts.values())) == len(parts)
    lines = {name: p.text.split("\n") for name, p in prompts.items()}
    for a in lines:
        for b in lines:
            if a < b:  # a different phrasing changes the fixed lines, a different haystack the filler
                assert (lines[a][0] != lines[b][0]) == (parts[a][0] != parts[b][0])
                assert (lines[a][1] != lines[b][1]) == (parts[a][1] != parts[b][1])


@pytest.mark.parametrize("haystack", [TOWN, DIARY, LEDGER])
def test_generated_haystacks_are_seeded_varied_text(haystack):
    a = haystack.stream([5, 0], 4000)
    assert a == haystack.stream([5, 0], 4000) and haystack.stream([5, 0], 9000).startswith(a)  # prefix-stable
    assert len(a) == 4000 and a != haystack.stream([6, 0], 4000)
    sentences = re.split(r"(?<=\.) ", a)[:-1]  # the last one is cut
    assert len(set(sentences)) > 0.9 * len(sentences)  # varied, not one passage repeated
    assert "\n" not in a and not any(re.search(k, a) for k in KEY_LINES.values())
    assert not any(q in a for q in QUESTION_ENDS.values())
    prefix, suffix = haystack.spans(100, 200, 5)
    assert (len(prefix), len(suffix)) == (100, 200) and prefix[0].isupper() and suffix[0].isupper()


def test_eval_only_strings_catch_held_out_prompts_and_never_training_text():
    from tasks.passkey import passkey_text

    leaks = eval_only_strings()
    assert LOOKUP_HEADER in leaks and all(len(s) >= MIN_FRAGMENT for s in leaks)
    for trial in range(300):  # the trainer's passkey documents, over a range of lengths
        doc = passkey_text(int(np.random.default_rng(trial).integers(0, 6000)), np.random.default_rng([trial, 1]))
        assert not [s for s in leaks if s in doc]
    for name in TEMPLATES:
        text = passkey.build_prompt(4000, passkey.trial_rng(0, 0, 0), name).text
        assert any(s in text for s in leaks) == (name != "landmark"), name
    for haystack in (TOWN, DIARY, LEDGER):
        for pattern in haystack.patterns:  # every generated sentence carries a detectable fragment
            sentence = GeneratedFiller("x", "", (pattern,), haystack.slots).stream([0], 200)
            assert any(s in sentence for s in literal_fragments(pattern)), pattern
            assert literal_fragments(pattern)[0] in leaks


# ----------------------------------------------------------------------------- scoring
class ScriptedModel:
    """Stands in for a model: generate() appends the scripted tokens for each prompt."""

    def __init__(self, script: dict):
        self.script, self.calls = script, []

    def generate(self, input_ids, attention_mask=None, max_new_tokens=None, do_sample=None, num_beams=None, **kw):
        self.calls.append(dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams, **kw))
        new = self.script[tuple(input_ids[0].tolist())][:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


def test_exact_match_scoring(encoder):
    trials = passkey.make_trials(encoder, [128, 256], trials=5, seed=1)
    every = [t for ts in trials.values() for t in ts]
    assert all(len(t.answer_ids) >= 2 for t in every)
    right = ScriptedModel({tuple(t.prompt_ids): t.answer_ids for t in every})
    rows = passkey.evaluate(right, trials, encoder.tokenizer, cache_policy="flush")
    assert [(r["length"], r["accuracy"], r["n"]) for r in rows] == [(128, 100.0, 5), (256, 100.0, 5)]
    assert right.calls[0] == dict(max_new_tokens=len(every[0].answer_ids) + passkey.READ_TOKENS, do_sample=False,
                                  num_beams=1, use_cache=True, cache_policy="flush")

    off_by_one = ScriptedModel({tuple(t.prompt_ids): t.answer_ids[:-1] + [t.answer_ids[-1] + 1] for t in every})
    assert [r["accuracy"] for r in passkey.evaluate(off_by_one, trials, encoder.tokenizer)] == [0.0, 0.0]
    stops_early = ScriptedModel({tuple(t.prompt_ids): t.answer_ids[:-1] for t in every})
    assert [r["accuracy"] for r in passkey.evaluate(stops_early, trials, encoder.tokenizer)] == [0.0, 0.0]
    assert passkey.is_correct([5, 6], [5, 6]) and not passkey.is_correct([5, 6, 7], [5, 6])


def test_the_answer_as_read_is_the_first_number_with_no_digit_after_it(encoder):
    """Scripted models that copy the key and stop, copy it and write a period, or copy it and keep writing digits:
    the protocol counts all three right, the score as read only the first two. The expected texts are decoded
    here from the scripts' own tokens."""
    trials = passkey.make_trials(encoder, [128], trials=2, seed=2)
    every = trials[128]
    tok = encoder.tokenizer

    def pieces(*names: str) -> list[int]:  # digits and "." are single pieces of fot's tokenizers (split digits)
        out = tok.convert_tokens_to_ids(list(names))
        assert tok.unk_token_id not in out
        return out

    scripts = {
        "stops": ([], 100.0),
        "period": (pieces(".", "▁"), 100.0),
        "newline": (pieces("<0x0A>"), 100.0),
        "runs on": (pieces("5", "9", "."), 0.0),
        "space then digit": (pieces("▁", "7"), 100.0),
    }
    for name, (tail, read) in scripts.items():
        script = {tuple(t.prompt_ids): t.answer_ids + tail for t in every}
        (row,) = passkey.evaluate(ScriptedModel(script), trials, tok)
        assert (row["accuracy"], row["accuracy_read"], row["correct_read"]) == (100.0, read, 2 * bool(read)), name
        for t, tr in zip(row["trials"], every):
            assert t["predicted_ids"] == tr.answer_ids and t["read_ids"] == tail
            assert t["read_text"] == tok.decode(tr.answer_ids + tail, skip_special_tokens=True)
            assert t["correct"] and t["correct_read"] == bool(read)
    # a wrong first digit is wrong both ways; a model that answers before the key ("no. 33543") is right as read
    assert passkey.is_correct_read(" 33543.", 33543) and passkey.is_correct_read("33543", 33543)
    assert not passkey.is_correct_read(" 3354359", 33543) and not passkey.is_correct_read(" 3354", 33543)
    assert not passkey.is_correct_read(" 33543.5", 33543) and not passkey.is_correct_read(" hidden", 33543)
    assert passkey.read_answer(" the key: 33543. 12") == "33543" and passkey.read_answer("none") is None


# ----------------------------------------------------------------------------- the CLI
def test_cli_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    report = passkey.main(["--model", str(model_dir), "--lengths", "160", "64", "--trials", "2", "--settings",
                           "memory", "no-memory", "topk:4", "--threads", "1", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "memory" in printed and "no-memory" in printed and "topk:4" in printed
    assert "protocol / as read" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["lengths"] == [64, 160] and saved["window"] == 64 and saved["trials"] == 2
    assert saved["answer_tokenization"] == {"tail": 4}
    assert (saved["templates"], saved["depths"]) == (["landmark"], None)
    assert list(saved["results"]) == ["memory", "no-memory", "topk:4"]
    assert saved["settings"]["memory"]["mem_layers"] == [1]
    assert saved["settings"]["no-memory"]["mem_layers"] == []
    assert (saved["settings"]["topk:4"]["mem_top_k"], saved["settings"]["topk:4"]["mem_index"]) == (4, "exact")
    for rows in saved["results"].values():
        assert [r["length"] for r in rows] == [64, 160]
        for r in rows:
            assert r["n"] == 2 and len(r["trials"]) == 2 and r["accuracy"] == 100.0 * r["correct"] / 2
            assert r["accuracy_read"] == 100.0 * r["correct_read"] / 2
            assert abs(r["mean_tokens"] - 160) <= 16 if r["length"] == 160 else r["mean_tokens"] >= 64
            for t in r["trials"]:
                assert len(t["predicted_ids"]) <= len(t["answer_ids"])
                assert t["correct"] == (t["predicted_ids"] == t["answer_ids"])
                assert 0 < t["peak_rss_bytes"] <= saved["peak_rss_bytes"]  # each prompt's own peak, within the run's
            assert r["peak_rss_bytes"] == max(t["peak_rss_bytes"] for t in r["trials"])
    keys = {name: [t["key"] for r in rows for t in r["trials"]] for name, rows in saved["results"].items()}
    assert keys["memory"] == keys["no-memory"] == keys["topk:4"]  # every setting sees the same prompts
    assert (out / "passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert lines[0]["run"]["lengths"] == [64, 160] and lines[0]["run"]["settings"] == ["memory", "no-memory", "topk:4"]
    logged = {tuple(line["key"]): line["value"] for line in lines[1:]}
    assert len(logged) == len(lines) - 1 == 3 + 3 * 4  # each setting's configuration, then each trial once
    for name, rows in saved["results"].items():
        assert logged[("setting", name)] == saved["settings"][name]
        for r in rows:
            for t in r["trials"]:
                value = logged[(name, "landmark", None, r["length"], t["trial"])]
                assert {k: v for k, v in value.items() if k != "seconds"} == t


def test_cli_evaluates_a_lora_adapter_on_its_base(model_dir, tmp_path):
    """A LoRA run's final/ (adapter only) is a --model: transformers loads the base its config names."""
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'fot[dev]')")
    from transformers import AutoTokenizer

    base = fot.LongLlamaForCausalLM.from_pretrained(model_dir)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(adapter)
    report = passkey.main(["--model", str(adapter), "--lengths", "100", "--trials", "2", "--threads", "1",
                           "--device", "cpu"])  # fmt: skip
    assert report["window"] == 64 and report["results"]["memory"][0]["n"] == 2
    from eval.common import load_model

    loaded = load_model(adapter, parse_setting("memory"), "cpu", "float32")
    ids = torch.randint(3, 200, (1, 100))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, lora(input_ids=ids).logits)  # base + adapter, as trained
        plain = fot.LongLlamaForCausalLM.from_pretrained(model_dir)
        assert not torch.equal(loaded(ids).logits, plain(ids).logits)  # the adapter is applied


def test_cli_scores_a_model_that_knows_the_keys_100_percent(model_dir, encoder, monkeypatch):
    """The CLI given a model whose generate() answers every prompt correctly: its prompts, seeds and scoring
    agree."""
    trials = passkey.make_trials(encoder, [100], trials=3, seed=5)
    knows = ScriptedModel({tuple(t.prompt_ids): t.answer_ids for t in trials[100]})
    knows.config = fot.LongLlamaConfig.from_pretrained(model_dir)
    monkeypatch.setattr(passkey, "load_model", lambda *args: knows)
    report = passkey.main(["--model", str(model_dir), "--lengths", "100", "--trials", "3", "--seed", "5",
                           "--settings", "memory", "--device", "cpu"])
    assert report["results"]["memory"][0]["accuracy"] == 100.0


def test_template_all_on_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "out"
    report = passkey.main(["--model", str(FOT_TINY), "--template", "all", "--lengths", "256", "--trials", "2",
                           "--settings", "memory", "--threads", "2", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "per template" in printed and all(name in printed for name in TEMPLATES)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(report)) and saved["templates"] == list(TEMPLATES)
    (row,) = saved["results"]["memory"]
    assert row["n"] == 2 * len(TEMPLATES) and (row["min_tokens"], row["max_tokens"]) == (256, 256)
    per_template, read = {}, {}
    for t in row["trials"]:
        assert t["correct"] == (t["predicted_ids"] == t["answer_ids"])
        per_template.setdefault(t["template"], []).append(t["correct"])
        read.setdefault(t["template"], []).append(t["correct_read"])
    assert {k: len(v) for k, v in per_template.items()} == {name: 2 for name in TEMPLATES}
    for name, correct in per_template.items():
        assert row["by_template"][name] == {"accuracy": 50.0 * sum(correct), "correct": sum(correct), "n": 2,
                                            "accuracy_read": 50.0 * sum(read[name]), "correct_read": sum(read[name])}
    assert row["accuracy"] == pytest.approx(np.mean([50.0 * sum(c) for c in per_template.values()]))
    keys = {name: [t["key"] for t in row["trials"] if t["template"] == name] for name in TEMPLATES}
    assert len({tuple(k) for k in keys.values()}) == 1  # paired: trial t has one key in every template
    assert (out / "passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (out / "passkey_depth.png").exists()


def test_depths_write_a_length_by_depth_heatmap(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    passkey.main(["--model", str(model_dir), "--lengths", "100", "160", "--trials", "2", "--depths", "0", "0.5", "1",
                  "--template", "landmark", "code-grass", "--settings", "memory", "no-memory", "--device", "cpu",
                  "--out", str(out)])
    assert "per depth" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved["depths"] == [0.0, 0.5, 1.0]
    for rows in saved["results"].values():
        for row in rows:
            assert row["n"] == 2 * 3 * 2 and list(row["by_depth"]) == ["0", "0.5", "1"]
            for depth, cell in row["by_depth"].items():
                mine = [t for t in row["trials"] if t["depth"] == float(depth)]
                assert cell["n"] == 4 and cell["correct"] == sum(t["correct"] for t in mine)
                assert all(t["n_prefix"] == round(float(depth) * t["n_garbage"]) for t in mine)
    assert (out / "passkey_depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lengths_for_runs_each_setting_at_its_own_lengths(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    passkey.main(["--model", str(model_dir), "--lengths", "100", "160", "240", "--trials", "2", "--depths", "0", "1",
                  "--settings", "memory", "topk:4", "no-memory", "--lengths-for", "memory=:160", "topk:4=160:",
                  "--device", "cpu", "--out", str(out)])
    table = capsys.readouterr().out.split("per depth")[0].splitlines()
    row = {line.split()[0]: re.findall(r"\S+%|(?<= )-(?= |$)", line) for line in table[2:] if line.strip()}
    assert [c == "-" for c in row["100"]] == [False, True, False]  # memory, topk:4, no-memory
    assert [c == "-" for c in row["160"]] == [False, False, False]
    assert [c == "-" for c in row["240"]] == [True, False, False]
    saved = json.loads((out / "results.json").read_text())
    assert saved["setting_lengths"] == {"memory": [100, 160], "topk:4": [160, 240], "no-memory": [100, 160, 240]}
    for name, lengths in saved["setting_lengths"].items():
        assert [r["length"] for r in saved["results"][name]] == lengths
    trials = [json.loads(line)["key"] for line in (out / "trials.jsonl").read_text().splitlines()[1:]]
    assert not any(k[0] == "memory" and k[3] == 240 for k in trials if k[0] != "setting")
    assert (out / "passkey_depth.png").is_file() and (out / "passkey.png").is_file()


def test_spread_cells_keeps_every_template_and_depth():
    cells = passkey.spread_cells(5, 3, 1, 10)
    assert len(set(cells)) == 10 and all(t == 0 for _, _, t in cells)
    per_template = np.bincount([i for i, _, _ in cells], minlength=5)
    per_depth = np.bincount([j for _, j, _ in cells], minlength=3)
    assert per_template.tolist() == [2] * 5 and sorted(per_depth.tolist()) == [3, 3, 4]
    assert passkey.spread_cells(5, 3, 1, 15) == [(i, j, 0) for i in range(5) for j in range(3)]
    two = passkey.spread_cells(2, 3, 2, 6)  # 12 cells, half of them: every (template, depth) pair once
    assert sorted((i, j) for i, j, _ in two) == [(i, j) for i in range(2) for j in range(3)]


def test_a_prompt_subset_holds_the_full_grids_prompts(tiny_encoder):
    """Capped lengths run some of the very prompts (key, depth, tokens) the full grid has, not other ones."""
    names = list(TEMPLATES)[:3]
    full = passkey.make_trials(tiny_encoder, [200, 300], 2, seed=3, templates=names, depths=[0, 1])
    part = passkey.make_trials(tiny_encoder, [200, 300], 2, seed=3, templates=names, depths=[0, 1], prompts={300: 5})
    assert part[200] == full[200] and len(part[300]) == 5
    assert all(tr in full[300] for tr in part[300])


def test_prompts_for_runs_a_spread_subset_at_long_lengths(model_dir, tmp_path):
    names = list(TEMPLATES)[:2]
    out = tmp_path / "out"
    report = passkey.main(["--model", str(model_dir), "--template", *names, "--lengths", "100", "160", "--trials",
                           "1", "--depths", "0", "0.5", "1", "--settings", "no-memory", "--prompts-for", "160:=4",
                           "--device", "cpu", "--out", str(out)])
    short, long = report["results"]["no-memory"]
    assert short["n"] == 6 and long["n"] == 4
    assert sorted((t["template"], t["depth"]) for t in long["trials"]) == sorted(
        (names[i], (0.0, 0.5, 1.0)[j]) for i, j, _ in passkey.spread_cells(2, 3, 1, 4))
    saved = json.loads((out / "results.json").read_text())
    assert saved["prompts_per_length"] == {"100": 6, "160": 4}


def test_prompts_for_below_the_template_count_reports_the_templates_it_ran(model_dir, tmp_path):
    """One prompt at a length leaves every other template out of that length's breakdown: the tables show "-"
    there and the report is written (it raised KeyError on the first missing template)."""
    names = list(TEMPLATES)[:3]
    out = tmp_path / "out"
    report = passkey.main(["--model", str(model_dir), "--template", *names, "--lengths", "100", "160", "--trials",
                           "1", "--depths", "0.5", "--settings", "no-memory", "--prompts-for", "160:=1",
                           "--device", "cpu", "--out", str(out)])
    short, long = report["results"]["no-memory"]
    assert set(short["by_template"]) == set(names) and len(long["by_template"]) == 1
    assert (out / "results.json").is_file() and (out / "passkey.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}"], "does not exist"),
    (["--model", "{model}", "--prompts-for", "160=4"], "write LO:HI=N"),
    (["--model", "{model}", "--prompts-for", ":=0"], "N must be between 1 and"),
    (["--model", "{model}", "--lengths", "100", "--prompts-for", "200:=1"], "none of --lengths [100]"),
    (["--model", "{model}", "--lengths", "100", "--prompts-for", ":=1", "100:=2"], "length 100 is in two ranges"),
    (["--model", "{model}", "--lengths-for", "memory=8192"], "write SETTING=LO:HI"),
    (["--model", "{model}", "--lengths-for", "topk:4=:100"], "is not among --settings"),
    (["--model", "{model}", "--lengths", "100", "--lengths-for", "memory=200:"], "none of --lengths [100]"),
    (["--model", "{empty}"], "has no config.json"),
    (["--model", "{no_tok}"], "no tokenizer in"),
    (["--model", "{model}", "--settings", "memory", "bogus"], "unknown setting 'bogus'"),
    (["--model", "{model}", "--settings", "topk:0"], "K must be a positive integer"),
    (["--model", "{model}", "--settings", "memory", "memory"], "lists a setting twice"),
    (["--model", "{model}", "--lengths", "32", "128"], "at least 64 tokens"),
    (["--model", "{model}", "--trials", "0"], "--trials must be >= 1"),
    (["--model", "{model}", "--last-context-length", "65"], "exceeds the model's window"),
    (["--model", "{model}", "--template", "bogus"], "unknown; use 'all' or any of landmark"),
    (["--model", "{model}", "--template", "all", "landmark"], "already includes every template"),
    (["--model", "{model}", "--template", "landmark", "landmark"], "lists a template twice"),
    (["--model", "{model}", "--depths", "0.5", "1.5"], "fractions of the filler in [0, 1]"),
    (["--model", "{model}", "--prefill-segment", "100"], "a positive multiple of the model's window (64 tokens)"),
    (["--model", "{model}", "--prefill-segment", "0"], "a positive multiple of the model's window"),
    (["--model", "{model}", "--offload-dir", "{empty}", "--settings", "memory", "hf:128"],
     "setting hf:128 (transformers' full attention) has no fot memory to prefill"),
])
def test_bad_inputs_are_clear_errors(args, message, model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((model_dir / "config.json").read_text())
    paths = dict(missing=tmp_path / "missing", empty=tmp_path / "empty", no_tok=no_tok, model=model_dir)
    with pytest.raises(SystemExit) as exc:
        passkey.main([a.format(**paths) for a in args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_settings_parse_to_from_pretrained_overrides():
    assert parse_setting("memory").overrides == {}
    assert parse_setting("no-memory").overrides == {"mem_layers": []}
    assert parse_setting("topk:32").overrides == {"mem_top_k": 32, "mem_index": "exact"}
    assert parse_setting("full:8192").overrides == {"mem_layers": [], "max_position_embeddings": 8192,
                                                    "last_context_length": 8192}
    with pytest.raises(ValueError, match="full:8192"):
        parse_setting("full:")


def test_full_attention_setting_equals_one_plain_pass():
    """full:W on a prompt shorter than W is one causal pass: the model's logits with no windows at all."""
    import fot
    from eval.common import load_model

    model = fot.LongLlamaForCausalLM.from_pretrained(ROOT / "models" / "fot-tiny").eval()
    full = load_model(ROOT / "models" / "fot-tiny", parse_setting("full:512"), "cpu", "float32")
    assert full.config.mem_layers == [] and full.config.max_position_embeddings == 512
    ids = torch.randint(3, 600, (1, 400))
    twin = fot.LongLlamaForCausalLM.from_pretrained(ROOT / "models" / "fot-tiny", mem_layers=[]).eval()
    with torch.no_grad():
        windowed = model(ids).logits  # window 128: three windows go to memory
        one_pass = full(ids).logits
        assert torch.equal(one_pass[:, :64], twin(ids[:, :64]).logits)  # the first tokens: same either way
    assert (one_pass - windowed).abs().max() > 1e-3


def test_topk_settings_parse():
    pytest.importorskip("faiss")
    assert parse_setting("topk-ivf:8").overrides == {"mem_top_k": 8, "mem_index": "faiss-ivf"}
    assert parse_setting("topk-flat:8").overrides == {"mem_top_k": 8, "mem_index": "faiss-flat"}


def test_script_entry_point_reports_a_missing_model(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "eval" / "passkey.py"), "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.mark.parametrize("target", ["demo", "demo-long"])
def test_make_demo_targets_pass_the_argument_checks(target, tmp_path):
    """The eval/passkey.py line of `make demo` / `make demo-long` (read with make -n) passes every argument check
    (a --lengths-for range with none of the target's lengths once failed here at the start of a run)."""
    dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    line = next(x for x in dry.stdout.replace("\\\n", "").splitlines() if "eval/passkey.py --model" in x)
    argv = shlex.split(line.split("eval/passkey.py", 1)[1])
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    args = passkey.build_parser().parse_args(argv)
    assert Path(args.model).resolve() == FOT_TINY
    settings = passkey.validate_args(args)[2]
    assert {s.name for s in settings} >= {"topk-ivf:32", "no-memory"}
    assert all(args.setting_lengths[s.name] for s in settings)


def test_shipped_model_finds_keys_on_held_out_templates_through_memory_only(tmp_path):
    """models/fot-tiny, trained on no passkey template: with the key at depth 0 of 512 tokens (three windows back),
    memory finds it on every template, and the same weights with memory off on none (make demo's 512 column)."""
    report = passkey.main(["--model", str(FOT_TINY), "--template", "all", "--lengths", "512", "--trials", "1",
                           "--depths", "0", "--settings", "memory", "no-memory", "--threads", "2", "--device", "cpu",
                           "--out", str(tmp_path / "out")])
    (memory,), (off,) = report["results"]["memory"], report["results"]["no-memory"]
    assert memory["correct"] == memory["n"] == len(TEMPLATES)
    assert off["correct"] == 0


# ----------------------------------------------------------------------------- eval/passkey_sweep.py
def test_sweep_walks_every_length_and_generator_and_scores_exactly(model_dir, encoder, tmp_path, capsys):
    from eval import passkey_sweep

    out = tmp_path / "sweep"
    report = passkey_sweep.main(["--model", str(model_dir), "--template", "landmark", "code-grass", "--chars", "40",
                                 "100", "30", "--generators", "2", "--depth", "0", "--threads", "1", "--device",
                                 "cpu", "--out", str(out)])
    records = report["results"]["memory"]
    assert [(r["template"], r["generator"], r["n_garbage"]) for r in records] == [
        (t, g, n) for t in ("landmark", "code-grass") for g in (0, 1) for n in (40, 70, 100)]
    for r in records:  # the prompt, rebuilt here from its generator, has the recorded key and length
        p = passkey.build_prompt(r["n_garbage"], np.random.default_rng([r["generator"], r["n_garbage"], 99]),
                                 r["template"], 0.0)
        assert (p.key, p.n_prefix) == (r["key"], 0) and len(encoder.encode(p.text)) == r["tokens"]
        assert r["correct"] == (r["predicted_ids"] == r["answer_ids"])
        assert r["correct_read"] == passkey.is_correct_read(r["read_text"], r["key"])
    assert len({r["key"] for r in records if r["template"] == "landmark"}) == 6  # each prompt draws its own key
    for name, s in report["summary"].items():
        mine = [r for r in records if r["template"] == name]
        assert (s["right"], s["n"]) == (sum(r["correct"] for r in mine), 6)
        assert s["miss_tokens"] == sorted(r["tokens"] for r in mine if not r["correct"])
    assert "code-grass" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["summary"] == json.loads(json.dumps(report["summary"]))
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_counts_a_model_that_knows_the_keys_as_all_right(model_dir, encoder, monkeypatch):
    from eval import passkey_sweep

    prompts = [r for t in ("landmark", "number-ledger")
               for r in passkey_sweep.sweep_prompts(encoder, t, range(50, 131, 40), 2, 0.5)]
    knows = ScriptedModel({tuple(r["prompt_ids"]): r["answer_ids"] for r in prompts})
    knows.config = fot.LongLlamaConfig.from_pretrained(model_dir)
    monkeypatch.setattr(passkey_sweep, "load_model", lambda *args: knows)
    report = passkey_sweep.main(["--model", str(model_dir), "--template", "landmark", "number-ledger", "--chars",
                                 "50", "130", "40", "--generators", "2", "--depth", "0.5", "--device", "cpu"])
    assert {name: (s["right"], s["right_read"], s["n"], s["miss_first_word"])
            for name, s in report["summary"].items()} == {"landmark": (6, 6, 6, None), "number-ledger": (6, 6, 6, None)}
    digit = encoder.tokenizer.convert_tokens_to_ids("7")
    runs_on = ScriptedModel({k: v + [digit] for k, v in knows.script.items()})  # the key, then one digit more
    runs_on.config = knows.config
    monkeypatch.setattr(passkey_sweep, "load_model", lambda *args: runs_on)
    report = passkey_sweep.main(["--model", str(model_dir), "--template", "landmark", "--chars", "50", "130", "40",
                                 "--generators", "2", "--depth", "0.5", "--device", "cpu"])
    assert (report["summary"]["landmark"]["right"], report["summary"]["landmark"]["right_read"]) == (6, 0)
    wrong = ScriptedModel({k: [v[0] + 1] + v[1:] for k, v in knows.script.items()})
    wrong.config = knows.config
    monkeypatch.setattr(passkey_sweep, "load_model", lambda *args: wrong)
    report = passkey_sweep.main(["--model", str(model_dir), "--template", "landmark", "--chars", "50", "130", "40",
                                 "--generators", "2", "--depth", "0.5", "--device", "cpu"])
    assert report["summary"]["landmark"]["right"] == 0


@pytest.mark.parametrize("args, message", [
    (["--chars", "100", "40", "10"], "--chars"),
    (["--generators", "0"], "--generators"),
    (["--depth", "1.5"], "--depth"),
    (["--template", "nope"], "nope"),
])
def test_sweep_bad_inputs_are_clear_errors(args, message, model_dir, capsys):
    from eval import passkey_sweep

    with pytest.raises(SystemExit) as exc:
        passkey_sweep.main(["--model", str(model_dir), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
