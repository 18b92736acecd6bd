"""`dlmoe sample`: generate from a trained run with any sampler of `dlmoe.sampling`.

Prints one JSON line per generated text, then one `{"stats": ...}` line (forwards, unique experts
per layer per forward, active FLOPs per generated token, tokens/s, the dtype and why). The progress
bar goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from dlmoe._checks import check_float
from dlmoe.config import BlockRoutingConfig, SampleConfig
from dlmoe.precision import resolve_precision
from dlmoe.sampling import CapacityPolicy
from dlmoe.vocab import CACHE_MODES, DEVICE_NAMES, PRECISIONS, REMASKING

# flags that set the `SampleConfig` field of the same name as given
PLAIN_FLAGS = (
    "prompt", "num_samples", "gen_length", "block_length", "steps", "temperature", "remasking", "threshold", "cache",
    "cfg_scale",
)  # fmt: skip


def parse_options(text: str, option: str, fields: dict[str, type]) -> dict[str, object]:
    """'a=1,b=0.5' → {'a': 1, 'b': 0.5} with the allowed `fields` and their types; clear errors."""
    values: dict[str, object] = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise ValueError(f"{option} takes key=value pairs separated by commas, got {text!r}")
        if key not in fields:
            raise ValueError(f"{option}: unknown key {key!r}; allowed: {sorted(fields)}")
        try:
            values[key] = fields[key](raw)
        except ValueError:
            raise ValueError(f"{option}: {key} must be a {fields[key].__name__}, got {raw!r}") from None
    return values


def block_routing_option(text: str | None) -> BlockRoutingConfig | None:
    if text is None:
        return None
    return BlockRoutingConfig(**parse_options(text, "--block-routing", {"top_p": float, "guard": int}))


def capacity_option(text: str | None) -> CapacityPolicy | None:
    if text is None:
        return None
    fields = {"schedule": str, "k_min": int, "k_max": int, "sigma": float}
    values = parse_options(text, "--capacity", fields)
    missing = [k for k in ("schedule", "k_min", "k_max") if k not in values]
    if missing:
        raise ValueError(
            "--capacity needs schedule, k_min and k_max (e.g. schedule=linear_reverse,k_min=2,k_max=6); "
            f"missing {missing}"
        )
    return CapacityPolicy(**values)


def token_ids_option(text: str | None, option: str, eos_id: int | None) -> list[int] | None:
    """'5,eos,17' → [5, eos_id, 17]: comma-separated token ids, `eos` meaning the model's EOS id.
    The ranges (vocabulary, mask id) are checked by `generate`."""
    if text is None:
        return None
    ids = []
    for item in text.split(","):
        raw = item.strip()
        if raw.lower() == "eos":
            if eos_id is None:
                raise ValueError(f"{option}: 'eos' needs a model with an eos_id; this run has none")
            ids.append(eos_id)
            continue
        try:
            ids.append(int(raw))
        except ValueError:
            raise ValueError(
                f"{option} takes token ids (ints, or 'eos') separated by commas, got {raw!r} in {text!r}"
            ) from None
    return ids


def read_batch_file(path: str) -> list[str]:
    """One prompt per line; blank lines are refused (a common copy-paste slip), as is an empty file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"--batch-file {str(file)!r} does not exist or is not a file")
    lines = file.read_text(encoding="utf-8").splitlines()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise ValueError(f"--batch-file {str(file)!r} has blank lines at {blank[:10]}; one prompt per line")
    if not lines:
        raise ValueError(f"--batch-file {str(file)!r} is empty")
    return lines


