"""eval/common.py's output checks, trials log and --resume, through each CLI (passkey, lookup, perplexity) on a
tiny random model: an unwritable --out fails before any model or tokenizer is loaded; a run interrupted after some
trials and resumed writes the results.json of an uninterrupted run, scoring only the missing trials; a resume with
other arguments, an --out with finished trials and no --resume, and a damaged log are refused; a truncated last
line is skipped with a warning."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval import common, lookup, passkey, perplexity
from plumbing import files
from tests.test_eval_passkey import model_dir, tokenizer_dir  # noqa: F401  module fixtures: window 64

ROOT = Path(__file__).resolve().parents[1]
# tool: (module, the function that scores one trial, arguments, trials per setting, plots)
TOOLS = {
    "passkey": (passkey, "greedy_answer", ["--lengths", "128", "160", "--trials", "2"], 4, ["passkey.png"]),
    "lookup": (lookup, "answer_from_cache", ["--sizes", "300", "--trials", "2", "--queries", "2"], 4, ["lookup.png"]),
    "perplexity": (perplexity, "score_tokens", ["--length", "100", "--docs", "3", "--chunk", "40"], 3,
                   ["perplexity.png"]),
}
SETTINGS = ["memory", "no-memory"]


def argv(tool: str, model, out, *extra) -> list[str]:
    return ["--model", str(model), *TOOLS[tool][2], "--settings", *SETTINGS, "--threads", "1", "--device", "cpu",
            "--out", str(out), *extra]


class Counting:
    """Wraps a function: counts its calls, and raises KeyboardInterrupt (a kill) instead of call ``stop + 1``."""

    def __init__(self, fn, stop: int | None = None):
        self.fn, self.stop, self.calls, self.args = fn, stop, 0, []

    def __call__(self, *args, **kwargs):
        if self.calls == self.stop:
            raise KeyboardInterrupt
        self.calls += 1
        self.args.append(args)
        return self.fn(*args, **kwargs)


def patch(monkeypatch, tool: str, stop: int | None = None) -> tuple[Counting, Counting]:
    """Count (and maybe interrupt) the tool's trial scoring, and count its model loads."""
    module, scorer = TOOLS[tool][:2]
    score, load = Counting(getattr(module, scorer), stop), Counting(module.load_model)
    monkeypatch.setattr(module, scorer, score)
    monkeypatch.setattr(module, "load_model", load)
    return score, load


def forbid_loading(monkeypatch, module) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    for name in ("load_model", "load_tokenizer"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, refuse)


def without_timings(obj):
    """``obj`` without its wall-clock fields (``seconds``), the thread count and the peak RSS (the process's
    high-water mark, which depends on what ran in it before): what may differ between runs."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in ("seconds", "threads", "peak_rss_bytes")}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    """Each tool's results.json from one uninterrupted run."""
    results = {}
    for tool, (module, *_) in TOOLS.items():
        out = tmp_path_factory.mktemp(f"whole-{tool}")
        module.main(argv(tool, model_dir, out))
        results[tool] = json.loads((out / "results.json").read_text())
    return results


def interrupted(monkeypatch, tool: str, model, out: Path, after: int) -> None:
    """A run of ``tool`` killed while scoring trial ``after + 1``."""
    with monkeypatch.context() as m:
        patch(m, tool, stop=after)
        with pytest.raises(KeyboardInterrupt):
            TOOLS[tool][0].main(argv(tool, model, out))


# ----------------------------------------------------------------------------- the output folder
@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("where, reason", [
    ("{file}/sub", "Not a directory"),
    ("{file}", "exists and is not a directory"),
    ("/proc/fot-eval-out", "cannot be created and written"),
])
def test_an_unwritable_out_fails_before_any_model_is_loaded(tool, where, reason, model_dir, tmp_path, capsys,
                                                           monkeypatch):
    module = TOOLS[tool][0]
    forbid_loading(monkeypatch, module)
    (tmp_path / "file").write_text("a regular file\n")
    out = where.format(file=tmp_path / "file")
    with pytest.raises(SystemExit) as exc:
        module.main(argv(tool, model_dir, out))
    assert exc.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # argparse prints the usage, then one error line
    assert f"--out {out!r}" in error and reason in error and "choose another --out" in error


def test_the_probe_leaves_a_new_directory_empty(tmp_path):
    out = files.check_out_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("truncated", [False, True], ids=["killed-between-trials", "killed-mid-line"])
