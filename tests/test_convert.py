"""fot.convert's config rewrite (``--from``) on a tiny checkpoint: compact memory layouts, atomic config, weights
untouched; one-line errors. The GGUF conversion itself is tested on the real model in tests/test_smollm2.py."""

import json

import pytest
import torch

import fot
from fot.convert import main
from tests.tiny import tiny_model


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "source"
    tiny_model(dtype=torch.float32, mem_layers=[1], mem_dtype="float32").save_pretrained(path)
    return path


def saved(path):
    return json.loads((path / "config.json").read_text())


def test_from_rewrites_the_memory_settings_into_a_copy_that_loads_as_the_overrides_would(checkpoint, tmp_path, capsys):
    out = tmp_path / "every-layer"
    main(["--from", str(checkpoint), "--mem-layers", "all", "--mem-top-k", "4", "--mem-nprobe", "8", "--window", "32",
          "--last-context-length", "16", "--window-overlap", "8", "--mem-score-bias", "1.5", "--mem-rope-distance", "32",
          "--out", str(out)])
    assert "memory layers" in capsys.readouterr().out
    cfg = saved(out)
    assert (cfg["mem_layers"], cfg["mem_top_k"], cfg["mem_nprobe"]) == ([0, 1, 2], 4, 8)
    assert (cfg["max_position_embeddings"], cfg["last_context_length"], cfg["window_overlap"]) == (32, 16, 8)
    assert (cfg["mem_score_bias"], cfg["mem_rope_distance"]) == (1.5, 32)
    assert saved(checkpoint)["mem_layers"] == [1]  # the source is untouched
    assert (out / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    assert not list(out.glob(".*.tmp"))
    # Reference: the source loaded with the same settings as from_pretrained overrides.
    expected = fot.LongLlamaForCausalLM.from_pretrained(checkpoint, mem_layers=[0, 1, 2], mem_top_k=4, mem_nprobe=8,
                                                        max_position_embeddings=32, last_context_length=16,
                                                        window_overlap=8, mem_score_bias=1.5,
                                                        mem_rope_distance=32).eval()
    ids = torch.randint(3, 128, (1, 150), generator=torch.Generator().manual_seed(0))  # several windows of memory
    with torch.no_grad():
        assert torch.equal(fot.LongLlamaForCausalLM.from_pretrained(out).eval()(ids).logits, expected(ids).logits)


def test_from_in_place_changes_only_the_config_and_none_turns_top_k_off(checkpoint):
    weights = (checkpoint / "model.safetensors").read_bytes()
    main(["--from", str(checkpoint), "--mem-layers", "0", "2", "--mem-top-k", "3", "--out", str(checkpoint)])
    assert (saved(checkpoint)["mem_layers"], saved(checkpoint)["mem_top_k"]) == ([0, 2], 3)
    main(["--from", str(checkpoint), "--mem-rope-distance", "64", "--out", str(checkpoint)])
    assert saved(checkpoint)["mem_rope_distance"] == 64
    main(["--from", str(checkpoint), "--mem-top-k", "none", "--mem-rope-distance", "none", "--out", str(checkpoint)])
    cfg = saved(checkpoint)
    assert cfg["mem_layers"] == [0, 2] and cfg.get("mem_top_k") is None  # a flag left out leaves its field alone
    assert cfg.get("mem_rope_distance") is None
    assert (checkpoint / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json", "generation_config.json",
                                                              "model.safetensors"]


def test_mem_heads_from_a_heads_file_set_the_memory_layers_and_all_undoes_them(checkpoint, tmp_path, capsys):
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"mem_heads": {"2": [1], "0": [3, 0]}, "key_mass": {}}))  # retrieval_heads.py's file
    main(["--from", str(checkpoint), "--mem-layers", "all", "--mem-heads", str(heads), "--out", str(checkpoint)])
    assert "3 of 8 (mem_heads, scope all)" in capsys.readouterr().out
    cfg = saved(checkpoint)
    assert (cfg["mem_layers"], cfg["mem_heads"]) == ([0, 2], {"0": [0, 3], "2": [1]})  # the heads' layers only
    main(["--from", str(checkpoint), "--mem-heads", "1.2", "--mem-heads-scope", "prefill", "--out", str(checkpoint)])
    assert (saved(checkpoint)["mem_layers"], saved(checkpoint)["mem_heads"]) == ([1], {"1": [2]})
    assert saved(checkpoint)["mem_heads_scope"] == "prefill"
    main(["--from", str(checkpoint), "--mem-layers", "all", "--mem-heads", "all", "--out", str(checkpoint)])
    assert (saved(checkpoint)["mem_layers"], saved(checkpoint).get("mem_heads")) == ([0, 1, 2], None)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mem-layers", "5:"], "mem_layers='5:' selects no layer of a model with num_hidden_layers=3"),
        (["--mem-layers", "all", "--mem-top-k", "0"], "--mem-top-k: '0' is neither a positive int nor 'none'"),
        (["--window", "8"], "last_context_length=32 exceeds max_position_embeddings=8"),
        (["--mem-rope-distance", "-4"], "--mem-rope-distance: '-4' is neither an int >= 0 nor 'none'"),
        (["--mem-heads", "1.9"], "mem_heads gives layer 1 head 9, but the model has num_attention_heads=4"),
        (["--mem-heads", "one"], "'one' is not layer.head"),
    ],
)
def test_bad_settings_are_one_line_errors_and_write_nothing(checkpoint, tmp_path, capsys, args, message):
    before = (checkpoint / "config.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["--from", str(checkpoint), *args, "--out", str(checkpoint)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert (checkpoint / "config.json").read_bytes() == before


def test_from_a_directory_without_config_and_gguf_without_layers_name_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--from", str(tmp_path), "--mem-layers", "all", "--out", str(tmp_path / "x")])
    assert "holds no config.json" in capsys.readouterr().err
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(SystemExit):
        main(["--gguf", str(gguf), "--window", "512", "--out", str(tmp_path / "y")])
    assert "--gguf needs --mem-layers, --last-context-length" in capsys.readouterr().err