def sampler_from_args(args: argparse.Namespace, base: SampleConfig, eos_id: int | None, batch: bool) -> SampleConfig:
    """The run's `sample` section with the options given on the command line (checked here, before
    the model loads). `--threshold` makes the steps adaptive; a batch file samples each prompt once
    unless `--num-samples` says otherwise."""
    fields = {name: getattr(args, name) for name in PLAIN_FLAGS if getattr(args, name) is not None}
    if args.threshold is not None:
        fields["steps"] = None  # --steps is ignored with --threshold
    if batch and args.num_samples is None:
        fields["num_samples"] = 1
    if args.stop_at_eos:
        fields["stop_at_eos"] = True
    options = {
        "block_routing": block_routing_option(args.block_routing),
        "capacity": capacity_option(args.capacity),
        "suppress_tokens": token_ids_option(args.suppress_tokens, "--suppress-tokens", eos_id),
        "suppress_commit_tokens": token_ids_option(args.suppress_commit_tokens, "--suppress-commit-tokens", eos_id),
    }
    fields |= {name: value for name, value in options.items() if value is not None}
    sampler = dataclasses.replace(base, **fields)
    sampler.check()
    return sampler


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """The generation options (`SamplerConfig` fields) of `dlmoe sample`, also `dlmoe serve`'s defaults."""
    p.add_argument("--gen-length", dest="gen_length", type=int)
    p.add_argument("--block-length", dest="block_length", type=int)
    p.add_argument("--steps", type=int, help="forwards over the generation (ignored with --threshold)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--remasking", choices=REMASKING)
    p.add_argument("--threshold", type=float, help="Fast-dLLM parallel decoding: commit every token with p >= τ")
    p.add_argument("--cache", choices=CACHE_MODES, help="KV cache (exact needs a block-causal model; default: none)")
    p.add_argument("--cfg", dest="cfg_scale", type=float, help="classifier-free guidance scale (default: 0, off)")
    p.add_argument("--block-routing", dest="block_routing", metavar="top_p=0.6,guard=16", help="dMoE block routing")
    p.add_argument(
        "--capacity", metavar="schedule=linear_reverse,k_min=2,k_max=6", help="expert-choice capacity over the steps"
    )
    p.add_argument("--stop-at-eos", dest="stop_at_eos", action="store_true")
    p.add_argument(
        "--suppress-tokens", dest="suppress_tokens", metavar="ID,ID",
        help="token ids never proposed (logit −inf; 'eos' = the model's EOS: fill the whole length)",
    )  # fmt: skip
    p.add_argument(
        "--suppress-commit-tokens", dest="suppress_commit_tokens", metavar="ID,ID",
        help="token ids committed only when nothing else is left (confidence −inf; 'eos' = the model's EOS)",
    )  # fmt: skip


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """Where and in which dtype the model runs, and whether its routed experts stay on disk."""
    p.add_argument("--device", choices=DEVICE_NAMES, default="cpu", help="where the model runs")
    p.add_argument(
        "--dtype", choices=(*PRECISIONS, "keep"), default="auto",
        help="weight dtype at run time: auto = bf16 where the device runs it natively, else fp32; "
        "keep = the checkpoint's own (default: auto)",
    )  # fmt: skip
    p.add_argument(
        "--expert-memory", dest="expert_memory", metavar="SIZE",
        help="keep the routed experts on disk, read on demand into at most SIZE of memory (e.g. 512MiB, 2GiB); "
        "the output is bit-identical (dlmoe.offload)",
    )  # fmt: skip


def add_sample_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a trained run (LLaDA / Fast-dLLM samplers, dMoE routing)")
    p.add_argument("--run", required=True)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt")
    source.add_argument("--batch-file", dest="batch_file", help="text file, one prompt per line (batched, left-padded)")
    p.add_argument("--num-samples", dest="num_samples", type=int, help="samples per prompt")
    add_sampler_flags(p)
    p.add_argument("--seed", type=int, default=0)
    add_device_flags(p)
    p.add_argument("--no-progress", dest="no_progress", action="store_true")
    p.set_defaults(func=sample)


def sample(args: argparse.Namespace) -> None:
    """Generate from a trained run; all input is checked before the model runs."""
    from dlmoe.inference import read_run_config, sample_text
    from dlmoe.offload.load import parse_size
    from dlmoe.runtime import resolve_device

    if args.threshold is not None:
        check_float("--threshold", args.threshold, low=0.0, high=1.0, low_open=True)
    if args.cfg_scale is not None:
        check_float("--cfg", args.cfg_scale, low=0.0)
    device = resolve_device(args.device, "--device")
    expert_memory = None if args.expert_memory is None else parse_size(args.expert_memory)
    precision = None if args.dtype == "keep" else resolve_precision(args.dtype, device)
    prompts = read_batch_file(args.batch_file) if args.batch_file else None
    run_config = read_run_config(args.run)
    sampler = sampler_from_args(args, run_config.sample, run_config.model.eos_id, batch=prompts is not None)
    output = sample_text(
        args.run,
        sampler,
        prompts=prompts,
        seed=args.seed,
        progress=not args.no_progress,
        device=device,
        dtype=None if precision is None else precision.dtype,
        expert_memory=expert_memory,
    )
    for prompt, text in zip(output.prompts, output.texts, strict=True):
        print(json.dumps({"prompt": prompt, "text": text}))
    stats = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in output.stats.as_dict().items()}
    if stats["unique_experts_by_layer"] is not None:
        stats["unique_experts_by_layer"] = [round(v, 2) for v in stats["unique_experts_by_layer"]]
    if precision is None:
        stats |= {"dtype": "keep", "dtype_reason": "keep: the checkpoint's own weights dtype"}
    else:
        stats |= {"dtype": precision.name, "dtype_reason": precision.reason}
    print(json.dumps({"stats": stats}))
