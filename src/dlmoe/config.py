"""Configuration dataclasses, one per component; validated once, when built.

Each component receives its own config explicitly. Errors are `ValueError`s that name the field,
the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dlmoe._checks import check_choice, check_float, check_int
from dlmoe.routing.config import BlockRoutingConfig, ExpertChoiceConfig, RouterConfig, TokenChoiceConfig
from dlmoe.sampling.config import SamplerConfig
from dlmoe.vocab import (
    ATTENTION_KINDS,
    DATA_PARALLEL,
    DEVICE_NAMES,
    DIST_BACKENDS,
    EC_POOLS,
    EXPERT_BACKENDS,
    LOSS_WEIGHTINGS,
    LR_SCHEDULES,
    PRECISIONS,
)

__all__ = [  # the router configs live in dlmoe.routing.config; re-exported here for every caller
    "BlockRoutingConfig",
    "DataConfig",
    "ExpertChoiceConfig",
    "MoEConfig",
    "ModelConfig",
    "ParallelConfig",
    "RouterConfig",
    "RunConfig",
    "SampleConfig",
    "TokenChoiceConfig",
    "TrainConfig",
]


@dataclass(kw_only=True)
class MoEConfig:
    """An MoE feed-forward block: router, `num_experts` SwiGLU experts of width `expert_hidden`,
    optional always-on shared experts, and the expert-compute backend."""

    router: RouterConfig = field(default_factory=RouterConfig)
    expert_hidden: int = 256
    num_shared_experts: int = 0
    shared_hidden: int | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            self.router = RouterConfig(**self.router)
        check_int("moe.expert_hidden", self.expert_hidden, low=1)
        check_int("moe.num_shared_experts", self.num_shared_experts, low=0)
        if self.shared_hidden is not None:
            check_int("moe.shared_hidden", self.shared_hidden, low=1)
        check_choice("moe.backend", self.backend, EXPERT_BACKENDS)
        if self.router.scaling_factor and self.num_shared_experts == 0:
            raise ValueError(
                "moe.router.scaling_factor=true scales the routed gates to the norm of the shared experts, "
                "but moe.num_shared_experts=0: set moe.num_shared_experts >= 1 or moe.router.scaling_factor=false"
            )

    @property
    def shared_width(self) -> int:
        """Width of the fused shared-expert MLP (0 = none)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_hidden or self.num_shared_experts * self.expert_hidden


