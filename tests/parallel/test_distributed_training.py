"""Training on 2 gloo processes: equal to one process, checkpoints across world sizes, bad input.

Each test launches 2 local ranks (≈ 5–10 s each), so they are marked slow."""

import csv
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from dlmoe.checkpoint import checkpoint_layout, latest_checkpoint
from dlmoe.config_io import load_run_config, run_config_from_dict
from dlmoe.model.hf import DlmoeConfig, DlmoeForDiffusionLM
from dlmoe.train import Trainer
from dlmoe.train.distributed import LocalRuntime
from tests.parallel import workers
from tests.parallel.launch import assert_all_ok, errors, run_ranks
from tests.train.test_trainer import overrides

pytestmark = pytest.mark.slow


def losses(run: Path) -> list[float]:
    with (run / "metrics.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(run / "model" / "model.safetensors")


def single(tmp_path: Path, run: str, **extra) -> Path:
    Trainer(load_run_config(None, overrides(tmp_path, run, **extra)), progress=False).fit()
    return tmp_path / run


def launch(tmp_path: Path, run: str, *, timeout=120, rank_overrides=None, die=None, resume=False, **extra) -> tuple:
    out = tmp_path / f"{run}-ranks{'-resume' if resume else ''}"
    out.mkdir(exist_ok=True)
    args = overrides(tmp_path, run, **extra) + (["--resume"] if resume else [])
    return run_ranks(workers.train, out, args, rank_overrides, die, world_size=2, timeout=timeout), out


FP32 = {"train.dtype": "fp32", "train.steps": 4, "train.threads": 1}


@pytest.mark.parametrize(
    "layout",
    [
        {"parallel.data_parallel": "ddp", "parallel.expert_parallel": 1},
        {"parallel.data_parallel": "ddp", "parallel.expert_parallel": 2},
        {"parallel.data_parallel": "fsdp", "parallel.expert_parallel": 2},
        {"parallel.data_parallel": "fsdp", "parallel.expert_parallel": 2, "train.grad_accum": 2},
        {  # loss-free balancing: the bias update must see the counts of all ranks
            "parallel.expert_parallel": 2,
            "model.moe.router.score": "sigmoid",
            "model.moe.router.expert_bias": True,
            "model.moe.router.bias_update_rate": 0.05,
        },
    ],
    ids=["ddp", "ddp+ep2", "fsdp+ep2", "fsdp+ep2+grad_accum", "ddp+ep2+expert_bias"],
)
def test_data_parallel_training_matches_one_process(tmp_path, layout):
    """Same global batch, same noise: the loss curve and the final weights of one process (fp32)."""
    same = {k: v for k, v in layout.items() if not k.startswith("parallel.")}  # model and training settings
    reference = single(tmp_path, "one", **FP32, **same)
    codes, out = launch(tmp_path, "two", **FP32, **layout)
    assert_all_ok(codes, out)
    one, two = losses(reference), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-4, (one, two)
    w1, w2 = weights(reference), weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    # Adam divides by √v: a parameter with a tiny gradient turns reduction-order rounding into a visible
    # update difference; 1e-3 is a tenth of one step's update (lr 1e-2)
    worst = max(w1, key=lambda k: (w1[k] - w2[k]).abs().max().item())
    assert (w1[worst] - w2[worst]).abs().max().item() < 1e-3, worst


def test_expert_choice_group_pool_training_matches_one_process(tmp_path):
    """EC with pool=batch over the EP group = one process routing the global batch (2 steps: EC's
    top-C may flip on the 1e-7 differences of a reordered reduction once the weights have moved)."""
    ec = {"model.moe.router.kind": "expert_choice", "model.moe.router.pool": "batch", "train.steps": 2}
    reference = single(tmp_path, "one", **(FP32 | ec))
    codes, out = launch(tmp_path, "two", **(FP32 | ec), **{"parallel.expert_parallel": 2, "parallel.ec_pool": "group"})
    assert_all_ok(codes, out)
    one, two = losses(reference), losses(tmp_path / "two")
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5, (one, two)


@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp"])
def test_fine_tune_under_torchrun_matches_one_process(tmp_path, data_parallel):
    """train.init_from with EP 2: each rank reads only its experts of the source; same curve as one process."""
    base = single(tmp_path, "base", **FP32)
    tune = FP32 | {"train.init_from": str(base), "train.steps": 3, "train.lr": 1e-3}
    reference = losses(single(tmp_path, "one", **tune))
    codes, out = launch(
        tmp_path, "two", **tune, **{"parallel.expert_parallel": 2, "parallel.data_parallel": data_parallel}
    )
    assert_all_ok(codes, out)
    two = losses(tmp_path / "two")
    assert len(two) == 3 and max(abs(a - b) for a, b in zip(reference, two, strict=True)) < 1e-4, (reference, two)


def test_checkpoint_from_two_ranks_resumes_on_one_and_back(tmp_path):
    """World 2 (EP 2) → world 1 → world 2 (FSDP2, EP 1): each resume continues the one-process run."""
    # a constant LR: the runs stop early by setting train.steps, which would reshape a decaying schedule
    steps6 = FP32 | {"train.steps": 6, "train.checkpoint_every": 2, "train.keep_last": 5}
    steps6 |= {"train.lr_schedule": "constant", "train.warmup_steps": 0, "train.lr": 3e-3}
    reference = losses(single(tmp_path, "ref", **steps6))

    # 1. two ranks, steps 1-2, sharded checkpoint
    codes, out = launch(tmp_path, "run", **(steps6 | {"train.steps": 2, "parallel.expert_parallel": 2}))
    assert_all_ok(codes, out)
    run = tmp_path / "run"
    assert checkpoint_layout(latest_checkpoint(run)) == "dcp"
    # its exported model holds the full experts and equals the checkpoint loaded by one process
    model = DlmoeForDiffusionLM.from_pretrained(run / "model")
    exported = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    LocalRuntime().load_checkpoint(latest_checkpoint(run), model)
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())

    # 2. one process resumes (steps 3-4) and writes a single-process checkpoint
    Trainer(
        load_run_config(None, overrides(tmp_path, "run", **(steps6 | {"train.steps": 4}))), resume=True, progress=False
    ).fit()
    assert checkpoint_layout(latest_checkpoint(run)) == "safetensors"

    # 3. two ranks with another layout resume that (steps 5-6)
    codes, out = launch(tmp_path, "run", **(steps6 | {"parallel.data_parallel": "fsdp"}), resume=True)
    assert_all_ok(codes, out)
    resumed = losses(run)
    assert len(resumed) == 6
    assert max(abs(a - b) for a, b in zip(resumed, reference, strict=True)) < 1e-4, (resumed, reference)


