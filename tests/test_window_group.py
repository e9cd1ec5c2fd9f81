"""Window groups: full windows bound for memory run several at a time (``fot.model.plan_window_groups``).

Each group runs as P*B batch rows, and a memory layer's window p also attends to windows 0..p-1 of its row
(``window_group_attention``). References: the naive float64 spec (tests/naive.py), and the same model with
grouping turned off (one window at a time), which must give the same logits, hidden states, memory and
generated tokens.
"""

import pytest
import torch

from tests.naive import naive_logits
from tests.tiny import TOL64, left_pad_mask, max_err, tiny_model, tokens

W, L = 64, 32
N_TWO_GROUPS = L + 11 * W + 17  # 11 full memory windows (groups of 8 and 3), a short one, then the last L


class GroupSizes(list):
    """The size of every window group a model runs, seen by a forward hook on its first layer: a group of P
    windows enters the layer as P*B batch rows."""

    def watch(self, model, batch: int):
        def hook(module, args):
            if args[0].shape[0] > batch:
                self.append(args[0].shape[0] // batch)

        model.model.layers[0].register_forward_pre_hook(hook)
        return model


@pytest.fixture
def group_sizes():
    return GroupSizes()


def one_window_at_a_time(model):
    model.model.window_group_queries = 0  # every window is long enough alone


def run(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=True, output_hidden_states=True, **kwargs)


def test_window_groups_equal_spec_and_one_window_at_a_time(group_sizes):
    model = group_sizes.watch(tiny_model(num_key_value_heads=2, mem_layers=[0, 2]), batch=2)
    ids = tokens(2, N_TWO_GROUPS, seed=5)
    grouped = run(model, ids)
    assert group_sizes == [8, 3]  # the second group starts with 8 windows already in memory
    expected = naive_logits(model, model.config, ids)
    assert max_err(grouped.logits, expected) < TOL64
    assert max_err(naive_logits(model, model.config, ids, mem_layers=[]), expected) > 1e-2  # memory matters

    one_window_at_a_time(model)
    single = run(model, ids)
    assert group_sizes == [8, 3]  # no new group
    assert max_err(grouped.logits, single.logits) < 1e-12
    for a, b in zip(grouped.hidden_states, single.hidden_states, strict=True):
        assert max_err(a, b) < 1e-12
    for idx in (0, 2):
        ga, sa = grouped.past_key_values.memories[idx].view(), single.past_key_values.memories[idx].view()
        assert max_err(ga.k_BGMH, sa.k_BGMH) < 1e-12 and max_err(ga.v_BGMH, sa.v_BGMH) < 1e-12
    assert grouped.past_key_values.seen_tokens == single.past_key_values.seen_tokens == N_TWO_GROUPS
    # generation continues from either cache the same way
    step = tokens(2, 5, seed=6)
    with torch.no_grad():
        a = model(step, past_key_values=grouped.past_key_values).logits
        b = model(step, past_key_values=single.past_key_values).logits
    assert max_err(a, b) < 1e-12


def test_bfloat16_memory_is_rounded_inside_a_group(group_sizes):
    """Windows of a group see the earlier windows' keys as memory would give them back: rounded to bf16."""
    model = group_sizes.watch(tiny_model(mem_dtype="bfloat16", mem_layers=[1]), batch=1)
    ids = tokens(1, L + 5 * W, seed=7)
    grouped = run(model, ids).logits
    assert group_sizes == [5]
    one_window_at_a_time(model)
    assert max_err(grouped, run(model, ids).logits) < 1e-12


@pytest.mark.parametrize(
    "overrides, call",
    [
        (dict(mem_top_k=4), {}),
        (dict(mem_max_tokens=200), {}),
        (dict(mem_attention_grouping=(2, 16)), {}),
        (dict(attn_impl="reference"), {}),
        ({}, dict(attention_mask=left_pad_mask([L + 5 * W - 3], L + 5 * W))),
    ],
)
def test_no_groups_where_they_do_not_apply(group_sizes, overrides, call):
    """Top-k retrieval, bounded memory, the reference's grouping, the reference implementation and padding
    run one window at a time (and stay equal to the spec, which the other test modules check)."""
    model = group_sizes.watch(tiny_model(**overrides), batch=1)
    ids = tokens(1, L + 5 * W, seed=8)
    run(model, ids, **call)
    assert group_sizes == []


def test_no_groups_with_gradients(group_sizes):
    model = group_sizes.watch(tiny_model(), batch=1)
    model(tokens(1, L + 5 * W, seed=9)).logits.sum().backward()
    assert group_sizes == []
    with torch.no_grad():
        model(tokens(1, L + 5 * W, seed=9))
    assert group_sizes == [5]


def test_window_groups_are_planned_up_front():
    from fot.model import WindowGroup, plan_window_groups

    groups = plan_window_groups(N_TWO_GROUPS, W, L, fresh=True, group_size=8)
    starts = [0, 8 * W, 11 * W, 11 * W + 17]
    assert groups == [
        WindowGroup(0, 8 * W, 8, True), WindowGroup(8 * W, 11 * W, 3, True),
        WindowGroup(11 * W, 11 * W + 17, 1, True), WindowGroup(11 * W + 17, N_TWO_GROUPS, 1, False),
    ]  # fmt: skip
    assert [g.start for g in groups] == starts
    single = plan_window_groups(N_TWO_GROUPS, W, L, fresh=True, group_size=1)
    assert [g.windows for g in single] == [1] * 13 and sum(g.to_memory for g in single) == 12
    # a continued cache: no group, nothing goes straight to memory
    cont = plan_window_groups(3 * W + 5, W, L, fresh=False, group_size=8)
    sizes = [(g.end - g.start, g.windows, g.to_memory) for g in cont]
    assert sizes == [(W, 1, False), (W, 1, False), (W + 5 - L, 1, False), (L, 1, False)]
