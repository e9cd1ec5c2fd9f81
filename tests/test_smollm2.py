"""The real SmolLM2-135M-Instruct (Q4_1 GGUF) as a fot model, and the book corpus.

Skipped without the assets: ``python -m train.assets --model`` (the GGUF) and ``--corpus`` (assets/books).
The converted model has memory layers 7, 15 and 22, window W=512 and L=256: an input of at most 256 tokens is one
window, where memory is empty and the model must equal HF LLaMA; 384 tokens put the first 128 into memory.
"""

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from fot import LongLlamaForCausalLM
from fot.convert import from_gguf, tokenizer_from_gguf

ASSETS = Path(__file__).resolve().parents[1] / "assets"
GGUFS = sorted((ASSETS / "smollm2").glob("*.gguf"))
needs_model = pytest.mark.skipif(not GGUFS, reason="no assets/smollm2/*.gguf: run python -m train.assets --model")
slow = pytest.mark.slow  # the model tests share one conversion (about 12 s) and take about 40 s in all
needs_corpus = pytest.mark.skipif(not (ASSETS / "books" / "state.json").is_file(),
                                  reason="no assets/books: run python -m train.assets --corpus")

MEM_LAYERS, W, L = [7, 15, 22], 512, 256
PARITY = 1e-4  # fp32 logits, |logit| up to 36 (measured against HF LLaMA: 0.0, the same operations)
# Two fp32 attention paths through 30 layers. Measured on 384 tokens: torch vs reference 6e-5, and the fp32
# reference is itself 1.8e-4 off a float64 run (torch: 1.3e-4), so 5e-4 keeps within the house budget of twice
# the reference's own fp32 error; a wrong KV-head mapping or memory mask moves logits by more than 1.
MEMORY_PARITY = 5e-4
# The opening of Pride and Prejudice (public domain): 282 tokens, of which the first 200 make one window.
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. \"My dear Mr. Bennet,\" said his lady to him "
    "one day, \"have you heard that Netherfield Park is let at last?\" Mr. Bennet replied that he had not. \"But it "
    "is,\" returned she; \"for Mrs. Long has just been here, and she told me all about it.\" Mr. Bennet made no "
    "answer. \"Do you not want to know who has taken it?\" cried his wife impatiently. \"You want to tell me, and I "
    "have no objection to hearing it.\" This was invitation enough. \"Why, my dear, you must know, Mrs. Long says "
    "that Netherfield is taken by a young man of large fortune from the north of England; that he came down on "
    "Monday in a chaise and four to see the place, and was so much delighted with it, that he agreed with Mr. "
    "Morris immediately; that he is to take possession before Michaelmas, and some of his servants are to be in "
    "the house by the end of next week.\""
)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def gguf() -> Path:
    return GGUFS[0]


