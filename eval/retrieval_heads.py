"""Find the heads that retrieve: which query heads of a checkpoint's memory layers read a pass key out of memory,
measured on validation passkey prompts, written as a ``mem_heads`` file (``LongLlamaConfig.mem_heads``).

    python eval/retrieval_heads.py --model models/smollm2-fot --lengths 4096 --templates landmark-town \\
        number-ledger --depths 0.1 0.5 0.9 --seed 1 --top 32 --out runs/heads

With memory in every layer of a pretrained model, a few heads copy from memory while most attend to it as to
local context, which costs perplexity (docs/results.md). Each prompt (``eval/passkey.py``'s, the answer appended)
runs once with dense memory on the torch path; a wrapper around the dense memory attention keeps, per memory layer,
the last window's queries, local keys and memory. At the positions that predict the answer's tokens, each head's
attention is recomputed in float64 as the layer's one softmax makes it (local window and memory, the checkpoint's
``mem_rope_distance`` and ``mem_score_bias``), and two masses are averaged over positions and prompts:

* ``key``: the attention on the memory slots that hold the key's tokens (memory slot m holds prompt token m: a
  fresh prefill, nothing evicted);
* ``memory``: the attention on all of memory.

The heads are ranked by ``key``; ``--top N`` keeps the first N, then ``--memory-heads M`` adds the M heads with
the most ``memory`` mass among the rest. Outputs (``--out DIR``): ``heads.json`` ({"mem_heads": {layer: [heads]},
the scores, the prompts' keys and whether each was answered}), ``heads.png`` (both masses as layer x head maps,
the chosen heads marked) and a table on stdout. Use the file with ``fot.convert --mem-heads``, ``make smollm2
SMOLLM2_HEADS=FILE`` or an evaluation's ``memory+heads=FILE``.

Choose the prompts from validation templates and seeds only: the heads are a tuned setting, and the passkey test
set (seed 0, every template) must stay unseen.
"""

from __future__ import annotations

import argparse
import logging
import math
from contextlib import contextmanager
from pathlib import Path

import torch

import fot.attention as attention
from eval.common import (add_probe_arguments, check_probe_args, new_figure, resolve_bos, save_figure,
                         write_json)
from eval.passkey import PromptEncoder, key_token, make_trials, template_names
from plumbing.tokenizer import load_tokenizer

logger = logging.getLogger("eval.retrieval_heads")


@contextmanager
def recording_memory_attention(layers: list):
    """Within the block, the torch dense memory attention keeps, for the layer that calls it (``layers``: the
    decoder layers, whose pre-hooks name the running one), its inputs (queries, local keys, memory, the memory
    queries) of the call with a non-empty memory; a later call of the same layer replaces them, so after a
    forward each memory layer holds its last window's. Yields the dict layer -> inputs."""
    key = ("torch", "dense")
    inner = attention.ATTENTION_FUNCTIONS[key]
    current = {"layer": None}
    hooks = [layer.register_forward_pre_hook(lambda _m, _a, i=i: current.__setitem__("layer", i))
             for i, layer in enumerate(layers)]
    calls: dict[int, tuple] = {}

    def record(q_BNTH, local, memory, **kwargs):
        if memory is not None and memory.size > 0:
            calls[current["layer"]] = (q_BNTH, local, memory, kwargs.get("q_mem_BNTH"))
        return inner(q_BNTH, local, memory, **kwargs)

    attention.ATTENTION_FUNCTIONS[key] = record
    try:
        yield calls
    finally:
        attention.ATTENTION_FUNCTIONS[key] = inner
        for hook in hooks:
            hook.remove()


