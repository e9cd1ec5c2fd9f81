"""eval/perplexity.py: per-position NLL against the float64 spec and against HF Llama, bucket aggregation by hand,
the CLI end to end on a tiny random model (passkey and files sources), and bad inputs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fot
from eval import perplexity
from tests.naive import naive_logits
from tests.test_eval_passkey import tokenizer_dir  # noqa: F401  the module fixture
from tests.tiny import TINY, TOL64, tiny_model, tokens

ROOT = Path(__file__).resolve().parents[1]
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: a second intra-op thread only adds barrier waits on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_nll(logits_1NV: torch.Tensor, ids_1N: torch.Tensor) -> torch.Tensor:
    """-log p(token t + 1 | ..t) from full logits, with torch's own cross entropy."""
    return F.cross_entropy(logits_1NV[0, :-1].to(torch.float64), ids_1N[0, 1:], reduction="none")


# ----------------------------------------------------------------------------- scoring
def test_nll_equals_the_float64_spec_across_windows_and_chunks():
    model = tiny_model(mem_layers=[1])  # window 64, last context 32
    ids = tokens(1, 150, seed=4)  # 118 tokens go to memory in windows of 64 and 54, then the last 32
    nll, predicted = perplexity.score_tokens(model, ids[0], chunk=16)
    assert nll.shape == predicted.shape == (149,) and nll.dtype == torch.float64

    spec = reference_nll(naive_logits(model, model.config, ids), ids)
    # fot's float64 model keeps fp32 RMSNorm, RoPE tables and softmax (tests/tiny.py): ~2e-6 here, not 1e-8
    assert (nll - spec).abs().max() < TOL64
    no_memory = reference_nll(naive_logits(model, model.config, ids, mem_layers=[]), ids)
    assert (spec - no_memory)[64:].abs().max() > 1e-2  # the tolerance separates memory from no memory
    assert (nll - torch.roll(spec, 1)).abs().max() > 1e-2  # and an off-by-one shift

    with torch.no_grad():
        logits = model(ids).logits
    assert (nll - reference_nll(logits, ids)).abs().max() < 1e-10  # the evaluator's own arithmetic is exact
    assert torch.equal(predicted, logits[0, :-1].argmax(-1))
    for chunk in (1, 7, 148, 149, 10_000):
        assert (perplexity.score_tokens(model, ids, chunk=chunk)[0] - nll).abs().max() < 1e-12


def hf_llama(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    hf_cfg = LlamaConfig(
        **{k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "rms_norm_eps")},
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings, rope_parameters=dict(cfg.rope_parameters),
        tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="eager",
    )
    hf = LlamaForCausalLM(hf_cfg).to(torch.float64).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


def test_no_memory_nll_in_one_window_equals_hf_llama():
    model = tiny_model(mem_layers=[])
    hf = hf_llama(model)
    ids = tokens(1, 32, seed=5)  # N = L: one window
    ours, _ = perplexity.score_tokens(model, ids, chunk=8)
    theirs, _ = perplexity.score_tokens(hf, ids, chunk=8)
    with torch.no_grad():
        hf_logits = hf(ids).logits
    assert (theirs - reference_nll(hf_logits, ids)).abs().max() < 1e-10  # the scorer works on HF's model too
    # same math in a different order, fp32 softmax/RoPE/RMSNorm on both sides: ~1e-7 measured, not 1e-8
    assert (ours - theirs).abs().max() < 1e-5
    assert theirs.std() > 0.1  # NLLs vary by position: a wrong shift or weight could not pass


# ----------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("n, window, edges", [
    (11, 3, [0, 3, 6, 11]), (50, 64, [0, 50]), (65, 64, [0, 65]), (66, 64, [0, 64, 66]),
    (4096, 1024, [0, 1024, 2048, 4096]), (4097, 1024, [0, 1024, 2048, 4097]),
    (4098, 1024, [0, 1024, 2048, 4096, 4098]), (2, 1, [0, 2]),
])
def test_bucket_edges(n, window, edges):
    assert perplexity.bucket_edges(n, window) == edges


