"""``fot ask``: read long text files once, keep the model's memory of them, and answer questions about them.

    fot ask book.txt -q "Who wrote the letter?"              # the SmolLM2 long-context checkpoint, models/smollm2-fot
    fot ask notes/*.txt --model models/fot-tiny -q "..."     # several files, read as one document
    fot ask book.txt < questions.txt                          # one question a line from stdin
    fot ask book.txt --model path/to/llama --recipe every-layer -q "..."   # any HF Llama checkpoint, untrained
    python -m fot.ask ...                                     # the same without the console script

The files are read as one document (their texts joined by a blank line, in the order given), which the model reads
once, window by window, with a progress bar in tokens per second. Its memory (the cache: memory layers' keys and
values, the last window) is saved to ``--cache-dir`` (default ``.fot-cache`` in the current directory) as
``<first file's name>-<key>.safetensors``, the key a hash of the files' contents and the model directory. The next
run on the same files and model loads that file instead of reading the document again. A cache built with other
settings (``--recipe``, ``--memory-layers``, ``--top-k``, ``--index``, ``--last-context-length``, ``--dtype``, any
other memory field, a retrained model, another prompt format) or a damaged one is rebuilt, with a note saying why.
Each question continues its own ``fork()`` of the cache (its own copy of the local window, the memory shared read-only), or a ``copy()`` when
the question and the answer do not fit in the window's free room, so no question sees another's tokens.

The prompt is the document, then the question. With a tokenizer that has a chat template (SmolLM2-Instruct does),
both are one user message and the answer is the assistant's turn; without one (the demo model) the question is
the next line after the document, so it should end where the answer begins ("... The pass key is"). The answer is
streamed to stdout as it is generated (greedy); notes and progress go to stderr.

Errors are one line each (exit status 2): a file that is missing or not text, a model directory that is not a
checkpoint, and a memory that would not fit in the free RAM (``fot.budget``'s estimate, checked before the
document is read or its cache loaded; ``FOT_MEMORY_CHECK=0`` skips it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import MEM_INDEXES, MEMORY_FIELDS, RECIPES, recipe

DEFAULT_MODEL = "models/smollm2-fot"
DEFAULT_CACHE_DIR = ".fot-cache"
CACHE_META_FORMAT = "fot-ask/1"
# The user turn of a chat template holds the document, this separator, then the question (QUESTION_MARK is cut at).
QUESTION_SEPARATOR = "\n\n"
QUESTION_MARK = "\x00fot-question\x00"



class AskError(ValueError):
    """A user error of ``fot ask``, reported as one line."""


# ---------------------------------------------------------------------------------------------- documents
@dataclass
class Document:
    text: str
    paths: list[Path]
    sha256: list[str]  # per file, of its bytes


def read_documents(paths: list[str | os.PathLike]) -> Document:
    """The files' texts joined by a blank line; ``AskError`` for a missing, empty or non-text file."""
    texts, shas = [], []
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise AskError(f"{name}: no such file.")
        if not path.is_file():
            raise AskError(f"{name} is not a file; pass text files (a directory's files as {name}/*.txt).")
        data = path.read_bytes()
        texts.append(decode_text(data, name))
        shas.append(hashlib.sha256(data).hexdigest())
    return Document("\n\n".join(texts), [Path(p) for p in paths], shas)


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 text (a leading BOM dropped), or ``AskError``: binary files (NUL bytes) and other encodings."""
    if not data.strip():
        raise AskError(f"{name} is empty; there is nothing to read.")
    if b"\x00" in data[:1 << 20]:
        raise AskError(f"{name} is not a text file (it has NUL bytes); convert it to UTF-8 text first.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise AskError(f"{name} is not UTF-8 text (byte {err.start} is {data[err.start]:#04x}); convert it to "
                       "UTF-8 first (e.g. iconv -f latin1 -t utf-8).") from None


# ---------------------------------------------------------------------------------------------- prompts
class PromptFormat:
    """Token ids of the document part of the prompt (read once) and of each question that continues it.

    Without a chat template the document is followed by a newline and, with ``add_bos``, BOS is prepended when
    the tokenizer has one (fot's tokenizers leave BOS to the caller; the trainer and eval/passkey.py prepend it
    too; ``fot ask`` passes false where the checkpoint declares ``add_bos_token`` false, as SmolLM2's does).
    """

    def __init__(self, tokenizer, document: str, chat: bool, add_bos: bool = True):
        self.tokenizer, self.chat = tokenizer, chat
        self.bos_ids: list[int] = []
        if chat:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": document + QUESTION_SEPARATOR + QUESTION_MARK}], tokenize=False,
                add_generation_prompt=True)  # fmt: skip
            self.prefix_text, self.suffix = rendered.split(QUESTION_MARK)
        else:
            self.prefix_text, self.suffix = document + "\n", ""
            if add_bos and tokenizer.bos_token_id is not None:
                self.bos_ids = [tokenizer.bos_token_id]
        self.text_ids = self._encode(self.prefix_text)
        self.prefix_ids = self.bos_ids + self.text_ids

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def question_ids(self, question: str) -> list[int]:
        """The question's tokens as they follow the document: the tail of the whole prompt's tokens after the
        document's when those are its prefix (how the prompt tokenizes as one text), else the question alone."""
        part = question + self.suffix
        full = self._encode(self.prefix_text + part)
        n = len(self.text_ids)
        if len(full) > n and full[:n] == self.text_ids:
            return full[n:]
        return self._encode(part)


# ---------------------------------------------------------------------------------------------- the cache file
def model_identity(model_dir: Path) -> dict:
    """What identifies a checkpoint's weights without reading them: config.json's hash, weight files' sizes and
    modification times (a retrained model at the same path gets another identity)."""
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {
        "path": str(model_dir.resolve()),
        "config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
        "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights],
    }


def cache_path(cache_dir: Path, document: Document, model_dir: Path) -> Path:
    key = hashlib.sha256(json.dumps([document.sha256, str(model_dir.resolve())]).encode()).hexdigest()[:16]
    return cache_dir / f"{document.paths[0].stem}-{key}.safetensors"


def meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def write_meta(path: Path, meta: dict) -> None:
    """The cache's description beside it (atomic: written to a temporary name, then renamed)."""
    tmp = meta_path(path).with_name(meta_path(path).name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path(path))


def stale_reason(path: Path, expected: dict) -> str | None:
    """Why the cache at ``path`` cannot be used for ``expected`` (a note for the user), or None when it can."""
    try:
        saved = json.loads(meta_path(path).read_text())
    except FileNotFoundError:
        return f"its description {meta_path(path).name} is missing"
    except (OSError, ValueError) as err:
        return f"its description {meta_path(path).name} is unreadable ({err})"
    changed = [name for name in expected if saved.get(name) != expected[name]]
    if not changed:
        return None
    if changed == ["settings"]:
        diff = {k: (saved["settings"].get(k), v) for k, v in expected["settings"].items()
                if saved["settings"].get(k) != v}
        return "it was built with other settings (" + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()) + ")"
    return "it was built with another " + " and ".join(n.replace("_", " ") for n in changed)


