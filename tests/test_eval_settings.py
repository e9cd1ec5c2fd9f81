"""Evaluation settings (eval/common.py): the composable ``BASE+KEY=VALUE`` forms, their effect on the loaded model,
and ``hf:W``, transformers' LlamaForCausalLM on the same weights, against fot's own full attention ``full:W``."""

import json

import pytest
import torch

import fot
from eval import passkey
from eval.baseline import PromptTooLongError
from eval.common import load_model, parse_setting, setting_overrides
from tests.test_eval_passkey import model_dir, tokenizer_dir  # noqa: F401 - the tiny checkpoint with a tokenizer
from tests.tiny import tiny_model

HF_PARITY = 1e-5  # fp32 logits of the same causal attention computed by two implementations (measured: 0.0 on unit_tiny)


@pytest.mark.parametrize(
    "text, overrides",
    [
        ("memory", {}),
        ("dense", {"mem_top_k": None, "mem_index": "exact"}),
        ("memory+layers=15:", {"mem_layers": "15:"}),
        ("topk-ivf:32+layers=all+window=1024+nprobe=32",
         {"mem_top_k": 32, "mem_index": "faiss-ivf", "mem_layers": "all", "max_position_embeddings": 1024,
          "mem_nprobe": 32}),
        ("dense+layers=every:2+lcl=128", {"mem_top_k": None, "mem_index": "exact", "mem_layers": "every:2",
                                          "last_context_length": 128}),
        ("memory+k=16+index=faiss-flat", {"mem_top_k": 16, "mem_index": "faiss-flat"}),
        ("no-memory+window=1024", {"mem_layers": [], "max_position_embeddings": 1024}),
        ("full:8192", {"mem_layers": [], "max_position_embeddings": 8192, "last_context_length": 8192}),
        ("hf:4096", {"max_position_embeddings": 4096}),
        ("memory+bias=2.5", {"mem_score_bias": 2.5}),
        ("memory+dist=512", {"mem_rope_distance": 512}),
        ("dense+dist=0", {"mem_top_k": None, "mem_index": "exact", "mem_rope_distance": 0}),
        ("memory+dist=none", {"mem_rope_distance": None}),
        ("blocks:16+block=64+chunk=128+overlap=32",
         {"mem_blocks": 16, "mem_top_k": None, "mem_index": "exact", "mem_block_size": 64, "mem_block_queries": 128,
          "window_overlap": 32}),
    ],
)
def test_composed_settings_are_the_overrides_they_name(text, overrides):
    setting = parse_setting(text)
    assert setting.name == text and setting.overrides == overrides
    assert setting.backend == ("hf" if text.startswith("hf:") else "fot")


@pytest.mark.parametrize(
    "text, message",
    [
        ("memory+layers=every:0", "memory\\+layers=every:0': mem_layers='every:0': in 'every:0' N must be >= 1"),
        ("memory+depth=3", "'depth=3' is not a modifier; use \\+KEY=VALUE with KEY one of layers, window"),
        ("memory+window=0", "window must be a positive integer"),
        ("memory+window=512+window=1024", "sets window twice"),
        ("topk:32+k=16", "sets k twice, or its base already sets it"),
        ("topk:32+nprobe=8", "nprobe only matters to faiss-ivf"),
        ("memory+index=annoy", "index='annoy' is unknown"),
        ("no-memory+layers=all", "no-memory takes no layers= \\(modifiers it takes: window, lcl\\)"),
        ("dense+k=4", "dense takes no k=.*use topk:K or memory\\+k=K"),
        ("full:512+window=256", "full takes no window="),
        ("hf:4096+layers=all", "hf takes no layers="),
        ("hf:0", "W \\(the window in tokens\\) must be a positive integer, e.g. hf:8192"),
        ("blocks:0", "N \\(blocks each chunk of queries reads\\) must be a positive integer, e.g. blocks:16"),
        ("memory+block=64", "block= sets block retrieval's mem_block_size; start from blocks:N"),
        ("blocks:8+k=32", "blocks takes no k="),
        ("memory+bias=-1", "bias must be a number >= 0"),
        ("memory+bias=x", "bias must be a number >= 0"),
        ("memory+dist=-5", "dist must be an integer >= 0"),
        ("blocks:4+dist=512", "blocks takes no dist="),
    ],
)
def test_bad_settings_name_the_fix(text, message):
    with pytest.raises(ValueError, match=message):
        parse_setting(text)


