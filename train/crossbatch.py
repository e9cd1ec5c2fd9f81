"""Crossbatch (Focused Transformer) training of LongLLaMA models.

    torchrun --nproc_per_node=N train/crossbatch.py --config configs/X.yaml [--section.key=value ...]
    python train/crossbatch.py --config configs/ci_tiny.yaml --run.out_dir=runs/ci
    python train/crossbatch.py tokenizer --out DIR --vocab_size 1000 --paths 'corpus/*.txt'

Every optimizer step: ``train.grad_accum`` micro-batches of ``train.micro_batch_size`` rows of one window each,
k = ``data.pack`` consecutive rows per document, through ``LongLlamaForCausalLM(..., crossbatch=plan)``: memory
layers attend causally to their row and, in one softmax, to the rows the plan names (``train/objective.py``).
Then gradient clipping, AdamW and the lr schedule. See ``train/README.md`` for the run directory layout.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import time
from pathlib import Path

import torch

import fot
from plumbing.cli import ArgumentParser, UserError, checking_user_input, fail, user_errors
from plumbing.files import atomic_path, check_out_dir
from train.build import build_config, build_model, count_parameters, model_fields, run_tokenizer
from train.checkpoint import load_latest, save_checkpoint, save_final, step_dirs
from train.config import (
    RunSpec,
    dump_yaml,
    load_config,
    parse_overrides,
    resolve_grad_accum,
    resume_changes,
    to_dict,
)
from train.data import IGNORE, build_batches
from train.lr_schedule import build_lr_scheduler
from train.metrics import RunLogger
from train.objective import Objective
from train.parallel import (
    CollectiveTimeout,
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    autocast,
    barrier,
    describe_stall,
    gradient_sync,
    init_distributed,
    parallelize,
    unwrap,
)

logger = logging.getLogger("train")


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms and biases do not (the HF Trainer's and nanoGPT's convention)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def setup_logging(info: DistInfo) -> None:
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank{info.rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


_COLLECTIVE_FAILURE = re.compile(r"timed out|timeout|connection (closed|reset)", re.IGNORECASE)


def train(spec: RunSpec) -> Path:
    """Run the training ``spec`` describes; returns the run directory.

    Raises ``UserError`` (a ``ValueError``) for a problem with the config, its paths or the run directory, found
    before the model is built where the check is cheap, and ``CollectiveTimeout`` when another rank stops
    responding for ``parallel.timeout_s``."""
    with checking_user_input():
        info = init_distributed(spec.train, spec.parallel)
    setup_logging(info)
    try:
        out = _train(spec, info)
        if info.initialized:  # every rank finishes its collectives before any tears down gloo's connections
            torch.distributed.barrier()
        return out
    except RuntimeError as err:
        if info.heartbeat is None or not _COLLECTIVE_FAILURE.search(str(err)):
            raise
        raise CollectiveTimeout(describe_stall(info, spec.parallel.timeout_s, err)) from err
    finally:
        if info.heartbeat is not None:
            info.heartbeat.stop()
        if info.initialized:
            torch.distributed.destroy_process_group()


def model_config(spec: RunSpec) -> fot.LongLlamaConfig:
    """The run's model config, validated, from the checkpoint's config.json alone (no weights are read)."""
    if spec.checkpoint is None:
        return build_config(spec)
    if Path(spec.checkpoint).is_dir() and not (Path(spec.checkpoint) / "config.json").is_file():
        # checked here: transformers reads a directory without config.json as the default config, without a word
        raise ValueError(f"checkpoint={spec.checkpoint!r} has no readable config.json: the directory has none; "
                         "point checkpoint at a directory holding config.json and the weights (a run's final/).")
    try:
        cfg = fot.LongLlamaConfig.from_pretrained(spec.checkpoint, **model_fields(spec))
    except OSError as err:
        if not Path(spec.checkpoint).exists():  # a missing local run directory reads as a failed Hub download
            raise ValueError(f"checkpoint={spec.checkpoint!r}: no such directory here ({Path.cwd()}), and no Hub "
                             "model could be read by that id. If it is an earlier stage's output, run that stage "
                             "first (make demo-model runs them in order).") from None
        raise ValueError(f"checkpoint={spec.checkpoint!r} has no readable config.json: {err}") from None
    return cfg


def check_run_dir(spec: RunSpec, info: DistInfo, out_dir: Path) -> str:
    """Check that the run directory can be written and, on resume, that the config keeps what the run learns
    (``resume_changes``, against OUT/config.yaml or, when that is gone, the newest checkpoint's copy). Returns the
    config's YAML, for ``write_run_config`` once the run has started."""
    check_out_dir(out_dir, "run.out_dir")
    config_yaml = dump_yaml(spec)
    saved = out_dir / "config.yaml"
    copies = [saved] + [path / "config.yaml" for _, path in reversed(step_dirs(out_dir))]
    reference = next((p for p in copies if p.is_file()), None)
    earlier = [path.name for _, path in step_dirs(out_dir)] + [n for n in ("final",) if (out_dir / n).exists()]
    if not spec.run.resume and earlier:
        # A fresh run here would mix its checkpoints with the earlier run's, and pruning (which keeps the highest
        # steps) would delete the new run's own.
        raise ValueError(f"run.out_dir {str(out_dir)!r} already holds a run ({', '.join(earlier)}): continue it with "
                         "--run.resume=true, or choose another run.out_dir.")
    if spec.run.resume and reference is not None:
        refused, allowed = resume_changes(reference.read_text(), spec, str(reference))
        if refused and not spec.run.force_config_change:
            raise ValueError(f"run.resume=true, but the config changes what the run learns: {'; '.join(refused)} "
                             f"(saved in {reference}). Resume with the saved values, start another run.out_dir, or "
                             "pass --run.force_config_change=true to continue with the new ones.")
        if info.is_main:
            for change in refused:
                logger.warning("resume: forced config change (run.force_config_change=true): %s", change)
            for change in allowed:
                logger.info("resume: config change allowed: %s", change)
    return config_yaml


def write_run_config(out_dir: Path, config_yaml: str, info: DistInfo) -> None:
    """Replace OUT/config.yaml (atomically) once the run has passed every check and restored its checkpoint."""
    barrier(info)  # every rank has read the saved config before rank 0 replaces it
    if info.is_main:
        with atomic_path(out_dir / "config.yaml") as tmp:
            tmp.write_text(config_yaml)
    barrier(info)


def _train(spec: RunSpec, info: DistInfo) -> Path:
    out_dir = Path(spec.run.out_dir)
    with checking_user_input():
        cfg = model_config(spec)  # a bad model field fails here, in seconds, before any weights are built
        config_yaml = check_run_dir(spec, info, out_dir)
        tokenizer = run_tokenizer(spec)
        if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size={cfg.vocab_size}; "
                             f"set --model.vocab_size={len(tokenizer)} (or larger).")
        window = spec.data.window or cfg.max_position_embeddings
        if window > cfg.max_position_embeddings:
            raise ValueError(f"data.window={window} exceeds the model's window max_position_embeddings="
                             f"{cfg.max_position_embeddings}; every row must be one window.")
        spec.train.grad_accum = resolve_grad_accum(spec, window, info.world)
    torch.manual_seed(spec.train.seed)
    model = build_model(spec)
    cfg = model.config
    model.to(info.device).train()
    logger.info("model: %.2fM parameters, %d layers, memory layers %s, window %d; %d process(es), %s, %s",
                count_parameters(model) / 1e6, cfg.num_hidden_layers, cfg.mem_layers, window, info.world,
                spec.parallel.strategy if info.initialized else "single", info.device)
    model = parallelize(model, spec, info)
    optimizer = build_optimizer(model, spec.optim)
    scheduler = build_lr_scheduler(optimizer, spec.optim, spec.optim.schedule_steps or spec.train.max_steps)
    batches = build_batches(spec, tokenizer, cfg.vocab_size, window, info.rank, info.world)
    objective = Objective(spec.crossbatch, spec.train.micro_batch_size, spec.data.pack, spec.train.max_steps,
                          spec.train.seed, world_size=info.world, rank=info.rank)
    with checking_user_input():  # no checkpoint verifies, or another process count
        start = load_latest(out_dir, model, optimizer, scheduler, batches, info) if spec.run.resume else 0
    write_run_config(out_dir, config_yaml, info)
    if start:
        logger.info("resumed from step %d", start)
    tokens_per_step = spec.train.micro_batch_size * window * spec.train.grad_accum * info.world
    logger.info("%d tokens per optimizer step (%d rows x %d tokens x %d accumulation x %d ranks)", tokens_per_step,
                spec.train.micro_batch_size, window, spec.train.grad_accum, info.world)
    run_log = RunLogger(out_dir, spec, to_dict(spec), info.is_main, start, spec.train.max_steps)
    try:
        loop(spec, info, model, optimizer, scheduler, batches, objective, run_log, start, out_dir, config_yaml)
    finally:
        run_log.close()
    if spec.run.save_final:
        path = save_final(out_dir, model, tokenizer, info)
        logger.info("saved %s", path)
    return out_dir


