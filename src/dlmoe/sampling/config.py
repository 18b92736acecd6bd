"""`SamplerConfig`: every option of one generation, validated once and YAML-able.

`generate`, `sample_text`, `dlmoe sample`, the lm-eval adapter and a run's `sample` section
(`dlmoe.config.SampleConfig`, a subclass) all take this one object, so an option is named,
defaulted and checked in one place. Checks that need the model (vocabulary, context length,
routers, the model's special ids) stay in `generate`. `sampler_from_keywords` is the one adapter
for the older keyword form (`generate(model, ids, gen_length=..., steps=...)`).

Only str / int / float / bool / None, lists of ints and nested dataclasses: OmegaConf structured
configs read and write it (YAML, dotted overrides).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from dlmoe import vocab
from dlmoe._checks import check_choice, check_float, check_int
from dlmoe.routing.config import BlockRoutingConfig
from dlmoe.routing.schedules import DEFAULT_SIGMA, dynamic_k, validate_schedule


@dataclass(frozen=True)
class CapacityPolicy:
    """Expert-choice compute as a policy over the denoising steps: each forward uses
    k_b = dynamic_k(r_b) = k_min + (k_max − k_min)·s(r_b) experts per token (rounded), with r_b the
    fraction of row b's generation still masked (1 at the first step, → 0 at the last) and s one
    of the capacity schedules (`dlmoe.routing.schedules`)."""

    schedule: str
    k_min: int
    k_max: int
    sigma: float = DEFAULT_SIGMA

    def __post_init__(self) -> None:
        if self.schedule not in vocab.SCHEDULE_NAMES:
            raise ValueError(f"capacity schedule must be one of {list(vocab.SCHEDULE_NAMES)}, got {self.schedule!r}")
        validate_schedule(self.schedule, self.sigma)
        check_int("capacity.k_min", self.k_min, low=1)
        check_int("capacity.k_max", self.k_max, low=self.k_min)

    def experts_per_token(self, remaining_B: Tensor) -> Tensor:
        return dynamic_k(remaining_B.float(), self.schedule, self.k_min, self.k_max, sigma=self.sigma).long()


@dataclass(kw_only=True)
class SamplerConfig:
    """Every option of one generation (`dlmoe.sampling.generate`).

    gen_length, block_length: gen_length a multiple of block_length; blocks go left to right.
    steps: forwards over the whole generation, split evenly over blocks (a multiple of the number
        of blocks, ≤ gen_length). Optional with `threshold` (then the minimum commits per step
        follow the quota; without it, at least one).
    temperature: 0 is greedy; > 0 draws by float64 Gumbel-max from softmax(logits / T).
    remasking: `vocab.REMASKING`: "low_confidence" (commit the most probable proposals) or "random".
    threshold: τ in (0, 1]: also commit every proposal with confidence ≥ τ (Fast-dLLM); a block
        then takes as many steps as it needs.
    cache: `vocab.CACHE_MODES`: "none", "prefix", "dual" (approximate, Fast-dLLM) or "exact"
        (block-causal models).
    cfg_scale: classifier-free guidance s ≥ 0 (0 = off).
    block_routing: dMoE block routing for this generation (top_p, guard; the blocks are the
        decoding blocks, so `block_routing.block_size` is not used). Token- or expert-choice models.
    capacity: expert-choice compute per step (`CapacityPolicy`), overriding the trained schedule.
    mask_id, eos_id, pad_id: None = the model config's (mask_id is required for plain callables).
    stop_at_eos: a row finishes once it holds an EOS with no mask before it; its remaining masks
        become EOS. The loop ends when every row is finished.
    suppress_tokens: token ids never proposed: their logits are −inf before the Gumbel-max /
        argmax and the confidence (LLaDA's `logits_eos_inf`, e.g. EOS so an instruct model fills
        the whole length). Ints in [0, vocab), not the mask id (never proposed anyway).
    suppress_commit_tokens: token ids that may be proposed but get confidence −inf: they rank
        below every other candidate of the block, so a step commits them only where its quota
        (or the threshold's minimum of one) is not met by other proposals, never by the threshold
        itself (LLaDA's `confidence_eos_eot_inf` for EOS / EoT). Same checks; no id in both.
        With a plain callable, ids ≥ its vocabulary are refused at the first forward.
    """

    section: ClassVar[str] = "sampler"  # the name errors give this config (a run's section: "sample")

    gen_length: int
    block_length: int
    steps: int | None = None
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    cache: str = "none"
    cfg_scale: float = 0.0
    block_routing: BlockRoutingConfig | None = None
    capacity: CapacityPolicy | None = None
    mask_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    stop_at_eos: bool = False
    suppress_tokens: list[int] | None = None
    suppress_commit_tokens: list[int] | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> int | None:
        """Validate every option (again: the dataclass is mutable); returns the steps per block
        (None with a threshold and no steps)."""
        self._check_options()
        return self._check_layout()

    # ------------------------------------------------------------------ checks

    def _check_options(self) -> None:
        """Each option on its own (and steps vs threshold)."""
        p = self.section
        check_int(f"{p}.gen_length", self.gen_length, low=1)
        check_int(f"{p}.block_length", self.block_length, low=1)
        if self.steps is not None:
            check_int(f"{p}.steps", self.steps, low=1)
        elif self.threshold is None:
            raise ValueError(f"{p}.steps is required without a threshold (e.g. steps=gen_length={self.gen_length})")
        check_float(f"{p}.temperature", self.temperature, low=0.0)
        check_choice(f"{p}.remasking", self.remasking, vocab.REMASKING)
        if self.threshold is not None:
            check_float(f"{p}.threshold", self.threshold, low=0.0, high=1.0, low_open=True)
        check_choice(f"{p}.cache", self.cache, vocab.CACHE_MODES)
        check_float(f"{p}.cfg_scale", self.cfg_scale, low=0.0)
        for name, kind in (("block_routing", BlockRoutingConfig), ("capacity", CapacityPolicy)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"{p}.{name} must be a {kind.__name__} or None, got {type(value).__name__}")
        for name in ("mask_id", "eos_id", "pad_id"):
            if getattr(self, name) is not None:
                check_int(f"{p}.{name}", getattr(self, name), low=0)
        if not isinstance(self.stop_at_eos, bool):
            raise ValueError(f"{p}.stop_at_eos must be a bool, got {self.stop_at_eos!r}")
        self.suppress_tokens = self._token_list("suppress_tokens")
        self.suppress_commit_tokens = self._token_list("suppress_commit_tokens")
        both = set(self.suppress_tokens or ()) & set(self.suppress_commit_tokens or ())
        if both:
            raise ValueError(
                f"token ids {sorted(both)} are in both {p}.suppress_tokens and {p}.suppress_commit_tokens; "
                "use one (suppress_tokens: never proposed, suppress_commit_tokens: committed last)"
            )

    def _check_layout(self) -> int | None:
        """Lengths and steps together: blocks tile the generation, steps split evenly over blocks."""
        p, gen_length, block_length = self.section, self.gen_length, self.block_length
        if gen_length % block_length:
            raise ValueError(
                f"{p}.gen_length={gen_length} must be a multiple of block_length={block_length} "
                f"(e.g. gen_length={-(-gen_length // block_length) * block_length})"
            )
        if self.steps is None:
            return None
        num_blocks = gen_length // block_length
        check_int(f"{p}.steps", self.steps, low=1, high=gen_length)  # more would leave steps with nothing to commit
        if self.steps % num_blocks:
            raise ValueError(
                f"{p}.steps={self.steps} must be a multiple of the number of blocks "
                f"(gen_length // block_length = {num_blocks})"
            )
        return self.steps // num_blocks

    def _token_list(self, name: str) -> list[int] | None:
        """A list of token ids as a plain list of ints ≥ 0 (a 1-D tensor or tuple is accepted)."""
        value = getattr(self, name)
        if value is None:
            return None
        if isinstance(value, Tensor) and value.ndim == 1:
            value = value.tolist()  # float / bool entries are refused below
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ValueError(f"{self.section}.{name} must be a list of int token ids, got {value!r}")
        return [check_int(f"{self.section}.{name}[{i}]", v, low=0) for i, v in enumerate(value)]


def sampler_from_keywords(
    sampler: SamplerConfig | None, keywords: dict[str, Any], caller: str, *, base: SamplerConfig | None = None
) -> SamplerConfig:
    """The one adapter for the keyword form (`caller(..., gen_length=..., steps=...)`): the
    `SamplerConfig` the keywords name, or `base` with those fields replaced. A sampler and keywords
    together are refused."""
    if sampler is not None:
        if not isinstance(sampler, SamplerConfig):
            raise ValueError(f"{caller}: sampler must be a SamplerConfig, got {type(sampler).__name__}")
        if keywords:
            raise ValueError(
                f"{caller}: give the options either in the SamplerConfig or as keywords, not both "
                f"(got a sampler and {sorted(keywords)}); dataclasses.replace(sampler, ...) changes some"
            )
        return sampler
    unknown = sorted(set(keywords) - {f.name for f in dataclasses.fields(SamplerConfig)})
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword arguments {unknown}")
    if base is not None:
        return dataclasses.replace(base, **keywords)
    if "gen_length" not in keywords or "block_length" not in keywords:
        raise ValueError(
            f"{caller} needs a SamplerConfig, e.g. SamplerConfig(gen_length=64, block_length=32, steps=64) "
            "(or the keywords gen_length=..., block_length=...)"
        )
    return SamplerConfig(**keywords)
