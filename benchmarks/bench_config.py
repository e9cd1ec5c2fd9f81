"""The benchmark model shared by every script in benchmarks/: the ``tiny_cpu`` preset (``plumbing/presets.py``) with
random weights: vocab 1000, 4 layers, hidden 256, 4 heads, FFN 688, window 512, ``last_context_length`` 256.

``LLAMA`` holds the fields plain LLaMA also has; ``LONG`` adds ``last_context_length``. Neither holds
``mem_layers`` or ``mem_dtype``: each script sets those per case, turning memory on at ``MEM_LAYERS``. The special
token ids stay at the config defaults: the benchmarks feed random ids and never generate."""

import copy

from plumbing.presets import PRESETS, llama_fields

_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
LLAMA = {k: v for k, v in copy.deepcopy(llama_fields("tiny_cpu")).items() if k not in _TOKEN_IDS}
LONG = dict(LLAMA, last_context_length=PRESETS["tiny_cpu"]["last_context_length"])
MEM_LAYERS = list(PRESETS["tiny_cpu"]["mem_layers"])


def check_args(parser, args, positive: tuple[str, ...] = ()) -> None:
    """Report a bad argument every benchmark shares in one line with exit status 2 (``plumbing.cli.fail``) before
    any work: ``--model`` must be a checkpoint directory, ``--json``'s folder writable, and the ``positive``
    arguments (ints or lists of ints) above zero."""
    from pathlib import Path

    from eval.common import check_model_dir
    from plumbing.cli import user_errors
    from plumbing.files import check_out_dir

    with user_errors(parser.prog):
        if getattr(args, "model", None):
            check_model_dir(args.model)
        for name in positive:
            value = getattr(args, name)
            bad = [v for v in (value if isinstance(value, list) else [value]) if v is not None and v <= 0]
            if bad:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {bad}.")
        if getattr(args, "json", None):
            check_out_dir(Path(args.json).resolve().parent, "--json's folder")
