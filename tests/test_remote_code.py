"""A saved checkpoint loads from an offline Hub cache with trust_remote_code, where the package cannot be imported."""

import json
import os
import subprocess
import sys

import torch
from conftest import random_ids, tiny_config

from mixture_of_tokens import MoTGPTForCausalLM

REVISION = "0123456789abcdef0123456789abcdef01234567"

# Run in a fresh interpreter: importing mixture_of_tokens is made impossible, so only the copied code can serve.
LOADER = r"""
import importlib.abc, json, sys

class RefuseOurPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mixture_of_tokens":
            raise ImportError("mixture_of_tokens must not be importable here")

sys.meta_path.insert(0, RefuseOurPackage())
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


def lay_out_hub_cache(folder, cache):
    """Place a saved folder where huggingface_hub looks for repo mot-org/tiny-mot at revision `main`."""
    repo = cache / "models--mot-org--tiny-mot"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


def test_offline_hub_checkpoint_loads_without_the_package(tmp_path):
    model = MoTGPTForCausalLM(tiny_config(mot_layers="second_half", learnable_temperature="layer")).eval()
    model.save_pretrained(tmp_path / "saved")
    lay_out_hub_cache(tmp_path / "saved", tmp_path / "hub")
    ids = random_ids(5, 6)

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    result = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(ids.tolist())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert (loaded["config"], loaded["base"], loaded["model"]) == ("MoTGPTConfig", "MoTGPTModel", "MoTGPTForCausalLM")
    assert loaded["module"].startswith("transformers_modules.")
    assert loaded["imported"] == []
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, rtol=0, atol=0)
