"""The task generators give the same documents from the same seed as they always have.

Every generator of training and evaluation text (passkey templates, the passkey, lookup and repeat training
sources, the synthetic mix's families and haystacks, the held-out scan's lists) is run on fixed seeds, and a
sha256 of its output is compared with the digest recorded from the generators before they were reorganized into
tasks/. A change of documents (a moved draw, a reordered word list) fails here, naming the generator.

The tokenizer is a small one written here (digits one piece each, words, spaces and punctuation), not a trained
sentencepiece model, so the digests depend on the generators and numpy's seeded streams alone.
"""

import hashlib
import json
import re
import zlib

import numpy as np
import pytest

from tasks.books import BookHaystack
from tasks.copying import SyntheticRepeat, copy_parts, repeat_parts
from tasks.heldout import Scanner, drop_lines, eval_only_strings, forbidden_patterns, forbidden_strings
from tasks.lookup import LOOKUP_HEADER, SyntheticLookup, lookup_line, lookup_parts, lookup_query
from tasks.mix import FAMILIES, SyntheticMix, haystack_style, training_texts
from tasks.passkey import TEMPLATES, SyntheticPasskey, passkey_text, resolve_templates
from tasks.recall import recall_parts
from tasks.records import records


class PieceTokenizer:
    """Digits, runs of letters, single spaces and punctuation marks as pieces; ids from a crc32 of the piece.
    Ids: 0 pad, 1 BOS, 2 EOS, 3 unk, 10-19 the digits, 20 and up the rest."""

    PIECE = re.compile(r"\d|[A-Za-z]+|\s|[^\sA-Za-z\d]")
    pad_token_id, bos_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3

    def piece_id(self, piece: str) -> int:
        return 10 + int(piece) if piece.isdigit() else 20 + zlib.crc32(piece.encode()) % 4000

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> dict:
        matches = list(self.PIECE.finditer(text))
        out = {"input_ids": [self.piece_id(m.group()) for m in matches]}
        if return_offsets_mapping:
            out["offset_mapping"] = [m.span() for m in matches]
        return out

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.piece_id(t) for t in tokens]


WORDS = ("harbour", "lantern", "morning", "quietly", "the", "a", "of", "walked", "river", "stone", "and", "letter",
         "under", "green", "window", "road", "they", "said", "before", "little")


def books() -> list[str]:
    """Five seeded 'books' of word salad with sentences and a few numbers."""
    out = []
    for b in range(5):
        rng = np.random.default_rng([b, 99])
        sentences = []
        for _ in range(300):
            words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(3, 11)))]
            tail = f" {int(rng.integers(1, 500))}" if rng.random() < 0.15 else ""
            sentences.append(" ".join(words).capitalize() + tail + ".")
        out.append(" ".join(sentences) + "\n" + " ".join(sentences[:40]))
    return out


def digest(value) -> str:
    def plain(x):
        if isinstance(x, np.ndarray):
            return x.tolist()
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (np.integer, np.floating)):
            return x.item()
        if isinstance(x, (str, int, float, bool)) or x is None:
            return x
        return repr(x)  # Target / Hay parts: their dataclass repr

    return hashlib.sha256(json.dumps(plain(value), sort_keys=True).encode()).hexdigest()[:16]


def document(doc) -> list:
    return [doc.ids, doc.loss_mask]


