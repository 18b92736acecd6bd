"""`dlmoe experiment capacity-policy`: generation quality against measured FLOPs when an expert-choice
model's k follows the denoising steps (`CapacityPolicy`), compared with static k at equal FLOPs.

Neither paper has this curve: EC-DLM schedules capacity by mask ratio in training; here one trained EC
model is sampled with k_b = k_min + (k_max − k_min)·s(r_b), r_b the fraction of row b's generation
still masked (1 at the first step → 0 at the last).

  1. base: --base-run (an expert-choice run), or one EC model per seed trained at the scale;
  2. prompts: the first P tokens of N held-out validation rows; greedy generation (temperature 0) of
     G tokens in blocks of W, one token per step by default, no cache (EC pools what is fed);
  3. settings: static k = 1 … k_max (k_max = min(2k, E) by default) and each schedule over a few
     k ranges inside [1, k_max];
  4. per prompt: the generative NLL — the MC-ELBO of the generated continuation given the prompt under
     the same model at static k_max, nats per token, with the same masks for every setting (the
     strongest setting judges; lower is better); the distinct-token fraction (repetition lowers the
     NLL dishonestly); the token agreement with the static-k_max generation. Per setting: active FLOPs
     per generated token as the sampler measured them (`GenerationStats`), and an offline proxy: the
     held-out validation ELBO with each row's k from the policy at that row's mask ratio;
  5. "equal FLOPs" (`report_capacity_policy`): each schedule point against the static frontier
     interpolated linearly at its measured FLOPs, paired per prompt.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dlmoe._checks import check_int
from dlmoe.experiments import ExperimentArgs
from dlmoe.experiments.common import check_args, experiment_scale, finite, prepare_output, scale_overrides, write_json
from dlmoe.experiments.provenance import finish_record, start_record
from dlmoe.experiments.raw_data import Rendered, publish, read_raw
from dlmoe.routing.context import RoutingContext
from dlmoe.routing.schedules import SCHEDULE_NAMES
from dlmoe.sampling.config import CapacityPolicy, SamplerConfig

NAME = "capacity-policy"
STATIC = "constant"  # a static k is the policy constant on [k, k]
BASE_VARIANT = {"model.moe.router.kind": "expert_choice"}
# laptop: 1200 steps (the routed experts are worth ≈ 0.43 nats there, 0.00 at 300: bench/routed_control.py)
LAPTOP = {"steps": 1200, "eval_every": 300}
SCHEDULES = ("linear", "linear_reverse", "cosine", "cosine_reverse", "gaussian", "gaussian_reverse")
DEFAULTS: dict[str, Any] = {"prompts": 32, "prompt_length": 32, "gen_length": 64, "block_length": 32, "mc_num": 16}
EXTRA = (*DEFAULTS, "denoising_steps", "k_max", "ranges", "schedules")
MASK_SEED = 4321  # the masks of the generative NLL: prompt i draws from MASK_SEED + i, for every setting
ROWS_PER_FORWARD = 128  # rows of one scoring forward
OVERHEAD = 1.0  # dlmoe.experiments.suite: the sampling sweep ≈ the base's training time (helper estimate, laptop)


@dataclass(frozen=True)
class Setting:
    """One way to sample: a schedule over [k_min, k_max] (static k: "constant" on [k, k])."""

    schedule: str
    k_min: int
    k_max: int

    @property
    def static(self) -> bool:
        return self.schedule == STATIC

    @property
    def name(self) -> str:
        return f"static k={self.k_min}" if self.static else f"{self.schedule} [{self.k_min}, {self.k_max}]"

    def policy(self) -> CapacityPolicy:
        return CapacityPolicy(self.schedule, self.k_min, self.k_max)


@dataclass(frozen=True)
class SweepOptions:
    """What is sampled and how it is judged (validated by `sweep_options`)."""

    prompts: int
    prompt_length: int
    gen_length: int
    block_length: int
    denoising_steps: int
    mc_num: int
    k_max: int
    ranges: tuple[tuple[int, int], ...]
    schedules: tuple[str, ...]

    def sampler(self) -> SamplerConfig:
        return SamplerConfig(
            gen_length=self.gen_length, block_length=self.block_length, steps=self.denoising_steps,
            temperature=0.0, remasking="low_confidence", cache="none",
        )  # fmt: skip

    def settings(self) -> list[Setting]:
        """Static k = 1 … k_max, then every schedule over every range."""
        static = [Setting(STATIC, k, k) for k in range(1, self.k_max + 1)]
        return static + [Setting(s, lo, hi) for s in self.schedules for lo, hi in self.ranges]


def default_ranges(k: int, k_max: int) -> tuple[tuple[int, int], ...]:
    """The full range [1, k_max], the upper one [k, k_max] and [k − 1, k + 1] around the model's k."""
    candidates = [(1, k_max), (k, k_max), (max(1, k - 1), min(k + 1, k_max))]
    return tuple(dict.fromkeys((lo, hi) for lo, hi in candidates if lo < hi))


