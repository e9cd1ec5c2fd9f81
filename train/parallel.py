"""Processes, devices and model parallelism: torchrun environment, DDP, FSDP2.

Order of model transforms (as torchtitan): activation checkpointing, then ``torch.compile`` of each decoder
layer, then FSDP2 ``fully_shard`` of every decoder layer and finally of the root (or DDP around the whole model).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world: int
    device: torch.device
    initialized: bool
    heartbeat: Heartbeat | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within ``parallel.timeout_s``; the message names the rank(s) that stopped."""


class Heartbeat:
    """Every rank's sign of life and current step in the job's TCP store (the one torchrun's rendezvous serves at
    MASTER_ADDR:MASTER_PORT), written at every step (``at_step``) and by a daemon thread every ``period`` seconds.

    A stopped or dead process stops beating, while a rank blocked in a collective keeps beating, so when a
    collective times out the ranks whose count no longer advances are the ones that stalled."""

    PREFIX = "fot/heartbeat/"

    def __init__(self, rank: int, world: int, period: float):
        self.rank, self.world, self.period = rank, world, period
        self.step = 0
        self.beats = 0
        self._lock = threading.Lock()  # the thread and the training loop share one store client
        self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=datetime.timedelta(seconds=max(10.0, 4 * period)))
        self._beat()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fot-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        with self._lock:
            self.beats += 1
            self.store.set(f"{self.PREFIX}{self.rank}", f"{self.beats} {self.step}")

    def at_step(self, step: int) -> None:
        """Record that this rank starts ``step`` (0-based), so a report names the step a stalled rank was on."""
        self.step = step
        self._beat()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - a store hiccup; stopping would make this healthy rank look stalled
                continue

    def snapshot(self) -> dict[int, tuple[int, int]]:
        """``{rank: (beats, step)}`` of every rank that has beaten at least once."""
        out = {}
        for r in range(self.world):
            key = f"{self.PREFIX}{r}"
            with self._lock:
                value = self.store.get(key).decode() if self.store.check([key]) else None
            if value is not None:
                beats, step = value.split()
                out[r] = (int(beats), int(step))
        return out

    def stalled(self) -> tuple[list[int], dict[int, tuple[int, int]]]:
        """Ranks that do not beat over three periods (a stopped or dead process), and the last snapshot."""
        first = self.snapshot()
        time.sleep(3 * self.period)
        last = self.snapshot()
        silent = [r for r in range(self.world) if r != self.rank and (r not in last or last[r] == first.get(r))]
        return silent, last

    def stop(self) -> None:
        """End the thread and wait for it: a daemon thread still inside the store client when the interpreter exits
        can abort the process ("terminate called without an active exception") after a successful run."""
        self._stop.set()
        self._thread.join(timeout=max(10.0, 4 * self.period))  # at most one store call's timeout
        if not self._thread.is_alive():
            self.store = None  # close the client now, not during interpreter shutdown


def describe_stall(info: DistInfo, timeout_s: float, err: Exception) -> str:
    """One line for a collective that failed on this rank: which ranks stopped responding, at which step."""
    head = (f"rank {info.rank}: a collective at step {info.heartbeat.step + 1} did not complete within "
            f"parallel.timeout_s={timeout_s:g} s")
    try:
        silent, last = info.heartbeat.stalled()
    except Exception as probe:  # noqa: BLE001 - the store is gone too: say what is known
        return f"{head}; the heartbeat store is unreachable ({probe}); first error: {err}"
    if silent:
        where = ", ".join(f"rank {r}" + (f" (last seen at step {last[r][1] + 1})" if r in last else " (never seen)")
                          for r in silent)
        return f"{head}: {where} stopped responding (stopped, hung in the kernel, or dead)"
    steps = ", ".join(f"rank {r} at step {s + 1}" for r, (_, s) in sorted(last.items()))
    return f"{head}: every rank is alive ({steps}); the slowest is stuck outside collectives"


def init_distributed(train_cfg, parallel_cfg) -> DistInfo:
    """Read RANK / LOCAL_RANK / WORLD_SIZE (torchrun), pick the device and start the process group."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    want = train_cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda, but no CUDA device is available; use train.device=cpu or auto.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and parallel_cfg.strategy == "none":
        raise ValueError(f"parallel.strategy=none runs one process, but WORLD_SIZE={world}; use ddp or fsdp2.")
    initialized = False
    if world > 1 or (parallel_cfg.strategy != "none" and "RANK" in os.environ):
        backend = parallel_cfg.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise ValueError("parallel.backend=nccl needs CUDA devices; use gloo (or auto) on CPU.")
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        timeout = datetime.timedelta(seconds=parallel_cfg.timeout_s)
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
        initialized = True
    heartbeat = None
    if initialized and world > 1:
        heartbeat = Heartbeat(rank, world, period=min(2.0, parallel_cfg.timeout_s / 10))
    return DistInfo(rank, local_rank, world, device, initialized, heartbeat)


def barrier(info: DistInfo) -> None:
    if info.initialized:
        dist.barrier()


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum over ranks of a (host or device) tensor, returned where ``value`` is. The reduction runs on the
    process's device: NCCL reduces only CUDA tensors, and the trainer's step statistics live on the host."""
    if not info.initialized:
        return value
    out = value.to(info.device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(value.device)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return all_reduce_sum(value, info) / info.world if info.initialized else value


def parallelize(model: torch.nn.Module, spec, info: DistInfo) -> torch.nn.Module:
    """Apply activation checkpointing, compile, then FSDP2 or DDP. Returns the module to train."""
    if spec.train.activation_checkpointing:
        # transformers renamed the switch and its argument after 5.20; the old names still work there, with a warning.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.train.compile:
        for layer in model.model.layers:
            layer.compile()
    strategy = spec.parallel.strategy if info.initialized else "none"
    if strategy == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = None
        if spec.train.dtype == "bfloat16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs = {"mp_policy": mp} if mp is not None else {}
        # A decoder layer also returns its keys/values (views) for the inference cache; a crossbatch step never
        # touches them, let alone in place, so FSDP2's warning about in-place ops on returned views does not apply.
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        for layer in model.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
    elif strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ``LongLlamaForCausalLM`` inside a DDP wrapper (FSDP2 modifies the module in place)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "config") else model


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Context for one micro-batch of gradient accumulation: skip the gradient reduction unless ``sync``."""
    if hasattr(model, "no_sync") and not sync:  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def autocast(spec, info: DistInfo):
    """bf16 autocast unless FSDP2's mixed-precision policy already computes in bf16."""
    fsdp_mp = spec.parallel.strategy == "fsdp2" and info.initialized
    enabled = spec.train.dtype == "bfloat16" and not fsdp_mp
    return torch.autocast(device_type=info.device.type, dtype=torch.bfloat16, enabled=enabled)
