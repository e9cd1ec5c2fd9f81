"""One table and one plot from several runs of the same eval (e.g. a base model against two fine-tuned ones).

    python -m eval.compare --runs base=runs/ppl_base fot=runs/ppl_fot d1=runs/ppl_d1 \
        --settings memory no-memory --out docs/img/perplexity.png

Each ``LABEL=DIR`` names an output folder of eval/passkey.py, eval/perplexity.py or eval/distraction.py (its
``results.json``); all must come from the same eval. Passkey runs of one model at different lengths join as
``LABEL=DIR1,DIR2``. The curves are every (run, setting) pair, or only the
settings named by ``--settings``: one colour per run, one line style per setting.

* passkey: accuracy (%) against prompt length (the lengths of the first run; a run without a length shows a gap);
* perplexity: perplexity of each position bucket against the bucket's upper edge;
* distraction: perplexity of the targets against the number of distracting documents in memory first.

The table (Markdown, on stdout) has one row per x value and one column per curve. ``--out`` writes the plot
(atomically); its parent folder is created.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval.common import LINE_STYLES, finish_plot, new_figure

# task -> (x label, y label, log2 x axis)
AXES = {
    "passkey": ("prompt length (tokens)", "accuracy (%)", True),
    "perplexity": ("position in the document (bucket's upper edge, tokens)", "perplexity", True),
    "distraction": ("distracting documents in memory before the target", "perplexity of the target", False),
}


def points(task: str, result) -> dict[int, float | None]:
    """x -> y of one setting's result in a results.json of ``task``."""
    if task == "passkey":
        return {row["length"]: row["accuracy"] for row in result}
    if task == "perplexity":
        return {b["hi"]: b["ppl"] for b in result["buckets"]}
    return {row["distractors"]: row["ppl"] for row in result["rows"]}


def load_runs(specs: list[str]) -> tuple[str, dict[str, dict]]:
    """(task, label -> results.json) for ``LABEL=DIR`` specs; a ``ValueError`` naming the problem otherwise."""
    runs, tasks = {}, set()
    for spec in specs:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            raise ValueError(f"--runs takes LABEL=DIR, got {spec!r}.")
        if label in runs:
            raise ValueError(f"--runs names the label {label!r} twice.")
        reports = []
        for part in folder.split(","):
            path = Path(part) / "results.json"
            if not path.is_file():
                raise ValueError(f"{str(path)!r} does not exist: is {part!r} the --out of a finished eval run?")
            report = json.loads(path.read_text())
            if report.get("task") not in AXES:
                raise ValueError(f"{str(path)!r} is not a passkey, perplexity or distraction result.")
            reports.append(report)
            tasks.add(report["task"])
        runs[label] = merge_passkey(label, reports) if len(reports) > 1 else reports[0]
    if len(tasks) != 1:
        raise ValueError(f"--runs mixes results of different evals: {sorted(tasks)}.")
    return tasks.pop(), runs


def merge_passkey(label: str, reports: list[dict]) -> dict:
    """One passkey report from several runs of one model at different lengths (``LABEL=DIR1,DIR2``)."""
    if any(r["task"] != "passkey" for r in reports):
        raise ValueError(f"--runs {label}=...: only passkey runs (at different lengths) can be joined with ','.")
    results: dict[str, list] = {}
    for report in reports:
        for name, rows in report["results"].items():
            have = {row["length"] for row in results.get(name, [])}
            if have & {row["length"] for row in rows}:
                raise ValueError(f"--runs {label}=...: setting {name!r} has the same length in two runs.")
            results.setdefault(name, []).extend(rows)
    return {**reports[0], "results": results}


def curves(task: str, runs: dict[str, dict], settings: list[str] | None) -> dict[tuple[str, str], dict]:
    """(label, setting) -> x -> y for every requested setting of every run; a ``ValueError`` when a requested
    setting is in no run."""
    out = {}
    for label, report in runs.items():
        for name, result in report["results"].items():
            if settings is None or name in settings:
                out[(label, name)] = points(task, result)
    missing = [s for s in settings or [] if not any(name == s for _, name in out)]
    if missing:
        raise ValueError(f"--settings {missing} are in none of the runs.")
    return out


def markdown(task: str, lines: dict[tuple[str, str], dict]) -> str:
    xs = sorted({x for pts in lines.values() for x in pts})
    fmt = (lambda y: f"{y:.0f}%") if task == "passkey" else (lambda y: f"{y:.2f}")
    head = "| x | " + " | ".join(f"{label}, {name}" for label, name in lines) + " |"
    rows = [head, "|" + "---|" * (len(lines) + 1)]
    for x in xs:
        cells = [fmt(pts[x]) if pts.get(x) is not None else "-" for pts in lines.values()]
        rows.append(f"| {x:,} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(task: str, lines: dict[tuple[str, str], dict], window: int | None, path: Path, title: str) -> None:
    fig, ax = new_figure()
    labels = list(dict.fromkeys(label for label, _ in lines))
    names = list(dict.fromkeys(name for _, name in lines))
    colours = [f"C{i}" for i in range(10)]
    for (label, name), pts in lines.items():
        marker, style = LINE_STYLES[names.index(name) % len(LINE_STYLES)]
        xy = sorted((x, y) for x, y in pts.items() if y is not None)
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker=marker, linestyle=style,
                color=colours[labels.index(label) % len(colours)], label=f"{label}, {name}", alpha=0.85)
    xlabel, ylabel, log2 = AXES[task]
    if log2:
        ax.set_xscale("log", base=2)
        xs = sorted({x for pts in lines.values() for x in pts})
        ax.set_xticks(xs, [str(x) for x in xs], rotation=45 if len(xs) > 8 else 0)
    if window and task != "distraction":
        ax.axvline(window, color="grey", linestyle="--", linewidth=1)
    if task == "passkey":
        ax.set_ylim(-3, 105)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    finish_plot(fig, ax, path, title)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="LABEL=DIR",
                   help="eval output folders to compare (passkey: LABEL=DIR1,DIR2 joins lengths)")
    p.add_argument("--settings", nargs="+", help="only these settings (default: every setting of every run)")
    p.add_argument("--out", help="the plot's path (.png, .svg, ...)")
    p.add_argument("--title", help="the plot's title (default: the eval's name)")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        task, runs = load_runs(args.runs)
        lines = curves(task, runs, args.settings)
    except ValueError as err:
        parser.error(str(err))  # one line on stderr, exit status 2
    print(markdown(task, lines))
    if args.out:
        windows = [r["window"] for r in runs.values() if r.get("window")]
        window = min(windows) if windows else None  # a full:W setting can widen one run's recorded window
        plot(task, lines, window, Path(args.out), args.title or task)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
