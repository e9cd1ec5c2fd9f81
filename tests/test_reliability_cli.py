"""User errors of the tokenizer trainer, the evaluations and the benchmarks: one line on stderr, exit status 2,
no traceback, before any work starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "fot-tiny"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT)}

CASES = {
    "tokenizer-unwritable-out": (["train.tokenizer", "--out", "/proc/x", "--synthetic", "passkey"],
                                 "--out '/proc/x' cannot be created and written"),
    "tokenizer-no-file-matches": (["train.tokenizer", "--out", "{tmp}/tok", "--paths", "{tmp}/none/*.txt"],
                                  "matches no file"),
    "tokenizer-vocab-too-small": (["train.tokenizer", "--out", "{tmp}/tok", "--synthetic", "passkey", "--documents",
                                   "20", "--vocab_size", "10"], "--vocab_size 10 is too small for this corpus"),
    "tokenizer-bad-int": (["train.tokenizer", "--out", "{tmp}/tok", "--synthetic", "passkey", "--vocab_size", "x"],
                          "argument --vocab_size: invalid int value: 'x'"),
    "passkey-missing-model": (["eval.passkey", "--model", "{tmp}/none", "--out", "{tmp}/out"],
                              "model directory '{tmp}/none' does not exist"),
    "passkey-bad-setting": (["eval.passkey", "--model", str(MODEL), "--settings", "bogus", "--out", "{tmp}/out"],
                            "unknown setting 'bogus'"),
    "lookup-bad-trials": (["eval.lookup", "--model", str(MODEL), "--trials", "0", "--out", "{tmp}/out"],
                          "--trials must be >= 1"),
    "distraction-missing-file": (["eval.distraction", "--model", str(MODEL), "--files", "{tmp}/none.txt", "--out",
                                  "{tmp}/out"], "'{tmp}/none.txt' does not exist"),
    "bench-missing-model": (["benchmarks.train_throughput", "--model", "{tmp}/none"],
                            "model directory '{tmp}/none' does not exist"),
    "bench-bad-tokens": (["benchmarks.prefill", "--tokens", "0"], "--tokens must be positive, got [0]"),
    "bench-bad-backend": (["benchmarks.memory_scaling", "--backends", "bogus"], "invalid choice: 'bogus'"),
    "bench-bad-template": (["benchmarks.memory_scaling", "--template", "bogus"], "invalid choice: 'bogus'"),
    "bench-unwritable-json": (["benchmarks.memory_scaling", "--json", "/proc/x/rows.json"],
                              "'/proc/x' cannot be created and written"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line_with_status_2(case, tmp_path):
    args, needle = CASES[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-m", *args], env=ENV, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    prog = args[0].rsplit(".", 1)[-1] + ".py"
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
    assert needle.replace("{tmp}", str(tmp_path)) in errors[0], errors[0]
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr, proc.stderr[-3000:]