@dataclass(kw_only=True)
class ModelConfig:
    """A bidirectional transformer for masked diffusion; MoE FFNs from layer `first_k_dense` on.

    `moe=None` gives a dense model (every FFN a SwiGLU of width `dense_hidden`).
    """

    vocab_size: int = 4096
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: = num_heads (MHA); fewer: GQA
    head_dim: int | None = None  # None: dim // num_heads
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    qk_norm: bool = True
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dense_hidden: int = 1024
    first_k_dense: int = 0
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    attention: str = "bidirectional"  # or "block_causal": a block attends to itself and earlier blocks
    attention_block_size: int = 32  # block length of "block_causal" attention (exact KV cache at inference)
    mask_id: int = 0
    pad_id: int | None = None
    eos_id: int | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        check_int("model.vocab_size", self.vocab_size, low=2)
        check_int("model.dim", self.dim, low=1)
        check_int("model.num_layers", self.num_layers, low=1)
        check_int("model.num_heads", self.num_heads, low=1)
        kv = self.num_kv_heads if self.num_kv_heads is not None else self.num_heads
        check_int("model.num_kv_heads", kv, low=1, high=self.num_heads)
        if self.num_heads % kv:
            raise ValueError(f"model.num_kv_heads={kv} must divide model.num_heads={self.num_heads}")
        if self.head_dim is None and self.dim % self.num_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by num_heads={self.num_heads} (or set head_dim)")
        if self.head_dim is not None:
            check_int("model.head_dim", self.head_dim, low=2)
        check_int("model.max_seq_len", self.max_seq_len, low=1)
        check_float("model.rope_theta", self.rope_theta, low=0.0, low_open=True)
        check_float("model.partial_rotary_factor", self.partial_rotary_factor, low=0.0, high=1.0, low_open=True)
        check_float("model.norm_eps", self.norm_eps, low=0.0, low_open=True)
        check_int("model.dense_hidden", self.dense_hidden, low=1)
        check_int("model.first_k_dense", self.first_k_dense, low=0, high=self.num_layers)
        check_choice("model.attention", self.attention, ATTENTION_KINDS)
        check_int("model.attention_block_size", self.attention_block_size, low=1)
        check_int("model.mask_id", self.mask_id, low=0, high=self.vocab_size - 1)
        for name in ("pad_id", "eos_id"):
            if getattr(self, name) is not None:
                check_int(f"model.{name}", getattr(self, name), low=0, high=self.vocab_size - 1)
        check_float("model.init_std", self.init_std, low=0.0, low_open=True)

    @property
    def block_causal(self) -> bool:
        """Block-causal attention: trained on two streams [x_t ; x_0] (each noisy block sees the clean
        earlier blocks), scored the same way, and sampled with an exact KV cache."""
        return self.attention == "block_causal"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """Rotated dimensions per head (even), from `partial_rotary_factor`."""
        return max(2, int(self.head_size * self.partial_rotary_factor) // 2 * 2)

    def is_moe_layer(self, index: int) -> bool:
        return self.moe is not None and index >= self.first_k_dense


@dataclass(kw_only=True)
class DataConfig:
    """Which text, how it is tokenized and cut. `corpus`: "shakespeare", "python-stdlib", a text
    file, a folder, or "data.jsonl[:field]"."""

    corpus: str = "shakespeare"
    vocab_size: int = 4096
    seq_len: int = 256
    validation_fraction: float = 0.05
    split_seed: int = 0  # which documents are held out; not train.seed, so a fine-tune or a new seed keeps the split
    cache_dir: str | None = None  # None: <run_dir>/../.cache (shared by runs in one folder)

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, str) or not self.corpus:
            raise ValueError(f"data.corpus must be a non-empty string, got {self.corpus!r}")
        check_int("data.vocab_size", self.vocab_size, low=260, high=1 << 20)
        check_int("data.seq_len", self.seq_len, low=2)
        check_float(
            "data.validation_fraction", self.validation_fraction, low=0.0, high=1.0, low_open=True, high_open=True
        )
        check_int("data.split_seed", self.split_seed, low=0)


