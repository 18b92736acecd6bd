"""One torchrun rank of `bench/distributed.py`: build the model, run the timed steps, report rank 0's row.

The launcher (`bench/distributed.py`) starts this code through `torchrun` with `--worker`; the
model and the shapes are defined here so both sides build the same thing.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

from dlmoe.config import ModelConfig, MoEConfig, ParallelConfig, RouterConfig

WORLD_SIZE = 2
ROUTERS = {"ec": "expert_choice", "tc": "token_choice"}
EXPERT_PARALLEL = (1, 2)
SHAPES = ("vocab", "dim", "layers", "heads", "experts", "k", "expert_hidden", "seq_len", "batch")
QUICK = {
    "vocab": 256,
    "dim": 32,
    "layers": 2,
    "heads": 2,
    "experts": 4,
    "k": 2,
    "expert_hidden": 32,
    "seq_len": 32,
    "batch": 4,
    "warmup": 1,
    "steps": 3,
}


# ----------------------------------------------------------------------------- model


def router_config(router: str, args: argparse.Namespace) -> RouterConfig:
    if router == "ec":
        return RouterConfig(kind="expert_choice", num_experts=args.experts, num_experts_per_tok=args.k, pool="sequence")
    # dropless, no balancing loss: a fresh router's skew reaches the experts unchanged
    return RouterConfig(
        kind="token_choice",
        num_experts=args.experts,
        num_experts_per_tok=args.k,
        capacity_factor=None,
        aux_loss_coef=0.0,
    )


def model_config(router: str, args: argparse.Namespace) -> ModelConfig:
    moe = MoEConfig(router=router_config(router, args), expert_hidden=args.expert_hidden, backend=args.backend)
    return ModelConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        num_layers=args.layers,
        num_heads=args.heads,
        max_seq_len=args.seq_len,
        moe=moe,
    )


# ----------------------------------------------------------------------------- worker (one torchrun rank)


def worker(args: argparse.Namespace) -> None:
    """One rank: build the parallel model, run warmup + timed steps, rank 0 prints the case's row."""
    from dlmoe.parallel import init_parallel, shutdown
    from dlmoe.runtime import prepare_benchmark

    facts = prepare_benchmark(args.threads, malloc_tuning=not args.no_malloc_tuning)
    parallel = ParallelConfig(
        data_parallel=args.data_parallel, expert_parallel=args.ep, backend="gloo", timeout_s=args.collective_timeout
    )
    state = init_parallel(parallel, device="cpu")
    try:
        if state.world_size != WORLD_SIZE:
            raise SystemExit(f"worker expects a world of {WORLD_SIZE} ranks, got {state.world_size}")
        pmodel, step = build_step(args, state)
        times, counts, calls, nbytes, loss = timed_steps(args, pmodel, step)
        report(args, state, pmodel, times, counts, calls, nbytes, loss, facts)
    finally:
        shutdown()


