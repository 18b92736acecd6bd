"""Load a trained run and use it: sample text, measure routing per mask ratio, evaluate perplexity."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from dlmoe._checks import check_int
from dlmoe.config import RunConfig, SampleConfig
from dlmoe.config_io import read_json, read_saved_run_config
from dlmoe.data import load_tokenizer
from dlmoe.diffusion.noise import add_mask_noise
from dlmoe.diffusion.validation import VALIDATION_SEED, validation_elbo
from dlmoe.model.hf import DlmoeForDiffusionLM
from dlmoe.sampling import GenerationStats, SamplerConfig, StepInfo, generate
from dlmoe.sampling.config import sampler_from_keywords
from dlmoe.train.data_setup import prepare_data
from dlmoe.train.metrics import routing_summary


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The config of a finished run, without loading its weights."""
    run_dir = Path(run_dir)
    if not (run_dir / "model" / "config.json").is_file():
        raise ValueError(f"no trained model in {str(run_dir / 'model')!r} (train first: dlmoe train run_dir={run_dir})")
    # the run is where it is now: a copied or moved run never points back at its old folder
    return dataclasses.replace(read_saved_run_config(run_dir / "config.json"), run_dir=str(run_dir))


def load_run(
    run_dir: str | Path, *, expert_memory: int | str | None = None
) -> tuple[RunConfig, DlmoeForDiffusionLM, object]:
    """(config, model in eval mode, tokenizer) of a finished run (`<run_dir>/model`).

    Only safetensors weights are read: a model folder holding pickles instead (pytorch_model.bin,
    *.pt) is refused before anything could unpickle them. With `expert_memory` (bytes, or "2GiB")
    the routed experts stay on disk and are read on demand into that much memory (`dlmoe.offload`;
    close the model's store, `dlmoe.offload.expert_store_of(model).close()`, or use `offloaded_run`)."""
    config = read_run_config(run_dir)
    model_dir = Path(run_dir) / "model"
    read_json(model_dir / "config.json", "the run's model config is damaged: train the run again")
    if not any((model_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        if pickles:
            raise ValueError(
                f"{model_dir} holds {pickles[0]} (a pickle); dlmoe reads only safetensors — pickled weights can run "
                "code when loaded, so they are never opened (convert them to model.safetensors with a tool you trust)"
            )
        raise ValueError(f"{model_dir} holds no model.safetensors: the run's model is missing (train the run again)")
    if expert_memory is not None:
        from dlmoe.offload import load_offloaded, parse_size

        model, _ = load_offloaded(model_dir, parse_size(expert_memory))
        return config, model, load_tokenizer(model_dir)
    hf_logging.disable_progress_bar()  # transformers' per-tensor "Loading weights" bar is noise here
    try:
        model = DlmoeForDiffusionLM.from_pretrained(model_dir, use_safetensors=True).eval()
    finally:
        hf_logging.enable_progress_bar()
    return config, model, load_tokenizer(model_dir)


@contextmanager
def offloaded_run(run_dir: str | Path, expert_memory: int | str) -> Iterator[tuple[RunConfig, object, object]]:
    """`load_run(run_dir, expert_memory=...)` whose expert store is closed (reader thread stopped,
    cached experts dropped) when the block ends, however it ends."""
    from dlmoe.offload import expert_store_of

    config, model, tokenizer = load_run(run_dir, expert_memory=expert_memory)
    try:
        yield config, model, tokenizer
    finally:
        expert_store_of(model).close()


@dataclass(frozen=True)
class SampleOutput:
    """Texts (prompt + generation, one per row) and what generating them cost."""

    texts: list[str]
    prompts: list[str]
    stats: GenerationStats


def sample_text(
    run_dir: str | Path,
    sampler: SamplerConfig | None = None,
    *,
    prompts: list[str] | None = None,
    seed: int = 0,
    progress: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    expert_memory: int | str | None = None,
    **keywords: object,
) -> SampleOutput:
    """Generate from a trained run: each prompt `num_samples` times, as one left-padded batch, on
    `device` (weights cast to `dtype` when given).

    sampler: how to generate (default: the run's `sample` section). A `SampleConfig` also gives the
        prompt (when `prompts` is None) and the samples per prompt; a plain `SamplerConfig` takes
        them from the run's section. The older keyword form (`sample=`, `threshold=`, `cache=`,
        ... any `SamplerConfig` field) changes those fields of the sampler; `threshold=` without
        `steps=` makes the steps adaptive, as it always did here.
    expert_memory: keep the routed experts on disk and read them into at most this many bytes
        ("2GiB"; `dlmoe.offload`); the output is bit-identical to the resident model's."""
    if expert_memory is None:
        config, model, tokenizer = load_run(run_dir)
        return _sample(config, model.to(device=device, dtype=dtype), tokenizer, sampler, prompts, seed, progress,
                       keywords)  # fmt: skip
    with offloaded_run(run_dir, expert_memory) as (config, model, tokenizer):
        return _sample(config, model.to(device=device, dtype=dtype), tokenizer, sampler, prompts, seed, progress,
                       keywords)  # fmt: skip


def _sample(config, model, tokenizer, sampler, prompts, seed, progress, keywords) -> SampleOutput:
    """`sample_text` once the model is loaded (resident or offloaded)."""
    base = keywords.pop("sample", None) if sampler is None else sampler  # `sample=`: the old name
    if keywords.get("threshold") is not None:
        keywords.setdefault("steps", None)
    sampler = sampler_from_keywords(None, keywords, "sample_text", base=base or config.sample)
    sampler.check()
    section = sampler if isinstance(sampler, SampleConfig) else config.sample
    prompts = [section.prompt] if prompts is None else prompts
    rows = [p for p in prompts for _ in range(section.num_samples)]
    prompt_ids = [tokenizer.encode(p) for p in rows]
    for text, ids in zip(rows, prompt_ids, strict=True):
        if not ids:
            raise ValueError(f"prompt {text!r} encodes to no tokens")
    generator = torch.Generator().manual_seed(seed)
    with tqdm(total=sampler.gen_length * len(rows), disable=not progress, desc="sample", unit="tok") as bar:

        def advance(info: StepInfo) -> None:
            bar.update(int(info.committed.sum()))

        result = generate(model, prompt_ids, sampler, generator=generator, callback=advance if progress else None)
    eos = config.model.eos_id if sampler.eos_id is None else sampler.eos_id
    texts = []
    for text, row in zip(rows, result.generated, strict=True):
        ids = row.tolist()
        if sampler.stop_at_eos and eos in ids:
            ids = ids[: ids.index(eos)]
        texts.append(text + tokenizer.decode(ids))
    return SampleOutput(texts, rows, result.stats)


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


def eval_ppl(
    run_dir: str | Path,
    num_batches: int | None = None,
    seed: int = VALIDATION_SEED,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Validation ELBO (nats/token), perplexity upper bound exp(ELBO) and bits per byte, on the CPU
    (weights cast to `dtype` when given): `diffusion.validation_elbo`, as training validates (same
    seed by default, t ~ U(0, 1), antithetic as `train.antithetic`, two streams for block-causal models)."""
    if num_batches is not None:
        check_int("num_batches", num_batches, low=0)  # None or 0: every validation batch
    config, model, _ = load_run(run_dir)
    model = model.to(dtype=dtype)
    data = prepare_data(config, Path(run_dir))
    batches = data.validation_batches[:num_batches] if num_batches else data.validation_batches
    result = validation_elbo(
        model,
        batches,
        mask_id=config.model.mask_id,
        two_stream=config.model.block_causal,
        antithetic=config.train.antithetic,
        seed=seed,
    )
    return {
        "val_elbo_nats_per_token": result.nats_per_token,
        "ppl_upper_bound": result.ppl_upper_bound,
        "bits_per_byte": result.bits_per_byte(data.bytes_per_token),
        "tokens": sum(b.numel() for b in batches),
    }