def answer_masses(q_BNTH, local, memory, q_mem_BNTH, n: int, span: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Per head [N], the mean over the last ``n`` query positions (batch row 0) of the attention on memory slots
    ``span`` and on all of memory, from the layer's one softmax over its local window and memory in float64."""
    N, T, H = q_BNTH.shape[1], q_BNTH.shape[2], q_BNTH.shape[-1]
    R = N // local.k_BGSH.shape[1]
    q = q_BNTH[0, :, -n:].double()
    q_mem = (q_BNTH if q_mem_BNTH is None else q_mem_BNTH)[0, :, -n:].double()
    k_loc = local.k_BGSH[0].repeat_interleave(R, 0).double()
    k_mem = memory.k_BGMH[0].repeat_interleave(R, 0).double()
    local_NnS = torch.einsum("nth,nsh->nts", q, k_loc) / math.sqrt(H)
    visible = attention.local_visibility(T, local)[0, 0, -n:]  # [n, S]
    local_NnS = local_NnS.masked_fill(~visible[None], -math.inf)
    mem_NnM = torch.einsum("nth,nmh->ntm", q_mem, k_mem) / math.sqrt(H) - memory.score_bias
    if memory.valid_BM is not None:
        mem_NnM = mem_NnM.masked_fill(~memory.valid_BM[0][None, None, :], -math.inf)
    probs = torch.softmax(torch.cat([local_NnS, mem_NnM], dim=-1), dim=-1)[..., local_NnS.shape[-1]:]
    start, end = span
    return probs[..., start:end].sum(-1).mean(-1), probs.sum(-1).mean(-1)


def probe_trial(model, trial, device: str = "cpu") -> dict:
    """One prompt with its answer appended: per memory layer the heads' ``key`` and ``memory`` masses, and
    whether the model predicts every answer token (teacher-forced, as greedy decoding would if all are right)."""
    n = len(trial.answer_ids)
    start = key_token(trial)
    if start is None:
        raise ValueError(f"the key of trial {trial.trial} ({trial.template}) is not a run of the prompt's tokens; "
                         "this tokenizer splits the key line differently, so its slots cannot be named.")
    ids = torch.tensor([trial.prompt_ids + trial.answer_ids[:-1]], device=device)
    with torch.no_grad(), recording_memory_attention(list(model.model.layers)) as calls:
        logits = model(ids, logits_to_keep=n).logits[0]
    key, mem = {}, {}
    for layer, (q, local, memory, q_mem) in sorted(calls.items()):
        if start + n > memory.size:
            raise ValueError(f"the key of trial {trial.trial} ends at token {start + n}, past the {memory.size} "
                             "memory slots; use a longer prompt or a smaller depth.")
        key[layer], mem[layer] = (t.tolist() for t in answer_masses(q, local, memory, q_mem, n, (start, start + n)))
    return {"template": trial.template, "depth": trial.depth, "key": trial.key, "key_token": start,
            "correct": logits.argmax(-1).tolist() == list(trial.answer_ids), "key_mass": key, "memory_mass": mem}


def choose(key, memory, top: int, memory_heads: int) -> dict[int, list[int]]:
    """``top`` heads by key mass, then ``memory_heads`` more by memory mass: {layer: sorted heads}.
    ``key``, ``memory``: {layer: [mass per head]}."""
    ranked = sorted(((m, layer, h) for layer, ms in key.items() for h, m in enumerate(ms)), reverse=True)
    chosen = [(layer, h) for _, layer, h in ranked[:top]]
    rest = sorted(((m, layer, h) for layer, ms in memory.items() for h, m in enumerate(ms)
                   if (layer, h) not in chosen), reverse=True)  # fmt: skip
    chosen += [(layer, h) for _, layer, h in rest[:memory_heads]]
    out: dict[int, list[int]] = {}
    for layer, h in chosen:
        out.setdefault(layer, []).append(h)
    return {layer: sorted(hs) for layer, hs in sorted(out.items())}


def mean_masses(records: list[dict], field: str) -> dict[int, list[float]]:
    layers = records[0][field].keys()
    return {int(layer): [sum(r[field][layer][h] for r in records) / len(records)
                         for h in range(len(records[0][field][layer]))] for layer in layers}


def format_table(key, memory, chosen) -> str:
    ranked = sorted(((m, layer, h) for layer, ms in key.items() for h, m in enumerate(ms)), reverse=True)
    picked = {(layer, h) for layer, hs in chosen.items() for h in hs}
    lines = ["| rank | layer.head | key mass | memory mass | chosen |", "|---|---|---|---|---|"]
    for i, (m, layer, h) in enumerate(ranked[:48]):
        lines.append(f"| {i + 1} | {layer}.{h} | {m:.3f} | {memory[layer][h]:.3f} | "
                     f"{'yes' if (layer, h) in picked else ''} |")
    total = sum(m for m, _, _ in ranked)
    share = sum(key[layer][h] for layer, h in picked) / total if total else 0.0
    return "\n".join(lines) + f"\n\n{len(picked)} heads chosen, {share:.0%} of the key mass."


def plot(path: Path, key, memory, chosen) -> None:
    new_figure()
    import matplotlib.pyplot as plt

    plt.close("all")
    layers = sorted(key)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.22 * len(layers) + 2.2))
    for ax, (name, masses) in zip(axes, (("key mass at the answer", key), ("memory mass at the answer", memory))):
        grid = torch.tensor([masses[layer] for layer in layers]).numpy()
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        for row, layer in enumerate(layers):
            for h in chosen.get(layer, []):
                ax.add_patch(plt.Rectangle((h - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
        ax.set_xlabel("query head")
        ax.set_ylabel("memory layer")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle("retrieval heads (red: chosen)", fontsize=10)
    save_figure(fig, path)


def load_probe_model(path: Path, device: str):
    """The checkpoint with dense memory read by every head on the torch path (what the probe records), float32."""
    import fot

    model = fot.LongLlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_impl="torch", mem_top_k=None,
                                                     mem_index="exact", mem_heads=None).to(device).eval()
    cfg = model.config
    if cfg.mem_max_tokens is not None:
        raise ValueError(f"{path}: the probe names memory slots by token, so memory must keep every token "
                         f"(mem_max_tokens None, not {cfg.mem_max_tokens}).")
    if not cfg.mem_layers:
        raise ValueError(f"{path}: the model has no memory layers; there are no heads to choose.")
    return model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_probe_arguments(p, "write heads.json and heads.png here")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096], help="prompt lengths in tokens")
    p.add_argument("--templates", nargs="+", default=["landmark-town", "number-ledger"],
                   help="passkey templates (validation ones: the test set must stay unseen)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="key depths")
    p.add_argument("--seed", type=int, default=1, help="eval/passkey.py's seed (not the test set's 0)")
    p.add_argument("--top", type=int, default=32, help="heads kept by key mass")
    p.add_argument("--memory-heads", type=int, default=0, help="heads added by memory mass at the answer")
    p.add_argument("--no-bos", action="store_true", help="never prepend BOS (default: as the tokenizer declares)")
    return p


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    p = build_parser()
    args = p.parse_args(argv)
    try:  # every input is checked before a model is loaded
        model_dir, tokenizer_dir = check_probe_args(args)
        templates = template_names(args.templates)
        if args.seed == 0:
            raise ValueError("--seed 0 draws the passkey test set (eval/passkey.py's default seed); choose heads on "
                             "validation prompts, e.g. --seed 1.")
        if args.top < 1 or args.memory_heads < 0:
            raise ValueError(f"--top must be >= 1 and --memory-heads >= 0, got {args.top} and {args.memory_heads}.")
        model = load_probe_model(model_dir, args.device)
    except ValueError as err:
        p.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = PromptEncoder(load_tokenizer(tokenizer_dir), add_bos=resolve_bos(args, tokenizer_dir))
    trials = make_trials(encoder, args.lengths, 1, args.seed, templates, args.depths)
    from tqdm.auto import tqdm

    records = []
    for length, ts in trials.items():
        for tr in tqdm(ts, desc=f"{length} tokens", unit="prompt", dynamic_ncols=True):
            records.append({"length": length, **probe_trial(model, tr, args.device)})
    key, memory = mean_masses(records, "key_mass"), mean_masses(records, "memory_mass")
    chosen = choose(key, memory, args.top, args.memory_heads)
    print(format_table(key, memory, chosen))
    answered = sum(r["correct"] for r in records)
    print(f"{answered} of {len(records)} prompts answered with every head reading (dense) memory.")
    report = {"model": str(args.model), "lengths": args.lengths, "templates": templates, "depths": args.depths,
              "seed": args.seed, "top": args.top, "memory_heads": args.memory_heads,
              "mem_heads": {str(layer): hs for layer, hs in chosen.items()},
              "key_mass": {str(layer): ms for layer, ms in key.items()},
              "memory_mass": {str(layer): ms for layer, ms in memory.items()},
              "prompts": [{k: v for k, v in r.items() if k not in ("key_mass", "memory_mass")} for r in records]}
    if args.out is not None:
        write_json(args.out / "heads.json", report)
        plot(args.out / "heads.png", key, memory, chosen)
        print(f"wrote {args.out / 'heads.json'} and {args.out / 'heads.png'}")
    return report


if __name__ == "__main__":
    main()
