"""A saved checkpoint loads from an offline Hub cache with trust_remote_code, where the package cannot be imported."""

import json
from pathlib import Path

import pytest
import torch
from helpers import lay_out_hub_cache, random_ids, run_without_package, tiny_config

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.conversion import mot_to_token_choice

LOADER = r"""
import json
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

ids = torch.tensor(json.loads(sys.argv[1]))
config = AutoConfig.from_pretrained("mot-org/tiny-mot", trust_remote_code=True)
base = AutoModel.from_pretrained("mot-org/tiny-mot", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("mot-org/tiny-mot", trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({
    "config": type(config).__name__,
    "base": type(base).__name__,
    "model": type(model).__name__,
    "module": type(model).__module__,
    "imported": sorted(m for m in sys.modules if m.startswith("mixture_of_tokens")),
    "logits": logits.tolist(),
}))
"""


@pytest.mark.slow
def test_offline_hub_checkpoint_loads_without_the_package(tmp_path):
    model = MoTGPTForCausalLM(tiny_config(mot_layers="second_half", learnable_temperature="layer")).eval()
    model.save_pretrained(tmp_path / "saved")
    lay_out_hub_cache(tmp_path / "saved", tmp_path / "hub", "mot-org/tiny-mot")
    ids = random_ids(5, 6)

    stdout = run_without_package(LOADER, tmp_path / "hub", json.dumps(ids.tolist()))
    loaded = json.loads(stdout.strip().splitlines()[-1])
    assert (loaded["config"], loaded["base"], loaded["model"]) == ("MoTGPTConfig", "MoTGPTModel", "MoTGPTForCausalLM")
    assert loaded["module"].startswith("transformers_modules.")
    assert loaded["imported"] == []
    with torch.no_grad():
        expected = model(ids).logits
    # Another process may run with another thread count (other matmul blocking): equal up to float32 rounding.
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, rtol=1e-5, atol=1e-5)


# The second environment `scripts/setup_env.sh` lays out: transformers 5.19 (what vLLM 0.33 and SGLang 0.5.23 pin), no
# mixture_of_tokens.
OLD_TRANSFORMERS = Path(__file__).resolve().parents[1] / ".venv-transformers-5.19" / "bin" / "python"

OLD_LOADER = r"""
import json
import torch
import transformers
from transformers import AutoModelForCausalLM

ids = torch.tensor(json.loads(sys.argv[1]))
logits = {}
for name in ("mot-org/mot", "mot-org/token-choice"):
    model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True).eval()
    with torch.no_grad():
        logits[name] = model(ids).logits.tolist()
print(json.dumps({"version": transformers.__version__, "logits": logits}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not OLD_TRANSFORMERS.exists(), reason="needs .venv-transformers-5.19 (bash scripts/setup_env.sh)")
def test_remote_code_gives_the_same_logits_under_transformers_5_19(tmp_path):
    mot = MoTGPTForCausalLM(tiny_config(n_experts=6, learnable_temperature="layer")).eval()
    converted = mot_to_token_choice(mot, calibration_ids=random_ids(12, 6, seed=3)).eval()
    ids = random_ids(3, 6)
    expected = {}
    for name, model in (("mot-org/mot", mot), ("mot-org/token-choice", converted)):
        model.save_pretrained(tmp_path / name)
        lay_out_hub_cache(tmp_path / name, tmp_path / "hub", name)
        with torch.no_grad():
            expected[name] = model(ids).logits

    stdout = run_without_package(OLD_LOADER, tmp_path / "hub", json.dumps(ids.tolist()), python=str(OLD_TRANSFORMERS))
    loaded = json.loads(stdout.strip().splitlines()[-1])
    assert loaded["version"] == "5.19.0"
    for name, logits in expected.items():
        # Another transformers release may compute attention another way: equal up to float32 rounding.
        torch.testing.assert_close(torch.tensor(loaded["logits"][name]), logits, rtol=1e-5, atol=1e-5)
