"""A saved checkpoint loads from an offline Hub cache with trust_remote_code, where the package cannot be imported."""

import json

import pytest
import torch
from helpers import lay_out_hub_cache, random_ids, run_without_package, tiny_config

from mixture_of_tokens import MoTGPTForCausalLM

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
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, rtol=0, atol=0)
