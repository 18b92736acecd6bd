"""Command line: `dlmoe <command>` (also `python -m dlmoe`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
from typing import TYPE_CHECKING

import torch

from dlmoe.cli_convert import add_convert_parser
from dlmoe.cli_eval import add_eval_parser
from dlmoe.cli_experiments import add_experiment_parsers
from dlmoe.cli_sample import add_sample_parser
from dlmoe.cli_serve import add_serve_parser
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
    summary = _fit(_resume_base(_load(args), args), args)
    if summary is not None:
        _print_summary(summary)


def _resume_base(config, args: argparse.Namespace):
    """With --resume, the run's saved config is the base that --config and the overrides change
    (so `--resume train.steps=600` alone continues the run as it was configured)."""
    from dlmoe.config_io import load_run_config, read_saved_run_config, run_config_to_dict

    saved_path = pathlib.Path(config.run_dir) / "config.json"
    if not args.resume or not saved_path.is_file():
        return config
    base = run_config_to_dict(read_saved_run_config(saved_path)) | {"run_dir": config.run_dir}
    return load_run_config(args.config, args.overrides, base=base)


def finetune(args: argparse.Namespace) -> None:
    """Fine-tune a finished run (e.g. with dMoE block routing): its config ← --config ← overrides, its
    weights and tokenizer; fresh optimizer, step 0. Prints a JSON summary.

    The fine-tune writes to the run_dir that --config or an override names, else to `<source>-ft`
    beside the source; never to the run_dir recorded in the source's config."""
    import dataclasses

    from dlmoe.config_io import load_run_config, run_config_to_dict
    from dlmoe.train.init_from import SourceRun

    source = SourceRun.open(args.source, name="--from")
    base = run_config_to_dict(source.config) | {"run_dir": str(source.path.parent / f"{source.path.name}-ft")}
    config = load_run_config(args.config, args.overrides, base=base)
    config = _resume_base(config, args)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=str(source.path)))
    summary = _fit(config, args)
    if summary is not None:
        _print_summary(summary)


def _fit(config, args: argparse.Namespace) -> TrainSummary | None:
    """One process, or — launched by torchrun — this rank of the world (None on ranks other than 0)."""
    from dlmoe.parallel import launched_by_torchrun
    from dlmoe.train import Trainer

    if not launched_by_torchrun():
        return Trainer(config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress).fit()
    from dlmoe.parallel import init_parallel, shutdown
    from dlmoe.train.distributed import DistributedRuntime

    state = init_parallel(config.parallel, config.train.device)
    try:
        runtime = DistributedRuntime(state)
        trainer = Trainer(
            config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress, runtime=runtime
        )
        summary = trainer.fit()
        return summary if state.is_main else None
    finally:
        shutdown()


def _print_summary(summary: TrainSummary) -> None:
    """One JSON line; a value that is not a finite number (nothing trained: NaN loss) is null, never NaN."""

    def value(v):
        if isinstance(v, pathlib.Path):
            return str(v)
        if isinstance(v, float):
            return round(v, 4) if math.isfinite(v) else None
        return v

    print(json.dumps({k: value(v) for k, v in summary.__dict__.items()}, allow_nan=False))


def routing_stats(args: argparse.Namespace) -> None:
    """Routing statistics of a trained run at several mask ratios."""
    from dlmoe.inference import routing_by_mask_ratio

    for row in routing_by_mask_ratio(args.run):
        print(json.dumps(row))


def eval_ppl(args: argparse.Namespace) -> None:
    from dlmoe.inference import eval_ppl as run_eval

    print(json.dumps(run_eval(args.run, args.batches)))


def info(args: argparse.Namespace) -> None:
    """Resolved config, parameter counts (total / active), forward FLOPs per token, and under "system"
    what this machine supports and what `dtype: auto` picks on it (`--system` alone: only that, no config)."""
    import dataclasses

    from dlmoe.model.flops import model_size
    from dlmoe.precision import hardware_info, resolve_precision

    hardware = hardware_info()
    devices = ["cpu", "cuda"] if hardware.cuda else ["cpu"]
    system = hardware.as_dict() | {"auto": {d: resolve_precision("auto", d).as_dict() for d in devices}}
    if args.system and args.config is None and not args.overrides:
        print(json.dumps(system, indent=2))
        return
    config = _load(args)
    size = model_size(config.model, config.data.seq_len)
    print(json.dumps({"config": dataclasses.asdict(config), "size": size.as_dict(), "system": system}, indent=2))


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
    p.add_argument("--overwrite", action="store_true", help="delete the run already in run_dir and start over")
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
    p.add_argument("--overwrite", action="store_true", help="delete the fine-tune run already in run_dir first")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=finetune)

    p = sub.add_parser("info", help="config, parameter counts (total/active), FLOPs per token, hardware / dtype")
    _add_config_args(p)
    p.add_argument(
        "--system", action="store_true", help="only the hardware and what dtype auto picks (no config needed)"
    )
    p.set_defaults(func=info)

    add_sample_parser(sub)
    add_serve_parser(sub)
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


DEBUG_ENV = "DLMOE_DEBUG"  # =1: errors raise with their traceback instead of one line
_DEBUG_HINT = f"(set {DEBUG_ENV}=1 for the traceback)"


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Dotted `key=value` overrides anywhere on the line (also after options, e.g. `dlmoe train
    --config c.yaml run_dir=r --no-progress train.steps=2`), for commands that take overrides;
    anything else left over is the usual argparse error."""
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    if overrides and isinstance(getattr(args, "overrides", None), list):
        args.overrides.extend(overrides)
        extra = [item for item in extra if item not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def error_line(err: BaseException, command: str | None = None) -> str:
    """An exception as the one line the CLI prints (without the "dlmoe: error: " prefix)."""
    from dlmoe.checkpoint import disk_full_message, is_disk_full

    if is_disk_full(err):
        chain, current = [], err
        while current is not None and current not in chain:  # the error and those it was raised from
            chain.append(current)
            current = current.__cause__ or current.__context__
        for item in chain:
            if isinstance(item, OSError) and item.strerror and item.strerror.startswith("disk full"):
                return item.strerror  # already names the file (checkpoint saves: raise_save_failure)
        path = next((item.filename for item in chain if isinstance(item, OSError) and item.filename), None)
        if command in ("train", "finetune"):
            return disk_full_message(path)
        return f"disk full while writing {path or 'the output'}; free space and rerun"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    known = isinstance(err, (ValueError, RuntimeError, OSError))
    if not known or not text:  # a bug, or a message that says nothing: name the exception type
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    if not known or len(lines) > 1:
        text = f"{text} {_DEBUG_HINT}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error is ONE line on stderr, "dlmoe: error: ...", exit code 2 for bad
    input (ValueError) and 1 otherwise; Ctrl-C exits 130. DLMOE_DEBUG=1 re-raises for the traceback."""
    args = parse_args(build_parser(), argv)
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    try:
        args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("dlmoe: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the CLI's one place that turns errors into one line
        if debug:
            raise
        print(f"dlmoe: error: {error_line(err, getattr(args, 'command', None))}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1  # ValueError: bad input; a non-finite loss, a full disk: 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