DTYPES = PRECISIONS  # auto: bf16 where the hardware runs it natively, else fp32 (dlmoe.precision)


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation, precision, logging and checkpointing of a training run.

    `mask_ratio_min/max`: training draws the masking probability t ~ U[min, max] (dMoE fine-tunes
    on [0.3, 0.8]); validation always uses U[0, 1], the range the ELBO integrates over.
    `loss_weighting="masked_mean"` averages over each micro-batch's masked tokens (dMoE's loss).
    `init_from`: a finished run folder whose weights and tokenizer a new run starts from
    (fine-tuning: same architecture, fresh optimizer, step 0); ignored when resuming a checkpoint.
    """

    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    lr_schedule: str = "cosine"
    decay_fraction: float = 0.2  # WSD: fraction of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto | bf16 | fp32
    seed: int = 0
    loss_weighting: str = "elbo"  # elbo | stable | masked_mean (dMoE: Σ CE / #masked)
    antithetic: bool = True
    mask_ratio_min: float = 0.0
    mask_ratio_max: float = 1.0
    init_from: str | None = None
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_last: int = 2
    threads: int | None = None
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        check_choice("train.device", self.device, DEVICE_NAMES)
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches"):
            check_int(f"train.{name}", getattr(self, name), low=1)
        check_int("train.checkpoint_every", self.checkpoint_every, low=1)
        check_int("train.keep_last", self.keep_last, low=1)
        check_int("train.warmup_steps", self.warmup_steps, low=0)
        check_int("train.seed", self.seed, low=0)
        check_float("train.lr", self.lr, low=0.0, low_open=True)
        check_float("train.min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_float("train.decay_fraction", self.decay_fraction, low=0.0, high=1.0)
        check_float("train.weight_decay", self.weight_decay, low=0.0)
        check_float("train.beta1", self.beta1, low=0.0, high=1.0, high_open=True)
        check_float("train.beta2", self.beta2, low=0.0, high=1.0, high_open=True)
        check_float("train.grad_clip", self.grad_clip, low=0.0, low_open=True)
        check_choice("train.dtype", self.dtype, DTYPES)
        check_choice("train.loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        check_float("train.mask_ratio_min", self.mask_ratio_min, low=0.0, high=1.0, high_open=True)
        check_float("train.mask_ratio_max", self.mask_ratio_max, low=0.0, high=1.0, low_open=True)
        if self.mask_ratio_min >= self.mask_ratio_max:
            raise ValueError(
                f"train.mask_ratio_min must be < train.mask_ratio_max, got {self.mask_ratio_min} >= "
                f"{self.mask_ratio_max} (allowed: 0 <= min < max <= 1)"
            )
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise ValueError(f"train.init_from must be a run folder path or null, got {self.init_from!r}")
        if self.threads is not None:
            check_int("train.threads", self.threads, low=1)


@dataclass(kw_only=True)
class SampleConfig(SamplerConfig):
    """A run's `sample` section (`dlmoe sample`, the demo): the prompt, samples per prompt, and the
    sampler with this run's defaults, so `generate(model, ids, run_config.sample)` works.

    Lengths and steps are checked together when it is sampled from, not when a run config is read:
    a saved run stays readable with lengths a caller then overrides (`dlmoe sample --gen-length`)."""

    section: ClassVar[str] = "sample"

    prompt: str = "ROMEO:"
    num_samples: int = 2
    gen_length: int = 64
    block_length: int = 32
    steps: int | None = 64

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"sample.prompt must be a string, got {self.prompt!r}")
        check_int("sample.num_samples", self.num_samples, low=1)
        self._check_options()


@dataclass(kw_only=True)
class ParallelConfig:
    """How a `torchrun` launch splits the work (ignored by a single process).

    Every rank trains on its own slice of the global batch (`train.batch_size` is global and must
    divide by the world size); dense parameters are replicated (`ddp`) or sharded (`fsdp`, FSDP2)
    over all ranks. `expert_parallel` = P shards the experts over groups of P consecutive ranks;
    dispatched rows travel by all_to_all. `ec_pool="group"`: an expert-choice router with
    `pool="batch"` ranks the tokens of the whole EP group (what one process with the group's
    batch would do) instead of each rank's own tokens.
    """

    data_parallel: str = "ddp"
    expert_parallel: int = 1
    ec_pool: str = "local"
    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        check_choice("parallel.data_parallel", self.data_parallel, DATA_PARALLEL)
        check_int("parallel.expert_parallel", self.expert_parallel, low=1)
        check_choice("parallel.ec_pool", self.ec_pool, EC_POOLS)
        check_choice("parallel.backend", self.backend, DIST_BACKENDS)
        check_float("parallel.timeout_s", self.timeout_s, low=0.0, low_open=True)


@dataclass(kw_only=True)
class RunConfig:
    """Everything a run needs; saved as `<run_dir>/config.json` and loadable from YAML + overrides."""

    run_dir: str = "runs/demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                "lower data.seq_len or raise model.max_seq_len"
            )
        router = self.model.moe.router if self.model.moe is not None else None
        if self.parallel.ec_pool == "group" and (
            router is None or router.kind != "expert_choice" or router.pool != "batch"
        ):
            raise ValueError(
                "parallel.ec_pool='group' pools the tokens of an expert-choice router with "
                "model.moe.router.pool='batch' over the expert-parallel group; this model's router is "
                f"{'absent (dense model)' if router is None else f'{router.kind} with pool={router.pool!r}'}"
                " (use parallel.ec_pool='local')"
            )
        if self.parallel.expert_parallel > 1 and router is None:
            raise ValueError("parallel.expert_parallel > 1 needs an MoE model (model.moe is null)")