def test_mismatched_configs_fail_on_every_rank_with_one_message(tmp_path):
    codes, out = launch(tmp_path, "bad", rank_overrides={"1": ["train.lr=0.5"]}, **FP32)
    assert codes == [1, 1], (codes, errors(out))
    for rank in (0, 1):
        text = (out / f"rank{rank}.err").read_text()
        assert "different run configs" in text and "train.lr=0.5" in text, text


def test_a_dead_rank_gives_a_clear_error_and_a_loadable_checkpoint(tmp_path):
    settings = FP32 | {"train.steps": 6, "train.checkpoint_every": 2, "parallel.timeout_s": 20}
    codes, out = launch(tmp_path, "dies", die={"rank": 1, "after_step": 2}, timeout=90, **settings)
    assert codes[1] == 3, (codes, errors(out))
    assert codes[0] == 1, (codes, errors(out))
    text = (out / "rank0.err").read_text()
    assert "DistributedError" in text and "step_00000002" in text and "--resume" in text, text
    last = latest_checkpoint(tmp_path / "dies")
    assert last is not None and last.name == "step_00000002"
    saved = run_config_from_dict(json.loads((tmp_path / "dies" / "config.json").read_text()))
    model = DlmoeForDiffusionLM(DlmoeConfig.from_model_config(saved.model))
    state = LocalRuntime().load_checkpoint(last, model)
    assert state["step"] == 2