def sweep_options(extra: dict[str, Any], *, k: int, num_experts: int, seq_len: int, rows: int) -> SweepOptions:
    """The options of `extra` over the defaults, each checked with a message naming it."""
    o = DEFAULTS | {key: value for key, value in extra.items() if key in DEFAULTS}
    for key in DEFAULTS:
        check_int(key, o[key], low=1)
    check_int("prompts", o["prompts"], high=rows)  # the validation rows the prompts are cut from
    if o["prompt_length"] + o["gen_length"] > seq_len:
        raise ValueError(
            f"prompt_length + gen_length = {o['prompt_length'] + o['gen_length']} must be <= seq_len={seq_len} "
            "(prompt and held-out continuation are cut from one validation row)"
        )
    steps = check_int("denoising_steps", extra.get("denoising_steps", o["gen_length"]), low=1, high=o["gen_length"])
    k_max = check_int("k_max", extra.get("k_max", min(2 * k, num_experts)), low=2, high=num_experts)
    ranges = extra.get("ranges", default_ranges(k, k_max))
    if isinstance(ranges, str) or not isinstance(ranges, list | tuple) or not ranges:
        raise ValueError(f"ranges must be a non-empty list of [k_min, k_max] pairs, got {ranges!r}")
    for r in ranges:
        if not isinstance(r, list | tuple) or len(r) != 2:
            raise ValueError(f"ranges must hold [k_min, k_max] pairs, got {r!r}")
        check_int("ranges k_min", r[0], low=1, high=k_max - 1)
        check_int("ranges k_max", r[1], low=r[0] + 1, high=k_max)  # inside the static frontier
    schedules = extra.get("schedules", SCHEDULES)
    allowed = [s for s in SCHEDULE_NAMES if s != STATIC]
    if isinstance(schedules, str) or not isinstance(schedules, list | tuple) or not schedules:
        raise ValueError(f"schedules must be a non-empty list from {allowed}, got {schedules!r}")
    unknown = [s for s in schedules if s not in allowed]
    if unknown:
        raise ValueError(f"schedules {unknown} unknown ('constant' is the static baseline); allowed: {allowed}")
    opts = SweepOptions(
        o["prompts"], o["prompt_length"], o["gen_length"], o["block_length"], steps, o["mc_num"], k_max,
        tuple(dict.fromkeys((lo, hi) for lo, hi in ranges)), tuple(dict.fromkeys(schedules)),
    )  # fmt: skip
    opts.sampler()  # lengths and steps, with the sampler's own messages
    return opts


# ----------------------------------------------------------------------------- measures


def prompt_masks(prompts: int, prompt_length: int, gen_length: int, mc_num: int) -> tuple[Tensor, Tensor]:
    """([B, N, G] bool masks, [B, N, G] weights G/l) of the MC-ELBO: the same draws for every setting."""
    from dlmoe.eval.likelihood import draw_masks

    drawn = [
        draw_masks(prompt_length, gen_length, mc_num, torch.Generator().manual_seed(MASK_SEED + i))
        for i in range(prompts)
    ]
    return torch.stack([m for m, _ in drawn]), torch.stack([w for _, w in drawn])


