"""LongLlamaConfig: validation errors name the field; reference defaults; published config.json loads."""

import json

import pytest
from transformers import AutoConfig

import fot
from tests.reference_format import reference_config_dict
from tests.tiny import TINY, tiny_config

REFERENCE_DEFAULTS = {
    "max_position_embeddings": 2048,
    "last_context_length": 1024,
    "mem_layers": [],
    "mem_positionals": True,
    "mem_dtype": "bfloat16",
    "mem_attention_grouping": None,
    "torch_attention": False,
    "gradient_checkpoint_every_ith": 1,
    "mem_top_k": None,
    "mem_max_tokens": None,
}


def test_reference_defaults():
    cfg = fot.LongLlamaConfig()
    assert cfg.model_type == "longllama"
    for name, value in REFERENCE_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
        assert type(getattr(cfg, name)) is type(value), name
    assert cfg.rope_theta == 10000.0


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("mem_layers", {"mem_layers": [5]}),
        ("mem_layers", {"mem_layers": [3]}),
        ("mem_layers", {"mem_layers": [-1]}),
        ("mem_layers", {"mem_layers": [1, 1]}),
        ("mem_layers", {"mem_layers": ["1"]}),
        ("last_context_length", {"last_context_length": 65}),
        ("last_context_length", {"last_context_length": 0}),
        ("last_context_length", {"last_context_length": -4}),
        ("mem_dtype", {"mem_dtype": "float64"}),
        ("mem_dtype", {"mem_dtype": "int4"}),
        ("rope_scaling", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ("rope_scaling", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}),
        ("rope_scaling", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}),
        ("mem_attention_grouping", {"mem_attention_grouping": (0, 2)}),
        ("mem_attention_grouping", {"mem_attention_grouping": (1,)}),
        ("mem_attention_grouping", {"mem_attention_grouping": "ab"}),
        ("mem_attention_grouping", {"mem_attention_grouping": (1.5, 2)}),
        ("mem_attention_grouping", {"mem_attention_grouping": (2, -1)}),
        ("mem_top_k", {"mem_top_k": 0}),
        ("mem_max_tokens", {"mem_max_tokens": -1}),
        ("cache_policy", {"cache_policy": "lru"}),
        ("attn_impl", {"attn_impl": "flash"}),
        ("num_key_value_heads", {"num_key_value_heads": 3}),
        ("gradient_checkpoint_every_ith", {"gradient_checkpoint_every_ith": 0}),
    ],
)
def test_validation_errors_name_the_field(field, overrides):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_valid_edge_values_are_accepted():
    cfg = tiny_config(mem_layers=[0, 2], last_context_length=64, mem_attention_grouping=[2, 3], mem_top_k=1)
    assert cfg.mem_attention_grouping == (2, 3)  # JSON lists become tuples
    assert tiny_config(last_context_length=1).last_context_length == 1


def test_reference_format_config_json_loads_without_remote_code(tmp_path):
    raw = reference_config_dict(mem_layers=[0, 2], last_context_length=24, mem_attention_grouping=[1, 16])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert type(cfg) is fot.LongLlamaConfig
    expected = {
        "mem_layers": [0, 2],
        "last_context_length": 24,
        "max_position_embeddings": 64,
        "mem_attention_grouping": (1, 16),
        "mem_dtype": "bfloat16",
        "mem_positionals": True,
        "torch_attention": False,
        "gradient_checkpoint_every_ith": 1,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,  # the reference has no GQA: defaults to the head count
        "num_hidden_layers": 3,
        "vocab_size": 128,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "use_cache": True,
        "head_dim": 16,
        "rope_theta": 10000.0,
        "cache_policy": "slide",
        "mem_top_k": None,
    }
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name
    # the saved config round-trips, auto_map and all
    cfg.save_pretrained(tmp_path / "again")
    again = AutoConfig.from_pretrained(tmp_path / "again")
    for name, value in expected.items():
        assert getattr(again, name) == value, name


def test_reference_format_with_rope_scaling_is_rejected(tmp_path):
    raw = reference_config_dict(rope_scaling={"type": "linear", "factor": 4.0})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="rope_scaling"):
        AutoConfig.from_pretrained(tmp_path)


def test_assigning_a_field_revalidates_the_config_and_a_bad_value_is_undone():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="mem_layers"):
        cfg.mem_layers = [7]
    assert cfg.mem_layers == TINY["mem_layers"]
    with pytest.raises(ValueError, match="last_context_length"):
        cfg.last_context_length = TINY["max_position_embeddings"] + 1
    assert cfg.last_context_length == TINY["last_context_length"]
    cfg.mem_attention_grouping = [1, 16]  # as JSON and YAML give it
    assert cfg.mem_attention_grouping == (1, 16)


