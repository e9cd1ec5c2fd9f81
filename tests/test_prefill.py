"""fot.prefill: a prefill split into calls of whole windows computes what one forward over the input computes
(window_overlap's context included), and a disk-offloaded prefill killed mid-way resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fot.cache import LongLlamaCache
from fot.prefill import ResumablePrefill, memory_bound, prefill
from tests.tiny import TOL64, max_err, tiny_model, tokens

ROOT = Path(__file__).resolve().parents[1]
N = 700  # W 64, L 32: 10 whole memory-bound windows, a partial one of 28 tokens, then the last 32


def one_call(model, ids):
    cache = LongLlamaCache(model.config)
    with torch.no_grad():
        logits = model(ids, cache=cache, use_cache=True).logits
    return logits, cache


@pytest.mark.parametrize("extra", [
    {"window_overlap": 16},  # dense memory, each memory-bound window re-reading 16 tokens before it
    {"window_overlap": 40, "mem_top_k": 4, "mem_index": "exact"},  # top-k, an overlap longer than the partial window
    {},  # no overlap: windows run in groups
], ids=["overlap-dense", "overlap-topk", "no-overlap"])
def test_a_prefill_in_segments_then_the_rest_equals_one_call(extra):
    model = tiny_model(**extra)
    W, L = model.config.max_position_embeddings, model.config.last_context_length
    ids = tokens(1, N, seed=41)
    full, whole = one_call(model, ids)
    seen = []
    cache = prefill(model, ids, segment=3 * W, on_segment=lambda c: seen.append(c.seen_tokens))
    assert seen == [192, 384, 576, 640] and cache.seen_tokens == memory_bound(N, W, L) == 640
    assert cache.local_length == 0
    with torch.no_grad():
        rest = model(ids[:, 640:], cache=cache, use_cache=True).logits
    assert max_err(rest, full[:, 640:]) < TOL64
    for i in model.config.mem_layers:  # the same memory, slot for slot
        a, b = cache.memories[i].view(), whole.memories[i].view()
        assert max_err(a.k_BGMH, b.k_BGMH) < TOL64 and max_err(a.v_BGMH, b.v_BGMH) < TOL64
    if extra.get("window_overlap"):  # without the carried context the rest differs, so the check can fail
        cache = prefill(model, ids, segment=3 * W)
        cache.overlap_context = None
        with torch.no_grad():
            lost = model(ids[:, 640:], cache=cache).logits
        assert max_err(lost, full[:, 640:]) > 1e-3


def test_generate_after_a_prefill_equals_generate_over_the_whole_prompt():
    model = tiny_model(window_overlap=16, mem_top_k=4, mem_index="exact")
    ids = tokens(1, 400, seed=42)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
        cache = prefill(model, ids, segment=128)
        got = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_prefill_refuses_what_it_cannot_continue_in_one_line():
    model = tiny_model(window_overlap=16)
    ids = tokens(1, 300, seed=43)
    with pytest.raises(ValueError, match="segment=100 must be a positive multiple of the window"):
        prefill(model, ids, segment=100)
    _, used = one_call(model, ids[:, :100])  # 32 tokens local
    with pytest.raises(ValueError, match="holds 100 tokens \\(32 local\\).*pass a new cache"):
        prefill(model, ids, used, segment=64)
    with pytest.raises(ValueError, match="last_context_length=0 moves a whole call to memory"):
        with torch.no_grad():
            model(ids[:, 100:164], cache=used, last_context_length=0)


KILLED_PREFILL = """
import os, signal, torch
import fot
from fot.memory import MemoryStore
from fot.prefill import ResumablePrefill
from tests.tiny import tiny_model, tokens
model = tiny_model(window_overlap=16, mem_top_k=4, mem_index="exact", mem_layers=[0, 2], mem_offload="disk",
                   mem_offload_dir={dir!r})
