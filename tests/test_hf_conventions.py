"""fot behaves like a transformers model: the cache under both of its names, the kwargs transformers passes,
HF's loss, logits_to_keep, return_dict, checkpointing layers, generation helpers left unmutated, autocast
and half-precision weights, and cache copies."""

import logging

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.generation.stopping_criteria import MaxLengthCriteria
from transformers.modeling_layers import GradientCheckpointingLayer

import fot
from fot.inputs import CACHE_NAME
from tests.test_parity_llama import hf_twin
from tests.tiny import max_err, tiny_model, tokens


# ----------------------------------------------------------------------------- the cache's two names
def test_forward_takes_the_cache_under_either_name_and_returns_it_under_both():
    model = tiny_model(mem_layers=[1])
    ids = tokens(1, 150, seed=1)
    with torch.no_grad():
        a = model(ids[:, :100])
        b = model(ids[:, :100])
        next_a = model(ids[:, 100:], cache=a.cache, attention_mask=torch.ones(1, 150, dtype=torch.long))
        next_b = model(ids[:, 100:], past_key_values=b.past_key_values)
        whole = model(ids)
    assert isinstance(a.cache, fot.LongLlamaCache) and a.cache is a.past_key_values is a[CACHE_NAME]
    assert torch.equal(next_a.logits, next_b.logits)
    assert next_a.cache.seen_tokens == next_b.past_key_values.seen_tokens == 150
    assert whole.cache.seen_tokens == 150
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, 100:], cache=a.cache, past_key_values=b.cache)


def test_generate_continues_a_cache_passed_under_either_name():
    model = tiny_model(mem_layers=[1, 2])
    ids = tokens(1, 130, seed=2)
    outs, caches = [], []
    with torch.no_grad():
        for name in ("cache", "past_key_values"):
            cache = fot.LongLlamaCache(model.config)
            model(ids[:, :-1], cache=cache)
            outs.append(model.generate(ids, max_new_tokens=12, do_sample=False, **{name: cache}))
            caches.append(cache)
        # the same steps by hand: the last prompt token, then each greedy token
        cache = fot.LongLlamaCache(model.config)
        model(ids[:, :-1], cache=cache)
        step, by_hand = ids[:, -1:], []
        for _ in range(12):
            step = model(step, cache=cache).logits[:, -1:].argmax(-1)
            by_hand.append(step)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, 130:], torch.cat(by_hand, dim=1))
    assert caches[0].seen_tokens == caches[1].seen_tokens == 130 + 11


# ----------------------------------------------------------------------------- kwargs transformers passes
def test_generate_accepts_stop_strings_with_a_tokenizer():
    tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained("models/fot-tiny")
    model = fot.LongLlamaForCausalLM.from_pretrained("models/fot-tiny").eval()
    ids = torch.tensor([[tok.bos_token_id] + tok("The grass is green. The sky is blue.")["input_ids"]])
    with torch.no_grad():  # min_new_tokens keeps this small model from ending at once with </s>
        free = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        new = free[0, ids.shape[1] :]
        stop = next(tok.decode(new[: i + 1]) for i in range(3, 20) if tok.decode(new[: i + 1]).strip())
        stopped = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, stop_strings=[stop],
                                 tokenizer=tok)  # fmt: skip
    assert stopped.shape[1] < free.shape[1]  # the stop string ended generation early
    assert torch.equal(stopped, free[:, : stopped.shape[1]])


def test_unused_transformers_kwargs_pass_but_unsupported_features_still_raise():
    model = tiny_model(mem_layers=[1])
    ids = tokens(1, 20)
    with torch.no_grad():
        plain = model(ids).logits
        assert torch.equal(model(ids, cache_position=torch.arange(20), num_items_in_batch=5).logits, plain)
        with pytest.raises(ValueError, match="output_attentions"):
            model(ids, output_attentions=True)
        with pytest.raises(ValueError, match="position_ids"):
            model(ids, position_ids=torch.arange(20)[None])
        from transformers import DynamicCache

        with pytest.raises(TypeError, match="LongLlamaCache"):
            model(ids, cache=DynamicCache())


# ----------------------------------------------------------------------------- HF's helpers
def test_loss_matches_llama_with_num_items_in_batch():
    model = tiny_model(dtype=torch.float32, mem_layers=[1])
    hf = hf_twin(model)
    ids = tokens(2, 30, seed=3)  # one window (last_context_length 32): plain LLaMA
    labels = ids.clone()
    labels[0, :10] = -100
    for extra in ({}, {"num_items_in_batch": torch.tensor(200)}):
        ours = model(ids, labels=labels, **extra).loss
        theirs = hf(ids, labels=labels, **extra).loss
        assert abs(ours.item() - theirs.item()) < 1e-5, extra
    # num_items_in_batch really normalises: sum of token losses / 200
    full = model(ids, labels=labels).loss.item() * (labels[:, 1:] != -100).sum().item()
    assert abs(model(ids, labels=labels, num_items_in_batch=torch.tensor(200)).loss.item() - full / 200) < 1e-4


def test_logits_to_keep_int_and_tensor_and_return_dict():
    model = tiny_model(mem_layers=[1])
    ids = tokens(1, 90, seed=4)
    with torch.no_grad():
        full = model(ids).logits
        assert max_err(model(ids, logits_to_keep=5).logits, full[:, -5:]) < 1e-12
        keep = torch.tensor([0, 17, 89])
        assert max_err(model(ids, logits_to_keep=keep).logits, full[:, keep]) < 1e-12
        as_tuple = model(ids, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], full)
        base = model.model(ids, return_dict=False)
        assert isinstance(base, tuple) and base[0].shape == (1, 90, model.config.hidden_size)


