# Over 500 lines: the whole run-config schema in one place (a typed dataclass per section, each field documented).
"""Run configuration: typed dataclasses, YAML files, dotted command-line overrides, validation.

A run config is a YAML mapping with these top-level keys (every one optional except what the run needs):

    checkpoint: null | DIR | HUB_ID     # start from a checkpoint instead of random weights
    preset: null | NAME                 # a named architecture (plumbing/presets.py), applied before `model:`
    model: {LongLlamaConfig fields}     # architecture / overrides of the checkpoint's config (e.g. mem_layers)
    data: DataConfig
    crossbatch: CrossbatchConfig
    optim: OptimConfig
    train: TrainConfig
    parallel: ParallelConfig
    run: RunConfig
    log: LogConfig
    adapter: AdapterConfig              # train LoRA adapters through peft instead of every weight

Command-line overrides are ``--section.key=value`` (``--checkpoint=DIR`` for top-level keys); values are parsed
as YAML, so ``--model.mem_layers=[2,3]`` and ``--run.resume=true`` work. ``model.mem_layers`` also takes fot's
compact forms (``all``, ``15:``, ``every:2``; the checkpoint saves the explicit list). OmegaConf checks keys and
types against these dataclasses (structured configs): unknown keys and values of the wrong type raise ``ValueError``
naming the dotted key. Strings may use OmegaConf interpolation (``${run.out_dir}/tokenizer``, ``${oc.env:HOME}``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


@dataclass
class DataConfig:
    """Where documents come from and how they are cut into rows.

    Attributes:
        source: "synthetic" (generated, no files), "files" (local text/json/jsonl/parquet via ``datasets``) or
            "hub" (a dataset name on the Hugging Face hub; needs network).
        paths: file paths or globs for ``source: files``.
        format: "auto" (from the file extension), "text", "json" (also jsonl) or "parquet".
        hub_name / hub_config / split: the hub dataset for ``source: hub`` (``split`` also names the split of
            local files).
        text_field: the column holding a document's text.
        text_sample_by: for .txt files, what one document is: a whole file, a paragraph or a line.
        tokenizer: a directory (or hub id) loadable by ``AutoTokenizer``; "checkpoint" uses the base model's
            tokenizer; null is only allowed for the synthetic "lookup" and "repeat" kinds, which emit token ids.
        pack: k, the number of consecutive rows holding consecutive windows of one document.
        window: tokens per row; null means the model's ``max_position_embeddings``.
        min_segment_tokens: a document's last, partial segment of k windows is padded if it holds at least this
            many tokens and dropped otherwise.
        first_row_tokens: [lo, hi] or null. With it, row 0 of a document's first segment holds only L tokens,
            drawn per document from [lo, hi], and is right-padded; the document goes on in row 1. Inference puts
            the prompt in memory in windows whose last one is usually partial (a 128-token prompt: one window of
            64 tokens), which full training rows never show the memory layers.
        add_bos / add_eos: put BOS before and EOS after every tokenized document.
        synthetic_kind: "lookup" (FoT dictionary lookup, token ids), "repeat" (random ids in which one span
            recurs, token ids: the copying task, ``tasks.copying.SyntheticRepeat``) or "passkey" (the passkey
            format, text).
        synthetic_doc_tokens: length of a synthetic document in tokens (lookup) or about that (passkey);
            null means k * window.
        synthetic_key_tokens / synthetic_value_tokens: tokens per key and per value (lookup).
        synthetic_query_prob: probability that an item after the first few is a query (lookup).
        synthetic_span_tokens / synthetic_min_offset / synthetic_jitters: the recurring span's length range
            [lo, hi], and its recurrence ``min_offset + U[0, J]`` tokens after it, J drawn per document from the
            jitters (repeat).
        synthetic_jitter_gate / synthetic_gate_steps: with a gate, the jitters are levels taken in order, moving
            to the next once the mean training loss of the last gate_steps steps is below the gate (repeat).
        synthetic_answers_only: compute the loss only on the answers (lookup: query values, as in the FoT
            paper; repeat: the recurrence after its first token; passkey: the key after the final question).
        passkey_fraction: share of documents replaced by generated passkey documents (text sources).
        mix: for ``source: synthetic_mix`` (tasks/mix.py), the weight of each document family: ``recall``
            (key-value recall), ``lookup`` (dictionary lookup), ``copy`` (copy a marked span) and ``books``
            (plain book text, loss on every token); the haystack is book text from the parquet files in ``paths``.
            Documents have ``3/4 synthetic_doc_tokens ... synthetic_doc_tokens`` tokens.
        mix_loss: for ``synthetic_mix``, where a task document carries the loss: "answers" (only the answers) or
            "all" (every token, answers included; the haystack's language-model signal trains the mechanisms the
            answers need, such as copying what followed an earlier occurrence).
        mix_values: for ``synthetic_mix``, the kinds of value that recall and lookup items take, among "number",
            "word", "code", "name" and "pair"; null means all of them.
        mix_max_keys: for ``synthetic_mix``, a recall document names 1 to this many values (the others are
            distractors for the one asked).
        mix_lookup_keys: for ``synthetic_mix``, the kinds of key a lookup dictionary draws from (one kind per
            dictionary, uniformly over this list, so a repeated kind weighs more); null means "number", "word",
            "code", "pair" and "name" once each.
        mix_haystacks: for ``synthetic_mix``, the weight of each haystack style, drawn per document: "books" (a
            book passage), "repeated" (one short passage repeated), "records" (generated record lines dense
            with numbers of one to five digits) and "tallies" (records of which half the lines give a named
            quantity a number, like a key line with another name); a ``books`` document stays book text; null
            means {repeated: 0.25, books: 0.75}.
        mix_mentions: for ``synthetic_mix``, the probability that a recall key is also named once with no value
            after "the <name> is" (``tasks.recall.MENTION_LINES``), before or after its key line.
        mix_named_intros: for ``synthetic_mix``, the probability that a recall document opens with a line naming
            its first asked key with no value (``tasks.recall.NAMED_INTROS``), in place of its intro.
        mix_answer_ends: for ``synthetic_mix``, put the loss on the character after each recall and lookup answer
            ("." or a line break) too, so that the model learns where an answer ends (a copied number otherwise
            runs on into more digits). "period": every answer is followed by ".", and only that "." carries the
            loss with it (with true, the line break that ends half the answers became a likely token wherever the
            model was unsure).
        mix_answer_end_weight: the loss weight of that end token, in [0, 1] (1: as an answer token). Below 1 the
            model still learns to stop after the key, but stopping weighs less than the digits, so it is not drawn
            to end an answer early wherever it is unsure of the next digit (stage 12 with weight 1 did that).
        mix_short_recall: for ``synthetic_mix``, the probability that a recall document is short: its length is
            drawn from ``mix_short_recall_tokens`` instead, so its opening line, key line and question share one
            or two windows (the rest of its pack is padding).
        mix_short_recall_tokens: [lo, hi], the length range of a short recall document, 32 <= lo <= hi <=
            ``synthetic_doc_tokens``.
    """

    source: Literal["synthetic", "files", "hub", "synthetic_mix"] = "synthetic"
    paths: list[str] = field(default_factory=list)
    format: Literal["auto", "text", "json", "parquet"] = "auto"
    hub_name: str | None = None
    hub_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    text_sample_by: Literal["document", "paragraph", "line"] = "document"
    tokenizer: str | None = None
    pack: int = 4
    window: int | None = None
    min_segment_tokens: int = 64
    first_row_tokens: list[int] | None = None
    add_bos: bool = True
    add_eos: bool = True
    synthetic_kind: Literal["lookup", "repeat", "passkey"] = "lookup"
    synthetic_doc_tokens: int | None = None
    synthetic_key_tokens: int = 4
    synthetic_value_tokens: int = 4
    synthetic_query_prob: float = 0.3
    synthetic_span_tokens: list[int] = field(default_factory=lambda: [6, 20])
    synthetic_min_offset: int = 24
    synthetic_jitters: list[int] = field(default_factory=lambda: [0])
    synthetic_jitter_gate: float | None = None
    synthetic_gate_steps: int = 25
    synthetic_answers_only: bool = False
    mix_loss: Literal["answers", "all"] = "answers"
    mix_values: list[str] | None = None
    mix_max_keys: int = 4
    mix_lookup_keys: list[str] | None = None
    mix_haystacks: dict[str, float] | None = None
    mix_mentions: float = 0.0
    mix_named_intros: float = 0.0
    mix_answer_ends: bool | str = False
    mix_answer_end_weight: float = 1.0
    mix_short_recall: float = 0.0
    mix_short_recall_tokens: list[int] = field(default_factory=lambda: [96, 256])
    passkey_fraction: float = 0.0
    mix: dict[str, float] = field(default_factory=lambda: {"recall": 0.5, "lookup": 0.25, "copy": 0.25})


@dataclass
class CrossbatchConfig:
    """The FoT objective: which other rows a memory layer's queries attend to (see ``fot.crossbatch``).

    Attributes:
        layout: "reference" (LongLLaMA: rows i-1 ... i-R with stepping), "paper" (the FoT paper's d) or "none"
            (no additional contexts: plain windowed causal LM training).
        range: R of the reference layout (3B: 3 with pack 4).
        stepping: the reference's stepping (k=4, R=3 gives (pos, neg) = (0,0), (1,1), (2,1), (3,0)).
        ranges: instead of range/stepping, the range of each row offset 0..k-1 (LongLLaMA 7B: [0, 3, 7, 7] gives
            (0,0), (1,2), (2,5), (3,4)); see train/objective.py.
        d: the paper's crossbatch dimension for ``schedule: constant`` and before the switch.
        schedule: "constant", "switch" (``d`` until ``switch_step``, then ``d_after``) or "sampled" (d drawn per
            step from ``d_choices``, deterministically from the seed and step).
        switch_step / switch_fraction: the switch happens at ``switch_step``, or when null at
            ``switch_fraction`` of ``train.max_steps`` (the paper: d=2, then d=64 for the last 10%).
        d_after: d after the switch.
        d_choices: the set d is sampled from (the paper's fine-tuning: {2, 128}).
        gather_across_ranks: take negatives from every rank's micro-batch, not only the local one.
    """

    layout: Literal["reference", "paper", "none"] = "reference"
    range: int = 3
    stepping: bool = True
    ranges: list[int] | None = None
    d: int = 2
    schedule: Literal["constant", "switch", "sampled"] = "constant"
    switch_step: int | None = None
    switch_fraction: float = 0.9
    d_after: int = 64
    d_choices: list[int] = field(default_factory=lambda: [2, 128])
    gather_across_ranks: bool = False


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1
    # The steps a cosine schedule spans; null: train.max_steps. Larger than max_steps, the run stops part-way down
    # the schedule, as a run cut short by train.max_minutes did (the shipped demo model's stages 2 and 3 did).
    schedule_steps: int | None = None


@dataclass
class TrainConfig:
    """Attributes:
        micro_batch_size: rows per rank per forward (a multiple of ``data.pack``).
        grad_accum: micro-batches per optimizer step. Tokens per step = rows x window x grad_accum x world.
        batch_tokens: if set, the tokens per optimizer step; grad_accum is then derived from the number of
            processes at launch (it must come out a whole number), so one config fits any GPU count.
        max_steps: optimizer steps of the run.
        seed: model init, data order and d sampling.
        dtype: "float32" or "bfloat16" (autocast; weights and optimizer state stay fp32).
        activation_checkpointing: recompute every ``model.gradient_checkpoint_every_ith`` layer in backward.
        compile: ``torch.compile`` every decoder layer.
        device: "auto" (cuda when available, else cpu), "cpu" or "cuda".
        max_minutes: if set, stop after this many minutes of training in this process (checked after each step,
            rank 0 decides for all): save a checkpoint of that step, then ``final/`` as usual. The schedule stays
            the one of ``max_steps``, so ``--run.resume=true`` continues the same run.
    """

    micro_batch_size: int = 8
    grad_accum: int = 1
    batch_tokens: int | None = None
    max_steps: int = 1000
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    activation_checkpointing: bool = False
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_minutes: float | None = None


@dataclass
class ParallelConfig:
    """``strategy``: "ddp", "fsdp2" (``fully_shard`` per decoder layer, then the root) or "none" (one process).
    ``backend``: "auto" (gloo on CPU, nccl on GPU), "gloo" or "nccl". ``timeout_s``: how long a collective may
    wait for the other ranks before the job ends with an error naming the rank that stopped responding (a
    stalled rank otherwise hangs the job)."""

    strategy: Literal["ddp", "fsdp2", "none"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = 300.0


@dataclass
class RunConfig:
    """``out_dir``: the run directory. ``save_every``: checkpoint period in steps (0: only the final model).
    ``keep_last``: how many periodic checkpoints to keep. ``resume``: continue from the newest checkpoint in
    ``out_dir`` that verifies, with the run's config (``resume_changes``). ``force_config_change``: resume even
    though the config changes what the model learns. ``save_final``: write ``final/`` in HF format at the end."""

    out_dir: str = "runs/default"
    save_every: int = 500
    keep_last: int = 2
    resume: bool = False
    force_config_change: bool = False
    save_final: bool = True


@dataclass
class LogConfig:
    every: int = 1
    wandb: bool = False
    wandb_project: str = "fot"
    wandb_mode: Literal["online", "offline"] = "online"
    wandb_run_name: str | None = None
    progress: bool = True


@dataclass
class AdapterConfig:
    """Fine-tune LoRA adapters (through ``peft``) instead of every weight: the base stays frozen, ``final/``
    holds only the adapter (megabytes) next to the base's config, and optimizer state is the adapter's alone.

    Attributes:
        kind: "none" (train every weight) or "lora".
        r / alpha / dropout: LoRA rank, scaling numerator (scale = alpha / r) and dropout.
        target_modules: projection names to adapt (Llama's names: q_proj, k_proj, v_proj, o_proj, gate_proj,
            up_proj, down_proj).
        layers: layer indices to adapt; null adapts every layer. "memory" adapts only ``model.mem_layers``.
        init: a saved adapter (an earlier run's ``final/``) to continue training from, instead of fresh LoRA
            weights; its own r, alpha and targets then apply. The optimizer starts afresh: use
            ``run.resume`` to continue a run with its optimizer state.
    """

    kind: Literal["none", "lora"] = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    layers: list[int] | Literal["memory"] | None = None
    init: str | None = None


@dataclass
class RunSpec:
    """The whole run config (see the module docstring)."""

    checkpoint: str | None = None
    preset: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    crossbatch: CrossbatchConfig = field(default_factory=CrossbatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)


# ----------------------------------------------------------------------------- loading
def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``["--a.b=1", "--c", "x"]`` -> ``{"a.b": 1, "c": "x"}`` with YAML-parsed values."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"unexpected argument {arg!r}; overrides look like --section.key=value.")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"override {arg} has no value; write {arg}=VALUE.")
            key, raw = arg[2:], argv[i + 1]
            i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ValueError(f"override --{key}: cannot parse {raw!r} as a YAML value ({err}).") from None
        out[key] = value
        i += 1
    return out


def _assignments(cfg: DictConfig, key: str, value: Any):
    """``key: value`` as ``(dotted key, value)`` pairs for ``OmegaConf.update``. A mapping given for a section (a
    dataclass) is split into its keys, so that a mapping inside a section (``data.mix``, ``model``) replaces its
    default, as a list does, instead of merging with it. An empty section (``log:`` alone) keeps the defaults."""
    node = OmegaConf.select(cfg, key)
    section = OmegaConf.is_dict(node) and dataclasses.is_dataclass(OmegaConf.get_type(node))
    if section and isinstance(value, dict | None):
        for sub, item in (value or {}).items():
            yield from _assignments(cfg, f"{key}.{sub}", item)
    else:
        yield key, value


@functools.cache
def _model_schema() -> type:
    """The keys ``model:`` accepts, LongLlamaConfig's fields and the legacy ``rope_scaling`` and ``torch_dtype``, as a
    dataclass whose fields are MISSING unless set. A field whose annotation OmegaConf cannot check (``str |
    torch.dtype``) is Any here; LongLlamaConfig validates it."""
    import torch

    from fot import LongLlamaConfig

    names = [f.name for f in dataclasses.fields(LongLlamaConfig)] + ["rope_scaling", "torch_dtype"]
    hints = typing.get_type_hints(LongLlamaConfig, localns={"torch": torch})

    def checkable(name: str):
        tp = hints.get(name, Any)
        try:
            OmegaConf.structured(dataclasses.make_dataclass(name, [(name, tp, field(default=MISSING))]))
        except OmegaConfBaseException:
            return Any
        return tp

    return dataclasses.make_dataclass("LongLlamaConfig", [(n, checkable(n), field(default=MISSING)) for n in names])


def _one_line(err: OmegaConfBaseException, prefix: str = "") -> ValueError:
    """OmegaConf's error as one line naming the dotted key; an unknown key also gets the close matches and the keys
    its section knows."""
    key = prefix + str(err.full_key or "")
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and dataclasses.is_dataclass(err.object_type):
        section, _, name = key.rpartition(".")
        known = sorted(f.name for f in dataclasses.fields(err.object_type))
        close = [f"{section}.{m}" if section else m for m in difflib.get_close_matches(name, known)]
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        return ValueError(f"unknown config key {key!r}{hint}; known keys of {section or 'the config'}: "
                          f"{', '.join(known)}.")
    return ValueError(f"{key + ': ' if key else ''}{str(err).splitlines()[0]}")


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunSpec:
    """Read a YAML run config, apply dotted overrides, check keys and types (OmegaConf), validate, return a
    ``RunSpec``."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist; pass --config configs/NAME.yaml.")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: a run config must be a YAML mapping of sections, got {type(tree).__name__}.")
    cfg = OmegaConf.structured(RunSpec)
    try:
        for key, value in [*tree.items(), *(overrides or {}).items()]:
            for dotted, item in _assignments(cfg, str(key), value):
                OmegaConf.update(cfg, dotted, item, merge=False)
        spec = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _one_line(err) from None
    model = OmegaConf.structured(_model_schema())
    # A compact mem_layers form ("all", "15:", ...) is a string where the schema wants a list: its syntax is checked
    # here, and it is resolved against the layer count when the model's config is built (fot.config).
    from fot.config import check_mem_layers

    compact = {key: value for key, value in spec.model.items() if key == "mem_layers" and isinstance(value, str)}
    try:
        for key, value in compact.items():
            check_mem_layers(value)
    except ValueError as err:
        raise ValueError(f"model.{err}") from None
    try:
        for key, value in spec.model.items():
            if key not in compact:
                OmegaConf.update(model, key, value, merge=False)
    except OmegaConfBaseException as err:
        raise _one_line(err, "model.") from None
    checked = {**OmegaConf.to_container(model), **compact}
    spec.model = {key: checked[key] for key in spec.model}
    validate(spec)
    return spec


def validate(spec: RunSpec) -> None:
    """Cross-field checks that need more than one key; each error names the keys and the fix."""
    d, cb, t, o = spec.data, spec.crossbatch, spec.train, spec.optim
    if d.pack < 1:
        raise ValueError(f"data.pack must be >= 1, got {d.pack}.")
    if t.micro_batch_size < 1 or t.micro_batch_size % d.pack:
        raise ValueError(f"train.micro_batch_size={t.micro_batch_size} must be a positive multiple of data.pack="
                         f"{d.pack}: every document occupies k consecutive rows.")
    for key in ("grad_accum", "max_steps"):
        if getattr(t, key) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {getattr(t, key)}.")
    if d.window is not None and d.window < 2:
        raise ValueError(f"data.window must be >= 2 tokens, got {d.window}.")
    if d.source == "files" and not d.paths:
        raise ValueError("data.source=files needs data.paths (files or globs of text/json/jsonl/parquet).")
    if d.source == "synthetic_mix" and not d.paths:
        raise ValueError("data.source=synthetic_mix needs data.paths: the training books' parquet files "
                         "(assets/books/train.parquet, built by make assets).")
    if d.source == "hub" and not d.hub_name:
        raise ValueError("data.source=hub needs data.hub_name (a dataset id on the Hugging Face hub).")
    if not 0.0 <= d.passkey_fraction <= 1.0:
        raise ValueError(f"data.passkey_fraction must be in [0, 1], got {d.passkey_fraction}.")
    if d.mix_answer_ends not in (False, True, "period"):
        raise ValueError(f"data.mix_answer_ends must be true, false or period, got {d.mix_answer_ends!r}.")
    if not 0.0 <= d.mix_answer_end_weight <= 1.0:
        raise ValueError(f"data.mix_answer_end_weight must be in [0, 1] (the end token's loss weight), got "
                         f"{d.mix_answer_end_weight!r}.")
    if d.mix_answer_end_weight != 1.0 and not d.mix_answer_ends:
        raise ValueError("data.mix_answer_end_weight weighs the answer ends that data.mix_answer_ends puts the loss "
                         "on: set data.mix_answer_ends to period or true.")
    if d.synthetic_kind == "repeat" and len(d.synthetic_span_tokens) != 2:
        raise ValueError(f"data.synthetic_span_tokens is a range [lo, hi], got {d.synthetic_span_tokens}.")
    if d.synthetic_jitter_gate is not None and (d.synthetic_jitter_gate <= 0 or d.synthetic_gate_steps < 1):
        raise ValueError(f"data.synthetic_jitter_gate must be a positive loss and data.synthetic_gate_steps >= 1, got "
                         f"{d.synthetic_jitter_gate} and {d.synthetic_gate_steps}.")
    if d.tokenizer is None and not (d.source == "synthetic" and d.synthetic_kind in ("lookup", "repeat")):
        raise ValueError("data.tokenizer is required for text data (and the synthetic passkey kind): a directory "
                         "with tokenizer.model (python train/tokenizer.py), a hub id, or 'checkpoint'.")
    if d.tokenizer == "checkpoint" and spec.checkpoint is None:
        raise ValueError("data.tokenizer=checkpoint needs a checkpoint; set checkpoint or a tokenizer directory.")
    if cb.range < 0:
        raise ValueError(f"crossbatch.range must be >= 0, got {cb.range}.")
    if cb.ranges is not None and (len(cb.ranges) != d.pack or min(cb.ranges, default=0) < 0):
        raise ValueError(f"crossbatch.ranges={cb.ranges} must list data.pack={d.pack} non-negative ranges, one per "
                         "row offset in a document pack.")
    if t.batch_tokens is not None and t.batch_tokens < 1:
        raise ValueError(f"train.batch_tokens must be positive, got {t.batch_tokens}.")
    if t.max_minutes is not None and not t.max_minutes > 0:
        raise ValueError(f"train.max_minutes must be a positive number of minutes (or null), got {t.max_minutes}.")
    n_docs = t.micro_batch_size // d.pack
    if cb.layout == "paper":
        ds = {"constant": [cb.d], "switch": [cb.d, cb.d_after], "sampled": list(cb.d_choices)}[cb.schedule]
        if not ds:
            raise ValueError("crossbatch.d_choices is empty; list the values d is sampled from, e.g. [2, 128].")
        for value in ds:
            if not 1 <= value <= n_docs:
                raise ValueError(
                    f"crossbatch d={value} (schedule {cb.schedule}) must be in [1, documents per micro-batch = "
                    f"train.micro_batch_size / data.pack = {n_docs}]; raise micro_batch_size or lower d.")
        if cb.schedule == "switch" and cb.switch_step is None and not 0.0 < cb.switch_fraction <= 1.0:
            raise ValueError(f"crossbatch.switch_fraction must be in (0, 1], got {cb.switch_fraction}.")
    if o.schedule_steps is not None and o.schedule_steps < 1:
        raise ValueError(f"optim.schedule_steps must be >= 1 (or null for train.max_steps), got {o.schedule_steps}.")
    if o.lr <= 0 or o.weight_decay < 0 or o.grad_clip < 0 or o.warmup_steps < 0:
        raise ValueError("optim.lr must be > 0 and optim.weight_decay, optim.grad_clip, optim.warmup_steps >= 0; "
                         f"got lr={o.lr}, weight_decay={o.weight_decay}, grad_clip={o.grad_clip}, "
                         f"warmup_steps={o.warmup_steps}.")
    if not (0.0 <= o.beta1 < 1.0 and 0.0 <= o.beta2 < 1.0):
        raise ValueError(f"optim.beta1 and optim.beta2 must be in [0, 1), got {o.beta1}, {o.beta2}.")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}.")
    a = spec.adapter
    if a.kind == "lora" and (a.r < 1 or a.alpha <= 0 or not 0.0 <= a.dropout < 1.0 or not a.target_modules):
        raise ValueError(f"adapter: r must be >= 1, alpha > 0, dropout in [0, 1) and target_modules non-empty; got "
                         f"r={a.r}, alpha={a.alpha}, dropout={a.dropout}, target_modules={a.target_modules}.")
    if a.init is not None and not (Path(a.init) / "adapter_config.json").is_file():
        raise ValueError(f"adapter.init={a.init!r} holds no adapter_config.json; point it at a LoRA run's final/ "
                         "directory (or a peft save_pretrained folder).")
    if spec.run.save_every < 0 or spec.run.keep_last < 1 or spec.log.every < 1:
        raise ValueError("run.save_every must be >= 0, run.keep_last >= 1 and log.every >= 1.")
    if not spec.parallel.timeout_s > 0:
        raise ValueError(f"parallel.timeout_s must be > 0 seconds, got {spec.parallel.timeout_s}.")
    if spec.preset is not None:
        from plumbing.presets import PRESETS  # noqa: PLC0415 - presets import fot

        if spec.preset not in PRESETS:
            raise ValueError(f"preset={spec.preset!r} is unknown; use one of {', '.join(sorted(PRESETS))}.")


def resolve_grad_accum(spec: RunSpec, window: int, world: int) -> int:
    """``train.grad_accum``, or the accumulation that makes ``train.batch_tokens`` tokens per step."""
    t = spec.train
    if t.batch_tokens is None:
        return t.grad_accum
    per_micro = t.micro_batch_size * window * world
    if t.batch_tokens % per_micro:
        raise ValueError(
            f"train.batch_tokens={t.batch_tokens} is not a multiple of micro_batch_size x window x processes = "
            f"{t.micro_batch_size} x {window} x {world} = {per_micro}; change train.micro_batch_size, the process "
            "count or train.batch_tokens.")
    return t.batch_tokens // per_micro


def to_dict(spec: RunSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def dump_yaml(spec: RunSpec) -> str:
    return yaml.safe_dump(to_dict(spec), sort_keys=False)


# ----------------------------------------------------------------------------- resuming with a changed config
# Keys a resumed run may change: how long it runs, how it logs, saves and executes, never what it learns.
# train.max_steps also moves a cosine schedule's end and crossbatch.switch_fraction's switch, which the note says.
RESUME_SAFE = ("train.max_steps", "train.max_minutes", "train.device", "train.compile",
               "train.activation_checkpointing", "run.", "log.", "parallel.")
_ABSENT = "(absent)"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def resume_changes(saved_yaml: str, spec: RunSpec, where: str) -> tuple[list[str], list[str]]:
    """Compare a run's saved config (``saved_yaml``, read from ``where``) with the config of its resume.

    Returns ``(refused, allowed)``, each a list of ``"key: old -> new"``: ``refused`` changes what the model
    learns (model, data, objective, optimizer, adapter, seed, batch, dtype, checkpoint), ``allowed`` only how long
    the run goes and how it logs, saves and executes (``RESUME_SAFE``). A key the saved config lacks (written
    before the key existed) counts as its default value. Raises ``ValueError`` when ``saved_yaml`` is not a config.
    """
    try:
        saved = yaml.safe_load(saved_yaml)
    except yaml.YAMLError as err:
        raise ValueError(f"{where} is not valid YAML ({' '.join(str(err).split())}); restore the run's config "
                         "there (every checkpoint step_*/ holds a copy).") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{where} is not a run config; restore it from a checkpoint's step_*/config.yaml.")
    old, new = flatten(saved), flatten(yaml.safe_load(dump_yaml(spec)))
    defaults = flatten(yaml.safe_load(dump_yaml(RunSpec())))
    refused, allowed = [], []
    for key in dict.fromkeys([*old, *new]):
        if key == "run.resume":  # the one key every resume changes
            continue
        before, after = old.get(key, defaults.get(key, _ABSENT)), new.get(key, defaults.get(key, _ABSENT))
        if before == after:
            continue
        change = f"{key}: {before!r} -> {after!r}"
        (allowed if key.startswith(RESUME_SAFE) else refused).append(change)
    return refused, allowed
