"""The inference bench's model, prompts and quality measure (`bench/inference.py` times and reports).

The model is a trained run (trained here unless it exists) or, with --quick, a tiny random one;
prompts are snippets of its validation text; quality is the conditional negative ELBO of each
output given its prompt, cached per distinct output.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import torch

from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
from dlmoe.diffusion import add_mask_noise, masked_diffusion_loss
from dlmoe.model.transformer import DiffusionTransformer


def tiny_model() -> DiffusionTransformer:
    """--quick: a small random-init model (outputs are noise; only the JSON contract is exercised)."""
    router = RouterConfig(num_experts=8, num_experts_per_tok=2)
    config = ModelConfig(
        vocab_size=64, dim=32, num_layers=2, num_heads=2, max_seq_len=64, moe=MoEConfig(router=router, expert_hidden=16)
    )
    torch.manual_seed(0)
    return DiffusionTransformer(config)


def trained_model(args: argparse.Namespace) -> tuple[DiffusionTransformer, list[torch.Tensor], dict]:
    """Train the run unless it holds a model (or --retrain); return (model, validation rows, run facts)."""
    from dlmoe.config_io import load_run_config
    from dlmoe.inference import load_run
    from dlmoe.train.data_setup import prepare_data
    from dlmoe.train.trainer import Trainer

    run = Path(args.run)
    facts: dict = {"run": str(run), "trained_now": False}
    if args.retrain or not (run / "model" / "config.json").is_file():
        print(f"training {run} from {args.config} ...", file=sys.stderr, flush=True)
        config = load_run_config(args.config, [f"run_dir={run}"])
        summary = Trainer(config, overwrite=args.retrain, progress=False).fit()
        facts |= {"trained_now": True, "train_s": round(summary.wall_s, 1)}
    config, hf_model, _ = load_run(run)
    facts |= {"train_steps": config.train.steps, "val_elbo": last_val_loss(run / "metrics.csv")}
    rows = [row for batch in prepare_data(config, run).validation_batches for row in batch]
    return hf_model.model, rows, facts


def last_val_loss(path: Path) -> float | None:
    """The run's last validation ELBO (nats/token) from metrics.csv, if logged."""
    with path.open() as f:
        values = [r["val_loss"] for r in csv.DictReader(f) if r.get("val_loss")]
    return round(float(values[-1]), 4) if values else None


def pick_prompts(rows: list[torch.Tensor], lengths: list[int], first_real_id: int) -> list[torch.Tensor]:
    """One snippet per length, from equal consecutive parts of the validation text, free of special tokens."""
    text = torch.cat(rows)
    part = text.numel() // len(lengths)
    prompts = []
    for i, length in enumerate(lengths):
        chunk = text[i * part : (i + 1) * part]
        for start in range(0, chunk.numel() - length + 1):
            if bool((chunk[start : start + length] >= first_real_id).all()):
                prompts.append(chunk[start : start + length].clone())
                break
        else:
            raise ValueError(f"no {length}-token prompt free of special tokens in part {i} of the validation text")
    return prompts


@torch.inference_mode()
def conditional_nelbo(
    model: DiffusionTransformer, prompt: torch.Tensor, generated: torch.Tensor, args: argparse.Namespace
) -> float:
    """Negative ELBO per generated token (nats) of `generated` given `prompt`: generated positions
    masked with `args.elbo_draws` antithetic t (seeded: the same draws for every output of this
    length), the prompt visible; the 1/r-weighted masked CE of `masked_diffusion_loss`."""
    draws, mask_id = args.elbo_draws, model.config.mask_id
    targets = generated.view(1, -1).expand(draws, -1)
    noised = add_mask_noise(targets, mask_id, antithetic=True, generator=torch.Generator().manual_seed(args.seed))
    total = 0.0
    for s in range(0, draws, args.elbo_chunk):
        part = slice(s, s + args.elbo_chunk)
        rows = noised.noisy_ids[part].shape[0]
        x = torch.cat([prompt.view(1, -1).expand(rows, -1), noised.noisy_ids[part]], 1)
        logits = model(x).logits[:, prompt.numel() :]
        loss = masked_diffusion_loss(logits, targets[part], noised.masked[part], noised.mask_ratio[part]).loss
        total += float(loss) * rows
    return total / draws


class ElboCache:
    """`conditional_nelbo` per distinct (prompt, output): equal outputs share one evaluation."""

    def __init__(self, model: DiffusionTransformer, args: argparse.Namespace) -> None:
        self.model, self.args, self.values = model, args, {}

    def mean(self, prompts: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
        values = []
        for prompt, out in zip(prompts, outputs, strict=True):
            key = (tuple(prompt.tolist()), tuple(out.tolist()))
            if key not in self.values:
                self.values[key] = conditional_nelbo(self.model, prompt, out, self.args)
            values.append(self.values[key])
        return statistics.fmean(values)