def test_decoder_layers_are_checkpointing_layers_every_ith():
    model = tiny_model(mem_layers=[1], num_hidden_layers=4, gradient_checkpoint_every_ith=2).train()
    assert all(isinstance(layer, GradientCheckpointingLayer) for layer in model.model.layers)
    switch = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"  # renamed after 5.20
    getattr(model, f"{switch}_checkpointing_enable")(**{f"{switch}_checkpointing_kwargs": {"use_reentrant": False}})
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False, True, False]
    getattr(model, f"{switch}_checkpointing_disable")()
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)


def test_generation_past_the_window_leaves_max_length_criteria_unmutated(caplog, monkeypatch):
    made = []
    original_init = MaxLengthCriteria.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made.append((self, self.max_position_embeddings))

    monkeypatch.setattr(MaxLengthCriteria, "__init__", recording_init)
    model = tiny_model(mem_layers=[1])
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = model.generate(tokens(1, 60), max_new_tokens=30, do_sample=False)
    assert out.shape[1] == 90
    assert made and all(c.max_position_embeddings == before for c, before in made)
    assert "maximum length" not in caplog.text


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("n_tokens", [40, 200])
def test_forward_and_generate_under_bf16_autocast(n_tokens):
    model = tiny_model(dtype=torch.float32, mem_layers=[1, 2], mem_dtype="bfloat16")
    ids = tokens(1, n_tokens, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
        with torch.autocast("cpu", torch.bfloat16):
            got = model(ids).logits
            gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert got.shape == ref.shape and torch.isfinite(got).all()
    assert max_err(got.float(), ref) < 0.1 * ref.abs().max().item()
    assert gen.shape == (1, n_tokens + 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_run_and_stay_close(dtype):
    ref_model = tiny_model(dtype=torch.float32, mem_layers=[1], mem_dtype="float32")
    model = tiny_model(dtype=dtype, mem_layers=[1], mem_dtype="float32")
    ids = tokens(1, 200, seed=6)
    with torch.no_grad():
        ref = ref_model(ids).logits
        got = model(ids).logits
        gen = model.generate(ids[:, :100], max_new_tokens=4, do_sample=False)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert max_err(got.float(), ref) < 0.1 * ref.abs().max().item()
    assert gen.shape == (1, 104)


def test_half_precision_on_cpu_is_logged_once(caplog):
    from fot import inputs

    inputs._low_precision_logged.clear()
    model = tiny_model(dtype=torch.float32, mem_layers=[1])
    with caplog.at_level(logging.WARNING, logger="fot.inputs"), torch.no_grad():
        model(tokens(1, 10))
        assert "float32" not in caplog.text or "computing in" not in caplog.text
        with torch.autocast("cpu", torch.bfloat16):
            model(tokens(1, 10))
            model(tokens(1, 10))
    assert caplog.text.count("computing in torch.bfloat16 on CPU") == 1


# ----------------------------------------------------------------------------- cache copies
CACHE_MEMORIES = pytest.mark.parametrize(
    "overrides", [{}, {"mem_top_k": 4, "mem_index": "faiss-ivf", "mem_dtype": "float32"}])


def questions_about_a_document(overrides):
    """A model, a prefilled 300-token document's cache, two 6-token questions and ``ask(question, cache, n)``."""
    if overrides.get("mem_index") == "faiss-ivf":
        pytest.importorskip("faiss")
    model = tiny_model(mem_layers=[1, 2], **overrides)
    doc, q1, q2 = tokens(1, 300, seed=7), tokens(1, 6, seed=8), tokens(1, 6, seed=9)

    def ask(q, cache, n=8):
        mask = torch.ones(1, 300 + q.shape[1], dtype=torch.long)
        return model.generate(q, cache=cache, attention_mask=mask, max_new_tokens=n, do_sample=False)

    with torch.no_grad():
        return model, doc, model(doc).cache, q1, q2, ask


@CACHE_MEMORIES
def test_cache_copy_lets_a_second_question_ignore_the_first(overrides):
    model, doc, cache, q1, q2, ask = questions_about_a_document(overrides)
    with torch.no_grad():
        fresh_q2 = ask(q2, model(doc).cache)
        ask(q1, cache.copy())
        assert cache.seen_tokens == 300
        assert torch.equal(ask(q2, cache.copy()), fresh_q2)
        ask(q1, cache)  # without a copy, generate extends the cache it is given
        assert cache.seen_tokens == 300 + 6 + 7


@CACHE_MEMORIES
def test_cache_fork_answers_as_a_copy_and_never_writes_the_shared_memory(overrides):
    _, _, cache, q1, q2, ask = questions_about_a_document(overrides)
    with torch.no_grad():
        memory = {i: store.k_BGMH[:, :, : store.length].clone() for i, store in cache.memories.items()}
        assert 6 + 8 <= cache.free_tokens == cache.window - cache.local_length  # the questions fit in the free room
        expected = ask(q2, cache.copy())
        ask(q1, cache.fork())
        assert torch.equal(ask(q2, cache.fork()), expected)
        assert cache.seen_tokens == 300 and not cache.shares_memory
        for i, store in cache.memories.items():
            assert store.length == memory[i].shape[2] and torch.equal(store.k_BGMH[:, :, : store.length], memory[i])
        ask(tokens(1, cache.free_tokens, seed=10), cache.fork(), n=1)  # exactly the free room stays local
        long_question = tokens(1, cache.free_tokens + 1, seed=10)  # one more token moves a window to memory
        with pytest.raises(ValueError, match=r"fork\(\).*continue a copy\(\) instead"):
            ask(long_question, cache.fork(), n=1)
        assert all(store.length == memory[i].shape[2] for i, store in cache.memories.items())
        assert cache.fork().copy().shares_memory is False
