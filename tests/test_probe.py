"""train/probe.py: the copying probe scores an exact content-copying oracle near 1 at every jitter, a positional
copier near 1 only at jitter 0, and a random model near chance; it reads a trainer run's step checkpoint."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.tiny import tiny_config
from train.probe import probe

MIN_OFFSET = 24
ROOT = Path(__file__).resolve().parents[1]


class Oracle(torch.nn.Module):
    """Brute-force copier over whole token ids: at position t predict the token after the latest earlier
    occurrence of ids[t] (content), or the token ``MIN_OFFSET - 1`` back (position)."""

    def __init__(self, by_content: bool, vocab_size: int = 2000):
        super().__init__()
        self.by_content, self.config = by_content, SimpleNamespace(vocab_size=vocab_size)

    def forward(self, input_ids, use_cache=False, last_context_length=None):
        B, N = input_ids.shape
        logits = torch.zeros(B, N, self.config.vocab_size)
        for b in range(B):
            ids = input_ids[b].tolist()
            for t in range(N):
                if self.by_content:
                    earlier = [s for s in range(t) if ids[s] == ids[t]]
                    guess = ids[earlier[-1] + 1] if earlier else 0
                else:
                    guess = ids[t - MIN_OFFSET + 1] if t >= MIN_OFFSET - 1 else 0
                logits[b, t, guess] = 10.0
        return SimpleNamespace(logits=logits)


def test_probe_tells_content_copying_from_positional_copying():
    content = {r["jitter"]: r["accuracy"] for r in probe(Oracle(True), [0, 80], 24, 128, (6, 20), MIN_OFFSET, 8)}
    position = {r["jitter"]: r["accuracy"] for r in probe(Oracle(False), [0, 80], 24, 128, (6, 20), MIN_OFFSET, 8)}
    assert content[0] > 0.9 and content[80] > 0.9  # an earlier chance occurrence of a span token can mislead it
    assert position[0] == 1.0 and position[80] < 0.2


def test_probe_of_an_untrained_model_is_near_chance():
    import fot

    torch.manual_seed(0)
    model = fot.LongLlamaForCausalLM(tiny_config(vocab_size=500, max_position_embeddings=128, mem_layers=[1]))
    rows = probe(model, [0, 40], 16, 96, (6, 12), MIN_OFFSET, 8)
    assert all(r["accuracy"] < 0.05 and r["loss"] > 5.0 for r in rows)
    assert all(r["tokens"] >= 16 * 5 for r in rows)


def test_probe_cli_errors(capsys, tmp_path):
    from train.probe import main

    with pytest.raises(SystemExit):
        main(["--run", str(tmp_path)])
    assert "holds no config.yaml" in capsys.readouterr().err


def test_probe_reads_the_newest_step_checkpoint_of_a_run(tmp_path):
    import fot
    from train.config import load_config
    from train.crossbatch import train
    from train.probe import load_run_model

    overrides = {"run.out_dir": str(tmp_path / "run"), "parallel.strategy": "none", "data.synthetic_kind": "repeat",
                 "data.synthetic_doc_tokens": 32, "data.synthetic_span_tokens": [2, 4], "data.synthetic_min_offset": 8,
                 "data.synthetic_jitters": [0, 4], "data.synthetic_answers_only": True, "data.pack": 1,
                 "crossbatch.layout": "none", "train.max_steps": 3, "train.grad_accum": 1, "run.save_every": 1}
    train(load_config(ROOT / "configs" / "ci_tiny.yaml", overrides))  # checkpoints steps 1 and 2, then final/
    model, step = load_run_model(tmp_path / "run")
    assert step == 2
    # the same run stopped at step 2 (the trainer is deterministic per seed) saves the same weights in final/
    overrides.update({"run.out_dir": str(tmp_path / "two"), "train.max_steps": 2})
    train(load_config(ROOT / "configs" / "ci_tiny.yaml", overrides))
    saved = fot.LongLlamaForCausalLM.from_pretrained(tmp_path / "two" / "final", dtype=torch.float32)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
