"""Command line: `dlmoe <command>` (also `python -m dlmoe`)."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import TYPE_CHECKING

import torch

from dlmoe.cli_convert import add_convert_parser
from dlmoe.cli_eval import add_eval_parser
from dlmoe.cli_experiments import add_experiment_parsers
from dlmoe.cli_sample import add_sample_parser
from dlmoe.config import BlockRoutingConfig, MoEConfig, RouterConfig
from dlmoe.moe import MoELayer
from dlmoe.routing.schedules import SCHEDULE_NAMES, dynamic_k, flops_match

if TYPE_CHECKING:
    from dlmoe.train import TrainSummary


def routing_demo(args: argparse.Namespace) -> None:
    """Route one random batch through each router family and print its statistics."""
    torch.manual_seed(args.seed)
    e, k, d = args.experts, args.k, args.dim
    routers = {
        "expert_choice": RouterConfig(kind="expert_choice", num_experts=e, num_experts_per_tok=k),
        "expert_choice+linear_reverse": RouterConfig(
            kind="expert_choice",
            num_experts=e,
            num_experts_per_tok=k,
            capacity_schedule="linear_reverse",
            k_min=max(1, k // 2),
            k_max=min(e, k + k // 2),
        ),
        "token_choice(cf=1.25)": RouterConfig(num_experts=e, num_experts_per_tok=k, capacity_factor=1.25),
        "token_choice(dropless)": RouterConfig(num_experts=e, num_experts_per_tok=k),
        "block_routing(p=0.6)": RouterConfig(
            num_experts=e,
            num_experts_per_tok=k,
            score="sigmoid",
            block=BlockRoutingConfig(block_size=32, top_p=0.6, guard=min(e, 2 * k)),
        ),
    }
    x = torch.randn(args.batch, args.length, d)
    mask_ratio = torch.linspace(0.05, 0.95, args.batch)
    for name, rc in routers.items():
        layer = MoELayer(MoEConfig(router=rc, expert_hidden=args.hidden), d)
        with torch.no_grad():
            _, out = layer(x, mask_ratio)
        print(json.dumps({"router": name} | {k_: round(v, 4) for k_, v in out.dispatch.stats().as_dict().items()}))
    rc = routers["expert_choice+linear_reverse"]
    print(
        json.dumps(
            {
                "mask_ratio": [round(r, 2) for r in mask_ratio.tolist()],
                "k_per_sample(linear_reverse)": dynamic_k(mask_ratio, "linear_reverse", rc.k_min, rc.k_max).tolist(),
            }
        )
    )
    for name in SCHEDULE_NAMES:
        print(json.dumps({"schedule": name} | flops_match(name, 8, 32, 20).as_dict()))


def _load(args: argparse.Namespace):
    from dlmoe.config_io import load_run_config

    return load_run_config(args.config, args.overrides)


def train(args: argparse.Namespace) -> None:
    """Train (or --resume) a run; prints a JSON summary. Under torchrun: every rank trains its slice."""
    summary = _fit(_load(args), args)
    if summary is not None:
        _print_summary(summary)


def finetune(args: argparse.Namespace) -> None:
    """Fine-tune a finished run (e.g. with dMoE block routing): its config ← --config ← overrides, its
    weights and tokenizer; fresh optimizer, step 0. Prints a JSON summary."""
    import dataclasses

    from dlmoe.config_io import load_run_config, run_config_to_dict
    from dlmoe.train.init_from import SourceRun

    source = SourceRun.open(args.source, name="--from")
    config = load_run_config(args.config, args.overrides, base=run_config_to_dict(source.config))
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=str(source.path)))
    summary = _fit(config, args)
    if summary is not None:
        _print_summary(summary)


def _fit(config, args: argparse.Namespace) -> TrainSummary | None:
    """One process, or — launched by torchrun — this rank of the world (None on ranks other than 0)."""
    from dlmoe.parallel import launched_by_torchrun
    from dlmoe.train import Trainer

    if not launched_by_torchrun():
        return Trainer(config, resume=args.resume, progress=not args.no_progress).fit()
    from dlmoe.parallel import init_parallel, shutdown
    from dlmoe.train.distributed import DistributedRuntime

    state = init_parallel(config.parallel, config.train.device)
    try:
        runtime = DistributedRuntime(state)
        summary = Trainer(config, resume=args.resume, progress=not args.no_progress, runtime=runtime).fit()
        return summary if state.is_main else None
    finally:
        shutdown()


def _print_summary(summary: TrainSummary) -> None:
    print(
        json.dumps({k: (str(v) if isinstance(v, pathlib.Path) else round(v, 4)) for k, v in summary.__dict__.items()})
    )


def routing_stats(args: argparse.Namespace) -> None:
    """Routing statistics of a trained run at several mask ratios."""
    from dlmoe.inference import routing_by_mask_ratio

    for row in routing_by_mask_ratio(args.run):
        print(json.dumps(row))


def eval_ppl(args: argparse.Namespace) -> None:
    from dlmoe.inference import eval_ppl as run_eval

    print(json.dumps(run_eval(args.run, args.batches)))


def info(args: argparse.Namespace) -> None:
    """Resolved config, parameter counts (total / active) and forward FLOPs per token."""
    import dataclasses

    from dlmoe.model.flops import model_size

    config = _load(args)
    size = model_size(config.model, config.data.seq_len)
    print(json.dumps({"config": dataclasses.asdict(config), "size": size.as_dict()}, indent=2))


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 model.moe.router.kind=token_choice"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("routing-demo", help="route a random batch through every router; print statistics")
    demo.add_argument("--experts", type=int, default=16)
    demo.add_argument("--k", type=int, default=4)
    demo.add_argument("--dim", type=int, default=64)
    demo.add_argument("--hidden", type=int, default=32)
    demo.add_argument("--batch", type=int, default=4)
    demo.add_argument("--length", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=routing_demo)

    p = sub.add_parser(
        "train",
        help="train a MoE diffusion LM",
        description="Train a MoE diffusion LM. Launched by torchrun, every rank trains its rows of the global "
        "batch (parallel.data_parallel=ddp|fsdp, parallel.expert_parallel=P; see the README).",
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run's latest valid checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=train)

    p = sub.add_parser(
        "finetune",
        help="fine-tune a finished run (same architecture; e.g. dMoE block routing)",
        description="Start from RUN_DIR's weights and tokenizer with RUN_DIR's config, then --config, then "
        "the dotted overrides, e.g. model.moe.router.block.top_p=0.6 train.steps=100 run_dir=runs/ft",
    )
    p.add_argument("--from", dest="source", required=True, metavar="RUN_DIR", help="a finished run folder")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the fine-tune run's latest valid checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=finetune)

    p = sub.add_parser("info", help="config, parameter counts (total/active), FLOPs per token")
    _add_config_args(p)
    p.set_defaults(func=info)

    add_sample_parser(sub)
    add_convert_parser(sub)
    add_experiment_parsers(sub)
    add_eval_parser(sub)

    p = sub.add_parser("routing-stats", help="routing statistics of a trained run at mask ratios 0.1/0.5/0.9")
    p.add_argument("--run", required=True)
    p.set_defaults(func=routing_stats)

    p = sub.add_parser("eval-ppl", help="validation ELBO, perplexity bound and bits per byte of a trained run")
    p.add_argument("--run", required=True)
    p.add_argument("--batches", type=int, default=None)
    p.set_defaults(func=eval_ppl)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:
        print(f"dlmoe: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as err:  # a non-finite loss (TrainingError), a full disk while saving
        print(f"dlmoe: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
