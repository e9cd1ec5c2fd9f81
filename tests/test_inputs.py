"""Bad inputs fail at fot's boundary with a message naming the problem and the fix (fot/inputs.py, config)."""

import pytest
import torch

import fot
from tests.tiny import tiny_config, tiny_model, tokens


@pytest.fixture(scope="module")
def model():
    return tiny_model(mem_layers=[1])


@pytest.mark.parametrize("bad, match", [(128, "outside the vocabulary"), (-1, "outside the vocabulary")])
def test_ids_outside_the_vocabulary(model, bad, match):
    ids = tokens(1, 10)
    ids[0, 4] = bad
    with pytest.raises(ValueError, match=match) as err:
        model(ids)
    assert str(bad) in str(err.value) and "vocab_size=128" in str(err.value)


def test_one_dimensional_ids_name_the_batch_dimension(model):
    with pytest.raises(ValueError, match=r"2-D \[batch, tokens\].*input_ids\[None\]"):
        model(tokens(1, 10)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_float_or_bool_ids(model, dtype):
    with pytest.raises(TypeError, match="integer token ids"):
        model(tokens(1, 10).to(dtype))


def test_mem_layers_as_an_int_suggests_a_list():
    with pytest.raises(ValueError, match=r"mem_layers=\[1\]"):
        tiny_config(mem_layers=1)


def test_odd_head_dim_is_a_config_error():
    with pytest.raises(ValueError, match="head_dim=.*odd"):
        tiny_config(hidden_size=60, num_attention_heads=4, num_key_value_heads=4)


@pytest.mark.parametrize("shape", [(1, 9), (2, 10), (10,)])
def test_labels_of_the_wrong_shape(model, shape):
    with pytest.raises(ValueError, match=r"labels must have the shape of the input, \[batch, tokens\] = \[1, 10\]"):
        model(tokens(1, 10), labels=torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("position", [5, 140])  # inside an early window (to memory) and in the last window
def test_non_finite_inputs_embeds(model, position):
    embeds = model.get_input_embeddings()(tokens(1, 150))
    embeds[0, position, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(inputs_embeds=embeds)
    embeds[0, position, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(inputs_embeds=embeds)


def test_float_and_non_binary_masks(model):
    ids = tokens(1, 10)
    with pytest.raises(TypeError, match=r"attention_mask.*\.long\(\)"):
        model(ids, attention_mask=torch.ones(1, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 0] = 2
    with pytest.raises(ValueError, match="only 0 .* and 1"):
        model(ids, attention_mask=mask)
    ok = torch.ones(1, 10, dtype=torch.bool)
    assert torch.equal(model(ids, attention_mask=ok).logits, model(ids).logits)


def test_mask_with_a_cache_must_cover_cached_and_new_tokens(model):
    ids = tokens(1, 30)
    with torch.no_grad():
        cache = model(ids[:, :20]).cache
        with pytest.raises(ValueError, match=r"\[1, 30\].*20 cached tokens and the 10 new"):
            model(ids[:, 20:], cache=cache, attention_mask=torch.ones(1, 10, dtype=torch.long))
        with pytest.raises(ValueError, match=r"\[1, 30\]"):
            model(ids[:, 20:], cache=cache, attention_mask=torch.ones(1, 29, dtype=torch.long))
        assert cache.seen_tokens == 20  # refused before anything was written
        model(ids[:, 20:], cache=cache, attention_mask=torch.ones(1, 30, dtype=torch.long))
    assert cache.seen_tokens == 30


def test_mem_index_without_mem_top_k_is_refused():
    with pytest.raises(ValueError, match="mem_top_k is None"):
        tiny_config(mem_index="faiss-ivf")
    assert tiny_config(mem_index="faiss-ivf", mem_top_k=8).mem_index == "faiss-ivf"


def test_a_foreign_cache_type_names_the_expected_one(model):
    with pytest.raises(TypeError, match="fot.LongLlamaCache"):
        model(tokens(1, 10), cache=[(torch.zeros(1), torch.zeros(1))])


def test_checks_accept_what_transformers_hands_over(model):
    assert isinstance(model.config, fot.LongLlamaConfig)
    ids = tokens(2, 12).int()  # int32 ids, as some tokenizers return
    mask = torch.ones(2, 12, dtype=torch.int32)
    mask[1, :3] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    assert torch.isfinite(out.logits).all()
