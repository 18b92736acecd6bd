"""DCP-layout checkpoints in one process: exact round trip, legacy checkpoints through the same loader,
and clear errors for a model that does not match."""

from pathlib import Path

import pytest
import torch

from dlmoe.checkpoint import checkpoint_layout, latest_checkpoint, load_checkpoint, save_checkpoint
from dlmoe.checkpoint.dcp_layout import load_sharded_checkpoint, save_sharded_checkpoint
from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
from dlmoe.model.hf import DlmoeConfig, DlmoeForDiffusionLM


def tiny(num_layers: int = 2, num_experts: int = 4) -> DlmoeForDiffusionLM:
    moe = MoEConfig(router=RouterConfig(num_experts=num_experts, num_experts_per_tok=2), expert_hidden=8)
    config = ModelConfig(vocab_size=20, dim=8, num_layers=num_layers, num_heads=2, max_seq_len=8, moe=moe)
    return DlmoeForDiffusionLM(DlmoeConfig.from_model_config(config))


def optimizer_for(model: torch.nn.Module) -> torch.optim.AdamW:
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2]}]
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)


def trained(steps: int = 2) -> tuple[DlmoeForDiffusionLM, torch.optim.AdamW]:
    torch.manual_seed(0)
    model, ids = tiny(), torch.randint(1, 20, (2, 8))
    optimizer = optimizer_for(model)
    for _ in range(steps):
        model(ids, torch.full((2,), 0.5)).logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    optimizer.param_groups[0]["lr"] = 3e-3  # as a scheduler would have left it
    return model, optimizer


def write_sharded_run(tmp_path: Path) -> Path:
    model, optimizer = trained()
    for step in (1, 2):
        save_sharded_checkpoint(tmp_path, step, model, optimizer, {"extra": step}, None, keep_last=3)
    return tmp_path


def assert_same(model_a, opt_a, model_b, opt_b) -> None:
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups, strict=True):
        assert {k: v for k, v in ga.items() if k != "params"} == {k: v for k, v in gb.items() if k != "params"}


def test_sharded_round_trip_is_exact(tmp_path):
    model, optimizer = trained()
    path = save_sharded_checkpoint(tmp_path, 7, model, optimizer, {"extra": [1, 2]}, None, keep_last=2)
    assert checkpoint_layout(path) == "dcp" and latest_checkpoint(tmp_path) == path
    fresh = tiny()
    fresh_opt = optimizer_for(fresh)
    state = load_sharded_checkpoint(path, fresh, fresh_opt, None)
    assert state["step"] == 7 and state["extra"] == [1, 2]
    assert_same(model, optimizer, fresh, fresh_opt)
    with pytest.raises(ValueError, match="is sharded"):
        load_checkpoint(path, tiny())


def test_single_process_checkpoint_loads_through_the_sharded_loader(tmp_path):
    model, optimizer = trained()
    path = save_checkpoint(tmp_path, 3, model, {"optimizer": optimizer.state_dict()})
    fresh = tiny()
    fresh_opt = optimizer_for(fresh)
    load_sharded_checkpoint(path, fresh, fresh_opt, None)
    assert_same(model, optimizer, fresh, fresh_opt)


def test_a_mismatched_model_is_refused_before_loading(tmp_path):
    path = latest_checkpoint(write_sharded_run(tmp_path))
    deeper = tiny(num_layers=3)
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.2"):
        load_sharded_checkpoint(path, deeper, None, None)
    wider = tiny(num_experts=8)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match=r"gate_up_proj: checkpoint \(4, 16, 8\) vs model \(8, 16, 8\)"):
        load_sharded_checkpoint(path, wider, None, None)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())  # untouched


def test_a_failed_save_leaves_the_run_and_earlier_checkpoints_alone(tmp_path, monkeypatch):
    import dlmoe.checkpoint.dcp_layout as sharded

    run = write_sharded_run(tmp_path / "run")
    (run / "config.json").write_text("{}")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    model, optimizer = trained()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sharded.dcp, "save", disk_full)
    with pytest.raises(OSError, match=r"disk full while writing .*step_00000003 \(checkpoint step 3: No space"):
        save_sharded_checkpoint(run, 3, model, optimizer, {}, None, keep_last=3)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # no scratch left, nothing lost
    monkeypatch.undo()

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "keep.txt").write_text("x")
    (blocked / "checkpoints").write_text("a file where the checkpoint folder would go")
    with pytest.raises(RuntimeError, match="saving checkpoint step 1 under"):
        save_sharded_checkpoint(blocked, 1, model, optimizer, {}, None, keep_last=3)
    assert (blocked / "keep.txt").read_text() == "x" and (blocked / "checkpoints").is_file()
