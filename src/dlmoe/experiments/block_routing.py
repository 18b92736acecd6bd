"""dMoE's claim on dMoE's own metric: block routing needs fewer unique experts per denoising forward
and keeps quality — training-free, and after block-routing fine-tuning (`report_block_routing` renders it).

Base: a token-choice run (`--base-run`, else one trained here: sigmoid scores with loss-free expert
bias, dropless — LLaDA2's router family; 1200 steps at the laptop scale, where its routed experts
matter, see the routed-experts-off control). Every routing setting (token routing, or top-p × guard)
is measured by
  - unique experts per layer per denoising forward (`GenerationStats.unique_experts`, per prompt)
    while generating greedily after fixed prefixes of held-out sequences;
  - agreement: the fraction of generated tokens equal to the token-routing generation of the
    same prompts (by the same model, and by the base);
  - the held-out validation ELBO (nats/token) per batch × noise draw, on fixed noise, so every
    difference between settings is paired;
  - with `--mcq` files, letter-scoring accuracy.
The base sweeps TOP_PS × guards {k, 2k, 4k} (capped at E). Fine-tuning (dMoE's "learnable" part):
from the base, FINETUNE_STEPS of masked-token CE with the mask ratio in [0.3, 0.8] and block routing
in the forward, at FINETUNE_TOP_PS; a control fine-tunes the same steps with token routing. Each
fine-tuned model sweeps the test top-p at the default guard: the p_train × p_test grid.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlmoe.config import BlockRoutingConfig, RunConfig
from dlmoe.config_io import load_run_config, run_config_to_dict
from dlmoe.diffusion.validation import VALIDATION_SEED, validation_elbo
from dlmoe.eval.mcq_file import read_mcq_jsonl
from dlmoe.eval.multiple_choice import score_mcq
from dlmoe.experiments import ExperimentArgs
from dlmoe.experiments.common import (
    Scale,
    check_args,
    experiment_scale,
    finite,
    prepare_output,
    scale_overrides,
    variant_config,
)
from dlmoe.experiments.controls import routed_experts_control
from dlmoe.experiments.provenance import finish_record, start_record
from dlmoe.experiments.raw_data import publish
from dlmoe.experiments.report_block_routing import grid, render, summary
from dlmoe.inference import load_run
from dlmoe.routing.routers import block_routing
from dlmoe.sampling import GenerationStats, SamplerConfig, StepInfo, generate
from dlmoe.sampling.denoiser import unwrap_model
from dlmoe.train import Trainer
from dlmoe.train.data_setup import prepare_data
from dlmoe.train.init_from import SourceRun

NAME = "block-routing"
TOP_PS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # 1.0: every voted expert = token routing
FINETUNE_TOP_PS = (0.3, 0.6)  # p_train; each must be in TOP_PS (its p_test = p_train cell)
CLAIM_TOP_P = 0.6  # dMoE's p (train and test), fixed before measuring: the claims are judged there
GUARD_MULTIPLES = (1, 2, 4)  # guards k, 2k, 4k (capped at E); the default guard is 2k
BLOCK_SIZE = 32  # dMoE's routing block = the decoding block
NOISE_DRAWS = 4  # passes over the validation batches, each batch × draw on its own fixed noise
NUM_PROMPTS, PROMPT_LENGTH, GEN_LENGTH = 16, 32, 64  # generations: prefixes of held-out sequences
FINETUNE_STEPS = 300  # at most; base_steps // 4 below that
LAPTOP = {"steps": 1200, "eval_every": 100}  # the base at the laptop scale: routed experts worth > 0.3 nats
FINETUNE_LR = 3e-4
MCQ_LIMIT = 300
# measuring (generations + ELBO, 64 settings at laptop) costs about as much as the 2100 training steps
OVERHEAD = 1.0
EXTRA = ("guard",)  # args.extra: the default guard (fine-tunes, grid, claims)


@dataclass(frozen=True)
class Plan:
    """What `run` will do, validated before the output folder is claimed."""

    scale: Scale  # the preset (with the laptop base's steps)
    base_steps: int
    finetune_steps: int
    source: SourceRun | None  # --base-run, else a base is trained
    router: dict[str, int]  # num_experts, k, max_seq_len of the base
    guard: int  # the default guard: fine-tunes, the grid and the claims
    mcq: dict[str, Any]
    options: dict[str, Any]

    @property
    def guards(self) -> list[int]:
        """The guard sweep: k, 2k, 4k capped at E, and the default guard."""
        e, k = self.router["num_experts"], self.router["k"]
        return sorted({min(e, m * k) for m in GUARD_MULTIPLES} | {self.guard})


def plan(args: ExperimentArgs) -> Plan:
    """Every option checked (ValueError naming it) before anything is written."""
    check_args(args, EXTRA)
    assert set(FINETUNE_TOP_PS) <= set(TOP_PS) and CLAIM_TOP_P in TOP_PS, "the grid and claims read these cells"
    scale = experiment_scale(args, LAPTOP)
    # the laptop base trains LAPTOP["steps"]; other scales twice their preset; args.steps wins
    base_steps = scale.steps if args.steps is not None or args.scale_name == "laptop" else 2 * scale.steps
    finetune_steps = min(FINETUNE_STEPS, max(1, base_steps // 4))
    source = SourceRun.open(args.base_run, name="--base-run") if args.base_run else None
    router = _router_shape(source, scale)
    guard = _default_guard(args.extra.get("guard"), router)
    mcq = {Path(p).stem: read_mcq_jsonl(p, limit=MCQ_LIMIT) for p in args.mcq}  # a missing file fails here
    options = {"scale": args.scale_name, "scale_values": dataclasses.asdict(scale), "corpus": args.corpus,
               "base_steps": None if source else base_steps, "finetune_steps": finetune_steps,
               "base_run": args.base_run, "mcq": list(args.mcq), "guard": guard, "seed": 0}  # fmt: skip
    return Plan(scale, base_steps, finetune_steps, source, router, guard, mcq, options)


def planned_steps(args: ExperimentArgs) -> dict[str, int]:
    """The optimizer steps `run(args)` will train (for `dlmoe results --plan`); checks the options too."""
    todo = plan(args)
    base = {} if todo.source else {"base": todo.base_steps}
    return base | {"fine-tunes": todo.finetune_steps * (1 + len(FINETUNE_TOP_PS))}


def run(args: ExperimentArgs) -> dict:
    todo = plan(args)
    out = prepare_output(args.out, NAME, todo.options, overwrite=args.overwrite)
    record, started = start_record(todo.scale.device, args.jobs), time.perf_counter()
    results = _measure(out, args, todo)
    results = finite(results | {"grid": grid(results)})
    results["summary"] = finite(summary(results))
    publish(out, NAME, results, finish_record(record, started), args.results_doc)
    return results


def _measure(out: Path, args: ExperimentArgs, todo: Plan) -> dict[str, Any]:
    """Train (or open) the base, sweep it, fine-tune and sweep each fine-tune; results.json's content."""
    cost: dict[str, float] = {}
    clock = time.perf_counter()
    base_run = todo.source.path if todo.source else _train_base(out, args, todo.scale, todo.base_steps)
    cost["base_train_s"] = time.perf_counter() - clock
    config, model, tokenizer = load_run(base_run)
    bench = Bench.build(config, base_run, tokenizer, todo.mcq)
    clock = time.perf_counter()
    points, base = sweep(bench, model, "base", [(p, g) for g in todo.guards for p in TOP_PS], None)
    controls = {"base": [routed_experts_control(base_run) | {"seed": 0}]}
    cost["base_measure_s"] = time.perf_counter() - clock
    steps = None if todo.source else todo.base_steps
    models = {"base": {"label": "training-free", "p_train": None, "run_dir": str(base_run), "steps": steps}}
    for name, top_p in [("ft_token", None)] + [(f"ft_top_p_{p}", p) for p in FINETUNE_TOP_PS]:
        clock = time.perf_counter()
        run_dir = _finetune(out, base_run, top_p, todo.guard, todo.finetune_steps)
        cost[f"{name}_train_s"] = time.perf_counter() - clock
        label = "token routing (control)" if top_p is None else f"p_train={top_p}"
        models[name] = {"label": label, "p_train": top_p, "run_dir": str(run_dir), "steps": todo.finetune_steps}
        clock = time.perf_counter()
        points += sweep(bench, load_run(run_dir)[1], name, [(p, todo.guard) for p in TOP_PS], base)[0]
        cost[f"{name}_measure_s"] = time.perf_counter() - clock
    router = todo.router
    return {
        "experiment": NAME, "options": todo.options, "base_run": str(base_run), "num_experts": router["num_experts"],
        "experts_per_token": router["k"], "block_size": BLOCK_SIZE, "guard": todo.guard, "guards": todo.guards,
        "top_ps": list(TOP_PS), "finetune_top_ps": list(FINETUNE_TOP_PS), "claim_top_p": CLAIM_TOP_P,
        "generation": bench.generation_record(), "noise_draws": NOISE_DRAWS, "elbo_items": bench.num_items,
        "models": models, "points": points, "controls": controls, "cost_s": cost,
        "mcq_skipped_lines": {name: data.skipped for name, data in todo.mcq.items()},
    }  # fmt: skip


