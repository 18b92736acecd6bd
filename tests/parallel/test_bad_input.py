"""Bad parallel input fails early, in one process, with a message naming the value and what is allowed."""

import json

import pytest
import torch

from dlmoe.checkpoint import latest_checkpoint
from dlmoe.config import ParallelConfig
from dlmoe.config_io import load_run_config
from dlmoe.moe.experts import Experts
from dlmoe.parallel import init_parallel, launched_by_torchrun
from dlmoe.parallel.all_to_all import all_to_all
from dlmoe.parallel.expert_parallel import ShardedExperts
from dlmoe.parallel.mesh import _differences, check_layout
from dlmoe.train import Trainer
from dlmoe.train.distributed import LocalRuntime


def test_parallel_config_values_are_checked():
    with pytest.raises(ValueError, match="parallel.expert_parallel"):
        ParallelConfig(expert_parallel=0)
    with pytest.raises(ValueError, match="parallel.data_parallel.*ddp"):
        ParallelConfig(data_parallel="zero3")
    with pytest.raises(ValueError, match="parallel.ec_pool"):
        ParallelConfig(ec_pool="world")
    with pytest.raises(ValueError, match="parallel.timeout_s"):
        ParallelConfig(timeout_s=0)


def test_group_pool_needs_an_expert_choice_batch_pool():
    with pytest.raises(ValueError, match="ec_pool='group'.*token_choice"):
        load_run_config(None, ["parallel.ec_pool=group"])
    with pytest.raises(ValueError, match="pool='sequence'"):
        load_run_config(None, ["parallel.ec_pool=group", "model.moe.router.kind=expert_choice"])
    load_run_config(
        None, ["parallel.ec_pool=group", "model.moe.router.kind=expert_choice", "model.moe.router.pool=batch"]
    )


def test_expert_parallel_needs_an_moe_model():
    with pytest.raises(ValueError, match="needs an MoE model"):
        load_run_config(None, ["parallel.expert_parallel=2", "model.moe=null"])


def test_ep_size_must_divide_the_world_and_the_experts():
    with pytest.raises(ValueError, match="expert_parallel=3 does not divide the world size 4"):
        check_layout(4, 3)
    with pytest.raises(ValueError, match="expert_parallel=8 does not divide the world size 4"):
        check_layout(4, 8)
    check_layout(4, 2)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by parallel.expert_parallel=4"):
        ShardedExperts(Experts(6, 8, 8), group=None, ep_rank=0, ep_size=4)


def test_init_parallel_refuses_a_bad_layout_before_joining(monkeypatch):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launched_by_torchrun()
    with pytest.raises(ValueError, match="does not divide the world size 2"):
        init_parallel(ParallelConfig(expert_parallel=4))
    with pytest.raises(ValueError, match="backend='nccl' needs CUDA"):
        init_parallel(ParallelConfig(backend="nccl"), device="cpu")
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(ValueError, match="MASTER_PORT"):
        init_parallel(ParallelConfig())


def test_config_differences_name_every_key():
    a = {"train": {"lr": 0.1, "steps": 5}, "run_dir": "x"}
    b = {"train": {"lr": 0.2, "steps": 5}, "run_dir": "y"}
    assert _differences(a, b) == ["run_dir='y' (rank 0: 'x')", "train.lr=0.2 (rank 0: 0.1)"]


def test_global_batch_must_split_evenly(tmp_path):
    class ThreeRanks(LocalRuntime):
        world_size = 3

    config = load_run_config(None, [f"run_dir={tmp_path / 'run'}", "train.batch_size=4"])
    with pytest.raises(ValueError, match="batch_size=4 .* not divisible by the world size 3"):
        Trainer(config, runtime=ThreeRanks())
    assert not (tmp_path / "run").exists()  # nothing written


def test_all_to_all_checks_its_splits():
    with pytest.raises(ValueError, match="3 rows but input_splits \\[1, 1\\] add up to 2"):
        all_to_all(torch.zeros(3, 2), [1, 1], [1, 1])


def test_corrupt_sharded_checkpoint_is_skipped(tmp_path):
    """A truncated DCP shard: latest_checkpoint skips the step, loading it names the file."""
    from tests.parallel.test_sharded_checkpoint import write_sharded_run

    run = write_sharded_run(tmp_path)
    newest = latest_checkpoint(run)
    shard = next((newest / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    assert latest_checkpoint(run) != newest
    meta = json.loads((newest / "meta.json").read_text())
    assert meta["layout"] == "dcp" and f"dcp/{shard.name}" in meta["files"]
