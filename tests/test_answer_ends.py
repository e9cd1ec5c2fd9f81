"""data.mix_answer_ends (tasks.document.answer_end): the loss covers the character after each recall and lookup
answer, so a model learns where a copied value ends; with the option off every document is as before."""

from pathlib import Path

import numpy as np
import pytest

from tasks.books import BookHaystack
from tasks.document import Target
from tasks.heldout import Scanner
from tasks.lookup import lookup_parts
from tasks.mix import SyntheticMix, mask_runs
from tasks.recall import recall_parts
from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
FOT_TINY = ROOT / "models" / "fot-tiny"
TEXT = ("The river ran past the mill, and the miller's daughter watched the boats go by in the morning light. " * 40)


def text_of(parts) -> str:
    return "".join(p if isinstance(p, str) else p.text if isinstance(p, Target) else "" for p in parts)


def merged(parts) -> list:
    """The parts with each answer and its end (a ``Target(end=True)`` right after it) as one ``Target``."""
    out = []
    for p in parts:
        if isinstance(p, Target) and p.end:
            assert out and isinstance(out[-1], Target) and not out[-1].end  # an end follows its answer
            out[-1] = Target(out[-1].text + p.text)
        else:
            out.append(p)
    return out


@pytest.mark.parametrize("make", [recall_parts, lookup_parts])
def test_the_answer_takes_the_next_character_and_the_text_stays_the_same(make):
    for seed in range(40):
        off = make(np.random.default_rng(seed), 300)
        on = merged(make(np.random.default_rng(seed), 300, answer_ends=True))
        assert text_of(on) == text_of(off)  # the same draws, the same document
        answers_off = [p.text for p in off if isinstance(p, Target)]
        answers_on = [p.text for p in on if isinstance(p, Target)]
        assert len(answers_on) == len(answers_off) >= 1
        for a, b in zip(answers_off, answers_on):
            assert b[:-1] == a and b[-1] in ".\n"  # the answer, then its "." or line break
        assert any(b[-1] == "\n" for b in answers_on) or make is recall_parts


def test_the_mask_covers_one_more_token_after_each_answer():
    """Through the tokenizer of the shipped model: each answer's loss span grows by the token of "." or the line
    break, and nothing else changes (ids equal, every other masked token equal)."""
    from plumbing.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(FOT_TINY)
    haystack = BookHaystack([TEXT] * 4, Scanner())
    mixes = [SyntheticMix(tokenizer, haystack, 256, {"recall": 1.0, "lookup": 1.0}, 5, answer_ends=ends)
             for ends in (False, True)]
    numbers = 0
    for index in range(24):
        (_, text_off, ids_off, mask_off), (_, text_on, ids_on, mask_on) = (m.sample(0, index) for m in mixes)
        assert text_on == text_off and np.array_equal(ids_on, ids_off)
        runs_off, runs_on = mask_runs(mask_off), mask_runs(mask_on)
        assert len(runs_on) == len(runs_off)
        for (a, b), (c, d) in zip(runs_off, runs_on):
            assert (c, d) == (a, b + 1)  # one token more, at the end
            assert tokenizer.decode(ids_on[b:d]) in (".", "\n")
            numbers += tokenizer.decode(ids_on[a:b]).strip().isdigit()
    assert numbers >= 10  # numeric answers are among them: the case that ran on


def test_stage_11_config_turns_it_on():
    spec = load_config(ROOT / "configs" / "demo_stage11.yaml", {})
    assert spec.data.mix_answer_ends is True and spec.checkpoint == "models/fot-tiny"
    assert load_config(ROOT / "configs" / "demo_stage8.yaml", {}).data.mix_answer_ends is False


@pytest.mark.parametrize("make", [recall_parts, lookup_parts])
def test_period_ends_every_answer_with_a_period_and_nothing_else_changes(make):
    """data.mix_answer_ends=period: each answer is the answer with the option off plus ".", the text after it is
    the line break alone, and the documents' other parts are the same draws."""
    for seed in range(40):
        off = make(np.random.default_rng(seed), 300)
        period = merged(make(np.random.default_rng(seed), 300, answer_ends="period"))
        assert len(period) == len(off)
        for i, (a, b) in enumerate(zip(off, period)):
            if isinstance(a, Target):
                assert isinstance(b, Target) and b.text == a.text + "."
            elif i > 0 and isinstance(off[i - 1], Target):
                assert a in (".\n", "\n") and b == "\n"
            else:
                assert b == a


