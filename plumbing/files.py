"""Files the scripts write and read: atomic writes, an output folder checked before hours of work, and globs of
input files."""

from __future__ import annotations

import glob
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path`` to write; when the block succeeds it is synced to disk and replaces
    ``path`` (``os.replace``), so a reader or a kill sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the block failed


def check_out_dir(out: str | os.PathLike, flag: str = "--out") -> Path:
    """Create ``out`` and write, sync and remove a probe file in it, so that an evaluation cannot run for hours and
    then fail to save; a ``ValueError`` naming ``flag``, the path and the reason otherwise."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} exists and is not a directory; choose another {flag}.")
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe\n")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        reason = f"{err.strerror}: {str(err.filename)!r}" if err.strerror else str(err)
        raise ValueError(f"{flag} {str(path)!r} cannot be created and written ({reason}); choose another {flag}.") \
            from None
    return path


_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def resolve_files(paths: list[str], fmt: str) -> tuple[list[str], str]:
    """Expand globs; infer the ``datasets`` builder from the extensions when ``fmt`` is "auto"."""
    files: list[str] = []
    for pattern in paths:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise ValueError(f"data.paths: {pattern!r} matches no file.")
        files += [f for f in matched if Path(f).is_file()]
    if fmt != "auto":
        return files, fmt
    kinds = {_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"data.format=auto cannot infer one format from {sorted({Path(f).suffix for f in files})}; "
                         "use files of one kind (.txt, .json/.jsonl, .parquet) or set data.format.")
    return files, kinds.pop()
