"""Prefill a long input into memory in segments: bounded activations, a progress bar, and, with a disk-offloaded
memory, a prefill that outlives its process.

One forward over N tokens moves the first max(N - L, 0) tokens to memory in windows of W and keeps the last L
local (README, Semantics). ``prefill(model, input_ids, cache)`` runs the whole windows of that first part,
floor((N - L) / W) * W tokens (``memory_bound``), in calls of ``segment`` tokens with ``last_context_length=0``
(each call moves all of its windows to memory). ``model.generate(input_ids, past_key_values=cache)``, or a
forward over ``input_ids[:, cache.seen_tokens:]``, then runs the rest and computes what one call over the whole
input computes: the windows start at the same tokens, and ``window_overlap``'s context crosses the calls
(``LongLlamaCache.keep_overlap_context``). A forward over N tokens holds [N, hidden] activations several times
(7 GB for SmolLM2 at 1M tokens); a segment holds those of ``segment`` tokens.

``ResumablePrefill`` keeps one disk-offloaded cache per job (a prompt) in a folder and records where each job's
cache is: after a kill, the same job reopens its memory files (``LongLlamaCache.open_offloaded``) and continues
from the last window bound that every memory layer holds. ``eval/passkey.py --offload-dir`` runs 1M-token prompts
this way, across sessions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time

import torch

from .cache import LongLlamaCache

logger = logging.getLogger(__name__)

DEFAULT_SEGMENT = 65536  # tokens per prefill call: ~0.5 GB of SmolLM2 activations, minutes of work per call


def memory_bound(n_tokens: int, window: int, last_context_length: int) -> int:
    """Tokens of an N-token input that one forward moves to memory in whole windows: floor((N - L) / W) * W."""
    return max(n_tokens - last_context_length, 0) // window * window


def prefill(model, input_ids: torch.Tensor, cache: LongLlamaCache | None = None, *, segment: int = DEFAULT_SEGMENT,
            last_context_length: int | None = None, progress: bool = False, on_segment=None) -> LongLlamaCache:
    """Move ``input_ids``' whole memory-bound windows (``memory_bound``) to memory, ``segment`` tokens per call,
    continuing from ``cache.seen_tokens``. Returns the cache; generate or a forward over the rest follows.

    Args:
        model: a ``LongLlamaForCausalLM`` (or a model that forwards to one, as a peft wrapper does).
        input_ids: [B, N] without padding, the whole input (the part already in ``cache`` included).
        cache: a cache holding a prefix of this input in memory, with an empty local window; a new one when None.
        segment: tokens per call, a positive multiple of the window.
        last_context_length: the L the call after the prefill will use (default ``config.last_context_length``).
        progress: show a tqdm bar in tokens.
        on_segment: called with the cache after each call (a caller's checkpoint or log).
    """
    config = model.config
    W = config.max_position_embeddings
    L = config.last_context_length if last_context_length is None else last_context_length
    if not isinstance(segment, int) or segment <= 0 or segment % W:
        raise ValueError(f"segment={segment!r} must be a positive multiple of the window ({W} tokens), e.g. {16 * W}.")
    cache = LongLlamaCache(config) if cache is None else cache
    target = memory_bound(input_ids.shape[1], W, L)
    if cache.local_length or cache.seen_tokens % W or cache.seen_tokens > target:
        raise ValueError(f"this cache holds {cache.seen_tokens} tokens ({cache.local_length} local): a prefill "
                         f"continues one that holds whole windows of this input in memory and nothing local; "
                         f"pass a new cache.")
    from tqdm.auto import tqdm

    with torch.no_grad(), tqdm(total=target, initial=cache.seen_tokens, unit="tok", unit_scale=True,
                               desc="prefill", disable=not progress, dynamic_ncols=True) as bar:  # fmt: skip
        while cache.seen_tokens < target:
            start = cache.seen_tokens
            end = min(start + segment, target)
            model(input_ids=input_ids[:, start:end], cache=cache, use_cache=True, last_context_length=0,
                  logits_to_keep=1)  # fmt: skip
            bar.update(end - start)
            if on_segment is not None:
                on_segment(cache)
    return cache


class ResumablePrefill:
    """Prefills whose memory lives on disk and survives the process: one cache folder per job, found again by
    the job's name.

    ``folder`` holds ``jobs.json`` (job name -> its cache folder, the tokens done, the seconds spent and the
    job's ``identity``) and the cache folders (``mem_offload_dir``). ``cache(name, model, input_ids)`` reopens the job's cache when there is
    one and prefills the rest; ``finish(name)`` deletes it (the memory of a 1M-token SmolLM2 prompt is 24 GB).
    The model's config must have ``mem_offload="disk"`` with ``mem_offload_dir`` inside ``folder``.
    """

    def __init__(self, folder: str, segment: int = DEFAULT_SEGMENT, progress: bool = True):
        self.folder = os.fspath(folder)
        self.segment = segment
        self.progress = progress
        os.makedirs(self.folder, exist_ok=True)
        self._jobs_path = os.path.join(self.folder, "jobs.json")

    def _jobs(self) -> dict:
        if not os.path.isfile(self._jobs_path):
            return {}
        with open(self._jobs_path) as f:
            return json.load(f)

    def _write_jobs(self, jobs: dict) -> None:
        tmp = self._jobs_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(jobs, f, indent=1)
        os.replace(tmp, self._jobs_path)

    @staticmethod
    def identity(model, input_ids: torch.Tensor, last_context_length: int | None) -> str:
        """What a job's memory is a function of: the prompt's tokens, the model's config (where its memory is
        kept aside) and a sample of every weight, and ``last_context_length``. A job resumed under another of
        any of them is started again, not continued (its memory would mix two settings)."""
        digest = hashlib.sha256(input_ids.detach().cpu().to(torch.int64).numpy().tobytes())
        config = {k: v for k, v in model.config.to_dict().items()
                  if k not in ("mem_offload", "mem_offload_dir", "_name_or_path", "transformers_version")}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        digest.update(repr(last_context_length).encode())
        for name, p in sorted(model.state_dict().items()):
            head = p.detach().flatten()[:64].cpu().to(torch.float64)
            digest.update(f"{name}{tuple(p.shape)}".encode() + head.numpy().tobytes())
        return digest.hexdigest()[:16]

    def seconds(self, name: str) -> float:
        """Seconds the job's earlier processes spent on its prefill (0 for a new job)."""
        return float(self._jobs().get(name, {}).get("seconds", 0.0))

    def cache(self, name: str, model, input_ids: torch.Tensor, last_context_length: int | None = None):
        """The job's cache with ``input_ids``' memory-bound windows in memory: reopened and continued, or new."""
        config = model.config
        if config.mem_offload != "disk" or not config.mem_offload_dir:
            raise ValueError("a resumable prefill keeps memory on disk: load the model with mem_offload='disk' and "
                             f"mem_offload_dir inside {self.folder}.")
        jobs = self._jobs()
        job = jobs.get(name)
        cache = None
        identity = self.identity(model, input_ids, last_context_length)
        if job is not None and job.get("identity") != identity:
            logger.warning("prefill %s: the memory in %s was made by another prompt, model or setting; starting "
                           "this prompt again", name, job["path"])  # fmt: skip
            shutil.rmtree(job["path"], ignore_errors=True)
            job = None
        if job is not None and os.path.isdir(job["path"]):
            cache = LongLlamaCache.open_offloaded(job["path"], config)
            logger.info("prefill %s: resumed at token %d of %d from %s", name, cache.seen_tokens,
                        input_ids.shape[1], job["path"])  # fmt: skip
        if cache is None:
            cache = LongLlamaCache(config)
            job = {"path": cache.offload_path, "tokens": 0, "seconds": 0.0, "identity": identity}
            jobs[name] = job
            self._write_jobs(jobs)
        clock = [time.perf_counter()]

        def checkpoint(c: LongLlamaCache) -> None:
            now = time.perf_counter()
            state = self._jobs()
            state[name] = {"path": job["path"], "tokens": c.seen_tokens,
                           "seconds": float(state.get(name, job).get("seconds", 0.0)) + now - clock[0],
                           "identity": identity}
            clock[0] = now
            self._write_jobs(state)

        return prefill(model, input_ids, cache, segment=self.segment, last_context_length=last_context_length,
                       progress=self.progress, on_segment=checkpoint)  # fmt: skip

    def finish(self, name: str) -> None:
        """Delete the job's cache folder and forget it."""
        jobs = self._jobs()
        job = jobs.pop(name, None)
        if job is not None:
            shutil.rmtree(job["path"], ignore_errors=True)
            self._write_jobs(jobs)