@torch.no_grad()
def reference_nll(
    transformer: Any, prompts_BP: Tensor, answers_BG: Tensor, masks: tuple[Tensor, Tensor], k: int
) -> Tensor:
    """[B] float64 −MC-ELBO / G of each answer given its prompt (nats per token), the model at static k.

    The estimator of `eval.likelihood.mc_log_likelihood` on the given masks; k is a routing override, so
    expert-choice rows stay independent (per-sequence pool)."""
    masked_BNG, weight_BNG = masks
    batch, samples, gen = masked_BNG.shape
    length, device = prompts_BP.shape[1], next(transformer.parameters()).device
    clean_RL = torch.cat([prompts_BP, answers_BG], 1).cpu().repeat_interleave(samples, 0)
    masked_RG = masked_BNG.reshape(batch * samples, gen)
    noisy_RL = clean_RL.clone()
    noisy_RL[:, length:] = noisy_RL[:, length:].masked_fill(masked_RG, transformer.config.mask_id)
    weight_RG = weight_BNG.reshape(batch * samples, gen) * masked_RG
    losses = []
    for start in range(0, batch * samples, ROWS_PER_FORWARD):
        rows = slice(start, start + ROWS_PER_FORWARD)
        x = noisy_RL[rows].to(device)
        k_R = torch.full((x.shape[0],), k, dtype=torch.long, device=device)
        logits = transformer(x, routing=RoutingContext(experts_per_token=k_R)).logits[:, length:].float()
        ce = F.cross_entropy(logits.transpose(1, 2), clean_RL[rows, length:].to(device), reduction="none")
        losses.append((ce.double().cpu() * weight_RG[rows]).sum(1))
    return torch.cat(losses).view(batch, samples).mean(1) / gen


def distinct_fraction(tokens_BG: Tensor) -> list[float]:
    """Per row, distinct tokens / generated tokens (1 = no token repeats)."""
    return [len(set(row.tolist())) / row.numel() for row in tokens_BG]


class PolicyForward:
    """The model with each row's expert-choice k from `policy` at that row's mask ratio (the training-style
    analogue of a sampling policy), counting the FLOPs and routed slots it ran."""

    def __init__(self, transformer: Any, policy: CapacityPolicy) -> None:
        self.transformer, self.policy = transformer, policy
        self.flops, self.tokens, self.slots = 0.0, 0, 0.0

    def __call__(self, input_ids: Tensor, *, mask_ratio: Tensor, **kwargs: Any) -> Any:
        from dlmoe.model.flops import forward_flops

        k_B = self.policy.experts_per_token(mask_ratio.float()).to(input_ids.device)
        out = self.transformer(
            input_ids, mask_ratio=mask_ratio, routing=RoutingContext(experts_per_token=k_B), **kwargs
        )
        batch, length = input_ids.shape
        slots = [d.num_slots for d in out.dispatches]
        self.flops += forward_flops(
            self.transformer.config, batch=batch, query_length=length, key_length=length, slots_per_moe_layer=slots
        )
        self.tokens += batch * length
        self.slots += sum(slots) / len(slots)
        return out


def proxy_elbo(
    transformer: Any, batches: list[Tensor], policy: CapacityPolicy, *, antithetic: bool
) -> dict[str, float]:
    """Validation ELBO (nats/token, the fixed validation noise) with k from `policy` per row, and its
    measured FLOPs and routed experts per token."""
    from dlmoe.diffusion.validation import validation_elbo

    forward = PolicyForward(transformer, policy)
    device = next(transformer.parameters()).device
    elbo = validation_elbo(
        forward, batches, mask_id=transformer.config.mask_id, two_stream=False, antithetic=antithetic, device=device
    )
    return {
        "elbo": elbo.nats_per_token,
        "flops_per_token": forward.flops / forward.tokens,
        "experts_per_token": forward.slots / forward.tokens,
    }


# ----------------------------------------------------------------------------- one base


