"""Plumbing shared by every script of the repository (train/, eval/, benchmarks/, tasks/): the argument parser with
one-line errors (``plumbing.cli``), atomic writes, output-folder checks and file globs (``plumbing.files``), the
tokenizer loader (``plumbing.tokenizer``) and the named model architectures (``plumbing.presets``).

It sits below the scripts and imports only fot and third-party packages, so that train/ and eval/ share these
without importing each other. Like train/ and eval/, it is a repository-side package beside fot (setup.py);
fot never imports it.
"""
