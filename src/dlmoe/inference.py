"""Load a trained run and use it: sample text, measure routing per mask ratio, evaluate perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dlmoe.config import RunConfig, SampleConfig
from dlmoe.config_io import run_config_from_dict
from dlmoe.data import load_tokenizer
from dlmoe.diffusion.noise import add_mask_noise
from dlmoe.diffusion.sampler import generate
from dlmoe.model.hf import DlmoeForDiffusionLM
from dlmoe.train.data_setup import prepare_data
from dlmoe.train.metrics import routing_summary


def load_run(run_dir: str | Path) -> tuple[RunConfig, DlmoeForDiffusionLM, object]:
    """(config, model in eval mode, tokenizer) of a finished run (`<run_dir>/model`)."""
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"no trained model in {str(model_dir)!r} (train first: dlmoe train run_dir={run_dir})")
    config = run_config_from_dict(json.loads((run_dir / "config.json").read_text()))
    model = DlmoeForDiffusionLM.from_pretrained(model_dir).eval()
    return config, model, load_tokenizer(model_dir)


def sample_text(run_dir: str | Path, sample: SampleConfig | None = None, seed: int = 0) -> list[str]:
    config, model, tokenizer = load_run(run_dir)
    s = sample or config.sample
    prompt_ids = tokenizer.encode(s.prompt)
    if len(prompt_ids) + s.gen_length > config.model.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + gen_length={s.gen_length} exceeds the model's "
            f"max_seq_len={config.model.max_seq_len}"
        )
    prompt = torch.tensor([prompt_ids] * s.num_samples, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        result = generate(
            lambda x, r: model(x, mask_ratio=r).logits,
            prompt,
            gen_length=s.gen_length,
            block_length=s.block_length,
            steps=s.steps,
            temperature=s.temperature,
            remasking=s.remasking,
            mask_id=config.model.mask_id,
            generator=generator,
        )
    return [s.prompt + tokenizer.decode(row.tolist()) for row in result.generated]


@torch.no_grad()
def routing_by_mask_ratio(run_dir: str | Path, ratios: tuple[float, ...] = (0.1, 0.5, 0.9)) -> list[dict]:
    """Routing statistics of the trained model on validation text noised at fixed mask ratios."""
    config, model, _ = load_run(run_dir)
    batch = prepare_data(config, Path(run_dir)).validation_batches[0]
    rows = []
    for r in ratios:
        noised = add_mask_noise(batch, config.model.mask_id, t=torch.full((batch.shape[0],), r))
        out = model(noised.noisy_ids, mask_ratio=noised.mask_ratio)
        rows.append({"mask_ratio": r} | {k: round(v, 4) for k, v in routing_summary(out.dispatches).items()})
    return rows


@torch.no_grad()
def eval_ppl(run_dir: str | Path, num_batches: int | None = None, seed: int = 1234) -> dict[str, float]:
    """Validation ELBO (nats/token), perplexity upper bound exp(ELBO) and bits per byte."""
    from dlmoe.diffusion.loss import masked_diffusion_loss

    config, model, _ = load_run(run_dir)
    data = prepare_data(config, Path(run_dir))
    batches = data.validation_batches[:num_batches] if num_batches else data.validation_batches
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for batch in batches:
        noised = add_mask_noise(batch, config.model.mask_id, generator=generator, antithetic=True)
        logits = model(noised.noisy_ids, mask_ratio=noised.mask_ratio).logits
        losses.append(masked_diffusion_loss(logits, batch, noised.masked, noised.mask_ratio).loss.item())
    nelbo = sum(losses) / len(losses)
    return {
        "val_elbo_nats_per_token": nelbo,
        "ppl_upper_bound": math.exp(nelbo),
        "bits_per_byte": nelbo / math.log(2) / data.bytes_per_token,
        "tokens": sum(b.numel() for b in batches),
    }