def generated() -> dict[str, object]:
    """name -> the output of one generator on fixed seeds."""
    tok, scanner = PieceTokenizer(), Scanner()
    haystack = BookHaystack(books(), scanner)
    out: dict[str, object] = {}
    out["templates"] = [[t.render(12345 + s, 300, 500, seed=s) for s in range(3)] for t in TEMPLATES.values()]
    out["template_names"] = resolve_templates(["all"])
    out["lookup_format"] = [LOOKUP_HEADER, lookup_line(3, 4), lookup_query(5)]
    out["eval_only_strings"] = eval_only_strings()
    out["forbidden"] = [forbidden_strings(), [p.pattern for p in forbidden_patterns()]]
    sample = "x " + TEMPLATES["code-diary"].render(77, 200, 200, 1) + "\nkey 12 value 34\nplain line\n"
    out["scan"] = [scanner.spans(sample), scanner.find(sample), drop_lines(sample, scanner)]
    out["passkey_text"] = [passkey_text(n, np.random.default_rng([7, i])) for i, n in enumerate([0, 50, 333, 2000])]
    for answers_only in (False, True):
        src = SyntheticPasskey(tok, 200, 3, answers_only=answers_only)
        out[f"passkey_docs_{answers_only}"] = [document(src.get(e, i)) for e in (0, 1) for i in range(4)]
        src = SyntheticLookup(64, 200, 2, 2, 0.3, answers_only, 5)
        out[f"lookup_docs_{answers_only}"] = [document(src.get(e, i)) for e in (0, 1) for i in range(4)]
        src = SyntheticRepeat(64, 200, (3, 8), 20, [0, 10, 40], answers_only, 9)
        out[f"repeat_docs_{answers_only}"] = [document(src.get(e, i)) for e in (0, 1) for i in range(4)]
    gated = SyntheticRepeat(64, 200, (3, 8), 20, [0, 10, 40], True, 9, gate=1.0, gate_steps=2)
    docs = []
    for i in range(8):
        docs.append(document(gated.get(0, i)))
        gated.after_step(0.5)
    out["repeat_gated"] = [docs, gated.state_dict()]
    rng = np.random.default_rng(21)
    out["parts"] = [
        [recall_parts(rng, 256, mentions=0.5, named_intros=0.5) for _ in range(6)],
        [recall_parts(rng, 256, ("number", "code"), max_keys=6) for _ in range(3)],
        [lookup_parts(rng, 256) for _ in range(4)],
        [lookup_parts(rng, 256, ("word",), ("number", "name")) for _ in range(3)],
        [copy_parts(rng, 256, haystack) for _ in range(4)],
        [repeat_parts(rng, 256, haystack) for _ in range(4)],
        [records(400, rng), records(400, rng, tallies=0.5)],
        [haystack_style(rng) for _ in range(10)],
        [haystack_style(rng, {"repeated": 1, "books": 1, "records": 1, "tallies": 1}) for _ in range(10)],
        [haystack.passage(300, rng), haystack.repeated(300, rng)],
    ]
    out["training_texts"] = training_texts(haystack, 4, 0)
    all_families = {f: 1.0 for f in FAMILIES}
    mixes = {
        "mix_default": SyntheticMix(tok, haystack, 256, all_families, 11),
        "mix_options": SyntheticMix(tok, haystack, 256, all_families, 12, loss_on="all",
                                    haystacks={"repeated": 1, "books": 1, "records": 1, "tallies": 1}, mentions=0.3,
                                    named_intros=0.3, short_recall=0.3, short_recall_tokens=(64, 128),
                                    lookup_keys=("number", "word"), value_kinds=("number", "name"), max_keys=3),
    }
    for name, mix in mixes.items():
        out[name] = [mix.sample(e, i) for e in (0, 1) for i in range(8)]
    return out


# Recorded from the generators as they were in train/synthetic.py, train/data.py and eval/templates.py. The two
# held-out lists were recorded again when the keeper-log probe template (tasks/passkey_probe.py) and the RULER-style
# prompts' pieces joined them: 36 strings added, none removed; every document digest stayed the same.
DIGESTS = {
    "eval_only_strings": "acf02cb70bf1a057",
    "forbidden": "7e25dde41f588cd3",
    "lookup_docs_False": "c278c87d89911703",
    "lookup_docs_True": "6cb3cfa10d0a18d5",
    "lookup_format": "d9451ef34f4ce579",
    "mix_default": "cf5ddd981b7b4efd",
    "mix_options": "197e717a419b98f7",
    "parts": "83652ef977cd989e",
    "passkey_docs_False": "6a3ff74b1bb7de36",
    "passkey_docs_True": "e06c6fc0f8194a07",
    "passkey_text": "bf6cfbb1b61451af",
    "repeat_docs_False": "d1160ce886ff407d",
    "repeat_docs_True": "47e0c3e001a86b7b",
    "repeat_gated": "e4409049e5b97c33",
    "scan": "c8f8b6911645b944",
    "template_names": "ef6b5062d3a3ffe7",
    "templates": "8ed32c075432d713",
    "training_texts": "22f21e224196d327",
}


@pytest.fixture(scope="module")
def outputs() -> dict[str, object]:
    return generated()


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_same_seed_same_documents(outputs, name):
    assert digest(outputs[name]) == DIGESTS[name], f"{name}: the generator's output changed"


def test_every_generator_is_checked(outputs):
    assert sorted(outputs) == sorted(DIGESTS)
