"""eval/summary.py: one table across passkey and RULER-style runs, read from their results.json."""

import json

import pytest

from eval import summary


def write(folder, report):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(report))
    return folder


def test_table_joins_passkey_and_ruler_cells_by_task_setting_and_length(tmp_path):
    pk = write(tmp_path / "pk", {"task": "passkey", "peak_rss_bytes": 3 * 2**30, "results": {
        "memory": [{"length": 4096, "accuracy": 100.0, "accuracy_read": 50.0, "n": 4, "seconds": 10.0},
                   {"length": 16384, "accuracy": 80.0, "accuracy_read": 80.0, "n": 5, "seconds": 300.0}],
        "hf:8192": [{"length": 4096, "accuracy": 90.0, "accuracy_read": 70.0}]}})
    ru = write(tmp_path / "ru", {"task": "ruler", "results": {
        "memory": [{"task": "niah_single_1", "length": 4096, "score": 50.0, "read": 25.0}]}})  # eval/ruler.py: in %
    out = tmp_path / "out"
    summary.main(["--runs", str(pk), str(ru), "--out", str(out)])
    lines = (out / "summary.md").read_text().splitlines()
    assert lines[0] == "| task | setting | 4K | 16K |"
    assert "| passkey | memory | 100% / 50% | 80% / 80% |" in lines
    assert "| passkey | hf:8192 | 90% / 70% | – |" in lines
    assert "| niah_single_1 | memory | 50% / 25% | – |" in lines
    assert (out / "summary.png").stat().st_size > 0
    seconds = lines[lines.index("Seconds per prompt:") + 2:]
    assert "| passkey | memory | 2.5 | 60.0 |" in seconds  # a cell's seconds over its prompts
    assert "| passkey | hf:8192 | ? | – |" in seconds  # no seconds recorded
    assert f"- {pk}: 3.00 GiB" in lines and not any(str(ru) in line for line in lines)  # ru recorded no RSS


def test_cells_with_their_own_peak_rss_get_a_table_of_it(tmp_path):
    pk = write(tmp_path / "pk", {"task": "passkey", "results": {
        "memory": [{"length": 4096, "accuracy": 100.0, "n": 2, "seconds": 4.0, "peak_rss_bytes": 3 * 2**29}],
        "hf:8192": [{"length": 4096, "accuracy": 50.0, "n": 2, "seconds": 2.0, "peak_rss_bytes": None}]}})
    summary.main(["--runs", str(pk), "--out", str(tmp_path / "out")])
    lines = (tmp_path / "out" / "summary.md").read_text().splitlines()
    rss = lines[lines.index("Peak RSS, GiB (the largest of a cell's prompts):") + 2:]
    assert rss[1:4] == ["|---|---|---|", "| passkey | memory | 1.50 |", "| passkey | hf:8192 | ? |"]


def test_a_prompts_peak_rss_is_its_own_and_the_runs_peak_keeps_the_largest():
    from eval.common import cell_peak_rss, peak_rss_bytes, reset_peak_rss, with_peak_rss

    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here: prompts record no peak of their own")

    def hold(mib):
        held = bytearray(mib * 2**20)
        held[::4096] = b"x" * len(held[::4096])  # touched, so resident
        return {"n": len(held)}

    base = with_peak_rss(lambda: {})["peak_rss_bytes"]  # what the process holds with no prompt running
    big = with_peak_rss(hold, 600)["peak_rss_bytes"]
    small = with_peak_rss(hold, 150)["peak_rss_bytes"]
    assert base + 590 * 2**20 <= big < base + 700 * 2**20
    assert base + 140 * 2**20 <= small < base + 250 * 2**20  # not the 600 MiB prompt's peak
    assert peak_rss_bytes() >= big  # the run's peak survives the resets
    assert cell_peak_rss([{"peak_rss_bytes": small}, {"peak_rss_bytes": big}]) == big
    assert cell_peak_rss([{"peak_rss_bytes": big}, {}]) is None  # a prompt without one: no cell peak to state


def test_run_report_records_the_peak_rss_of_the_process():
    from types import SimpleNamespace

    from eval.common import run_report

    held = bytearray(b"x" * (256 * 2**20))  # 256 MiB written, so resident, before the report
    report = run_report("passkey", SimpleNamespace(device="cpu", dtype="float32"), "m", "t", 512, {}, {}, {})
    # In bytes: read as kilobytes (getrusage's unit on Linux) it would be about a thousand times too small.
    assert 256 * 2**20 <= report["peak_rss_bytes"] < 64 * 2**30 and held[-1:] == b"x"


def test_a_folder_without_results_is_one_line_naming_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        summary.main(["--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "results.json" in err


def test_other_evals_are_refused(tmp_path, capsys):
    run = write(tmp_path / "ppl", {"task": "perplexity", "results": {}})
    with pytest.raises(SystemExit):
        summary.main(["--runs", str(run), "--out", str(tmp_path / "o")])
    assert "passkey and ruler" in capsys.readouterr().err
