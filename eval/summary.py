"""One table and one plot across tasks: passkey runs (eval/passkey.py) and RULER-style runs (eval/ruler.py) of one
checkpoint, each setting's score per task and length, as ``make demo-smollm2`` reports them.

    python -m eval.summary --runs runs/demo_smollm2/passkey runs/demo_smollm2/ruler runs/demo_smollm2/hf \
        --out runs/demo_smollm2

A cell reads ``protocol / read``: the task's standard score (the passkey protocol's exact token match, RULER's
``string_match_all``) and the score of the answer as a user reads it (eval/README.md). Rows are (task, setting),
columns the lengths any run measured; a length a setting did not run is "–". A second table gives the seconds per
prompt of each cell (its run's seconds over its prompts), a third each cell's peak RSS (the largest of its prompts'
own peaks, which runs since the eighth session record), and a list of each run's peak RSS (``peak_rss_bytes`` of
results.json: the process's, every setting it ran). Writes ``OUT/summary.md`` (the tables,
also printed) and ``OUT/summary.png`` (one panel per task: the protocol score solid, the read score dashed).
"""

from __future__ import annotations

import json
from pathlib import Path

from eval.common import LINE_STYLES, new_figure, save_figure
from plumbing.cli import ArgumentParser
from plumbing.files import atomic_path


def read_run(folder: Path) -> list[tuple[str, str, int, float, float | None, float | None, int | None]]:
    """(task, setting, length, protocol %, read %, seconds per prompt, peak RSS in bytes) of every cell in one run's
    results.json."""
    path = folder / "results.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass an output folder of eval/passkey.py or eval/ruler.py that "
                         "finished (it writes results.json at the end).")
    report = json.loads(path.read_text())
    if report.get("task") not in ("passkey", "ruler"):
        raise ValueError(f"{path} is a {report.get('task')!r} run; eval.summary reads passkey and ruler runs.")
    cells = []
    for setting, rows in report["results"].items():
        for row in rows:
            per_prompt = row["seconds"] / row["n"] if row.get("seconds") is not None and row.get("n") else None
            peak = row.get("peak_rss_bytes")
            if report["task"] == "passkey":
                cells.append(("passkey", setting, row["length"], row["accuracy"], row.get("accuracy_read"), per_prompt,
                              peak))
            else:
                cells.append((row["task"], setting, row["length"], row["score"], row["read"], per_prompt, peak))  # in %
    return cells


def peak_rss(folder: Path) -> int | None:
    """The peak RSS (bytes) a run's results.json records; None for runs written before it did."""
    return json.loads((folder / "results.json").read_text()).get("peak_rss_bytes")


def table(cells) -> str:
    """The scores' table: ``protocol / read`` per (task, setting) row and length column."""
    return _grid(cells, lambda score, read, *_: f"{score:.0f}%" + ("" if read is None else f" / {read:.0f}%"))


def seconds_table(cells) -> str:
    """Seconds per prompt, in the scores' layout ("?" where a run recorded no seconds)."""
    return _grid(cells, lambda _s, _r, sec, _p: "?" if sec is None else f"{sec:.1f}")


def rss_table(cells) -> str:
    """Each cell's peak RSS in GiB, in the scores' layout ("?" where its prompts recorded none)."""
    return _grid(cells, lambda _s, _r, _sec, peak: "?" if peak is None else f"{peak / 2**30:.2f}")


def _grid(cells, fmt) -> str:
    lengths = sorted({c[2] for c in cells})
    rows: dict[tuple[str, str], dict[int, str]] = {}
    for task, setting, length, *values in cells:
        rows.setdefault((task, setting), {})[length] = fmt(*values)
    head = "| task | setting | " + " | ".join(_k(n) for n in lengths) + " |"
    lines = [head, "|" + "---|" * (len(lengths) + 2)]
    for (task, setting), by_length in rows.items():
        lines.append(f"| {task} | {setting} | " + " | ".join(by_length.get(n, "–") for n in lengths) + " |")
    return "\n".join(lines)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def plot(cells, path: Path) -> None:
    tasks = list(dict.fromkeys(c[0] for c in cells))
    new_figure()  # the Agg backend and quiet matplotlib, as every eval plot; its single panel is not used
    import matplotlib.pyplot as plt

    plt.close("all")
    fig, grid = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.2), squeeze=False)
    axes = list(grid[0])
    settings = list(dict.fromkeys(c[1] for c in cells))
    for ax, task in zip(axes, tasks):
        for i, setting in enumerate(settings):
            mine = sorted((c[2], c[3], c[4]) for c in cells if c[0] == task and c[1] == setting)
            if not mine:
                continue
            marker, _ = LINE_STYLES[i % len(LINE_STYLES)]
            xs = [m[0] for m in mine]
            line = ax.plot(xs, [m[1] for m in mine], marker=marker, label=setting, alpha=0.85)[0]
            if all(m[2] is not None for m in mine):
                ax.plot(xs, [m[2] for m in mine], marker=marker, linestyle="--", color=line.get_color(), alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-3, 105)
        ax.set_title(task)
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score (%): protocol solid, as read dashed")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="output folders of eval/passkey.py or eval/ruler.py")
    p.add_argument("--out", required=True, help="folder for summary.md and summary.png")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        cells = [c for folder in args.runs for c in read_run(Path(folder))]
    except ValueError as e:
        p.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rss = [f"- {folder}: {peak / 2**30:.2f} GiB" for folder in args.runs
           if (peak := peak_rss(Path(folder))) is not None]
    text = (table(cells) + "\n\nSeconds per prompt:\n\n" + seconds_table(cells)
            + ("\n\nPeak RSS, GiB (the largest of a cell's prompts):\n\n" + rss_table(cells)
               if any(c[6] is not None for c in cells) else "")
            + ("\n\nPeak RSS of each run (its process):\n\n" + "\n".join(rss) if rss else ""))
    print(text)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(text + "\n")
    plot(cells, out / "summary.png")


if __name__ == "__main__":
    main()