def sweep_base(run_dir: Path, opts: SweepOptions, device: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(every setting's measures on one finished run, its generations as ids and text)."""
    from dlmoe.inference import load_run
    from dlmoe.sampling import generate
    from dlmoe.sampling.denoiser import unwrap_model
    from dlmoe.train.data_setup import prepare_data

    config, model, tokenizer = load_run(run_dir)
    model = model.to(device)
    transformer = unwrap_model(model)
    batches = prepare_data(config, Path(run_dir)).validation_batches
    rows = torch.cat(batches)
    if rows.shape[0] < opts.prompts:
        raise ValueError(f"{run_dir} has {rows.shape[0]} validation rows, fewer than prompts={opts.prompts}")
    prompts_BP, rest = rows[: opts.prompts, : opts.prompt_length], rows[: opts.prompts, opts.prompt_length :]
    masks = prompt_masks(opts.prompts, opts.prompt_length, opts.gen_length, opts.mc_num)
    started, points, generated = time.perf_counter(), [], {}
    for setting in opts.settings():
        result = generate(model, prompts_BP.to(device), dataclasses.replace(opts.sampler(), capacity=setting.policy()))
        tokens = generated[setting.name] = result.generated.cpu()
        stats = result.stats
        points.append({
            "setting": setting.name, "schedule": setting.schedule, "k_min": setting.k_min, "k_max": setting.k_max,
            "static": setting.static, "flops_per_token": stats.active_flops_per_token,
            "experts_per_token": stats.experts_per_token, "forwards": stats.num_forwards, "seconds": stats.seconds,
            "nll": reference_nll(transformer, prompts_BP, tokens, masks, opts.k_max).tolist(),
            "distinct": distinct_fraction(tokens),
            "proxy": proxy_elbo(transformer, batches, setting.policy(), antithetic=config.train.antithetic),
        })  # fmt: skip
    reference = generated[Setting(STATIC, opts.k_max, opts.k_max).name]
    for point in points:
        point["agreement"] = (generated[point["setting"]] == reference).double().mean(1).tolist()
    heldout = rest[:, : opts.gen_length]
    record = {
        "model": _model_record(config),
        "heldout": {"nll": reference_nll(transformer, prompts_BP, heldout, masks, opts.k_max).tolist(),
                    "distinct": distinct_fraction(heldout)},
        "points": points,
        "sweep_s": time.perf_counter() - started,
    }  # fmt: skip
    texts = {name: tokenizer.batch_decode(tokens.tolist()) for name, tokens in generated.items()}
    ids = {name: tokens.tolist() for name, tokens in generated.items()}
    return record, {"prompts": tokenizer.batch_decode(prompts_BP.tolist()), "texts": texts, "ids": ids}


def _model_record(config: Any) -> dict[str, Any]:
    """What the report says about the sampled model."""
    router = config.model.moe.router
    return {
        "router": router.kind, "num_experts": router.num_experts, "k": router.num_experts_per_tok,
        "capacity_schedule": router.capacity_schedule, "dim": config.model.dim, "num_layers": config.model.num_layers,
        "shared_experts": config.model.moe.num_shared_experts, "seq_len": config.data.seq_len,
        "train_steps": config.train.steps,
    }  # fmt: skip


# ----------------------------------------------------------------------------- run


def check_base(config: Any, name: str = "--base-run") -> None:
    """The policy needs a single-stream expert-choice model whose rows route independently."""
    moe = None if config.model.moe is None else config.model.moe.router
    if moe is None or moe.kind != "expert_choice":
        kind = "dense" if moe is None else moe.kind
        raise ValueError(f"{name} routes with {kind!r}; a capacity policy needs an expert_choice model")
    if moe.pool != "sequence" or moe.block is not None:
        raise ValueError(
            f"{name} uses router.pool={moe.pool!r}, router.block={moe.block!r}: prompts are compared one by one, so "
            "each row must route on its own (pool 'sequence', no block routing)"
        )
    if config.model.block_causal:
        raise ValueError(f"{name} is a block-causal (two-stream) model; capacity-policy scores single-stream models")


def _check(args: ExperimentArgs) -> tuple[Any, SweepOptions, Any]:
    """(scale, sweep options, the --base-run or None), every option checked before --out is written."""
    from dlmoe.train.init_from import SourceRun

    check_args(args, EXTRA)
    if args.mcq:
        raise ValueError("capacity-policy takes no --mcq (quality is measured on generations)")
    scale = experiment_scale(args, LAPTOP)
    source = None
    if args.base_run is not None:
        if args.seeds != 1:
            raise ValueError(f"--seeds={args.seeds} trains that many base models; --base-run gives one: pass --seeds 1")
        source = SourceRun.open(args.base_run, name="--base-run")
        check_base(source.config)
        router, train = source.config.model.moe.router, source.config.train
        shape = {"k": router.num_experts_per_tok, "num_experts": router.num_experts,
                 "seq_len": source.config.data.seq_len, "rows": train.eval_batches * train.batch_size}  # fmt: skip
    else:
        shape = {"k": scale.experts_per_token, "num_experts": scale.num_experts, "seq_len": scale.seq_len,
                 "rows": scale.eval_batches * scale.batch_size}  # fmt: skip
    return scale, sweep_options(args.extra, **shape), source


def _bases(args: ExperimentArgs, out: Path, scale: Any, source: Any) -> list[dict[str, Any]]:
    """Each base: {"seed", "run_dir", "trained_here", "train_s", "control"} (trained here unless --base-run)."""
    from dlmoe.experiments.controls import routed_experts_control
    from dlmoe.experiments.jobs import TrainJob, run_jobs

    if source is not None:
        control = routed_experts_control(source.path) | {"seed": 0}
        return [{"seed": 0, "run_dir": source.path, "trained_here": False, "train_s": None, "control": control}]
    base = scale_overrides(scale, out / "runs", args.corpus, out / ".cache", scaling_factor=args.scaling_factor)
    jobs = [TrainJob("base", seed, BASE_VARIANT) for seed in range(args.seeds)]
    done = run_jobs(out, base, jobs, workers=args.jobs)
    return [
        {"seed": job.seed, "run_dir": d.run.run_dir, "trained_here": True, "train_s": d.run.rows[-1]["train_s"],
         "control": d.control}
        for job, d in zip(jobs, done, strict=True)
    ]  # fmt: skip


def planned_steps(args: ExperimentArgs) -> dict[str, int]:
    """Optimizer steps this experiment will train with `args` (dlmoe.experiments.suite)."""
    return {"bases": 0 if args.base_run else args.seeds * experiment_scale(args, LAPTOP).steps}


def run(args: ExperimentArgs) -> dict:
    """Train (or take) the base, sample it under every setting, write results.json, plots and results.md."""
    from dlmoe.experiments.report_capacity_policy import summary

    scale, opts, source = _check(args)
    options = {
        "scale": args.scale_name, "scale_values": dataclasses.asdict(scale), "corpus": args.corpus,
        "seeds": args.seeds, "steps": scale.steps, "base_run": args.base_run, "scaling_factor": args.scaling_factor,
    } | {key: args.extra[key] for key in sorted(args.extra)}  # fmt: skip
    out = prepare_output(args.out, NAME, options, overwrite=args.overwrite)
    record, started = start_record(scale.device, args.jobs), time.perf_counter()
    found = _bases(args, out, scale, source)
    bases, generations = [], {}
    for base in found:
        measured, generations[f"seed{base['seed']}"] = sweep_base(base["run_dir"], opts, scale.device)
        run_dir = Path(base["run_dir"]).relative_to(out) if base["trained_here"] else base["run_dir"]
        bases.append({"seed": base["seed"], "run_dir": str(run_dir), "trained_here": base["trained_here"],
                      "train_s": base["train_s"]} | measured)  # fmt: skip
    write_json(out / "generations.json", generations)
    results = {
        "experiment": NAME,
        "options": options,
        "sweep": dataclasses.asdict(opts) | {"reference_k": opts.k_max, "mask_seed": MASK_SEED, "dtype": "float32"},
        "bases": bases,
        "controls": {"base": [base["control"] for base in found]},
    }
    results = finite(results | {"summary": summary(results)})
    publish(out, args.report_name(NAME), results, finish_record(record, started), args.results_doc)
    return results


def render(raw_dir: Path) -> Rendered:
    """The report and plots from the archived results.json and provenance.json alone."""
    from dlmoe.experiments.report_capacity_policy import plot_curve, plot_deltas, report

    results, provenance = read_raw(raw_dir)
    curve, curve_series = plot_curve(results, raw_dir / "quality_flops.png")
    deltas, delta_series = plot_deltas(results, raw_dir / "equal_flops_deltas.png")
    return Rendered(
        report(results, provenance),
        [curve, deltas],
        {"quality_flops": curve_series, "equal_flops_deltas": delta_series},
    )