def test_a_saved_and_reloaded_config_still_revalidates_and_saves_no_build_state(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    assert "_longllama_built" not in (tmp_path / "config.json").read_text()
    cfg = fot.LongLlamaConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mem_layers"):
        cfg.mem_layers = [7]


def test_last_context_length_default_follows_a_short_window():
    # The reference default is 1024; a plain LLaMA with a shorter window gets its window instead of an error.
    assert fot.LongLlamaConfig().last_context_length == 1024
    assert fot.LongLlamaConfig(max_position_embeddings=64).last_context_length == 64
    with pytest.raises(ValueError, match="last_context_length"):
        fot.LongLlamaConfig(max_position_embeddings=64, last_context_length=65)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_mem_top_k_and_unknown_index_are_errors(bad):
    with pytest.raises(ValueError, match="mem_top_k"):
        tiny_config(mem_top_k=bad)
    with pytest.raises(ValueError, match="mem_index"):
        tiny_config(mem_top_k=4, mem_index="annoy")


# ----------------------------------------------------------------------------- compact mem_layers forms
@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", list(range(30))),
        ("none", []),
        ("every:2", list(range(0, 30, 2))),
        ("every:3:1", list(range(1, 30, 3))),
        ("15:", list(range(15, 30))),
        ("2:", list(range(2, 30))),
        ("-8:", list(range(22, 30))),
        (":10:3", [0, 3, 6, 9]),
        ("7,15,22", [7, 15, 22]),
        ("22, 7 ,15", [7, 15, 22]),
        ("0,15:", [0, *range(15, 30)]),
        (" ALL ", list(range(30))),
    ],
)
def test_compact_mem_layers_resolve_against_the_layer_count(spec, expected):
    from fot.config import resolve_mem_layers

    assert resolve_mem_layers(spec, 30) == expected
    cfg = tiny_config(num_hidden_layers=30, mem_layers=spec)
    assert cfg.mem_layers == expected and type(cfg.mem_layers) is list


@pytest.mark.parametrize(
    "spec, message",
    [
        ("every:0", "N must be >= 1"),
        ("every:2:-1", "OFFSET >= 0"),
        ("every:1:2:3", "'every:N' or 'every:N:OFFSET'"),
        ("1:2:3:4", "not a slice"),
        ("::-1", "step"),
        ("first", "'first' is not an integer; use 'all'"),
        ("3", r"names layer 3, but the model has num_hidden_layers=3; memory layers must be in \[0, 2\]"),
        ("5:", "selects no layer of a model with num_hidden_layers=3; write 'none'"),
        ("0,0:2", r"selects layer\(s\) \[0\] more than once"),
        ("1,,2", "empty part"),
        ("", "empty part"),
    ],
)
def test_bad_compact_mem_layers_name_the_form_and_the_fix(spec, message):
    with pytest.raises(ValueError, match=f"mem_layers={spec!r}.*{message}"):
        tiny_config(mem_layers=spec)  # 3 layers


def test_check_mem_layers_checks_syntax_without_a_model():
    from fot.config import check_mem_layers

    for good in ("all", "15:", "every:2:1", "7,15,22", [7, 15, 22]):
        check_mem_layers(good)
    for bad, message in (("every:0", "N must be"), ("5:5", "selects no layer; write 'none'"), ([1, "a"], "'a'")):
        with pytest.raises(ValueError, match=message):
            check_mem_layers(bad)


def test_compact_mem_layers_are_saved_as_the_explicit_list_and_work_as_overrides(tmp_path):
    tiny_config(mem_layers="1:").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["mem_layers"] == [1, 2]
    assert fot.LongLlamaConfig.from_pretrained(tmp_path).mem_layers == [1, 2]
    # from_pretrained's override resolves against the saved num_hidden_layers (3)
    assert fot.LongLlamaConfig.from_pretrained(tmp_path, mem_layers="all").mem_layers == [0, 1, 2]
    assert fot.LongLlamaConfig.from_pretrained(tmp_path, mem_layers="none").mem_layers == []
    auto = AutoConfig.for_model("longllama", **{**TINY, "mem_layers": "every:2"})
    assert auto.mem_layers == [0, 2]
    cfg = tiny_config()
    cfg.mem_layers = "all"  # an assignment resolves too, against the config's own layer count
    assert cfg.mem_layers == [0, 1, 2]
    with pytest.raises(ValueError, match="every:0"):
        cfg.mem_layers = "every:0"
    assert cfg.mem_layers == [0, 1, 2]  # the bad assignment is undone


def test_a_model_built_from_a_compact_form_has_memory_in_those_layers(tmp_path):
    from tests.tiny import tiny_model

    model = tiny_model(mem_layers="all")
    assert [layer.self_attn.is_memory_layer for layer in model.model.layers] == [True, True, True]
    model.save_pretrained(tmp_path)
    again = fot.LongLlamaForCausalLM.from_pretrained(tmp_path, mem_layers="2:")
    assert [layer.self_attn.is_memory_layer for layer in again.model.layers] == [False, False, True]