# ---------------------------------------------------------------------------------------------- reading
class TokenCounter:
    """Counts the tokens that pass through a module (a forward hook), and drives a progress bar if given one."""

    def __init__(self, module: torch.nn.Module):
        self.tokens = 0
        self.bar = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        n = hidden.shape[0] * hidden.shape[1]  # batch 1: window groups run their windows as rows
        self.tokens += n
        if self.bar is not None:
            self.bar.update(n)

    def remove(self) -> None:
        self._handle.remove()


def read_document(model, ids: list[int], counter: TokenCounter):
    """One forward over the document (the windowing of a long input, as in one call), with a progress bar in
    tokens per second; returns the cache. Logits are kept for the last token only."""
    from tqdm.auto import tqdm

    from .cache import LongLlamaCache
    from .inputs import CACHE_NAME

    cache = LongLlamaCache(model.config)
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    with tqdm(total=len(ids), desc="reading", unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr) as bar:
        counter.bar = bar
        try:
            with torch.no_grad():
                model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache})
        finally:
            counter.bar = None
    return cache


# ---------------------------------------------------------------------------------------------- a session
@dataclass
class Answer:
    question: str
    text: str
    tokens: int
    seconds: float


@dataclass
class Session:
    """A read document and its cache, ready for questions. ``loaded``: the cache came from its file; the
    counter's tokens are every token the model has run so far (document, questions and answers)."""

    model: object
    tokenizer: object
    prompt: PromptFormat
    cache: object
    cache_file: Path | None
    loaded: bool
    counter: TokenCounter
    answers: list[Answer] = field(default_factory=list)

    def ask(self, question: str, max_new_tokens: int, stream: bool = True) -> Answer:
        """Greedily answer ``question`` from a fork (or copy) of the document's cache, streaming to stdout."""
        from transformers import TextStreamer

        from .inputs import CACHE_NAME

        ids = self.prompt.question_ids(question)
        fits = len(ids) + max_new_tokens <= self.cache.free_tokens
        cache = self.cache.fork() if fits else self.cache.copy()
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        mask = torch.ones(1, cache.seen_tokens + len(ids), dtype=torch.long, device=self.model.device)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                      num_beams=1, use_cache=True, pad_token_id=pad, streamer=streamer,
                                      **{CACHE_NAME: cache})  # fmt: skip
        new = out[0, len(ids):]
        answer = Answer(question, tok.decode(new, skip_special_tokens=True), len(new), time.perf_counter() - start)
        self.answers.append(answer)
        return answer