def build_step(args: argparse.Namespace, state) -> tuple:
    """(parallel model, step(global_ids) -> (loss, per-layer dispatch counts)): one full training step."""
    from dlmoe.diffusion import add_mask_noise, masked_diffusion_loss
    from dlmoe.model.transformer import DiffusionTransformer
    from dlmoe.parallel import parallelize

    config = model_config(args.router, args)
    torch.manual_seed(args.seed)  # same weights on every rank; parallelize keeps each rank's part
    pmodel = parallelize(DiffusionTransformer(config), state)
    params = [p for p in pmodel.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else nullcontext
    noise_gen = torch.Generator().manual_seed(args.seed + 2)
    per_rank = args.batch // state.world_size
    rows = slice(state.rank * per_rank, (state.rank + 1) * per_rank)

    def step(global_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        noised = add_mask_noise(global_ids, config.mask_id, antithetic=True, generator=noise_gen)
        ids, noisy, masked, ratio = (
            global_ids[rows],
            noised.noisy_ids[rows],
            noised.masked[rows],
            noised.mask_ratio[rows],
        )
        with autocast():
            out = pmodel.forward_module(noisy, ratio)
            loss = masked_diffusion_loss(out.logits, ids, masked, ratio).loss + out.aux_loss
        loss.backward()
        pmodel.sync_expert_gradients()
        pmodel.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), [d.counts.detach() for d in out.dispatches]

    pmodel.module.train()
    return pmodel, step


def timed_steps(args: argparse.Namespace, pmodel, step) -> tuple[list, list, int, int, torch.Tensor]:
    """Run warmup + timed steps on the same global batches on every rank (real tokens never equal
    mask_id 0); per timed step [step s, all_to_all s] and the dispatch counts [MoE layers, E]."""
    import torch.distributed as dist

    data_gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [
        torch.randint(1, args.vocab, (args.batch, args.seq_len), generator=data_gen)
        for _ in range(args.warmup + args.steps)
    ]
    stats = pmodel.comm_stats
    times, counts = [], []
    calls = nbytes = 0
    loss = torch.zeros(())
    for i, global_ids in enumerate(batches):
        timed = i >= args.warmup
        stats.reset()
        stats.enabled = timed
        dist.barrier()
        t0 = time.perf_counter()
        loss, layer_counts = step(global_ids)
        elapsed = time.perf_counter() - t0
        stats.enabled = False
        if timed:
            times.append([elapsed, stats.seconds])
            counts.append(torch.stack(layer_counts).double())
            calls, nbytes = calls + stats.calls, nbytes + stats.bytes
    return times, counts, calls, nbytes, loss


def report(args, state, pmodel, times, counts, calls, nbytes, loss, facts) -> None:
    """Reduce over ranks (slowest step, global counts, mean loss, largest memory); rank 0 prints the row."""
    import torch.distributed as dist

    memory = parameter_mib(pmodel)
    slowest = torch.tensor(times, dtype=torch.float64)  # [steps, 2]
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    global_counts = torch.stack(counts)  # [steps, layers, E]: this rank's tokens
    dist.all_reduce(global_counts)  # Σ over ranks: rows per global expert
    mean_loss = loss.double().reshape(1)
    dist.all_reduce(mean_loss)
    largest = torch.tensor([memory["param_mib"], memory["expert_param_mib"]], dtype=torch.float64)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    if state.is_main:
        row = summarize(args, slowest, global_counts, calls, nbytes, float(mean_loss) / state.world_size)
        row |= {"param_mib_per_rank": largest[0].item(), "expert_param_mib_per_rank": largest[1].item()}
        print(json.dumps(row | {"worker_result": True, "malloc_tuned": facts["malloc_tuned"]}), flush=True)


def parameter_mib(pmodel) -> dict[str, float]:
    """MiB of parameters this rank holds (FSDP2 shards and EP shards counted locally); AdamW adds 2×."""
    from torch.distributed.tensor import DTensor

    from dlmoe.moe.experts import Experts

    def mib(params) -> float:
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        return sum(t.numel() * t.element_size() for t in local) / 2**20

    experts = [p for m in pmodel.module.modules() if isinstance(m, Experts) for p in m.parameters(recurse=False)]
    return {"param_mib": mib(pmodel.module.parameters()), "expert_param_mib": mib(experts)}


def summarize(
    args: argparse.Namespace, slowest: torch.Tensor, counts: torch.Tensor, calls: int, nbytes: int, loss: float
) -> dict:
    """One case's row from the slowest-rank [steps, (step s, all_to_all s)] and global counts [steps, layers, E]."""
    step_ms = (slowest[:, 0] * 1e3).tolist()
    a2a_ms = (slowest[:, 1] * 1e3).tolist()
    steps = len(step_ms)
    ranks = counts.view(*counts.shape[:-1], WORLD_SIZE, -1).sum(-1)  # [steps, layers, P]: rows per EP rank
    tokens = args.batch * args.seq_len
    return {
        "step_ms": step_ms,
        "all_to_all_ms": a2a_ms,
        "rank_load_max_over_mean": [float(x) for x in (ranks.amax(-1) / ranks.mean(-1)).mean(-1)],
        "expert_load_max_over_mean": [float(x) for x in (counts.amax(-1) / counts.mean(-1)).mean(-1)],
        "realized_k": float(counts.sum(-1).mean() / tokens),
        "all_to_all_calls_per_step": calls / steps,
        "all_to_all_mb_per_step": nbytes / steps / 1e6,
        "loss": loss,
    }
