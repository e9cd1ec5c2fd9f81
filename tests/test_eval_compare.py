"""eval/compare.py: tables and plots across runs of one eval, from hand-written results.json files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval import compare

ROOT = Path(__file__).resolve().parents[1]


def write(folder: Path, report: dict) -> str:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(report))
    return str(folder)


def passkey(acc: dict[str, dict[int, float]]) -> dict:
    return {"task": "passkey", "window": 512,
            "results": {s: [{"length": n, "accuracy": a} for n, a in rows.items()] for s, rows in acc.items()}}


def test_passkey_table_has_every_curve_and_gaps(tmp_path):
    a = write(tmp_path / "a", passkey({"memory": {1024: 25.0, 4096: 5.0}, "no-memory": {1024: 20.0, 4096: 0.0}}))
    b = write(tmp_path / "b", passkey({"memory": {1024: 90.0, 16384: 70.0}}))
    task, runs = compare.load_runs([f"base={a}", f"fot={b}"])
    lines = compare.curves(task, runs, ["memory"])
    assert list(lines) == [("base", "memory"), ("fot", "memory")]
    table = compare.markdown(task, lines).splitlines()
    assert table[0] == "| x | base, memory | fot, memory |"
    assert table[2:] == ["| 1,024 | 25% | 90% |", "| 4,096 | 5% | - |", "| 16,384 | - | 70% |"]


def test_passkey_runs_at_other_lengths_join(tmp_path):
    a = write(tmp_path / "a", passkey({"memory": {1024: 25.0, 4096: 5.0}}))
    b = write(tmp_path / "b", passkey({"memory": {16384: 0.0}}))
    task, runs = compare.load_runs([f"fot={a},{b}"])
    assert compare.curves(task, runs, None) == {("fot", "memory"): {1024: 25.0, 4096: 5.0, 16384: 0.0}}
    with pytest.raises(ValueError, match="same length in two runs"):
        compare.load_runs([f"fot={a},{a}"])
    p = write(tmp_path / "p", {"task": "perplexity", "results": {}})
    with pytest.raises(ValueError, match="only passkey runs"):
        compare.load_runs([f"x={p},{p}"])


def test_perplexity_and_distraction_points():
    ppl = {"buckets": [{"lo": 0, "hi": 512, "ppl": 21.5}, {"lo": 512, "hi": 1024, "ppl": 30.25}]}
    assert compare.points("perplexity", ppl) == {512: 21.5, 1024: 30.25}
    rows = {"rows": [{"distractors": 0, "ppl": 10.0}, {"distractors": 7, "ppl": 12.5}]}
    assert compare.points("distraction", rows) == {0: 10.0, 7: 12.5}


@pytest.mark.parametrize("specs, message", [
    (["nolabel"], "LABEL=DIR"),
    (["x={missing}"], "does not exist"),
    (["x={a}", "x={a}"], "twice"),
    (["x={a}", "y={p}"], "mixes results"),
])
def test_bad_runs_are_named(tmp_path, specs, message):
    a = write(tmp_path / "a", passkey({"memory": {1024: 25.0}}))
    p = write(tmp_path / "p", {"task": "perplexity", "results": {}})
    specs = [s.format(a=a, p=p, missing=tmp_path / "nope") for s in specs]
    with pytest.raises(ValueError, match=message):
        compare.load_runs(specs)


def test_unknown_setting_is_refused(tmp_path):
    a = write(tmp_path / "a", passkey({"memory": {1024: 25.0}}))
    task, runs = compare.load_runs([f"a={a}"])
    with pytest.raises(ValueError, match="topk:32"):
        compare.curves(task, runs, ["topk:32"])


def test_cli_writes_plot_and_errors_in_one_line(tmp_path):
    a = write(tmp_path / "a", passkey({"memory": {1024: 25.0, 4096: 5.0}}))
    out = tmp_path / "img" / "p.png"
    run = subprocess.run([sys.executable, "-m", "eval.compare", "--runs", f"a={a}", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "-m", "eval.compare", "--runs", "a"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "LABEL=DIR" in bad.stderr
