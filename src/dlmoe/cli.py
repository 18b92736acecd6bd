"""Command line: `dlmoe <command>` (also `python -m dlmoe`)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dlmoe.config import BlockRoutingConfig, MoEConfig, RouterConfig
from dlmoe.moe import MoELayer
from dlmoe.routing.schedules import SCHEDULE_NAMES, dynamic_k, flops_match


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:
        print(f"dlmoe: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
