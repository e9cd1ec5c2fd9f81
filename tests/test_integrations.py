"""fot with the libraries around transformers: Auto* loading of saved checkpoints, and PEFT's LoRA."""

import subprocess
import sys
import textwrap

import pytest
import torch

import fot
from tests.tiny import max_err, tiny_model, tokens


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_auto_loading_a_saved_checkpoint_needs_import_fot(tmp_path):
    """A fot checkpoint names model_type "longllama", which transformers learns from ``import fot`` (the README
    says so): without it AutoModelForCausalLM refuses the folder, with it the same logits come back."""
    model = tiny_model(dtype=torch.float32, mem_layers=[1])
    model.save_pretrained(tmp_path)
    ids = tokens(1, 100)
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    load = f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
    """
    without = _run(load)
    assert without.returncode != 0 and "longllama" in without.stderr
    with_fot = _run("import fot\n" + textwrap.dedent(load) + f"""
print(type(model).__name__)
torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits.detach(), {str(tmp_path / "out.pt")!r})
""")
    assert with_fot.returncode == 0, with_fot.stderr
    assert "LongLlamaForCausalLM" in with_fot.stdout
    assert max_err(torch.load(tmp_path / "out.pt"), expected) == 0.0


def test_lora_on_attention_projections_trains_only_adapters_and_merges_exactly():
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'fot[dev]')")
    model = tiny_model(dtype=torch.float32, mem_layers=[1])
    ids = tokens(2, 150, seed=3)
    with torch.no_grad():
        base = model(ids).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      task_type="CAUSAL_LM"))  # fmt: skip
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    with torch.no_grad():
        assert max_err(lora(input_ids=ids).logits, base) == 0.0  # LoRA's B starts at zero
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    for _ in range(2):
        lora(input_ids=ids, labels=ids).loss.backward()  # through memory windows
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in lora.named_parameters() if not p.requires_grad)
    with torch.no_grad():
        tuned = lora(input_ids=ids).logits
        assert max_err(tuned, base) > 1e-3
        merged = lora.merge_and_unload()
        assert isinstance(merged, fot.LongLlamaForCausalLM)
        assert max_err(merged(ids).logits, tuned) < 1e-4
