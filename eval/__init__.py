"""Evaluations of trained checkpoints, each a CLI that writes JSON and a plot: ``python -m eval.passkey``,
``eval.lookup``, ``eval.perplexity``, ``eval.distraction`` (see ``eval/README.md``)."""
