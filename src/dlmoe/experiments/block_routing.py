"""dMoE's claim at laptop scale: quality against unique experts as the coreset's top-p varies — a
Pareto curve —, training-free and after block-routing fine-tuning.

Base: a token-choice run (`--base-run`, else one trained here: sigmoid scores with loss-free expert
bias, dropless — LLaDA2's router family). For each top-p (guard = 2k by default, block 32), on fixed
held-out batches noised with fixed draws: the ELBO (nats/token), dMoE's unique experts per block
per layer, and, with `--mcq` files, letter-scoring accuracy. Fine-tuning (dMoE's "learnable" part):
from the same base, `finetune_steps` of masked-token CE with the mask ratio in [0.3, 0.8] and block
routing in the forward pass, at a few training top-p values; a control fine-tunes the same steps
with token routing, so the comparison isolates what block-routed training buys.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from dlmoe.config import BlockRoutingConfig, RunConfig
from dlmoe.config_io import load_run_config, run_config_to_dict
from dlmoe.diffusion.validation import validation_elbo
from dlmoe.eval.mcq_file import read_mcq_jsonl
from dlmoe.eval.multiple_choice import score_mcq
from dlmoe.experiments import ExperimentArgs
from dlmoe.experiments.common import (
    finite,
    markdown_table,
    prepare_output,
    scale_overrides,
    variant_config,
)
from dlmoe.experiments.provenance import finish_record, start_record
from dlmoe.experiments.raw_data import Rendered, publish, read_raw
from dlmoe.inference import load_run
from dlmoe.routing.routers import block_routing
from dlmoe.train import Trainer
from dlmoe.train.data_setup import prepare_data
from dlmoe.train.init_from import SourceRun

NAME = "block-routing"
TOP_PS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FINETUNE_TOP_PS = (0.3, 0.6)
BLOCK_SIZE = 32
NOISE_DRAWS = 4
MCQ_LIMIT = 300


def run(args: ExperimentArgs) -> dict:
    options = {"scale": args.scale_name, "corpus": args.corpus, "steps": args.steps, "base_run": args.base_run,
               "mcq": list(args.mcq), "seed": 0}  # fmt: skip
    for path in args.mcq:
        if not Path(path).is_file():
            raise ValueError(f"--mcq file {path!r} does not exist")
    out = prepare_output(args.out, NAME, options, overwrite=args.overwrite)
    record, started = start_record(args.scale.device), time.perf_counter()
    scale = args.scale
    base_steps = args.steps or 2 * scale.steps
    finetune_steps = max(1, base_steps // 3)
    base_run = Path(args.base_run) if args.base_run else _train_base(out, args, base_steps)
    config, model, tokenizer = load_run(base_run)
    router = config.model.moe.router if config.model.moe is not None else None
    if router is None or router.kind != "token_choice":
        raise ValueError(f"block-routing needs a token-choice MoE base run, got {router.kind if router else 'dense'}")
    guard = int(args.extra.get("guard") or min(router.num_experts, 2 * router.num_experts_per_tok))
    batches = prepare_data(config, base_run).validation_batches
    mcq = {Path(p).stem: read_mcq_jsonl(p, limit=MCQ_LIMIT) for p in args.mcq}

    curves: dict[str, list[dict[str, Any]]] = {"training-free": _sweep(model, tokenizer, config, batches, mcq, guard)}
    finetuned: dict[str, str] = {}
    for label, top_p in [("token routing", None)] + [(f"top_p={p}", p) for p in FINETUNE_TOP_PS]:
        run_dir = _finetune(out, base_run, top_p, guard, finetune_steps)
        finetuned[label] = str(run_dir)
        ft_config, ft_model, _ = load_run(run_dir)
        curves[f"fine-tuned ({label})"] = _sweep(ft_model, tokenizer, ft_config, batches, mcq, guard)

    results = {
        "base_run": str(base_run),
        "guard": guard,
        "block_size": BLOCK_SIZE,
        "num_experts": router.num_experts,
        "experts_per_token": router.num_experts_per_tok,
        "finetune_steps": finetune_steps,
        "finetuned_runs": finetuned,
        "mcq_skipped_lines": {name: data.skipped for name, data in mcq.items()},
        "curves": curves,
        "summary": _summary(curves),
    }
    results = finite(results | {"experiment": NAME})
    publish(out, NAME, results, finish_record(record, started), args.results_doc)
    return results


def render(raw_dir: Path) -> Rendered:
    """The report and the Pareto plot from the archived results.json alone."""
    results, _ = read_raw(raw_dir)
    curves, mcq = results["curves"], list(results["mcq_skipped_lines"])
    plot = _plot(raw_dir, curves, mcq)
    return Rendered(_markdown(curves, mcq, results["guard"], results["finetune_steps"]), [plot])


def _train_base(out: Path, args: ExperimentArgs, steps: int) -> Path:
    # dMoE's recipe (LLaDA2-style token choice) has no EC-DLM scaling factor
    overrides = scale_overrides(args.scale, out / "base", args.corpus, out / ".cache", scaling_factor=False)
    variant = {"model.moe.router.kind": "token_choice", "model.moe.router.score": "sigmoid",
               "model.moe.router.expert_bias": True, "train.steps": steps, "train.checkpoint_every": steps}  # fmt: skip
    return Trainer(variant_config(overrides, variant), progress=False).fit().run_dir


def _finetune(out: Path, base_run: Path, top_p: float | None, guard: int, steps: int) -> Path:
    """Fine-tune from the base run's config and weights (its architecture, data and tokenizer)."""
    name = "ft_token" if top_p is None else f"ft_top_p_{top_p}"
    source = SourceRun.open(base_run, name="--base-run")
    variant = {
        "run_dir": out / name, "train.init_from": base_run, "train.steps": steps, "train.checkpoint_every": steps,
        "train.lr": 3e-4, "train.warmup_steps": 1, "train.lr_schedule": "constant", "train.log_every": 1,
        "train.eval_every": steps, "train.mask_ratio_min": 0.3, "train.mask_ratio_max": 0.8,
        "train.loss_weighting": "masked_mean",
    }  # fmt: skip
    if top_p is not None:
        variant |= {"model.moe.router.block.block_size": BLOCK_SIZE, "model.moe.router.block.top_p": top_p,
                    "model.moe.router.block.guard": guard}  # fmt: skip
    overrides = [f"{k}={v}" for k, v in variant.items()]
    config = load_run_config(None, overrides, base=run_config_to_dict(source.config))
    return Trainer(config, progress=False).fit().run_dir


