"""``fot COMMAND ...``: the console script (``python -m fot`` runs the same).

Commands:
    ask          read long text files once and answer questions about them (``fot.ask``)
    export-code  copy a checkpoint with its modeling code, to load with trust_remote_code (``fot.export``)
"""

from __future__ import annotations

import sys

COMMANDS = {"ask": "fot.ask", "export-code": "fot.export"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        print(f"fot: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} (fot ask --help)", file=sys.stderr)
        raise SystemExit(2)
    import importlib

    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