@pytest.mark.parametrize("tool", TOOLS)
def test_an_interrupted_run_resumes_to_the_uninterrupted_results(tool, truncated, uninterrupted, model_dir,
                                                                 tmp_path, monkeypatch, caplog):
    module, _, _, per_setting, plots = TOOLS[tool]
    total, done = 2 * per_setting, per_setting + 1  # the first setting and one trial of the second
    out = tmp_path / "out"
    interrupted(monkeypatch, tool, model_dir, out, after=done)
    lines = log_lines(out)
    assert lines[0]["run"]["settings"] == SETTINGS and lines[0]["run"]["task"] == tool
    trials = [line for line in lines[1:] if line["key"][0] != "setting"]
    assert len(trials) == len({tuple(t["key"]) for t in trials}) == done  # one line per trial, unique keys
    assert not (out / "results.json").exists()
    if truncated:  # killed while writing the last trial's line: half of it is on disk
        data = (out / "trials.jsonl").read_bytes()
        cut = data.rstrip(b"\n").rfind(b"\n") + 1
        (out / "trials.jsonl").write_bytes(data[: cut + (len(data) - cut) // 2])
        done -= 1

    score, load = patch(monkeypatch, tool)
    report = module.main(argv(tool, model_dir, out, "--resume"))
    assert score.calls == total - done  # only the missing trials ran
    assert [args[1].name for args in load.args] == ["no-memory"]  # the finished setting was not even loaded
    assert ("cut short" in caplog.text) == truncated
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert without_timings(saved) == without_timings(uninterrupted[tool])  # every prediction and accuracy
    assert sorted(os.listdir(out)) == sorted(["results.json", "trials.jsonl", *plots])  # no temporary files left
    assert len([line for line in log_lines(out)[1:] if line["key"][0] != "setting"]) == total

    score, load = patch(monkeypatch, tool)  # resuming a finished run rebuilds it without any model
    again = module.main(argv(tool, model_dir, out, "--resume"))
    assert without_timings(json.loads(json.dumps(again))) == without_timings(saved)
    assert (score.calls, load.calls) == (0, 0)


@pytest.mark.parametrize("tool", TOOLS)
def test_finished_trials_are_never_overwritten_without_resume(tool, model_dir, tmp_path, monkeypatch, capsys):
    module = TOOLS[tool][0]
    out = tmp_path / "out"
    interrupted(monkeypatch, tool, model_dir, out, after=1)
    before = (out / "trials.jsonl").read_bytes()
    forbid_loading(monkeypatch, module)
    with pytest.raises(SystemExit) as exc:
        module.main(argv(tool, model_dir, out))
    assert exc.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "pass --resume" in error and "choose another --out" in error and str(out / "trials.jsonl") in error
    assert (out / "trials.jsonl").read_bytes() == before

    with pytest.raises(SystemExit) as exc:  # a resume with other arguments names each differing field
        module.main(argv(tool, model_dir, out, "--resume", "--seed", "7", "--dtype", "float32"))
    assert exc.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--resume:" in error and "seed 0 (now 7)" in error and 'dtype "auto" (now "float32")' in error
    assert "settings" not in error and (out / "trials.jsonl").read_bytes() == before


def test_a_resume_with_other_settings_or_lengths_is_refused(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupted(monkeypatch, "passkey", model_dir, out, after=1)
    forbid_loading(monkeypatch, passkey)
    args = argv("passkey", model_dir, out, "--resume")
    args[args.index("160")] = "192"
    args[args.index("no-memory")] = "topk:4"
    with pytest.raises(SystemExit):
        passkey.main(args)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "lengths [128, 160] (now [128, 192])" in error
    assert 'settings ["memory", "no-memory"] (now ["memory", "topk:4"])' in error


def test_a_resume_after_the_checkpoint_changed_in_place_is_refused(model_dir, tmp_path, monkeypatch, capsys):
    import shutil

    import torch

    import fot

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out = tmp_path / "out"
    interrupted(monkeypatch, "passkey", model, out, after=1)
    retrained = fot.LongLlamaForCausalLM.from_pretrained(model)
    with torch.no_grad():
        retrained.lm_head.weight.mul_(1.5)
    retrained.save_pretrained(model)  # the same path, other weights
    forbid_loading(monkeypatch, passkey)
    with pytest.raises(SystemExit):
        passkey.main(argv("passkey", model, out, "--resume"))
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model_fingerprint" in error and "tokenizer_fingerprint" not in error and "seed" not in error


def test_resume_needs_out_and_starts_afresh_without_a_log(model_dir, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        forbid_loading(m, passkey)
        with pytest.raises(SystemExit):
            passkey.main(argv("passkey", model_dir, tmp_path)[:-2] + ["--resume"])
        assert "--resume needs --out" in capsys.readouterr().err
    score, _ = patch(monkeypatch, "passkey")
    passkey.main(argv("passkey", model_dir, tmp_path / "new", "--resume"))
    assert score.calls == 8 and (tmp_path / "new" / "results.json").exists()


def test_a_damaged_line_before_the_last_is_refused(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupted(monkeypatch, "passkey", model_dir, out, after=2)
    lines = (out / "trials.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:10] + "\n"
    (out / "trials.jsonl").write_text("".join(lines))
    forbid_loading(monkeypatch, passkey)
    with pytest.raises(SystemExit):
        passkey.main(argv("passkey", model_dir, out, "--resume"))
    assert "line 3, is not a trials log line; the file is damaged" in capsys.readouterr().err


def test_a_logged_trial_whose_inputs_changed_is_refused(tmp_path):
    log = common.TrialLog.open(tmp_path, {"task": "t"}, resume=False)
    log.put(("memory", 0), {"key": 5, "tokens": 100, "correct": True})
    log = common.TrialLog.open(tmp_path, {"task": "t"}, resume=True)
    assert log.get(("memory", 0), key=5, tokens=100)["correct"] is True and log.get(("memory", 1)) is None
    with pytest.raises(ValueError, match=r"the finished trial \['memory', 0\] has \{'key': \(5, 6\)\}"):
        log.get(("memory", 0), key=6, tokens=100)


def test_a_log_holding_only_its_configuration_is_started_afresh(tmp_path):
    common.TrialLog.open(tmp_path, {"task": "t", "seed": 0}, resume=False)  # killed before its first trial
    log = common.TrialLog.open(tmp_path, {"task": "t", "seed": 1}, resume=False)
    assert log.done == {} and log_lines(tmp_path) == [{"run": {"task": "t", "seed": 1}}]


# ----------------------------------------------------------------------------- atomic outputs
def test_atomic_writes_keep_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.json"
    common.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with files.atomic_path(path) as tmp:
            tmp.write_text('{"a": ')  # half written, then killed
            raise RuntimeError
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]


# Run in a fresh interpreter: inside the suite, what earlier tests left in the heap decides whether glibc's own
# trim on free already returned the pages (held ~0 MiB, seen once in CI), so the check could not tell anything.
_RELEASE_SCRIPT = """
import gc, json, torch
from eval.common import release_memory

def rss_mib():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024

gc.collect()
before = rss_mib()
# 200 MiB in 64 KiB tensors: below glibc's mmap threshold, so they come from the heap
chunks = [torch.ones(16384) for _ in range(3200)]
pin = torch.ones(16384)  # a live block above them, so free() alone cannot shrink the heap from its top
for i in range(0, len(chunks), 2):  # free every other chunk first: holes that a plain free cannot give back
    chunks[i] = None
chunks = None
held = rss_mib() - before
release_memory()
print(json.dumps({"held": held, "after": rss_mib() - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_release_memory_returns_freed_heap_pages_to_the_os():
    from eval.common import _libc

    if getattr(_libc(), "malloc_trim", None) is None:
        pytest.skip("this C library has no malloc_trim")
    proc = subprocess.run([sys.executable, "-c", _RELEASE_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rss["held"] > 150, rss  # the freed chunks are still resident: the case release_memory is for
    assert rss["after"] < rss["held"] - 100, rss


def test_a_prompt_killed_mid_prefill_resumes_from_its_memory_on_disk(uninterrupted, model_dir, tmp_path,
                                                                      monkeypatch):
    """--offload-dir: prompts are prefilled in segments into memory files; a run killed inside a prompt's prefill,
    after its first segment, resumes that prompt from the files (its first segment is not run again) and writes
    the uninterrupted run's results; every prompt's files are deleted once it is scored."""
    import fot.prefill

    out, offload = tmp_path / "out", tmp_path / "offload"
    extra = ["--offload-dir", str(offload), "--prefill-segment", "64"]
    real = fot.prefill.prefill
    segments = []

    def killed_in_third_prompt(model, ids, cache=None, **kwargs):
        def on_segment(c):
            segments.append(c.seen_tokens)
            kwargs["on_segment"](c)  # the job's checkpoint
            if len(segments) == 5:  # prompts of 128 and 160 tokens: 1 and 2 segments (W 64, L 32); third prompt
                raise KeyboardInterrupt
        return real(model, ids, cache, **{**kwargs, "on_segment": on_segment})

    with monkeypatch.context() as m:
        m.setattr(fot.prefill, "prefill", killed_in_third_prompt)
        with pytest.raises(KeyboardInterrupt):
            passkey.main(argv("passkey", model_dir, out, *extra))
    jobs = json.loads((offload / "jobs.json").read_text())
    assert [job["tokens"] for job in jobs.values()] == [64]  # the killed prompt: one segment done, on disk
    segments.clear()
    with monkeypatch.context() as m:
        m.setattr(fot.prefill, "prefill", lambda *a, **k: segments.append(a[2].seen_tokens) or real(*a, **k))
        passkey.main(argv("passkey", model_dir, out, *extra, "--resume"))
    assert segments[0] == 64  # the killed prompt continued from its files
    saved = json.loads((out / "results.json").read_text())
    assert without_timings(saved) == without_timings(uninterrupted["passkey"])
    assert json.loads((offload / "jobs.json").read_text()) == {} and os.listdir(offload / "memory") == []