def test_period_masks_exactly_the_answer_and_its_period():
    """Through the tokenizer of the shipped model: with period, each loss span is the option-off answer's tokens
    and then the token of "." (decoded alone); the line break after it carries no loss."""
    from plumbing.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(FOT_TINY)
    period_id, = tokenizer("a.", add_special_tokens=False)["input_ids"][-1:]
    assert tokenizer.decode([period_id]) == "."
    haystack = BookHaystack([TEXT] * 4, Scanner())
    off, period = (SyntheticMix(tokenizer, haystack, 256, {"recall": 1.0, "lookup": 1.0}, 5, answer_ends=ends)
                   for ends in (False, "period"))
    numbers = compared = 0
    for index in range(24):
        (_, _, ids_off, mask_off), (_, text, ids, mask) = off.sample(0, index), period.sample(0, index)
        runs_off, runs = mask_runs(mask_off), mask_runs(mask)
        assert len(runs) >= 1
        if len(runs) != len(runs_off):
            continue  # the "." made the first draw too long for 256 tokens: the document was drawn again
        compared += 1
        for (a, b), (c, d) in zip(runs_off, runs):
            assert ids[d - 1] == period_id  # the span ends on the "." token ...
            assert tokenizer.decode(ids[c:d - 1]) == tokenizer.decode(ids_off[a:b])  # ... after the answer alone
            assert d < len(ids) and tokenizer.decode(ids[d:d + 1]) == "\n" and not mask[d]  # line break: no loss
            numbers += tokenizer.decode(ids_off[a:b]).strip().isdigit()
        assert text.count(".\n") >= len(runs)
    assert compared >= 20 and numbers >= 10


def test_stage_12_config_puts_the_loss_on_the_period_and_other_values_are_refused():
    spec = load_config(ROOT / "configs" / "demo_stage12.yaml", {})
    assert spec.data.mix_answer_ends == "period" and spec.checkpoint == "models/fot-tiny"
    assert spec.run.out_dir.startswith("runs/")
    with pytest.raises(ValueError, match="data.mix_answer_ends must be true, false or period, got 'dot'"):
        load_config(ROOT / "configs" / "demo_stage12.yaml", {"data.mix_answer_ends": "dot"})


# ----------------------------------------------------------------------------- data.mix_answer_end_weight
def test_the_end_token_weighs_the_end_weight_and_everything_else_is_unchanged():
    """With mix_answer_end_weight w the "." after each answer (period) weighs w, every other token 1; the ids and
    the loss mask are those of weight 1, whose documents carry no weights at all."""
    from plumbing.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(FOT_TINY)
    period_id, = tokenizer("a.", add_special_tokens=False)["input_ids"][-1:]
    haystack = BookHaystack([TEXT] * 4, Scanner())
    full, light = (SyntheticMix(tokenizer, haystack, 256, {"recall": 1.0, "lookup": 1.0}, 5, answer_ends="period",
                                answer_end_weight=w) for w in (1.0, 0.25))  # fmt: skip
    ends = 0
    for index in range(16):
        a, b = full.get(0, index), light.get(0, index)
        assert a.loss_weight is None and np.array_equal(a.ids, b.ids) and np.array_equal(a.loss_mask, b.loss_mask)
        for c, d in mask_runs(b.loss_mask):
            assert b.ids[d - 1] == period_id and b.loss_weight[d - 1] == 0.25  # the run's "."
            assert (b.loss_weight[c:d - 1] == 1.0).all()
            ends += 1
        assert int((b.loss_weight != 1.0).sum()) == len(mask_runs(b.loss_mask))  # nothing else is lighter
    assert ends >= 16
    with pytest.raises(ValueError, match="data.mix_answer_end_weight=1.5"):
        SyntheticMix(tokenizer, haystack, 256, {"recall": 1.0}, 5, answer_ends="period", answer_end_weight=1.5)


def test_the_weighted_loss_is_the_weighted_mean_of_the_token_losses():
    """train.crossbatch.weighted_lm_loss: weights of 1 give the model's own loss; other weights give
    sum(w * CE) / count over the labelled tokens, computed here in float64 from log-softmax."""
    import torch

    from tests.tiny import tiny_model, tokens
    from train.crossbatch import weighted_lm_loss

    model = tiny_model(dtype=torch.float32, mem_layers=[1])
    ids = tokens(2, 40, seed=7)
    labels = ids.clone()
    labels[:, :10] = -100
    logits = model(ids, use_cache=False).logits
    ones = torch.ones(2, 40)
    assert abs(weighted_lm_loss(logits, labels, ones).item() - model(ids, labels=labels).loss.item()) < 1e-5
    weights = torch.ones(2, 40)
    weights[0, 20], weights[1, 33] = 0.25, 0.0
    logp = torch.log_softmax(logits.double(), -1)
    total = count = 0.0
    for b in range(2):
        for t in range(39):
            if labels[b, t + 1] != -100:
                total += -logp[b, t, labels[b, t + 1]].item() * weights[b, t + 1].item()
                count += 1
    assert abs(weighted_lm_loss(logits, labels, weights).item() - total / count) < 1e-5
    assert abs(weighted_lm_loss(logits, labels, weights).item() - weighted_lm_loss(logits, labels, ones).item()) > 1e-4


def test_the_end_weight_reaches_the_batches_and_is_checked():
    spec = load_config(ROOT / "configs" / "demo_stage12.yaml", {"data.mix_answer_end_weight": 0.3})
    assert spec.data.mix_answer_end_weight == 0.3
    with pytest.raises(ValueError, match="data.mix_answer_end_weight must be in \\[0, 1\\]"):
        load_config(ROOT / "configs" / "demo_stage12.yaml", {"data.mix_answer_end_weight": 2.0})
    with pytest.raises(ValueError, match="set data.mix_answer_ends to period or true"):
        load_config(ROOT / "configs" / "demo_stage12.yaml", {"data.mix_answer_end_weight": 0.3,
                                                               "data.mix_answer_ends": False})
