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


@pytest.mark.parametrize("make", [recall_parts, lookup_parts])
def test_the_answer_takes_the_next_character_and_the_text_stays_the_same(make):
    for seed in range(40):
        off = make(np.random.default_rng(seed), 300)
        on = make(np.random.default_rng(seed), 300, answer_ends=True)
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
        period = make(np.random.default_rng(seed), 300, answer_ends="period")
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
