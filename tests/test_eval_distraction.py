"""eval/distraction.py: the target's NLL against independent forwards (alone, after distractors, the float64 spec),
no-memory invariance to distractors, the windowing rule, document splitting and the seeded draws, the CLI end to
end on a tiny random model, and bad inputs."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fot
from eval import distraction, perplexity
from tests.naive import naive_logits
from tests.test_eval_passkey import tokenizer_dir  # noqa: F401  the module fixture
from tests.tiny import TOL64, tiny_model, tokens

ROOT = Path(__file__).resolve().parents[1]
W, L = 64, 32  # tests/tiny.py's window and last context


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: a second intra-op thread only adds barrier waits on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def memory_model():
    return tiny_model(mem_layers=[1])


@pytest.fixture(scope="module")
def no_memory_model():
    return tiny_model(mem_layers=[])  # the same weights: memory layers add no parameters


def docs(n: int, length: int, seed: int) -> list[list[int]]:
    return [tokens(1, length, seed=seed + k)[0].tolist() for k in range(n)]


def direct_nll(model, ids: list[int], first: int, **kwargs) -> torch.Tensor:
    """-log p(ids[t + 1] | ids[..t]) for t = first..N-2, from a plain ``model(...)`` forward and cross entropy."""
    ids_1N = torch.tensor([ids])
    with torch.no_grad():
        logits = model(ids_1N, **kwargs).logits
    return F.cross_entropy(logits[0, first:-1].to(torch.float64), ids_1N[0, first + 1:], reduction="none")


# ----------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("n_target", [150, 20])  # several windows (memory holds its own earlier ones); one window
def test_no_distractors_is_the_target_scored_alone(memory_model, n_target):
    target = tokens(1, n_target, seed=7)[0].tolist()
    ours = distraction.target_nll(memory_model, [], target, chunk=16)
    assert ours.shape == (n_target - 1,) and ours.dtype == torch.float64
    expected = direct_nll(memory_model, target, 0)
    assert (ours - expected).abs().max() < 1e-10
    assert (ours - torch.roll(expected, 1)).abs().max() > 1e-2  # an off-by-one shift would not pass
    assert (ours - perplexity.score_tokens(memory_model, target)[0]).abs().max() < 1e-10  # eval/perplexity.py's


@pytest.mark.parametrize("n_target", [100, 20])  # T > L: windows [0, 64), [64, 68), [68, 100); T < L: one window
def test_distractors_then_target_equals_a_forward_over_the_concatenation(memory_model, n_target):
    distractors, target = docs(2, W, seed=20), tokens(1, n_target, seed=8)[0].tolist()
    ours = distraction.target_nll(memory_model, distractors, target, chunk=7)
    concat, D = distractors[0] + distractors[1] + target, 2 * W
    # the model's own windowing with the last window no longer than the target (the module docstring)
    lcl = min(L, n_target)
    assert (ours - direct_nll(memory_model, concat, D, last_context_length=lcl)).abs().max() < 1e-10
    spec = naive_logits(memory_model, memory_model.config, torch.tensor([concat]), last_context_length=lcl)
    spec_nll = F.cross_entropy(spec[0, D:-1], torch.tensor(concat[D + 1:]), reduction="none")
    assert (ours - spec_nll).abs().max() < TOL64  # the float64 statement of the semantics agrees
    alone = distraction.target_nll(memory_model, [], target)
    assert (ours - alone)[: min(W, n_target - 1)].abs().max() > 1e-2  # the distractors are in memory and read


@pytest.mark.parametrize("n_target", [150, 20])
def test_without_memory_layers_distractors_change_nothing(memory_model, no_memory_model, n_target):
    """With memory layers off only the local window matters, and no window of the target holds a distractor token
    (distractors fill whole windows before it), so every target position has the same NLL for every d."""
    target, pool = tokens(1, n_target, seed=9)[0].tolist(), docs(3, W, seed=30)
    base = distraction.target_nll(no_memory_model, [], target)
    for d in (1, 3):
        nll = distraction.target_nll(no_memory_model, pool[:d], target)
        assert (nll - base).abs().max() < 1e-10  # all of them, in particular those past the first window
        with_memory = distraction.target_nll(memory_model, pool[:d], target) - distraction.target_nll(
            memory_model, [], target)
        assert with_memory[:W].abs().max() > 1e-2  # the same draw does move a model with memory
        if n_target > W:
            assert with_memory[W:].abs().max() > 1e-2


def test_distractors_that_do_not_fill_whole_windows_are_refused(no_memory_model):
    target, dis = tokens(1, 100, seed=10)[0].tolist(), docs(1, 40, seed=40)
    with pytest.raises(ValueError, match="not a multiple of the window 64"):
        distraction.target_nll(no_memory_model, dis, target)
    # why: in one forward, the target's first window would hold the distractor's tail
    shifted = direct_nll(no_memory_model, dis[0] + target, 40)
    assert (shifted - distraction.target_nll(no_memory_model, [], target))[: W - 40].abs().max() > 1e-2
    short = docs(1, 10, seed=41)  # but 10 + 20 tokens fit one window: plain causal attention over both
    assert distraction.placement(10, 20, W, L) == "local"
    expected = direct_nll(no_memory_model, short[0] + target[:20], 10)
    assert (distraction.target_nll(no_memory_model, short, target[:20]) - expected).abs().max() < 1e-10


@pytest.mark.parametrize("D, T, window, lcl, where", [
    (0, 5, 64, 32, "none"), (64, 5, 64, 32, "memory"), (192, 500, 64, 32, "memory"), (10, 22, 64, 32, "local"),
    (4096, 4096, 8192, 8192, "local"), (8192, 4096, 8192, 8192, "memory"),
])
def test_placement(D, T, window, lcl, where):
    assert distraction.placement(D, T, window, lcl) == where


@pytest.mark.parametrize("D, T", [(10, 23), (100, 5), (12288, 4096)])
def test_placement_refuses_a_shared_first_window(D, T):
    window, lcl = (8192, 8192) if D > 1000 else (64, 32)
    with pytest.raises(ValueError, match=f"not a multiple of the window {window}"):
        distraction.placement(D, T, window, lcl)


# ----------------------------------------------------------------------------- documents and draws
def test_split_ids_gives_non_overlapping_pieces_with_bos():
    assert distraction.split_ids([1, 5, 6, 7, 8, 9, 10, 11], 1, 3) == [[1, 5, 6], [1, 7, 8], [1, 9, 10]]
    assert distraction.split_ids([5, 6, 7, 8, 9, 10, 11], 1, 3) == [[5, 6, 7], [8, 9, 10]]  # --no-bos
    assert distraction.split_ids([5, 6, 7], None, 2) == [[5, 6]]
    assert distraction.split_ids([1, 5], 1, 3) == []


def fake_docs(lengths_by_text: list[list[int]]) -> list[distraction.Document]:
    return [distraction.Document([0] * n, f"text{t}#{k}", t)
            for t, lengths in enumerate(lengths_by_text) for k, n in enumerate(lengths)]


def test_targets_round_robin_and_distractors_from_other_texts():
    pool = fake_docs([[50] * 5, [50, 10, 50], [50] * 4])  # text 1's second piece is too short for anything
    targets = distraction.pick_targets(pool, 4, 40)
    assert [pool[i].source for i in targets] == ["text0#0", "text1#0", "text2#0", "text0#1"]
    draws = distraction.draw_distractors(pool, targets, 3, 30, seed=5)
    names = {pool[i].source for i in targets}
    for draw in draws:
        assert len(draw.distractors) == 3 and len({d.source for d in draw.distractors}) == 3
        assert all(d.text != draw.target.text and d.source not in names and d.tokens >= 30 for d in draw.distractors)
    again = distraction.draw_distractors(pool, targets, 3, 30, seed=5)
    assert [[d.source for d in x.distractors] for x in again] == [[d.source for d in x.distractors] for x in draws]
    other = distraction.draw_distractors(pool, targets, 3, 30, seed=6)
    assert [[d.source for d in x.distractors] for x in other] != [[d.source for d in x.distractors] for x in draws]


def test_not_enough_documents_is_an_error():
    pool = fake_docs([[50] * 3, [50] * 2])
    with pytest.raises(ValueError, match="--targets 6 needs 6 documents of >= 40 tokens.*only 5 of 5"):
        distraction.pick_targets(pool, 6, 40)
    with pytest.raises(ValueError, match="the longest has 50"):
        distraction.pick_targets(pool, 1, 60)
    targets = distraction.pick_targets(pool, 2, 40)  # text0#0, text1#0: text0's target has 1 candidate left
    with pytest.raises(ValueError, match="target text0#0 has only 1 possible distractors"):
        distraction.draw_distractors(pool, targets, 2, 30, seed=0)


# ----------------------------------------------------------------------------- the CLI
WORDS = ("the grass is green sky blue sun yellow here we go there and back again pass key remember it what "
         "important info hidden inside a lot of irrelevant text find memorize quiz").split()


def random_text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir, tmp_path_factory):
    """A tiny random fot model (window 32, last context 16, one memory layer) saved with the tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model(dtype=torch.float32, vocab_size=len(tok), max_position_embeddings=32, last_context_length=16,
                       eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def corpus(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": random_text(k, 60)}) for k in range(7)) + "\n")
    return jsonl


def draws_of(report: dict, setting: str, d: int) -> list[list[str]]:
    row = next(r for r in report["results"][setting]["rows"] if r["distractors"] == d)
    return [t["distractors"] for t in row["targets"]]


def test_cli_end_to_end(model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--files", str(corpus), "--target-tokens", "40", "--distractor-tokens", "32",
            "--distractors", "2", "0", "1", "--targets", "2", "--threads", "1", "--device", "cpu"]
    proc = subprocess.run([sys.executable, str(ROOT / "eval" / "distraction.py"), *args, "--settings", "memory",
                           "no-memory", "--seed", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((out / "results.json").read_text())
    assert (out / "distraction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (saved["task"], saved["window"], saved["distractors"], saved["targets"]) == ("distraction", 32, [0, 1, 2], 2)
    assert (saved["documents"], saved["texts"], saved["seed"], saved["bos"]) == (7, 7, 3, True)
    header = proc.stdout.splitlines()[0].split()
    assert header == ["distractors", "in", "memory", "scored", "memory", "no-memory"]

    # the draw: two targets (the first documents), distractors from the others, nested, the same in every setting
    targets = [f"{corpus}:1", f"{corpus}:2"]
    assert [d["target"] for d in saved["draws"]] == targets
    for i, draw in enumerate(saved["draws"]):
        assert len(draw["distractors"]) == 2 and not set(draw["distractors"]) & set(targets)
        for setting in ("memory", "no-memory"):
            for d in (0, 1, 2):
                assert draws_of(saved, setting, d)[i] == draw["distractors"][:d]

    # the numbers: tokens, perplexity = exp(mean NLL), d = 0 as eval/perplexity.py scores the target alone
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    encoder = perplexity.PromptEncoder(tok)
    model = fot.LongLlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    for setting, res in saved["results"].items():
        rows = res["rows"]
        assert [(r["distractors"], r["distractor_tokens"], r["tokens"]) for r in rows] == [
            (0, 0, 78), (1, 32, 78), (2, 64, 78)]
        assert [r["placement"] for r in rows] == ["none", "memory", "memory"]
        for r in rows:
            assert r["ppl"] == pytest.approx(math.exp(r["nll"]), rel=1e-9)
            assert sum(b["tokens"] for b in r["buckets"]) == 78 and [b["lo"] for b in r["buckets"]] == [0, 32]
            assert r["nll"] == pytest.approx(sum(t["nll"] for t in r["targets"]) / 2, rel=1e-9)
    for i, row in enumerate(saved["results"]["memory"]["rows"][0]["targets"]):
        alone, _ = perplexity.score_tokens(model, encoder.encode(texts[i])[:40])
        assert row["nll"] == pytest.approx(alone.mean().item(), abs=1e-5)
    mem, base = ([r["nll"] for r in saved["results"][s]["rows"]] for s in ("memory", "no-memory"))
    assert base == pytest.approx([base[0]] * 3, abs=1e-5)  # no memory layers: distractors are never seen
    assert abs(mem[2] - mem[0]) > 1e-3

    # reproducible by seed: in-process with the same seed, the same draw; another seed, another draw
    again = distraction.main([*args, "--settings", "no-memory", "--seed", "3"])
    assert again["draws"] == saved["draws"]
    assert again["results"]["no-memory"]["rows"][2]["nll"] == pytest.approx(base[2], abs=1e-6)
    other = distraction.main([*args, "--settings", "no-memory", "--seed", "4"])
    assert [d["target"] for d in other["draws"]] == targets and other["draws"] != saved["draws"]


def test_cli_split_tokens(model_dir, tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text(random_text(100, 200))
    jsonl = tmp_path / "short.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": random_text(200 + k, 120)}) for k in range(3)) + "\n")
    report = distraction.main(["--model", str(model_dir), "--files", str(book), str(jsonl), "--text-field", "body",
                               "--split-tokens", "40", "--target-tokens", "40", "--distractor-tokens", "32",
                               "--distractors", "0", "2", "--targets", "3", "--settings", "no-memory", "--device",
                               "cpu", "--threads", "1"])
    assert report["split_tokens"] == 40 and report["texts"] == 4 and report["documents"] > 5
    targets = [d["target"] for d in report["draws"]]
    assert targets == [f"{book}#0", f"{jsonl}:1#0", f"{jsonl}:2#0"]  # round-robin over the texts
    for draw in report["draws"]:
        own = draw["target"].split("#")[0]
        assert all(not s.startswith(own + "#") and s not in targets for s in draw["distractors"])
    assert any(s.startswith(f"{book}#") for s in report["draws"][1]["distractors"] + report["draws"][2]["distractors"])
    assert "wrote" not in capsys.readouterr().out  # no --out, no files


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}"], "does not exist"),
    (["--target-tokens", "1"], "--target-tokens must be >= 2"),
    (["--targets", "0"], "--targets must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--distractors", "0", "1", "1"], "--distractors must be distinct counts >= 0"),
    (["--distractors", "-1"], "--distractors must be distinct counts >= 0"),
    (["--distractor-tokens", "20"], "setting memory, --distractors 1: 20 distractor tokens are not a multiple of "
                                    "the window 32"),
    (["--distractor-tokens", "20"], "Use a --distractor-tokens that is a multiple of 32 (e.g. 32)"),
    (["--split-tokens", "35"], "--split-tokens 35 is shorter than a target (40)"),
    (["--settings", "bogus"], "unknown setting 'bogus'"),
    (["--settings", "full:64", "--distractors", "1"], "setting full:64, --distractors 1"),
    (["--files", "{missing}.txt"], "does not exist"),
    (["--targets", "6"], "has only 1 possible distractors"),
    (["--targets", "9"], "--targets 9 needs 9 documents"),
    (["--target-tokens", "500"], "the longest has"),
    (["--text-field", "body"], "has no text field 'body'"),
])
def test_bad_inputs_are_clear_errors(args, message, model_dir, corpus, tmp_path, capsys):
    base = {"--model": str(model_dir), "--files": str(corpus), "--target-tokens": "40", "--distractor-tokens": "32",
            "--distractors": ["0", "1", "2"], "--targets": "2", "--device": "cpu", "--threads": "1"}
    argv, given = [], set(a for a in args if a.startswith("--"))
    for flag, value in base.items():
        if flag not in given:
            argv += [flag, *([value] if isinstance(value, str) else value)]
    argv += [a.format(missing=tmp_path / "missing") for a in args]
    with pytest.raises(SystemExit) as exc:
        distraction.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "error:" in err
