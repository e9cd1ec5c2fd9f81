"""lm-evaluation-harness runs fot models on the offline passkey task (eval/lmeval_passkey.py), from Python and from
its command line, and scores every prompt as eval/passkey.py does (greedy, exactly the answer's token count)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is an extra: pip install -e '.[lmeval]'")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from eval.lmeval_passkey import GROUP, write_tasks  # noqa: E402
from eval.passkey import PromptEncoder, greedy_answer, is_correct, make_trials  # noqa: E402
from fot.export import export_code  # noqa: E402
from tests.test_remote_code import needs_code_loading  # noqa: E402


MODEL = Path(__file__).resolve().parent.parent / "models" / "fot-tiny"
LENGTHS, TRIALS, SEED = [192, 640], 3, 7  # several windows of 128 tokens; the keys sit in memory or the last window
MAX_LENGTH = 1 << 20  # lm-eval reads max_position_embeddings (fot's window) as the context limit unless told


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The demo model with its code, the task files, and eval/passkey.py's verdict per key."""
    root = tmp_path_factory.mktemp("lm_eval")
    exported = export_code(MODEL, root / "fot-tiny-code")
    counts = write_tasks(AutoTokenizer.from_pretrained(exported), root / "tasks", LENGTHS, TRIALS, SEED)
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    encoder = PromptEncoder(AutoTokenizer.from_pretrained(MODEL))  # the shipped tokenizer: eval/passkey.py's ids
    verdict = {}
    for trials in make_trials(encoder, LENGTHS, TRIALS, SEED).values():
        for tr in trials:
            verdict[tr.key] = is_correct(greedy_answer(model, tr.prompt_ids, len(tr.answer_ids)), tr.answer_ids)
    assert sum(counts.values()) == len(verdict) == len(LENGTHS) * TRIALS
    assert 0 < sum(verdict.values()), "the demo model should get some of these right"
    return {"root": root, "exported": exported, "tasks": root / "tasks", "model": model, "verdict": verdict}


def lm_eval_verdict(samples: dict) -> dict[int, bool]:
    return {s["doc"]["key"]: s["exact_match"] == 1.0 for task in samples.values() for s in task}


def test_python_api_scores_as_eval_passkey(setup):
    tokenizer = AutoTokenizer.from_pretrained(setup["exported"])  # adds BOS itself, as lm-eval expects
    lm = HFLM(pretrained=setup["model"], tokenizer=tokenizer, max_length=MAX_LENGTH, batch_size=1)
    out = simple_evaluate(model=lm, tasks=[GROUP], log_samples=True,
                          task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False))
    assert lm_eval_verdict(out["samples"]) == setup["verdict"]
    expected = sum(setup["verdict"].values()) / len(setup["verdict"])
    assert out["results"][GROUP]["exact_match,none"] == pytest.approx(expected)
    for task in out["samples"].values():  # the prompts reached the model as eval/passkey.py's ids
        for s in task:
            assert tokenizer.encode(s["arguments"][0][0])[:1] == [tokenizer.bos_token_id]


@needs_code_loading
def test_command_line_with_trust_remote_code_scores_as_eval_passkey(setup):
    out = setup["root"] / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(setup["root"] / "modules"), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={setup['exported']},trust_remote_code=True,max_length={MAX_LENGTH},dtype=float32",
         "--tasks", GROUP, "--include_path", str(setup["tasks"]), "--batch_size", "1", "--device", "cpu",
         "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    expected = sum(setup["verdict"].values()) / len(setup["verdict"])
    assert results["results"][GROUP]["exact_match,none"] == pytest.approx(expected)
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        samples[path.name] = [json.loads(line) for line in path.read_text().splitlines()]
    assert lm_eval_verdict(samples) == setup["verdict"]
    assert (setup["root"] / "modules" / "transformers_modules").is_dir()  # the checkpoint's code ran