@torch.no_grad()
def _sweep(model, tokenizer, config: RunConfig, batches, mcq: dict, guard: int) -> list[dict[str, Any]]:
    """One point per routing: token routing (top_p None), then every top-p in TOP_PS."""
    points = []
    for top_p in (None, *TOP_PS):
        block = None if top_p is None else BlockRoutingConfig(block_size=BLOCK_SIZE, top_p=top_p, guard=guard)
        with block_routing(model, block):
            point = {"top_p": top_p} | _held_out(model, config, batches)
            for name, data in mcq.items():
                result = score_mcq(model, tokenizer, data.items, "letter")
                point[f"acc_{name}"] = result.accuracy
                point[f"ci95_{name}"] = result.ci95
        points.append(point)
    return points


def _held_out(model, config: RunConfig, batches) -> dict[str, float]:
    """The validation ELBO (`validation_elbo`, NOISE_DRAWS passes of its fixed noise), and dMoE's unique
    experts per 32-token block (mean over layers) of the same forwards."""
    model.eval()
    unique, experts = [], []

    def forward(noisy_ids, **inputs):
        output = model(noisy_ids, **inputs)
        stats = [d.stats(block_size=BLOCK_SIZE) for d in output.dispatches]
        unique.append(sum(s.unique_experts_per_block for s in stats) / len(stats))
        experts.append(sum(s.experts_per_token_mean for s in stats) / len(stats))
        return output

    elbo = validation_elbo(
        forward, list(batches) * NOISE_DRAWS, mask_id=config.model.mask_id, two_stream=config.model.block_causal,
        antithetic=config.train.antithetic,
    )  # fmt: skip
    return {
        "elbo": elbo.nats_per_token,
        "unique_experts_per_block": sum(unique) / len(unique),
        "experts_per_token": sum(experts) / len(experts),
    }


def _summary(curves: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per curve: token-routing reference, and the cheapest top-p within 1 % of its ELBO."""
    out = {}
    for label, points in curves.items():
        reference = points[0]
        within = [p for p in points[1:] if p["elbo"] <= reference["elbo"] * 1.01]
        best = min(within, key=lambda p: p["unique_experts_per_block"]) if within else None
        ref_unique = reference["unique_experts_per_block"]
        cheapest = None if best is None else {k: best[k] for k in ("top_p", "elbo", "unique_experts_per_block")}
        out[label] = {
            "token_routing_elbo": reference["elbo"],
            "token_routing_unique_experts": ref_unique,
            "cheapest_within_1pct": cheapest,
            "expert_reduction": None if best is None else ref_unique / best["unique_experts_per_block"],
        }
    return out


def _markdown(curves: dict, mcq_names: list[str], guard: int, steps: int) -> str:
    columns = ["curve", "top_p", "unique_experts_per_block", "elbo", "experts_per_token"]
    columns += [f"acc_{name}" for name in mcq_names]
    rows = [
        {"curve": label, **{k: ("token routing" if k == "top_p" and v is None else v) for k, v in p.items()}}
        for label, points in curves.items()
        for p in points
    ]
    text = (
        f"Block {BLOCK_SIZE}, guard {guard}; fine-tuned curves: {steps} steps of block-routed masked-token CE "
        "(mask ratio in [0.3, 0.8]) from the base; the token-routing fine-tune is the control. ELBO in nats/token "
        f"on held-out text ({NOISE_DRAWS} fixed noise draws); unique experts = distinct routed experts per "
        f"{BLOCK_SIZE}-token block, mean over layers (dMoE's metric).\n\n"
    )
    return text + markdown_table(rows, columns)


def _plot(out: Path, curves: dict, mcq_names: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(mcq_names)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    for label, points in curves.items():
        xs = [p["unique_experts_per_block"] for p in points]
        line = axes[0][0].plot(xs[1:], [p["elbo"] for p in points[1:]], "o-", label=label)[0]
        axes[0][0].plot(xs[0], points[0]["elbo"], "*", markersize=14, color=line.get_color())
        for i, name in enumerate(mcq_names, start=1):
            accs = [p[f"acc_{name}"] if p[f"acc_{name}"] is not None else math.nan for p in points]
            axes[0][i].plot(xs[1:], accs[1:], "o-", color=line.get_color(), label=label)
            axes[0][i].plot(xs[0], accs[0], "*", markersize=14, color=line.get_color())
    axes[0][0].set(xlabel="unique experts per block per layer", ylabel="held-out ELBO (nats/token, lower is better)",
                   title="block routing: quality vs experts (★ = token routing)")  # fmt: skip
    for i, name in enumerate(mcq_names, start=1):
        axes[0][i].set(xlabel="unique experts per block per layer", ylabel="accuracy (letter scoring)", title=name)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "pareto.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["run"]
