"""Command-line conventions of every script (the trainer, the evaluations, the benchmarks): a user error (a bad
config, path or value) is one line on stderr, ``PROG: error: MESSAGE``, with exit status 2; a bug keeps its
traceback."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import NoReturn, Sequence

USER_ERROR = 2


class UserError(ValueError):
    """A ``ValueError`` known to come from checking user input (see ``checking_user_input``)."""


def fail(prog: str, message: str, status: int = USER_ERROR) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` as one line on stderr and exit with ``status``."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(status)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors (a missing or malformed argument) are one line, not the usage
    block followed by the message."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see {self.prog} --help)")


@contextmanager
def checking_user_input():
    """Mark the ``ValueError``s of the block as user errors (``UserError``). Wrap only stages whose
    ``ValueError``s are checks of user input (configs, paths, checkpoints), so that bugs keep their tracebacks."""
    try:
        yield
    except UserError:
        raise
    except ValueError as err:
        raise UserError(str(err)) from err


@contextmanager
def user_errors(prog: str, kind: type[Exception] = ValueError):
    """Report an exception of ``kind`` raised in the block as one line with exit status 2 (``fail``)."""
    try:
        yield
    except kind as err:
        fail(prog, str(err))


def resolve_choices(names: Sequence[str], choices: Sequence[str], flag: str, noun: str) -> list[str]:
    """A list flag's values (or ``all``) -> the chosen names, in ``choices`` order for ``all``, else as given; a
    ``ValueError`` naming the flag for ``all`` mixed with others, an unknown name or a name given twice."""
    if "all" in names:
        if len(names) > 1:
            raise ValueError(f"{flag} all already includes every {noun}; drop the others from {list(names)}.")
        return list(choices)
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise ValueError(f"{flag} {unknown}: unknown; use 'all' or any of {', '.join(choices)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"{flag} lists a {noun} twice: {list(names)}.")
    return list(names)
