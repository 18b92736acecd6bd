"""Expert offloading driven by block routing: memory, speed and bytes read, side by side in one run.

Writes (once, reused) a synthetic checkpoint in LLaDA2's real layout with random weights — `issue`
scale: E = 256 experts of width 256, k = 8, 8 layers of width 512, one shared expert, first layer
dense: ≈ 3 GiB of fp32 routed experts — imports it with `dlmoe convert`, and then generates the same
prompts four ways, each in a fresh process (peak RSS is per process): token routing and block
routing (top-p 0.6, guard 16), each with every expert resident and with the expert store
(`--expert-memory`, default 512 MiB). The router keeps its initialisation (N(0, 0.02²)) and the expert
bias is N(0, 0.01²): a random router whose top-k spreads over many experts per block, as a trained
one's does (with larger router weights or biases every token picks the same few experts, and there
is nothing for block routing to save). One JSON object per case:

    case, routing, mode, expert_memory, peak_rss_bytes (VmHWM), baseline_rss_bytes (python + torch
    before the model), dense_bytes (resident parameters), tokens_per_s, bytes_per_token,
    loads_per_token, hit_rate, set_change_rate, bit_identical (offload vs resident, same routing)

then a summary row with the issue's four targets and whether each was met.

    python bench/offload.py                      # issue scale (≈ 3 GiB of experts, ≈ 7 GiB of disk)
    python bench/offload.py --scale small        # seconds: what the test runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCALES = {
    "issue": {"experts": 256, "k": 8, "guard": 16, "layers": 8, "dim": 512, "hidden": 256, "heads": 8,
              "vocab": 4096, "budget": "512MiB", "prompts": 1, "prompt_length": 32, "gen_length": 64, "bias_std": 0.01},
    "small": {"experts": 16, "k": 2, "guard": 4, "layers": 3, "dim": 64, "hidden": 32, "heads": 4,
              "vocab": 512, "budget": "512KiB", "prompts": 1, "prompt_length": 16, "gen_length": 32, "bias_std": 0.01},
}  # fmt: skip
TOP_P = 0.6
BLOCK = 32
TARGET_RSS_SLACK = 0.15  # peak RSS ≤ (baseline + dense + budget) · 1.15
TARGET_BYTES_RATIO = 3.0  # block routing reads ≥ 3× fewer expert bytes per token than token routing
TARGET_SPEED = 0.5  # block routing + store ≥ 0.5× the tokens/s of resident block routing


def build(workdir: Path, scale: dict) -> Path:
    """The imported run folder of the synthetic LLaDA2 checkpoint (built once per scale)."""
    run, stamp = workdir / "run", workdir / "scale.json"
    if (run / "model" / "config.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == scale:
        return run
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    checkpoint = write_llada2(workdir / "llada2", scale)
    subprocess.run([sys.executable, "-m", "dlmoe", "convert", str(checkpoint), "--out", str(run), "--block-size",
                    str(BLOCK)], check=True)  # fmt: skip
    shutil.rmtree(checkpoint)  # the run holds the weights now
    stamp.write_text(json.dumps(scale))
    return run


def write_llada2(folder: Path, scale: dict) -> Path:
    """Random weights in LLaDA2's layout (sigmoid group-limited top-k with expert bias, a shared
    expert, first layer dense, block-causal), written by dlmoe's exporter, with a BPE tokenizer."""
    import torch

    from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
    from dlmoe.data import train_tokenizer
    from dlmoe.data.corpus import resolve_corpus
    from dlmoe.model.convert import export_checkpoint
    from dlmoe.model.hf import DlmoeConfig, DlmoeForDiffusionLM

    tokenizer = train_tokenizer(resolve_corpus("shakespeare"), vocab_size=scale["vocab"] - 3)
    router = RouterConfig(num_experts=scale["experts"], num_experts_per_tok=scale["k"], score="sigmoid",
                          expert_bias=True, n_group=8 if scale["experts"] >= 64 else None,
                          topk_group=4 if scale["experts"] >= 64 else None)  # fmt: skip
    config = ModelConfig(
        vocab_size=len(tokenizer) + 3, dim=scale["dim"], num_layers=scale["layers"], num_heads=scale["heads"],
        first_k_dense=1, dense_hidden=4 * scale["dim"], max_seq_len=512, attention="block_causal",
        attention_block_size=BLOCK, moe=MoEConfig(router=router, expert_hidden=scale["hidden"], num_shared_experts=1),
        mask_id=tokenizer.mask_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = DlmoeForDiffusionLM(DlmoeConfig.from_model_config(config))
    with torch.no_grad():  # small biases: they must not decide every token's experts alike
        for module in model.modules():
            if getattr(module, "expert_bias", None) is not None:
                module.expert_bias.normal_(0.0, scale["bias_std"])
    export_checkpoint(model, folder, format="llada2_moe")
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- one case, in a child


def rss(field: str) -> int:
    """VmHWM / VmRSS of this process in bytes (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(run: Path, routing: str, budget: str | None, scale: dict, out: Path) -> None:
    """Load (resident or offloaded), generate, write the tokens and the figures as JSON to `out`."""
    import torch

    import dlmoe  # noqa: F401 - the imports themselves are the baseline
    from dlmoe.config import BlockRoutingConfig
    from dlmoe.inference import load_run
    from dlmoe.sampling import SamplerConfig, generate

    baseline = rss("VmRSS")
    _, model, _ = load_run(run, expert_memory=budget)
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    block = BlockRoutingConfig(top_p=TOP_P, guard=scale["guard"]) if routing == "block" else None
    sampler = SamplerConfig(gen_length=scale["gen_length"], block_length=BLOCK, steps=scale["gen_length"],
                            cache="dual", block_routing=block)  # fmt: skip
    prompts = torch.randint(10, model.config.vocab_size - 3, (scale["prompts"], scale["prompt_length"]),
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    started = time.perf_counter()
    result = generate(model, prompts, sampler)
    seconds = time.perf_counter() - started
    stats = result.stats.as_dict()
    out.write_text(json.dumps({"tokens": result.generated.tolist(), "seconds": seconds, "stats": stats,
                               "peak_rss_bytes": rss("VmHWM"), "baseline_rss_bytes": baseline,
                               "dense_bytes": dense}))  # fmt: skip


# ----------------------------------------------------------------------------- the comparison


def run_case(run: Path, routing: str, budget: str | None, scale_name: str, workdir: Path) -> dict:
    out = workdir / f"case_{routing}_{'offload' if budget else 'resident'}.json"
    out.unlink(missing_ok=True)
    argv = [sys.executable, __file__, "--child", "--run", str(run), "--routing", routing, "--scale", scale_name,
            "--case-out", str(out)] + (["--expert-memory", budget] if budget else [])  # fmt: skip
    subprocess.run(argv, check=True)
    return json.loads(out.read_text())


def case_row(routing: str, budget: str | None, measured: dict, resident: dict | None) -> dict:
    stats, generated = measured["stats"], max(measured["stats"]["generated_tokens"], 1)
    row = {
        "case": f"{routing}/{'offload' if budget else 'resident'}",
        "routing": routing,
        "mode": "offload" if budget else "resident",
        "expert_memory": budget,
        "peak_rss_bytes": measured["peak_rss_bytes"],
        "baseline_rss_bytes": measured["baseline_rss_bytes"],
        "dense_bytes": measured["dense_bytes"],
        "tokens_per_s": generated / measured["seconds"],
        "unique_experts": stats["unique_experts"],
        "bytes_per_token": None,
        "loads_per_token": None,
        "hit_rate": None,
        "set_change_rate": None,
    }
    if budget:
        needed = stats["expert_loads"] + stats["expert_hits"]
        row |= {
            "bytes_per_token": stats["expert_bytes_read"] / generated,
            "loads_per_token": (stats["expert_loads"] + stats["expert_prefetched"]) / generated,
            "hit_rate": stats["expert_hits"] / needed if needed else None,
            "set_change_rate": stats["expert_set_change_rate"],
            "load_seconds": stats["expert_load_seconds"],
            "peak_expert_bytes": stats["peak_expert_bytes"],
            "bit_identical": resident is not None and measured["tokens"] == resident["tokens"],
        }
    return row


def summary(rows: dict[str, dict], budget_bytes: int) -> dict:
    tok, blk = rows["token/offload"], rows["block/offload"]
    rss_ok = all(
        r["peak_rss_bytes"] <= (r["baseline_rss_bytes"] + r["dense_bytes"] + budget_bytes) * (1 + TARGET_RSS_SLACK)
        for r in (tok, blk)
    )
    ratio = tok["bytes_per_token"] / blk["bytes_per_token"] if blk["bytes_per_token"] else None
    speed = blk["tokens_per_s"] / rows["block/resident"]["tokens_per_s"]
    return {
        "case": "summary",
        "bit_identical": tok["bit_identical"] and blk["bit_identical"],
        "rss_within_dense_plus_budget_plus_15pct": rss_ok,
        "bytes_per_token_token_over_block": ratio,
        "bytes_target_met": ratio is not None and ratio >= TARGET_BYTES_RATIO,
        "block_offload_speed_vs_resident": speed,
        "speed_target_met": speed >= TARGET_SPEED,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="issue")
    p.add_argument("--workdir", default="runs/bench-offload", help="where the checkpoint and run live (reused)")
    p.add_argument("--expert-memory", dest="expert_memory", help="the store's budget (default: the scale's)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--routing", choices=("token", "block"), help=argparse.SUPPRESS)
    p.add_argument("--case-out", dest="case_out", help=argparse.SUPPRESS)
    args = p.parse_args()
    scale = SCALES[args.scale]
    if args.child:
        child(Path(args.run), args.routing, args.expert_memory, scale, Path(args.case_out))
        return
    from dlmoe.offload import parse_size

    budget = args.expert_memory or scale["budget"]
    budget_bytes = parse_size(budget)  # checked before anything is built
    workdir = Path(args.workdir) / args.scale
    run = build(workdir, scale)
    rows = {}
    for routing in ("token", "block"):
        resident = run_case(run, routing, None, args.scale, workdir)
        rows[f"{routing}/resident"] = case_row(routing, None, resident, None)
        print(json.dumps(rows[f"{routing}/resident"]), flush=True)
        offloaded = run_case(run, routing, budget, args.scale, workdir)
        rows[f"{routing}/offload"] = case_row(routing, budget, offloaded, resident)
        print(json.dumps(rows[f"{routing}/offload"]), flush=True)
    print(json.dumps(summary(rows, budget_bytes)), flush=True)


if __name__ == "__main__":
    main()
