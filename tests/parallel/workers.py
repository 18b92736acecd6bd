"""Functions run on every rank by `launch.run_ranks` (importable by spawned processes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from dlmoe.config import ModelConfig, MoEConfig, ParallelConfig, RouterConfig
from dlmoe.model.transformer import DiffusionTransformer
from dlmoe.parallel import init_parallel
from dlmoe.parallel.expert_parallel import ShardedExperts, apply_expert_parallel

# (name, router config, ec_pool) — cases where one process with the global batch is the reference
EP_CASES = {
    "ec_sequence": (dict(kind="expert_choice", num_experts=4, num_experts_per_tok=2), "local"),
    "ec_schedule": (
        dict(kind="expert_choice", num_experts=4, num_experts_per_tok=2, capacity_schedule="linear", k_min=1, k_max=3),
        "local",
    ),
    "ec_schedule_scaling_factor": (
        dict(
            kind="expert_choice",
            num_experts=4,
            num_experts_per_tok=2,
            capacity_schedule="linear",
            k_min=1,
            k_max=3,
            scaling_factor=True,
        ),
        "local",
    ),  # fmt: skip
    "ec_batch_group": (dict(kind="expert_choice", num_experts=4, num_experts_per_tok=2, pool="batch"), "group"),
    "tc_softmax": (dict(kind="token_choice", num_experts=4, num_experts_per_tok=2), "local"),
    "tc_sigmoid_bias_groups": (
        dict(
            kind="token_choice",
            num_experts=8,
            num_experts_per_tok=2,
            score="sigmoid",
            expert_bias=True,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.0,
        ),
        "local",
    ),  # fmt: skip
}


def tiny_model_config(router: dict, backend: str = "auto") -> ModelConfig:
    moe = MoEConfig(router=RouterConfig(**router), expert_hidden=16, backend=backend, num_shared_experts=1)
    return ModelConfig(vocab_size=40, dim=16, num_layers=2, num_heads=2, max_seq_len=16, dense_hidden=32, moe=moe)


def ep_equivalence(out: Path, cases: list[str]) -> None:
    """Per case: the full model on the global batch (reference) vs the EP model on this rank's half."""
    state = init_parallel(ParallelConfig(expert_parallel=dist_world()))
    rank, world = state.rank, state.world_size
    report = {}
    for name in cases:
        router, pool = EP_CASES[name]
        torch.manual_seed(0)
        model = DiffusionTransformer(tiny_model_config(router))
        for module in model.modules():  # a non-zero expert bias, so it steers selection
            if getattr(module, "expert_bias", None) is not None:
                module.expert_bias.copy_(torch.randn_like(module.expert_bias) * 0.05)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(1, 40, (2 * world, 12), generator=generator)
        mask_ratio = torch.rand(2 * world, generator=generator)
        weight = torch.randn(2 * world, 12, 40, generator=generator)

        out_ref = model(ids, mask_ratio)
        ((out_ref.logits * weight).sum() + out_ref.aux_loss).backward()
        grads_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)

        apply_expert_parallel(model, state.ep_group, state.ep_rank, world, ec_pool=pool)
        rows = slice(2 * rank, 2 * rank + 2)
        out_ep = model(ids[rows], mask_ratio[rows])
        ((out_ep.logits * weight[rows]).sum() + out_ep.aux_loss).backward()
        errors = {"logits": (out_ep.logits - out_ref.logits[rows]).abs().max().item()}
        for module_name, module in model.named_modules():
            if isinstance(module, ShardedExperts):
                first, num = module.first_expert, module.num_experts
                for p_name, param in module.named_parameters(recurse=False):
                    full = f"{module_name}.{p_name}"
                    errors[full] = (param.grad - grads_ref[full][first : first + num]).abs().max().item()
        dense = [(n, p) for n, p in model.named_parameters() if n not in errors]
        for n, p in dense:
            grad = p.grad.clone()
            dist.all_reduce(grad)  # dense gradients: Σ over ranks = the global batch's
            errors[n] = (grad - grads_ref[n]).abs().max().item()
        report[name] = {"max_error": max(errors.values()), "worst": max(errors, key=errors.get)}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def dist_world() -> int:
    import os

    return int(os.environ["WORLD_SIZE"])


def train(out: Path, overrides: list[str], rank_overrides: dict | None = None, die: dict | None = None) -> None:
    """`dlmoe train` on this rank: overrides (+ this rank's own, to test a mismatch); `die` =
    {"rank": r, "after_step": s}: that rank exits abruptly after step s (to test a dead rank)."""
    import os

    from dlmoe.config_io import load_run_config
    from dlmoe.train import Trainer
    from dlmoe.train.distributed import DistributedRuntime

    rank = int(os.environ["RANK"])
    extra = (rank_overrides or {}).get(str(rank), [])
    resume = "--resume" in overrides
    config = load_run_config(None, [o for o in overrides if o != "--resume"] + extra)
    state = init_parallel(config.parallel, config.train.device)
    trainer = Trainer(config, progress=False, runtime=DistributedRuntime(state), resume=resume)
    if die is not None and rank == die["rank"]:
        step = trainer.train_step

        def train_step_then_die(**kwargs):
            if trainer.step == die["after_step"]:
                os._exit(3)
            return step(**kwargs)

        trainer.train_step = train_step_then_die
    summary = trainer.fit()
    if state.is_main:
        (out / "summary.json").write_text(json.dumps({"steps": summary.steps, "val_loss": summary.val_loss}))
