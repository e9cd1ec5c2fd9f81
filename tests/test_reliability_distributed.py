"""A stalled rank (SIGSTOP) in a 2-process gloo run: the job ends within parallel.timeout_s plus a few seconds,
with a nonzero exit and one error line naming the rank that stopped, instead of waiting on a collective for
gloo's default 30 minutes."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "configs" / "ci_tiny.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TIMEOUT_S = 10


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in env:
        if entry.startswith(b"RANK="):
            return int(entry[5:])
    return None


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_with_one_line_naming_it(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "train.crossbatch", "--config", str(CI), f"--run.out_dir={out}", "--train.max_steps=100000",
           "--run.save_every=0", "--run.save_final=false", f"--parallel.timeout_s={TIMEOUT_S}"]
    job = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks: dict[int, int] = {}
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # both ranks are training once step 3 is logged
            metrics = out / "metrics.jsonl"
            if metrics.exists() and '"step": 3,' in metrics.read_text():
                break
            assert job.poll() is None, job.communicate()[1][-3000:]
            time.sleep(0.1)
        ranks = {rank_of(pid): pid for pid in children(job.pid)}
        assert {0, 1} <= set(ranks), ranks
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.time()
        while alive(ranks[0]) and time.time() - stopped < TIMEOUT_S + 60:
            time.sleep(0.2)
        waited = time.time() - stopped
        assert not alive(ranks[0]), "rank 0 still waits on the stopped rank"
        assert waited < TIMEOUT_S + 30, waited  # the timeout, then a few heartbeat periods to name the rank
    finally:
        for pid in ranks.values():  # torchrun would wait 30 s before it SIGKILLs a stopped worker
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    errors = [line for line in stderr.splitlines() if "crossbatch.py: error:" in line]
    assert len(errors) == 1, stderr[-4000:]
    assert "rank 0: a collective at step" in errors[0] and f"parallel.timeout_s={TIMEOUT_S} s" in errors[0]
    assert "rank 1 (last seen at step" in errors[0] and "stopped responding" in errors[0], errors[0]
    # torchrun itself ends with its own ChildFailedError traceback; the workers print none
    ours = re.escape(str(ROOT)) + r'/(train|fot)/[^"]*\.py"'  # a frame of our code, not of torchrun in .venv
    assert not re.search(r'File "' + ours, stderr), stderr[-4000:]


def test_heartbeat_stop_ends_its_thread_before_returning(monkeypatch):
    """A heartbeat thread left inside the store client at interpreter exit can abort a finished rank, so stop()
    waits for it."""
    import datetime
    import socket

    import torch.distributed as dist

    from train.parallel import Heartbeat

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    beat = Heartbeat(rank=0, world=1, period=0.01)
    time.sleep(0.05)
    beat.stop()
    assert not beat._thread.is_alive()
    assert beat.beats >= 2  # the first beat, then the thread's
    del server