def train_step(spec, info, model, optimizer, scheduler, batches, plan):
    """One optimizer step over ``grad_accum`` micro-batches. Returns (mean loss, grad norm, tokens)."""
    accum = spec.train.grad_accum
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for micro in range(accum):
        batch = batches.next_batch()
        tokens += batch.tokens
        mask = None if batch.attention_mask is None else batch.attention_mask.to(info.device)
        labels = batch.labels.to(info.device)
        with gradient_sync(model, micro == accum - 1), autocast(spec, info):
            if batch.loss_weights is None:
                loss = model(input_ids=batch.input_ids.to(info.device), labels=labels, attention_mask=mask,
                             crossbatch=plan, use_cache=False).loss
            else:
                logits = model(input_ids=batch.input_ids.to(info.device), attention_mask=mask, crossbatch=plan,
                               use_cache=False).logits
                loss = weighted_lm_loss(logits, labels, batch.loss_weights.to(info.device))
            (loss / accum).backward()
        loss_sum += loss.detach().double().cpu()
    grad_norm = clip_gradients(model, spec.optim.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / accum, grad_norm, tokens


def weighted_lm_loss(logits_BWV: torch.Tensor, labels_BW: torch.Tensor, weights_BW: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy with a weight per label: sum(weight * CE) over the labels that are not ignored,
    divided by their number, so that weights of 1 give the mean the model's own loss computes (transformers'
    causal LM loss: logits at t predict the label at t + 1)."""
    labels = labels_BW[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits_BWV[:, :-1].reshape(-1, logits_BWV.shape[-1]).float(), labels,
                                           ignore_index=IGNORE, reduction="none")  # fmt: skip
    counted = labels != IGNORE
    return (ce * weights_BW[:, 1:].reshape(-1).to(ce.dtype) * counted).sum() / counted.sum().clamp(min=1)


def out_of_time(deadline: float | None, info) -> bool:
    """Whether ``train.max_minutes`` has passed; rank 0's clock decides, so every rank stops at the same step."""
    if deadline is None:
        return False
    late = torch.tensor(float(info.rank == 0 and time.monotonic() > deadline), dtype=torch.float64)
    return bool(all_reduce_sum(late, info) > 0)


def loop(spec, info, model, optimizer, scheduler, batches, objective, run_log, start, out_dir, config_yaml):
    minutes = spec.train.max_minutes
    deadline = None if minutes is None else time.monotonic() + 60 * minutes
    for step in range(start, spec.train.max_steps):
        if info.heartbeat is not None:
            info.heartbeat.at_step(step)
        plan = objective.plan(step)
        lr = scheduler.get_last_lr()[0]
        t0 = time.perf_counter()
        loss, grad_norm, tokens = train_step(spec, info, model, optimizer, scheduler, batches, plan)
        loss = float(all_reduce_mean(loss, info))
        tokens = int(all_reduce_sum(torch.tensor(tokens, dtype=torch.float64), info))
        elapsed = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss} at step {step + 1}; lower optim.lr or check the data.")
        done = step + 1
        if done % spec.log.every == 0 or done == spec.train.max_steps:
            positives, negatives = plan.counts()
            record = {"step": done, "loss": loss, "lr": lr, "tokens_per_s": tokens / elapsed, "tokens": tokens,
                      "grad_norm": grad_norm, "positives": float(positives.float().mean()),
                      "negatives": float(negatives.float().mean()), "step_time_s": elapsed}
            d = objective.d_at(step)
            if d is not None:
                record["d"] = d
            run_log.log(record)
        run_log.advance(loss, lr)
        batches.after_step(loss)  # before the checkpoint, which saves a gated curriculum's level with the data
        every = spec.run.save_every
        saved = bool(every) and done % every == 0 and done < spec.train.max_steps
        if saved:
            save_checkpoint(out_dir, done, model, optimizer, scheduler, batches, config_yaml, info,
                            spec.run.keep_last)
        if done < spec.train.max_steps and out_of_time(deadline, info):
            if not saved:
                save_checkpoint(out_dir, done, model, optimizer, scheduler, batches, config_yaml, info,
                                spec.run.keep_last)
            logger.info("train.max_minutes=%g reached: stopped after step %d of %d (resume with --run.resume=true)",
                        minutes, done, spec.train.max_steps)
            break


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "tokenizer":
        from train.tokenizer import main as tokenizer_main

        tokenizer_main(argv[1:])
        return
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            usage="%(prog)s --config FILE [--section.key=value ...] | tokenizer ...")
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml), e.g. configs/ci_tiny.yaml")
    args, rest = parser.parse_known_args(argv)
    with user_errors(parser.prog):
        spec = load_config(args.config, parse_overrides(rest))
    try:
        train(spec)
    except UserError as err:
        fail(parser.prog, str(err))
    except CollectiveTimeout as err:
        fail(parser.prog, str(err), status=1)


if __name__ == "__main__":
    main()