def load_model(model_dir: Path, overrides: dict, dtype: str, recipe_name: str | None = None):
    """The checkpoint and its tokenizer (``AskError`` when the directory is not a fot checkpoint, nor a plain Llama
    one given with a recipe, whose fields ``overrides`` holds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling import LongLlamaForCausalLM

    if not (model_dir / "config.json").is_file():
        hint = " (build it with make smollm2)" if str(model_dir) == DEFAULT_MODEL else ""
        raise AskError(f"{model_dir} is not a model directory{hint}: pass --model DIR, a checkpoint with "
                       "config.json, its weights and a tokenizer.")
    if json.loads((model_dir / "config.json").read_text()).get("model_type") == "llama":
        # A plain Llama checkpoint has no memory settings; its max_position_embeddings is its trained context, not
        # a window. fot reads it unchanged once a recipe says how.
        if not recipe_name:
            raise AskError(f"{model_dir} is a plain Llama checkpoint with no memory settings: add --recipe "
                           f"every-layer, or convert it once (python -m fot.convert --from {model_dir} --recipe "
                           "every-layer --out DIR).")
        model = LongLlamaForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), **overrides)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), **overrides)
    if not isinstance(model, LongLlamaForCausalLM):
        raise AskError(f"{model_dir} holds a {type(model).__name__}, not a fot model; convert it first "
                       "(python -m fot.convert).")
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def check_memory(config, n_tokens: int) -> None:
    """``fot.budget``'s check that the memory of ``n_tokens`` tokens fits the free RAM (the weights are loaded
    already): a one-line ``MemoryBudgetError`` before a cache is read or loaded, not a killed process halfway."""
    from .budget import check_memory_fits

    check_memory_fits(config, n_tokens, include_weights=False)


def memory_layers(values: list[str] | None, model_dir: Path) -> list[int] | None:
    """``--memory-layers``: None (as configured), "all" (every layer of the checkpoint) or layer indices."""
    if not values:
        return None
    if values == ["all"]:
        config = model_dir / "config.json"
        if not config.is_file():
            return None  # load_model reports the missing checkpoint
        return list(range(json.loads(config.read_text())["num_hidden_layers"]))
    if not all(v.isdigit() for v in values):
        raise AskError(f"--memory-layers {' '.join(values)}: give 'all' or layer indices, e.g. "
                       "--memory-layers 7 15 22.")
    return [int(v) for v in values]


def open_session(args) -> Session:
    """Read the files, load the model, then load the document's cache or read the document (and save it)."""
    document = read_documents(args.files)
    model_dir = Path(args.model)
    overrides = {} if args.recipe is None else recipe(args.recipe)  # the flags below override its fields
    overrides.update({k: v for k, v in (("mem_top_k", args.top_k), ("mem_index", args.index),
                                        ("last_context_length", args.last_context_length),
                                        ("mem_layers", memory_layers(args.memory_layers, model_dir)))
                      if v is not None})  # fmt: skip
    model, tokenizer = load_model(model_dir, overrides, args.dtype, args.recipe)
    chat = tokenizer.chat_template is not None and not args.no_chat_template
    from .convert import declared_add_bos

    prompt = PromptFormat(tokenizer, document.text, chat, add_bos=declared_add_bos(model_dir) is not False)
    counter = TokenCounter(model.model.layers[-1])  # every token the model runs passes the last layer
    n = len(prompt.prefix_ids)
    expected = {
        "format": CACHE_META_FORMAT, "files": document.sha256, "model": model_identity(model_dir),
        # every memory field as JSON reads it back (mem_heads' layer keys become strings), so a cache built under
        # any other memory setting (a recipe's included) is rebuilt
        "settings": json.loads(json.dumps({**{f: getattr(model.config, f) for f in MEMORY_FIELDS},
                                           "dtype": args.dtype})),
        "prompt": {"chat_template": chat, "tokens": n,
                   "sha256": hashlib.sha256(json.dumps(prompt.prefix_ids).encode()).hexdigest()},
    }  # fmt: skip
    path = None if args.no_cache else cache_path(Path(args.cache_dir), document, model_dir)
    check_memory(model.config, n)
    cache = None
    if path is not None and path.exists():
        reason = stale_reason(path, expected)
        if reason is None:
            from .cache import LongLlamaCache

            try:
                cache = LongLlamaCache.load(path, model.config, device=model.device)
                note(f"loaded the memory of {n} tokens from {path}")
            except ValueError as err:
                reason = f"it is damaged ({err})"
        if cache is None:
            note(f"the cache {path} cannot be used: {reason}; reading the document again")
    loaded = cache is not None
    if cache is None:
        start = time.perf_counter()
        cache = read_document(model, prompt.prefix_ids, counter)
        seconds = time.perf_counter() - start
        note(f"read {n} tokens in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} tokens/s)")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            meta_path(path).unlink(missing_ok=True)  # a cache file is only valid with its description
            cache.save(path)
            write_meta(path, expected)
            note(f"saved the memory to {path}")
    return Session(model, tokenizer, prompt, cache, path, loaded, counter)


