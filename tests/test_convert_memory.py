"""Importing a checkpoint holds the model once in RAM (plus the shard being read), not twice."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WRITE = """
import sys, torch
from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
from dlmoe.model.hf import DlmoeConfig, DlmoeForDiffusionLM
from dlmoe.model.convert import export_checkpoint
router = RouterConfig(num_experts=64, num_experts_per_tok=8, renormalize=False)
config = ModelConfig(vocab_size=1000, dim=256, num_layers=4, num_heads=4, mask_id=999, eos_id=998,
                     moe=MoEConfig(router=router, expert_hidden=256))
export_checkpoint(DlmoeForDiffusionLM(DlmoeConfig.from_model_config(config)), sys.argv[1],
                  format="lladamoe", max_shard_bytes=25_000_000)
"""

READ = """
import json, sys
def peak_mib():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
import torch
from dlmoe.model.convert import import_checkpoint
before = peak_mib()
model = import_checkpoint(sys.argv[1]).model
size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
print(json.dumps({"peak_increase_mib": peak_mib() - before, "model_mib": size}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux) to read the peak RSS")
def test_import_peak_memory_is_one_model_plus_a_shard(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    subprocess.run([sys.executable, "-c", WRITE, str(checkpoint)], check=True, timeout=300)
    largest_shard = max(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / 2**20
    out = subprocess.run([sys.executable, "-c", READ, str(checkpoint)], check=True, timeout=300, capture_output=True)
    figures = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert figures["model_mib"] > 150  # big enough that a second copy would show
    # one copy of the weights + the mapped pages of the shard in use + allocator slack
    assert figures["peak_increase_mib"] < figures["model_mib"] + largest_shard + 48, figures