appends = []
original = MemoryStore.append
def append(self, *args, **kwargs):
    appends.append(1)
    if len(appends) == {kill_at}:  # in the second segment, between two layers' appends of one window
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
MemoryStore.append = append
ResumablePrefill({folder!r}, segment=192, progress=False).cache("prompt-0", model, tokens(1, {n}, seed=44))
"""


def test_a_killed_resumable_prefill_continues_to_one_calls_result(tmp_path):
    folder = tmp_path / "prefill"
    offload = folder / "memory"
    script = KILLED_PREFILL.format(dir=str(offload), folder=str(folder), kill_at=2 * 4 + 2, n=N)  # windows 0-3, 1 layer
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    jobs = json.loads((folder / "jobs.json").read_text())
    assert jobs["prompt-0"]["tokens"] == 192  # the first segment's checkpoint
    model = tiny_model(window_overlap=16, mem_top_k=4, mem_index="exact", mem_layers=[0, 2], mem_offload="disk",
                       mem_offload_dir=str(offload))  # fmt: skip
    ids = tokens(1, N, seed=44)
    resumable = ResumablePrefill(str(folder), segment=192, progress=False)
    reopened = LongLlamaCache.open_offloaded(jobs["prompt-0"]["path"], model.config)
    assert reopened.seen_tokens == 4 * 64  # layer 0 had a fifth window; layer 2 had not
    cache = resumable.cache("prompt-0", model, ids)
    assert cache.seen_tokens == 640 and cache.offload_path == jobs["prompt-0"]["path"]
    with torch.no_grad():
        rest = model(ids[:, 640:], cache=cache).logits
    ram_model = tiny_model(window_overlap=16, mem_top_k=4, mem_index="exact", mem_layers=[0, 2])
    full, _ = one_call(ram_model, ids)
    assert max_err(rest, full[:, 640:]) < TOL64
    assert resumable.seconds("prompt-0") > 0
    resumable.finish("prompt-0")
    assert not os.path.exists(jobs["prompt-0"]["path"]) and "prompt-0" not in json.loads(
        (folder / "jobs.json").read_text())


def test_a_job_resumed_under_another_prompt_or_setting_starts_again(tmp_path, caplog):
    folder = tmp_path / "prefill"
    disk = dict(mem_offload="disk", mem_offload_dir=str(folder / "memory"))
    topk = dict(mem_top_k=4, mem_index="exact")
    ids = tokens(1, N, seed=45)
    resumable = ResumablePrefill(str(folder), segment=192, progress=False)
    first = resumable.cache("prompt-0", tiny_model(**topk, **disk), ids)
    path = first.offload_path
    again = resumable.cache("prompt-0", tiny_model(**topk, **disk), ids)  # the same job: reopened, nothing to do
    assert again.offload_path == path and again.seen_tokens == first.seen_tokens
    for seed, extra, prompt in ((0, {"mem_score_bias": 1.0}, ids),  # another setting
                                (0, {}, tokens(1, N, seed=46)),  # another prompt
                                (1, {}, ids)):  # other weights
        model = tiny_model(seed=seed, **topk, **extra, **disk)
        with caplog.at_level("WARNING", logger="fot.prefill"):
            cache = resumable.cache("prompt-0", model, prompt)
        assert "made by another prompt, model or setting" in caplog.text and not os.path.exists(path)
        caplog.clear()
        path, done = cache.offload_path, cache.seen_tokens
        with torch.no_grad():
            rest = model(prompt[:, done:], cache=cache).logits
        full, _ = one_call(tiny_model(seed=seed, **topk, **extra), prompt)  # the same model, memory in RAM
        assert max_err(rest, full[:, done:]) < TOL64


def test_a_saved_prefilled_cache_keeps_the_overlap_context(tmp_path):
    model = tiny_model(window_overlap=16)
    ids = tokens(1, 400, seed=45)
    full, _ = one_call(model, ids)
    cache = prefill(model, ids, segment=128)
    cache.save(tmp_path / "c.safetensors")
    loaded = LongLlamaCache.load(tmp_path / "c.safetensors", model.config)
    assert loaded.seen_tokens == 320
    with torch.no_grad():
        rest = model(ids[:, 320:], cache=loaded).logits
    assert max_err(rest, full[:, 320:]) < TOL64