def test_a_smaller_window_takes_the_last_context_length_down_with_it():
    saved = {"max_position_embeddings": 64, "last_context_length": 32}
    assert setting_overrides(parse_setting("memory+window=16"), saved)["last_context_length"] == 16
    assert setting_overrides(parse_setting("memory+window=128"), saved)["last_context_length"] == 32
    assert setting_overrides(parse_setting("memory+window=16+lcl=8"), saved)["last_context_length"] == 8
    assert "last_context_length" not in setting_overrides(parse_setting("memory+layers=all"), saved)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """unit_tiny (3 layers, window 64, last context 32) with grouped-query attention, memory in layer 1."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_model(dtype=torch.float32, mem_layers=[1], mem_dtype="float32", num_key_value_heads=2).save_pretrained(path)
    return path


def test_composed_settings_load_as_the_explicit_overrides(checkpoint):
    model = load_model(checkpoint, parse_setting("memory+layers=all+window=16"), "cpu", "float32")
    c = model.config
    assert (c.mem_layers, c.max_position_embeddings, c.last_context_length) == ([0, 1, 2], 16, 16)
    # Reference: the same settings written out as from_pretrained overrides.
    explicit = fot.LongLlamaForCausalLM.from_pretrained(checkpoint, mem_layers=[0, 1, 2], max_position_embeddings=16,
                                                        last_context_length=16, dtype=torch.float32).eval()
    ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(1))  # 6 windows of 16 in memory
    with torch.no_grad():
        assert torch.equal(model(ids).logits, explicit(ids).logits)
    upper = load_model(checkpoint, parse_setting("topk:4+layers=1:"), "cpu", "float32").config
    assert (upper.mem_layers, upper.mem_top_k, upper.last_context_length) == ([1, 2], 4, 32)
    with pytest.raises(ValueError, match="mem_layers='5:' selects no layer of a model with num_hidden_layers=3"):
        load_model(checkpoint, parse_setting("memory+layers=5:"), "cpu", "float32")


def test_hf_setting_equals_fot_full_attention_on_the_same_weights(checkpoint):
    """hf:W is transformers' LlamaForCausalLM (SDPA) on the fot checkpoint's weights: its logits and greedy answers
    are fot's full:W ones when the prompt and answer fit in W."""
    from transformers import LlamaForCausalLM

    w = 96
    hf = load_model(checkpoint, parse_setting(f"hf:{w}"), "cpu", "auto")
    full = load_model(checkpoint, parse_setting(f"full:{w}"), "cpu", "float32")
    assert isinstance(hf, LlamaForCausalLM) and not isinstance(hf, fot.LongLlamaForCausalLM)
    assert hf.config._attn_implementation == "sdpa" and hf.dtype == torch.float32
    assert hf.config.num_key_value_heads == 2 and hf.config.max_position_embeddings == w
    ids = torch.randint(3, 128, (1, w), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, ours = hf(ids).logits, full(ids).logits
    assert (theirs - ours).abs().max().item() < HF_PARITY
    assert (theirs - tiny_logits_without_memory(checkpoint, ids)).abs().max().item() > 1e-2  # the window matters
    for n_prompt in (40, 80):  # prompt + 16 answer tokens <= W: full attention in both
        prompt = ids[0, :n_prompt].tolist()
        answer = passkey.greedy_answer(hf, prompt, 16, "cpu", pad_token_id=0, last_context_length=32,
                                       cache_policy="slide")  # fot's options: dropped by hf:W
        assert answer == passkey.greedy_answer(full, prompt, 16, "cpu", pad_token_id=0)
        assert len(set(answer)) > 1
    with pytest.raises(PromptTooLongError, match=f"a prompt of {w + 1} tokens is longer than its window of {w}"):
        passkey.greedy_answer(hf, ids[0].tolist() + [5], 2, "cpu")


def tiny_logits_without_memory(checkpoint, ids):
    """The checkpoint as saved (window 64, memory layer 1) with memory off: its last 32 tokens see only 32."""
    model = fot.LongLlamaForCausalLM.from_pretrained(checkpoint, mem_layers=[], dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_passkey_runs_hf_beside_full_and_refuses_lengths_past_w(model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    report = passkey.main(["--model", str(model_dir), "--template", "landmark", "--lengths", "100", "200", "--trials",
                           "2", "--settings", "full:256", "hf:256", "--device", "cpu", "--out", str(out)])
    for full_row, hf_row in zip(report["results"]["full:256"], report["results"]["hf:256"]):
        assert [t["predicted_ids"] for t in full_row["trials"]] == [t["predicted_ids"] for t in hf_row["trials"]]
    saved = json.loads((out / "results.json").read_text())["settings"]["hf:256"]
    assert saved["window"] == 256 and saved["mem_layers"] == [] and saved["overrides"] == {"max_position_embeddings": 256}
    with pytest.raises(SystemExit) as exc:
        passkey.main(["--model", str(model_dir), "--lengths", "100", "300", "--settings", "hf:256", "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "setting hf:256 runs prompts of at most 256 tokens, not [300]" in err and "Traceback" not in err


def test_tools_that_read_through_fot_windows_refuse_hf(checkpoint, capsys):
    from eval import perplexity

    with pytest.raises(SystemExit) as exc:
        perplexity.main(["--model", str(checkpoint), "--settings", "hf:64", "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "setting hf:64 (transformers' LlamaForCausalLM) runs in eval/passkey.py and eval/ruler.py" in err


@pytest.mark.parametrize("declared, no_bos, expected", [
    (None, False, True),  # nothing declared: BOS, as fot's checkpoints and LongLLaMA are trained
    (False, False, False),  # SmolLM2's converted tokenizer_config.json
    (True, False, True),
    (True, True, False),  # --no-bos wins
])
def test_bos_follows_the_checkpoints_declaration_unless_no_bos(tmp_path, caplog, declared, no_bos, expected):
    import json
    import logging
    from argparse import Namespace

    from eval.common import resolve_bos

    config = {"tokenizer_class": "LlamaTokenizer"} | ({} if declared is None else {"add_bos_token": declared})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="eval.common"):
        assert resolve_bos(Namespace(no_bos=no_bos), tmp_path) is expected
    assert f"BOS: {'on' if expected else 'off'}" in caplog.text  # "auto" says what it chose


def test_overlap_modifier_sets_window_overlap_on_memory_settings_only():
    from eval.common import parse_setting

    assert parse_setting("memory+overlap=64").overrides == {"window_overlap": 64}
    assert parse_setting("dense+overlap=32").overrides["window_overlap"] == 32
    with pytest.raises(ValueError, match="no-memory takes no overlap="):
        parse_setting("no-memory+overlap=64")
    # 0 turns off the overlap a checkpoint saved (make smollm2's 32), e.g. for the [7, 15, 22] layout's row
    assert parse_setting("dense+layers=7,15,22+overlap=0+dist=none").overrides == {
        "mem_top_k": None, "mem_index": "exact", "mem_layers": "7,15,22", "window_overlap": 0,
        "mem_rope_distance": None}
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(ValueError, match="overlap must be an integer >= 0"):
            parse_setting(f"memory+overlap={bad}")


def test_heads_modifier_reads_pairs_a_file_or_all_and_layers_reset_saved_heads(tmp_path):
    import json

    from eval.common import parse_setting, setting_overrides

    # normalized and JSON-stable; the heads' layers become the memory layers unless layers= says otherwise
    assert parse_setting("memory+heads=21.8,18.6").overrides == {"mem_heads": "18.6,21.8", "mem_layers": "18,21"}
    assert parse_setting("memory+layers=all+heads=21.8").overrides == {"mem_heads": "21.8", "mem_layers": "all"}
    assert parse_setting("memory+heads=all").overrides == {"mem_heads": None}
    assert parse_setting("memory+heads=1.2+hscope=prefill").overrides == {"mem_heads": "1.2", "mem_layers": "1",
                                                                          "mem_heads_scope": "prefill"}
    with pytest.raises(ValueError, match="hscope='last' is unknown; use one of all, prefill"):
        parse_setting("memory+hscope=last")
    chosen = tmp_path / "heads.json"
    chosen.write_text(json.dumps({"mem_heads": {"7": [7], "18": [6, 7]}, "scores": [[0.0]]}))  # retrieval_heads.py's
    assert parse_setting(f"memory+heads={chosen}").overrides == {"mem_heads": "7.7,18.6,18.7", "mem_layers": "7,18"}
    chosen.write_text(json.dumps({"2": [], "7": [7]}))  # layer 2 with no head (scope "prefill"), kept as "2."
    assert parse_setting(f"memory+heads={chosen}+hscope=prefill").overrides == {
        "mem_heads": "2.,7.7", "mem_layers": "2,7", "mem_heads_scope": "prefill"}
    for bad in ("18", "x.1", str(tmp_path / "missing.json")):
        with pytest.raises(ValueError, match="neither 'all', a heads JSON file nor layer.head pairs"):
            parse_setting(f"memory+heads={bad}")
    with pytest.raises(ValueError, match="no-memory takes no heads="):
        parse_setting("no-memory+heads=1.1")
    saved = {"mem_layers": [7, 18], "mem_heads": {"7": [7], "18": [6, 7]}}
    # a setting that sets the layers reads them with every head, unless it says heads=
    assert setting_overrides(parse_setting("no-memory"), saved) == {"mem_layers": [], "mem_heads": None}
    assert setting_overrides(parse_setting("memory+layers=all"), saved) == {"mem_layers": "all", "mem_heads": None}
    assert setting_overrides(parse_setting("memory+layers=7+heads=7.1"), saved) == {"mem_layers": "7",
                                                                                    "mem_heads": "7.1"}
    assert setting_overrides(parse_setting("memory"), saved) == {}
    assert setting_overrides(parse_setting("no-memory"), {"mem_layers": [1]}) == {"mem_layers": []}  # no saved heads
