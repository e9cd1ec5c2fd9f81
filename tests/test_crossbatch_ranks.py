"""Crossbatch negatives gathered across ranks: two gloo processes, each holding half of a global batch, give the
same loss and the same (summed) gradients as one process holding the whole batch with the same plan."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fot.crossbatch import paper_layout, reference_layout
from tests.tiny import tiny_model, tokens

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss_and_grads(model, ids, plan):
    model.zero_grad()
    logits = model(ids, crossbatch=plan).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, port, ids, plan_kind, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = tiny_model(dtype=torch.float64, mem_layers=[1, 2], mem_dtype="float32", num_key_value_heads=2).train()
        plan = _plan(plan_kind, ids.shape[0]).local_rows(WORLD, rank)
        b = ids.shape[0] // WORLD
        loss, grads = _loss_and_grads(model, ids[rank * b : (rank + 1) * b], plan)
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, out_path)
    finally:
        dist.destroy_process_group()


def _plan(kind, batch):
    if kind == "paper":
        return paper_layout(batch, 2, 4)  # 4 documents of 2 windows: negatives from the other rank too
    return reference_layout(batch, 2, 3, stepping=False)  # row 2 (rank 1's first) looks back into rank 0


@pytest.mark.parametrize("plan_kind", ["paper", "reference"])
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path, plan_kind):
    ids = tokens(8, 24, seed=5)
    out_path = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(_free_port(), ids, plan_kind, str(out_path)), nprocs=WORLD, join=True)
    got = torch.load(out_path)

    model = tiny_model(dtype=torch.float64, mem_layers=[1, 2], mem_dtype="float32", num_key_value_heads=2).train()
    plan = _plan(plan_kind, ids.shape[0])
    assert bool((plan.sources_BC[:4] >= 4).any() | (plan.sources_BC[4:] < 4).any())  # contexts cross ranks
    loss, grads = _loss_and_grads(model, ids, plan)
    assert torch.allclose(got["loss"], loss, rtol=1e-10)
    for name, g in grads.items():
        assert torch.allclose(got["grads"][name], g, rtol=1e-7, atol=1e-10), name
    # the contexts matter: without them the loss differs
    loss_plain, _ = _loss_and_grads(model, ids, None)
    assert abs(loss_plain - loss) > 1e-3


def test_a_multi_rank_plan_outside_a_process_group_is_an_error():
    plan = paper_layout(8, 2, 4).local_rows(2, 0)
    model = tiny_model(dtype=torch.float64, mem_layers=[1], mem_dtype="float32")
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        model(tokens(4, 16, seed=1), crossbatch=plan)