def note(text: str) -> None:
    print(f"fot ask: {text}", file=sys.stderr, flush=True)


def questions_from_stdin():
    """Questions one per line (blank lines skipped), with a prompt when stdin is a terminal."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("question> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fot ask", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("files", nargs="+", help="text files (UTF-8), read as one document in this order")
    p.add_argument("-q", "--question", action="append",
                   help="a question (repeat for several); without it, questions are read from stdin, one a line")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"fot checkpoint directory (default {DEFAULT_MODEL})")
    p.add_argument("--max-new-tokens", type=int, default=200, help="longest answer in tokens (default 200)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                   help=f"where documents' memories are kept (default {DEFAULT_CACHE_DIR})")
    p.add_argument("--no-cache", action="store_true", help="neither load nor save the memory")
    p.add_argument("--memory-layers", nargs="+", metavar="L",
                   help="memory in these layers instead of the configured ones: 'all' or indices (mem_layers)")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="a named memory setting (fot.config.RECIPES) for the model, which may then be a plain Llama "
                        "checkpoint; the options below override its fields")
    p.add_argument("--top-k", type=int, help="kNN memory: attend to the K best memory keys (mem_top_k)")
    p.add_argument("--index", choices=MEM_INDEXES, help="key search of --top-k (mem_index)")
    p.add_argument("--last-context-length", type=int, help="override the model's last_context_length")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default float32: bf16 matmuls are slow on most CPUs)")
    p.add_argument("--no-chat-template", action="store_true", help="plain prompt even if the tokenizer has a template")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    return p


def run(args) -> Session:
    if args.max_new_tokens < 1:
        raise AskError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    if args.top_k is not None and args.top_k < 1:
        raise AskError(f"--top-k must be >= 1, got {args.top_k}.")
    if args.index is not None and args.top_k is None:
        raise AskError("--index picks the search of kNN memory: give --top-k K with it.")
    if args.threads:
        torch.set_num_threads(args.threads)
    session = open_session(args)
    for question in args.question or questions_from_stdin():
        session.ask(question, args.max_new_tokens)
    return session


def main(argv: list[str] | None = None) -> Session:
    """The console script ``fot ask``; one-line errors on stderr with exit status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weights load in a second; stderr keeps fot's own lines
    try:
        return run(args)
    except (AskError, MemoryError) as err:  # fot.budget's MemoryBudgetError is a MemoryError
        print(f"fot ask: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("fot ask: interrupted (a memory being saved is written atomically: nothing half-written is left)",
              file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