@pytest.fixture(scope="module")
def model(gguf) -> LongLlamaForCausalLM:
    return from_gguf(gguf, MEM_LAYERS, W, L, mem_dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(gguf):
    return tokenizer_from_gguf(gguf)


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt").input_ids  # [1, 282]
    assert ids.shape[1] >= 200, ids.shape
    return ids[:, :200]


@pytest.fixture(scope="module")
def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@slow
@needs_model
def test_converted_config_is_smollm2(model):
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (49152, 100000.0, True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (c.mem_layers, c.max_position_embeddings, c.last_context_length) == (MEM_LAYERS, W, L)
    assert getattr(c, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None


@slow
@needs_model
def test_single_window_logits_equal_hf_llama(gguf, ids, logits):
    hf = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    assert max_err(logits, theirs) < PARITY
    # Both go through transformers' GGUF reader; a plausible loss shows the weights themselves are right
    # (a wrong Q/K permutation or dequantization gives a loss near ln(49152) = 10.8).
    loss = torch.nn.functional.cross_entropy(theirs[0, :-1], ids[0, 1:]).item()
    assert loss < 3.5, loss


@slow
@needs_model
def test_save_and_reload_without_gguf(model, tokenizer, ids, logits, tmp_path):
    from transformers import AutoTokenizer

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.gguf"))
    reloaded = LongLlamaForCausalLM.from_pretrained(tmp_path).eval()
    c = reloaded.config
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.mem_layers == MEM_LAYERS
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    assert torch.equal(AutoTokenizer.from_pretrained(tmp_path)(TEXT, return_tensors="pt").input_ids[:, :200], ids)


@slow
@needs_model
def test_gqa_memory_attention_matches_reference(model, ids):
    # 384 tokens = 1.5 L: the first 128 go to memory, the last 256 form the local window, whose queries in the
    # memory layers attend to 128 memory keys through 3 KV heads shared by 9 query heads. The fused torch path
    # must match the one-softmax reference there (only the last window reads memory).
    long_ids = torch.cat([ids, ids], dim=1)[:, :384]
    impl = model.config.attn_impl
    try:
        with torch.no_grad():
            model.config.attn_impl = "torch"
            fast = model(long_ids, logits_to_keep=L).logits
            model.config.attn_impl = "reference"
            ref = model(long_ids, logits_to_keep=L).logits
            alone = model(long_ids[:, -L:]).logits  # the same window without memory
    finally:
        model.config.attn_impl = impl
    assert max_err(fast, ref) < MEMORY_PARITY
    assert max_err(fast, alone) > 1.0  # the memory does change the last window


@needs_corpus
def test_corpus_holds_out_whole_books():
    from train.corpus import HELDOUT_TITLES, load_corpus

    books = load_corpus(ASSETS / "books")
    train = set(books.filter(lambda r: r["split"] == "train")["title"])
    heldout = set(books.filter(lambda r: r["split"] == "heldout")["title"])
    assert heldout == set(HELDOUT_TITLES)
    assert not train & HELDOUT_TITLES
    assert len(train) + len(heldout) == len(books)  # titles are unique
    assert all(text.strip() for text in books["text"])
    assert set(books["source"]) == {"austen", "shakespeare", "bible", "tdavid"}
    # Training reads the per-split parquet files (configs/smollm2_135m.yaml): they must split the same way.
    import pyarrow.parquet as pq

    for split, titles in (("train", train), ("heldout", heldout)):
        table = pq.read_table(ASSETS / "books" / f"{split}.parquet", columns=["title", "split"]).to_pydict()
        assert set(table["title"]) == titles and set(table["split"]) == {split}


def test_convert_cli_reports_a_missing_file_in_one_line(tmp_path, capsys):
    from fot.convert import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--gguf", str(tmp_path / "none.gguf"), "--mem-layers", "7", "--window", "512",
              "--last-context-length", "256", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not a file" in err and "train.assets --model" in err and "Traceback" not in err


ROOT = ASSETS.parent
# The adapters were trained on the earlier layout, memory layers 7, 15, 22 (make smollm2-3layers); make smollm2's
# models/smollm2-fot is the every-layer checkpoint.
BASE = "models/smollm2-fot-3layers"
needs_base = pytest.mark.skipif(not (ROOT / BASE / "config.json").is_file(),
                                reason=f"no {BASE}: run make smollm2-3layers")


@slow
@needs_base
@pytest.mark.parametrize("name", ["smollm2-fot-lora", "smollm2-fot-lora-d1", "smollm2-fot-lora-synth"])
def test_shipped_adapters_load_on_the_base_and_touch_only_memory_layers(name, monkeypatch):
    """The committed adapters load with one from_pretrained call (base + adapter), hold LoRA weights on the memory
    layers' attention only, and change the logits of the base."""
    import re

    monkeypatch.chdir(ROOT)  # adapter_config.json names the base relative to the repository root
    tuned = LongLlamaForCausalLM.from_pretrained(f"models/{name}")
    base = LongLlamaForCausalLM.from_pretrained(BASE)
    assert tuned.config.mem_layers == base.config.mem_layers == MEM_LAYERS and base.config.mem_top_k is None
    lora = [n for n, _ in tuned.named_parameters() if "lora_" in n]
    layers = {int(re.search(r"layers\.(\d+)\.", n).group(1)) for n in lora}
    modules = {re.search(r"\.(\w+_proj)\.lora_", n).group(1) for n in lora}
    assert layers == set(MEM_LAYERS) and modules == {"q_proj", "k_proj", "v_proj", "o_proj"}
    ids = torch.arange(1000, 1384).unsqueeze(0)  # 384 tokens: the first 128 go through memory
    with torch.no_grad():
        a, b = tuned(ids).logits, base(ids).logits
    assert torch.isfinite(a).all() and max_err(a, b) > 1e-2


RECOMMENDED = ROOT / "models" / "smollm2-fot"
needs_recommended = pytest.mark.skipif(not (RECOMMENDED / "config.json").is_file(),
                                       reason="no models/smollm2-fot: run make smollm2")


def makefile_recipe() -> str:
    """The recipe make smollm2 applies (``SMOLLM2_RECIPE``; fot/config.py RECIPES holds its values)."""
    import re

    return re.search(r"^SMOLLM2_RECIPE \?= (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).strip()


@needs_recommended
def test_the_recommended_checkpoint_holds_the_makefiles_settings():
    """make smollm2 writes its recipe into config.json, so from_pretrained with no overrides runs it."""
    import fot
    from fot import LongLlamaConfig

    fields = fot.recipe(makefile_recipe())
    c = LongLlamaConfig.from_pretrained(RECOMMENDED)
    want = LongLlamaConfig.from_pretrained(RECOMMENDED, **fields)  # the recipe resolved against this model
    differ = {f: (getattr(c, f), getattr(want, f)) for f in fields if getattr(c, f) != getattr(want, f)}
    assert not differ, f"models/smollm2-fot is not the Makefile's setting ({differ}): run make smollm2"


@needs_model
def test_the_gguf_says_smollm2_reads_text_without_bos(gguf):
    from fot.convert import gguf_add_bos

    # Independent of fot's reader: gguf's own field listing, as llama.cpp writes it.
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields["tokenizer.ggml.add_bos_token"]
    assert gguf_add_bos(gguf) is bool(field.parts[-1][0]) is False


@pytest.mark.skipif(not (ROOT / "models/smollm2-fot/config.json").is_file(), reason="make smollm2 not run")
def test_the_built_checkpoint_declares_no_bos_so_evaluations_prompt_without_one():
    from argparse import Namespace

    from eval.common import resolve_bos

    assert resolve_bos(Namespace(no_bos=False), ROOT / "models/smollm2-fot") is False
