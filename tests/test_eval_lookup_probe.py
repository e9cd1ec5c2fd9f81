"""eval/lookup_probe.py: its probabilities are the memory layers' own (they rebuild each layer's attention output),
line ranks against a brute-force count, the CLI end to end on models/fot-tiny, and the refusal of models it cannot
probe."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from eval import lookup, lookup_probe
from eval.passkey import PromptEncoder
from plumbing.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FOT_TINY = ROOT / "models" / "fot-tiny"


@pytest.fixture(scope="module")
def model():
    return lookup_probe.load_probe_model(FOT_TINY, "cpu")


@pytest.fixture(scope="module")
def dictionary():
    encoder = PromptEncoder(load_tokenizer(FOT_TINY))
    return lookup.build_dictionary(encoder, 700, 0, 3, 128, 3)


def test_probabilities_rebuild_each_memory_layers_output(model, dictionary):
    with torch.no_grad():
        cache = model(torch.tensor([dictionary.ids]), use_cache=True).cache
        q = dictionary.queries[0]
        records: list = []
        with lookup_probe.recording_dense_attention(records):
            model(torch.tensor([q.query_ids + q.answer_ids[:1]]), cache=cache.fork(), use_cache=True)
    assert len(records) == len(model.config.mem_layers)
    for q_BN1H, local, memory, out_BN1H in records:
        _, local_NS, mem_NM = lookup_probe.last_position_attention(q_BN1H, local, memory)
        R = q_BN1H.shape[1] // local.v_BGSH.shape[1]
        v_local = local.v_BGSH[0].repeat_interleave(R, 0).double()
        v_mem = memory.v_BGMH[0].repeat_interleave(R, 0).double()
        rebuilt_NH = torch.einsum("ns,nsh->nh", local_NS, v_local) + torch.einsum("nm,nmh->nh", mem_NM, v_mem)
        torch.testing.assert_close(rebuilt_NH, out_BN1H[0, :, 0].double(), atol=2e-5, rtol=1e-4)
        assert memory.size <= len(dictionary.ids)
    # the spy is gone after the block
    assert lookup_probe.attention.ATTENTION_FUNCTIONS[("torch", "dense")].__name__ != "record"


def test_line_rank_counts_slots_that_score_higher():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 300, generator=gen, dtype=torch.float64)
    start, end = 120, 134
    expected = []
    for head in scores.tolist():
        best = max(head[start:end])
        expected.append(1 + sum(s > best for s in head))
    assert lookup_probe.line_rank(scores, start, end) == expected
    scores[2, 127] = 100.0  # the line's token scores highest in head 2
    assert lookup_probe.line_rank(scores, start, end)[2] == 1


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "probe"
    report = lookup_probe.main(["--model", str(FOT_TINY), "--sizes", "700", "--trials", "1", "--queries", "3",
                                "--seed", "3", "--threads", "1", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"]["700"]["summary"] == json.loads(json.dumps(report["results"][700]["summary"]))
    summary = report["results"][700]["summary"]
    assert summary["queries"] == 3 and set(summary["layers"]) == {1, 2, 3}
    for q in report["results"][700]["queries"]:
        for layer in q["layers"]:
            assert all(1 <= r <= layer["slots"] for r in layer["rank"])
            assert all(0 <= a <= b <= 1 + 1e-9 for a, b in zip(layer["line_mass"], layer["memory_mass"]))


def test_refuses_top_k_models_and_missing_inputs(tmp_path, capsys):
    topk = tmp_path / "topk"
    shutil.copytree(FOT_TINY, topk)
    config = json.loads((topk / "config.json").read_text())
    (topk / "config.json").write_text(json.dumps({**config, "mem_top_k": 8}))
    with pytest.raises(ValueError, match="dense memory"):
        lookup_probe.load_probe_model(topk, "cpu")
    with pytest.raises(SystemExit):
        lookup_probe.main(["--model", str(tmp_path / "missing")])
    assert "does not exist" in capsys.readouterr().err
