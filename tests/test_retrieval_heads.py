"""eval/retrieval_heads.py: the heads' attention masses at the answer against a naive float64 softmax, the choice
of heads, and the CLI on the shipped demo model, whose file loads as ``mem_heads``."""

import json
import math
from pathlib import Path

import pytest
import torch

import fot
from eval import retrieval_heads
from fot.types import LocalKV, MemoryKV

FOT_TINY = Path(__file__).resolve().parents[1] / "models" / "fot-tiny"


def naive_masses(q, k_loc, k_mem, valid_loc, valid_mem, q_mem, bias, n, span):
    """Loop by loop: per head, the mean over the last n queries of the softmax mass on memory slots span and on all
    of memory; query t of T sits at local position S - T + t and sees local keys up to it."""
    N, T, H = q.shape[1], q.shape[2], q.shape[3]
    G, S, M = k_loc.shape[1], k_loc.shape[2], k_mem.shape[2]
    key, mem = [], []
    for h in range(N):
        g = h // (N // G)
        ks, ms = 0.0, 0.0
        for t in range(T - n, T):
            scores, kinds = [], []
            for s in range(S):
                if s <= S - T + t and valid_loc[0, s]:
                    scores.append(float(q[0, h, t] @ k_loc[0, g, s]) / math.sqrt(H))
                    kinds.append(None)
            for m in range(M):
                if valid_mem[0, m]:
                    scores.append(float(q_mem[0, h, t] @ k_mem[0, g, m]) / math.sqrt(H) - bias)
                    kinds.append(m)
            top = max(scores)
            weights = [math.exp(x - top) for x in scores]
            z = sum(weights)
            ks += sum(w for w, m in zip(weights, kinds) if m is not None and span[0] <= m < span[1]) / z
            ms += sum(w for w, m in zip(weights, kinds) if m is not None) / z
        key.append(ks / n)
        mem.append(ms / n)
    return torch.tensor(key, dtype=torch.float64), torch.tensor(mem, dtype=torch.float64)


@pytest.mark.parametrize("distance", [False, True])
def test_masses_equal_a_naive_float64_softmax(distance):
    g = torch.Generator().manual_seed(3)
    B, N, G, T, S, M, H = 1, 4, 2, 5, 9, 12, 8
    q = torch.randn(B, N, T, H, generator=g)
    q_mem = torch.randn(B, N, T, H, generator=g) if distance else None
    k_loc, v_loc = torch.randn(B, G, S, H, generator=g), torch.randn(B, G, S, H, generator=g)
    k_mem, v_mem = torch.randn(B, G, M, H, generator=g), torch.randn(B, G, M, H, generator=g)
    valid_loc = torch.ones(B, S, dtype=torch.bool)
    valid_loc[0, 0] = False  # a padded local key
    valid_mem = torch.ones(B, M, dtype=torch.bool)
    valid_mem[0, 7] = False  # an invalid slot inside the span
    local = LocalKV(k_loc, v_loc, valid_loc)
    memory = MemoryKV(k_mem, v_mem, valid_mem, score_bias=0.5)
    key, mem = retrieval_heads.answer_masses(q, local, memory, q_mem, 3, (5, 9))
    ref_key, ref_mem = naive_masses(q.double(), k_loc.double(), k_mem.double(), valid_loc, valid_mem,
                                    (q if q_mem is None else q_mem).double(), 0.5, 3, (5, 9))
    torch.testing.assert_close(key, ref_key, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mem, ref_mem, rtol=1e-9, atol=1e-12)
    assert (key <= mem).all() and (mem < 1).all() and (key > 0).all()


def test_choose_takes_top_key_heads_then_memory_heads():
    key = {3: [0.1, 0.9, 0.0], 5: [0.5, 0.0, 0.2]}
    memory = {3: [0.2, 0.95, 0.8], 5: [0.6, 0.7, 0.3]}
    assert retrieval_heads.choose(key, memory, 2, 0) == {3: [1], 5: [0]}
    assert retrieval_heads.choose(key, memory, 2, 2) == {3: [1, 2], 5: [0, 1]}  # 3.2 (0.8), then 5.1 (0.7)


def test_cli_on_the_demo_model_writes_heads_that_load(tmp_path, capsys):
    out = tmp_path / "heads"
    report = retrieval_heads.main(["--model", str(FOT_TINY), "--lengths", "512", "--templates", "landmark",
                                   "--depths", "0.3", "0.6", "--top", "3", "--memory-heads", "1", "--threads", "1",
                                   "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| rank | layer.head |" in printed and "4 heads chosen" in printed
    saved = json.loads((out / "heads.json").read_text())
    assert saved == json.loads(json.dumps(report))
    chosen = {int(layer): hs for layer, hs in saved["mem_heads"].items()}
    assert sum(map(len, chosen.values())) == 4 and set(chosen) <= {1, 2, 3}  # the demo model's memory layers
    assert len(saved["prompts"]) == 2 and all(p["key_token"] > 0 for p in saved["prompts"])
    for layer in ("1", "2", "3"):
        assert all(0 <= k <= m <= 1 for k, m in zip(saved["key_mass"][layer], saved["memory_mass"][layer]))
    assert (out / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the file is a mem_heads setting: the chosen layers' other heads no longer read memory
    model = fot.LongLlamaForCausalLM.from_pretrained(FOT_TINY, mem_heads=saved["mem_heads"])
    assert model.config.mem_heads == chosen


def test_the_test_seed_and_bad_counts_are_one_line_errors(capsys):
    for args, message in ((["--seed", "0"], "--seed 0 draws the passkey test set"), (["--top", "0"], "--top must be")):
        with pytest.raises(SystemExit):
            retrieval_heads.main(["--model", str(FOT_TINY), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1]