def _router_shape(source: SourceRun | None, scale: Scale) -> dict[str, int]:
    """E, k and the context length of the base, checked before anything is written: a token-choice
    MoE whose context holds a prompt and its generation."""
    shape = {"num_experts": scale.num_experts, "k": scale.experts_per_token, "max_seq_len": scale.seq_len}
    if source is not None:
        moe = source.config.model.moe
        router = moe.router if moe is not None else None
        if router is None or router.kind != "token_choice":
            kind = router.kind if router is not None else "dense"
            raise ValueError(
                f"--base-run must be a token-choice MoE run (dMoE routes a token-choice model), got {kind}"
            )
        shape = {"num_experts": router.num_experts, "k": router.num_experts_per_tok,
                 "max_seq_len": source.config.model.max_seq_len}  # fmt: skip
    needed = PROMPT_LENGTH + GEN_LENGTH
    if needed > shape["max_seq_len"]:
        raise ValueError(
            f"block-routing generates {GEN_LENGTH} tokens after {PROMPT_LENGTH}-token prompts ({needed} in all), "
            f"more than the base model's max_seq_len={shape['max_seq_len']}"
        )
    return shape


def _default_guard(value: Any, router: dict[str, int]) -> int:
    """The default guard: `value` (an int in [1, E]) or 2k capped at E (dMoE: 16 of 256 with k = 8)."""
    num_experts = router["num_experts"]
    if value is None:
        return min(num_experts, 2 * router["k"])
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_experts:
        raise ValueError(f"guard must be an int from 1 to the base's {num_experts} experts, got {value!r}")
    return value