def test_buckets_are_means_over_every_documents_positions():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], dtype=torch.float64)  # N = 11
    b = torch.tensor([0.5, 0.5, 0.5, 2.0, 2.0, 2.0, 4.0], dtype=torch.float64)  # N = 8
    rows = perplexity.aggregate([a, b], [0, 3, 6, 11])
    assert [(r["lo"], r["hi"], r["tokens"]) for r in rows] == [(0, 3, 6), (3, 6, 6), (6, 11, 5)]
    means = [(1 + 2 + 3 + 1.5) / 6, (4 + 5 + 6 + 6) / 6, (7 + 8 + 9 + 10 + 4) / 5]
    for r, m in zip(rows, means):
        assert r["nll"] == pytest.approx(m, abs=1e-12) and r["ppl"] == pytest.approx(math.exp(m), rel=1e-12)
    assert perplexity.aggregate([b], [0, 3, 6, 11])[2]["tokens"] == 1
    assert perplexity.aggregate([a[:2]], [0, 3, 6])[1] == {"lo": 3, "hi": 6, "tokens": 0, "nll": None, "ppl": None}


class Oracle(torch.nn.Module):
    """Stands in for a model: its hidden state at position t is the one-hot of the scripted next token, and
    lm_head scales it, so the scripted token gets almost all the probability."""

    class Body(torch.nn.Module):
        def __init__(self, script: dict, vocab: int):
            super().__init__()
            self.script, self.vocab = script, vocab

        def forward(self, input_ids, use_cache=None):
            nxt = self.script[tuple(input_ids[0].tolist())] + [0]
            return type("Out", (), {"last_hidden_state": F.one_hot(torch.tensor([nxt]), self.vocab).double()})

    def __init__(self, script: dict, vocab: int = 16):
        super().__init__()
        self.model = Oracle.Body(script, vocab)
        self.lm_head = torch.nn.Linear(vocab, vocab, bias=False).double()
        with torch.no_grad():
            self.lm_head.weight.copy_(30.0 * torch.eye(vocab))


