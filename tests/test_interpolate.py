"""train.interpolate: weight interpolation of a fine-tune with its base, against a float64 sum by hand."""

import pytest
import torch

import fot
from tests.tiny import tiny_model
from train.interpolate import interpolate, main


def pair():
    return tiny_model(seed=1, mem_layers=[1]), tiny_model(seed=2, mem_layers=[1])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_every_parameter_is_on_the_line_between_the_two(alpha):
    base, tuned = pair()
    a = {k: v.clone() for k, v in base.state_dict().items()}
    b = {k: v.clone() for k, v in tuned.state_dict().items()}
    mixed = interpolate(base, tuned, alpha).state_dict()
    for k in a:
        assert torch.equal(mixed[k], (1 - alpha) * a[k] + alpha * b[k])  # float64 models: exact
    assert all(torch.equal(base.state_dict()[k], a[k]) for k in a)  # the base is left as it was


def test_mismatched_models_and_alphas_are_refused():
    base, _ = pair()
    with pytest.raises(ValueError, match="configs differ.*num_hidden_layers"):
        interpolate(base, tiny_model(mem_layers=[1], num_hidden_layers=base.config.num_hidden_layers + 1), 0.5)
    with pytest.raises(ValueError, match=r"alpha=1.5: use a value in \[0, 1\]"):
        interpolate(base, tiny_model(seed=2, mem_layers=[1]), 1.5)


def test_command_line_writes_a_loadable_model_and_refuses_to_overwrite(tmp_path, capsys):
    base, tuned = pair()
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    args = ["--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--alpha", "0.25"]
    main(args + ["--out", str(tmp_path / "mixed")])
    got = fot.LongLlamaForCausalLM.from_pretrained(tmp_path / "mixed", dtype=torch.float64).state_dict()
    for k, v in base.state_dict().items():
        assert torch.allclose(got[k], 0.75 * v + 0.25 * tuned.state_dict()[k], atol=1e-15)
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--out", str(tmp_path / "mixed")])
    assert exit_info.value.code == 2 and "exists; remove it or choose another --out" in capsys.readouterr().err