def _train_base(out: Path, args: ExperimentArgs, scale: Scale, steps: int) -> Path:
    # dMoE's recipe (LLaDA2-style token choice) has no EC-DLM scaling factor
    overrides = scale_overrides(scale, out / "runs" / "base", args.corpus, out / ".cache", scaling_factor=False)
    variant = {"model.moe.router.kind": "token_choice", "model.moe.router.score": "sigmoid",
               "model.moe.router.expert_bias": True, "train.steps": steps, "train.checkpoint_every": steps,
               "train.warmup_steps": max(1, steps // 10)}  # fmt: skip
    return Trainer(variant_config(overrides, variant), progress=False).fit().run_dir


def _finetune(out: Path, base_run: Path, top_p: float | None, guard: int, steps: int) -> Path:
    """Fine-tune from the base run's config and weights (its architecture, data and tokenizer)."""
    name = "ft_token" if top_p is None else f"ft_top_p_{top_p}"
    source = SourceRun.open(base_run, name="--base-run")
    variant = {
        "run_dir": out / "runs" / name, "train.init_from": base_run, "train.steps": steps,
        "train.checkpoint_every": steps, "train.lr": FINETUNE_LR, "train.warmup_steps": 1,
        "train.lr_schedule": "constant", "train.log_every": 1, "train.eval_every": steps,
        "train.mask_ratio_min": 0.3, "train.mask_ratio_max": 0.8, "train.loss_weighting": "masked_mean",
    }  # fmt: skip
    if top_p is not None:
        variant |= {"model.moe.router.block.block_size": BLOCK_SIZE, "model.moe.router.block.top_p": top_p,
                    "model.moe.router.block.guard": guard}  # fmt: skip
    overrides = [f"{k}={v}" for k, v in variant.items()]
    config = load_run_config(None, overrides, base=run_config_to_dict(source.config))
    return Trainer(config, progress=False).fit().run_dir


# ----------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Measurement:
    """One model under one routing: its generations and held-out scores."""

    tokens: Tensor  # [P, G] generated tokens
    unique_per_prompt: list[float]  # dMoE's unique experts per layer per denoising forward, per prompt
    stats: GenerationStats
    elbo_items: list[float]  # nats/token per validation batch × noise draw
    mcq: dict[str, tuple[float | None, tuple[float, float] | None]]  # name → (accuracy, 95 % Wilson interval)


@dataclass(frozen=True)
class Bench:
    """The fixed inputs every setting is measured on: prompts, validation batches, MCQ items."""

    config: RunConfig
    prompts: Tensor  # [P, PROMPT_LENGTH] prefixes of held-out sequences
    batches: list[Tensor]
    tokenizer: Any
    mcq: dict[str, Any]

    @classmethod
    def build(cls, config: RunConfig, run_dir: Path, tokenizer: Any, mcq: dict[str, Any]) -> Bench:
        batches = prepare_data(config, run_dir).validation_batches
        prompts = torch.cat(batches)[:NUM_PROMPTS, :PROMPT_LENGTH]
        if prompts.shape[0] < 2 or prompts.shape[1] < PROMPT_LENGTH:
            raise ValueError(
                f"the held-out split gives {prompts.shape[0]} prompts of {prompts.shape[1]} tokens; block-routing "
                f"needs at least 2 of {PROMPT_LENGTH} (a larger corpus or data.seq_len)"
            )
        return cls(config, prompts, batches, tokenizer, mcq)

    @property
    def num_items(self) -> int:
        return NOISE_DRAWS * len(self.batches)

    def sampler(self, block: BlockRoutingConfig | None) -> SamplerConfig:
        """Greedy LLaDA sampling, one token per step, in BLOCK_SIZE decoding blocks (dMoE's layout)."""
        return SamplerConfig(gen_length=GEN_LENGTH, block_length=BLOCK_SIZE, steps=GEN_LENGTH, temperature=0.0,
                             block_routing=block)  # fmt: skip

    def generation_record(self) -> dict[str, Any]:
        fields = ("gen_length", "block_length", "steps", "temperature", "remasking", "cache")
        sampler = self.sampler(None)
        return {"prompts": self.prompts.shape[0], "prompt_length": PROMPT_LENGTH} | {
            f: getattr(sampler, f) for f in fields
        }

    @torch.no_grad()
    def measure(self, model, block: BlockRoutingConfig | None) -> Measurement:
        model.eval()
        with block_routing(model, block):  # also the ELBO's and MCQ's forwards (and a block fine-tune's own)
            tokens, per_prompt, stats = generate_per_prompt(model, self.prompts, self.sampler(block))
            elbo = [self._elbo(model, i) for i in range(self.num_items)]
            mcq = {}
            for name, data in self.mcq.items():
                result = score_mcq(model, self.tokenizer, data.items, "letter")
                mcq[name] = (result.accuracy, result.ci95)
        return Measurement(tokens, per_prompt, stats, elbo, mcq)

    def _elbo(self, model, item: int) -> float:
        """The ELBO of one validation batch on its own fixed noise (seeded by the item's index)."""
        model_config, train = self.config.model, self.config.train
        batch = self.batches[item % len(self.batches)]
        return validation_elbo(
            model, [batch], mask_id=model_config.mask_id, two_stream=model_config.block_causal,
            antithetic=train.antithetic, seed=VALIDATION_SEED + item,
        ).nats_per_token  # fmt: skip


def generate_per_prompt(model, prompts: Tensor, sampler: SamplerConfig) -> tuple[Tensor, list[float], GenerationStats]:
    """Generate after every prompt in one batch; the sampler's unique-experts statistic per prompt.

    `GenerationStats.unique_experts` averages over rows; dMoE reports it per sample, and the claims
    pair it per prompt. Each denoising step runs one forward (no cache, no CFG), so a forward hook
    pairs the step's dispatches with its block and counts each row's distinct experts over the
    block as the sampler does; their mean must equal the sampler's figure.
    """
    assert sampler.cache == "none" and sampler.cfg_scale == 0, "one forward per denoising step"
    dispatches: list[list] = []
    per_row_P = torch.zeros(prompts.shape[0], dtype=torch.float64)
    forwards = 0

    def step(info: StepInfo) -> None:
        nonlocal per_row_P, forwards
        assert len(dispatches) == 1, f"{len(dispatches)} forwards in one denoising step"
        start = info.gen_start + info.block * sampler.block_length
        columns_BL = torch.zeros(info.tokens.shape, dtype=torch.bool)
        columns_BL[:, start : start + sampler.block_length] = True
        used_LB = torch.stack([d.unique_experts(columns_BL.to(d.token_index.device)).cpu() for d in dispatches.pop()])
        per_row_P = per_row_P + used_LB.double().mean(0)
        forwards += 1

    transformer = unwrap_model(model)
    handle = transformer.register_forward_hook(lambda _module, _inputs, output: dispatches.append(output.dispatches))
    try:
        result = generate(model, prompts, sampler, callback=step)
    finally:
        handle.remove()
    per_prompt = (per_row_P / forwards).tolist()
    assert math.isclose(sum(per_prompt) / len(per_prompt), result.stats.unique_experts, rel_tol=1e-9)
    return result.generated.cpu(), per_prompt, result.stats


def sweep(
    bench: Bench, model, name: str, settings: list[tuple[float, int]], base: Measurement | None
) -> tuple[list[dict[str, Any]], Measurement]:
    """Points of `model`: token routing first (its own reference), then every (top_p, guard);
    `base`: the base's token routing (None: this is the base). Returns the points and the model's
    token-routing measurement."""
    token = bench.measure(model, None)
    base = base or token
    points = [point(name, None, None, token, token, base)]
    for top_p, guard in settings:
        block = BlockRoutingConfig(block_size=BLOCK_SIZE, top_p=top_p, guard=guard)
        points.append(point(name, top_p, guard, bench.measure(model, block), token, base))
    return points, token


def point(
    name: str, top_p: float | None, guard: int | None, m: Measurement, own: Measurement, base: Measurement
) -> dict[str, Any]:
    """One setting's record: the dMoE metric per prompt, agreement and the paired ELBO change
    against the model's own token routing and against the base's."""
    agreement_P = (m.tokens == own.tokens).double().mean(1)
    elbo = sum(m.elbo_items) / len(m.elbo_items)
    record = {
        "model": name, "top_p": top_p, "guard": guard,
        "unique_experts": sum(m.unique_per_prompt) / len(m.unique_per_prompt),
        "unique_experts_per_prompt": m.unique_per_prompt, "unique_experts_by_layer": m.stats.unique_experts_by_layer,
        "experts_per_token": m.stats.experts_per_token, "denoising_forwards": m.stats.denoising_forwards,
        "agreement": float(agreement_P.mean()), "agreement_per_prompt": agreement_P.tolist(),
        "agreement_base": float((m.tokens == base.tokens).double().mean()),
        "elbo": elbo, "elbo_items": m.elbo_items,
        "elbo_change": elbo - sum(own.elbo_items) / len(own.elbo_items),
        "elbo_change_base": elbo - sum(base.elbo_items) / len(base.elbo_items),
    }  # fmt: skip
    for mcq_name, (accuracy, ci95) in m.mcq.items():
        record[f"acc_{mcq_name}"], record[f"ci95_{mcq_name}"] = accuracy, ci95
    return record


__all__ = ["generate_per_prompt", "planned_steps", "render", "run"]