def test_answer_nll_and_exact_match():
    docs = [perplexity.Document([1, 5, 6, 7, 8, 9], "a", answer=(3, 5), key=78),
            perplexity.Document([1, 4, 4, 4, 10, 11, 12], "b", answer=(4, 6), key=1011)]
    knows = Oracle({tuple(d.ids): d.ids[1:] for d in docs})
    res = perplexity.evaluate(knows, docs, perplexity.bucket_edges(7, 2), chunk=2)
    assert res["answer"]["tokens"] == 4 and res["answer"]["exact_match"] == 100.0 and res["answer"]["nll"] < 1e-9
    assert [r["answer_correct"] for r in res["documents"]] == [True, True] and res["all"]["ppl"] < 1 + 1e-9

    wrong = {tuple(d.ids): d.ids[1:] for d in docs}
    wrong[tuple(docs[1].ids)] = [4, 4, 4, 10, 3, 12]  # the answer's second token (11, at position 5) is wrong
    res = perplexity.evaluate(Oracle(wrong), docs, [0, 2, 4, 7], chunk=4)
    assert [r["answer_correct"] for r in res["documents"]] == [True, False] and res["answer"]["exact_match"] == 50.0
    assert res["documents"][1]["answer_nll_sum"] == pytest.approx(30.0, abs=1e-6)  # log-odds 30 against token 11
    assert res["answer"]["nll"] == pytest.approx(30.0 / 4, abs=1e-6)
    assert [b["nll"] * b["tokens"] for b in res["buckets"]] == pytest.approx([0.0, 0.0, 30.0], abs=1e-6)


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def model_dir(tokenizer_dir, tmp_path_factory):
    """A tiny random fot model (tests/tiny.py's weights: window 32, one memory layer) saved with the tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model(dtype=torch.float32, vocab_size=len(tok), max_position_embeddings=32, last_context_length=16,
                       eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_cli_passkey_end_to_end(model_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "perplexity.py"), "--model", str(model_dir), "--source", "passkey",
         "--length", "150", "--docs", "2", "--settings", "memory", "no-memory", "--chunk", "40", "--threads", "1",
         "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "settings: memory, no-memory" in proc.stderr
    saved = json.loads((out / "results.json").read_text())
    assert {"task", "model", "window", "source", "length", "docs", "doc_tokens", "edges", "settings",
            "results"} <= set(saved)
    assert (saved["task"], saved["source"], saved["window"], saved["docs"]) == ("perplexity", "passkey", 32, 2)
    n_max = max(saved["doc_tokens"])
    assert all(abs(n - 150) <= 15 for n in saved["doc_tokens"]) and saved["edges"] == [0, 32, 64, 128, n_max]
    assert saved["settings"]["no-memory"]["mem_layers"] == [] and saved["settings"]["memory"]["mem_layers"] == [1]
    for line in ("[0, 32)", "[32, 64)", f"[128, {n_max})", "all", "answer NLL", "answer exact"):
        assert line in proc.stdout
    for res in saved["results"].values():
        buckets = res["buckets"]
        assert [(b["lo"], b["hi"]) for b in buckets] == list(zip(saved["edges"][:-1], saved["edges"][1:]))
        assert sum(b["tokens"] for b in buckets) == res["all"]["tokens"] == sum(n - 1 for n in saved["doc_tokens"])
        total = sum(b["nll"] * b["tokens"] for b in buckets) / res["all"]["tokens"]
        assert res["all"]["ppl"] == pytest.approx(math.exp(total), rel=1e-9)
        assert all(b["ppl"] == pytest.approx(math.exp(b["nll"])) for b in buckets)
        assert set(res["answer"]) == {"tokens", "nll", "ppl", "exact_match"} and res["seconds"] > 0
        assert [d["tokens"] for d in res["documents"]] == saved["doc_tokens"]
    mem, base = saved["results"]["memory"], saved["results"]["no-memory"]
    assert mem["buckets"][0]["nll"] == pytest.approx(base["buckets"][0]["nll"], abs=1e-5)  # first window: no memory
    assert abs(mem["buckets"][-1]["nll"] - base["buckets"][-1]["nll"]) > 1e-3  # later: memory is used
    assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the documents: the passkey prompt followed by " K.", scored as an independent forward pass scores them
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = perplexity.passkey_documents(perplexity.PromptEncoder(tok), 150, 2, 0)
    model = fot.LongLlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for doc, row in zip(docs, mem["documents"]):
        assert doc.ids[0] == tok.bos_token_id and row["key"] == doc.key
        text = tok.decode(doc.ids, skip_special_tokens=True)
        assert text.endswith(f"What is the pass key? The pass key is {doc.key}.")
        assert tok.decode(doc.ids[doc.answer[0]: doc.answer[1]]).strip() == str(doc.key)
        ids = torch.tensor([doc.ids])
        with torch.no_grad():
            logits = model(ids).logits
        nll = reference_nll(logits, ids)
        assert row["nll"] == pytest.approx(nll.mean().item(), abs=1e-5)
        a, b = doc.answer
        assert row["answer_nll_sum"] == pytest.approx(nll[a - 1: b - 1].sum().item(), abs=1e-4)
        assert row["answer_correct"] == (logits[0, a - 1: b - 1].argmax(-1).tolist() == doc.ids[a:b])


def test_cli_files_end_to_end(model_dir, tmp_path, capsys, caplog):
    long_text = " ".join([FILLER] * 12)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps(o) for o in [{"text": "too short", "id": 0}, {"text": long_text},
                                                       {"text": long_text.upper()}]) + "\n\n")
    txt = tmp_path / "doc.txt"
    txt.write_text(long_text[::-1])
    out = tmp_path / "out"
    report = perplexity.main(["--model", str(model_dir), "--source", "files", "--files", str(jsonl), str(txt),
                              "--length", "60", "--docs", "5", "--settings", "topk:2", "--threads", "1",
                              "--device", "cpu", "--out", str(out)])
    assert "only 3 of 4 documents have >= 60 tokens" in caplog.text
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (saved["source"], saved["doc_tokens"], saved["edges"]) == ("files", [60, 60, 60], [0, 32, 60])
    res = saved["results"]["topk:2"]
    assert [d["source"] for d in res["documents"]] == [f"{jsonl}:2", f"{jsonl}:3", str(txt)]
    assert [b["tokens"] for b in res["buckets"]] == [96, 81] and "answer" not in res
    assert "[32, 60)" in capsys.readouterr().out and (out / "perplexity.png").exists()


def test_parquet_rows_are_documents_named_by_title(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "books.parquet"
    pq.write_table(pa.table({"title": ["Persuasion", "The Tempest"], "text": ["first book", "second book"]}), path)
    assert list(perplexity.read_texts(perplexity.check_files([str(path)]), "text")) == [
        (f"{path}:Persuasion", "first book"), (f"{path}:The Tempest", "second book")]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(perplexity.read_texts([path], "body"))


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}"], "does not exist"),
    (["--model", "{empty}"], "has no config.json"),
    (["--model", "{model}", "--length", "1"], "--length must be >= 2"),
    (["--model", "{model}", "--docs", "0"], "--docs must be >= 1"),
    (["--model", "{model}", "--chunk", "0"], "--chunk must be >= 1"),
    (["--model", "{model}", "--settings", "bogus"], "unknown setting 'bogus'"),
    (["--model", "{small_vocab}", "--tokenizer", "{model}"], "mismatched tokenizer"),
    (["--model", "{model}", "--source", "files"], "--source files needs --files"),
    (["--model", "{model}", "--files", "{jsonl}"], "--files is only read with --source files"),
    (["--model", "{model}", "--source", "files", "--files", "{missing}.txt"], "does not exist"),
    (["--model", "{model}", "--source", "files", "--files", "{csv}"], "unknown extension '.csv'"),
    (["--model", "{model}", "--source", "files", "--files", "{jsonl}"], "has no text field 'text'"),
    (["--model", "{model}", "--source", "files", "--files", "{bad_json}"], "is not valid JSON"),
    (["--model", "{model}", "--source", "files", "--files", "{jsonl}", "--text-field", "body", "--length", "999"],
     "no document has --length 999 tokens: the longest of 1 has"),
])
def test_bad_inputs_are_clear_errors(args, message, model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    small = tmp_path / "small_vocab"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({**json.loads((model_dir / "config.json").read_text()),
                                                   "vocab_size": 100}))
    (tmp_path / "x.csv").write_text("text\nhello\n")
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "a short document"}) + "\n")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    paths = dict(missing=tmp_path / "missing", empty=tmp_path / "empty", model=model_dir, small_vocab=small,
                 csv=tmp_path / "x.csv", jsonl=tmp_path / "x.jsonl", bad_json=tmp_path / "bad.jsonl")
    with pytest.raises(SystemExit) as exc:
        perplexity.main([a.format(**paths) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "error:" in err
    if message == "mismatched tokenizer":
        assert "--tokenizer" in err and "vocab_size is 100" in err
    if message == "has no text field 'text'":
        assert "--text-field" in err and "['body']" in err


def test_scoring_rejects_too_short_inputs():
    model = tiny_model(mem_layers=[])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity.score_tokens(model, [5])
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        perplexity.score_tokens(model, [5, 6], chunk=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity.bucket_edges(1, 64)
