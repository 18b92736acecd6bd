"""Configuration dataclasses, one per component; validated once, when built.

Each component receives its own config explicitly. Errors are `ValueError`s that name the field,
the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dlmoe._checks import check_choice, check_float, check_int
from dlmoe.routing.schedules import DEFAULT_SIGMA, expected_k, validate_schedule
from dlmoe.vocab import (
    ATTENTION_KINDS,
    DATA_PARALLEL,
    DEVICE_NAMES,
    DIST_BACKENDS,
    EC_POOLS,
    EXPERT_BACKENDS,
    GATES,
    LOSS_WEIGHTINGS,
    LR_SCHEDULES,
    POOLS,
    PRECISIONS,
    REMASKING,
    ROUTER_KINDS,
    SCHEDULE_NAMES,
    SCORE_FUNCTIONS,
    SELECT,
)


@dataclass(kw_only=True)
class BlockRoutingConfig:
    """dMoE block routing: `block_size` tokens vote a coreset covering `top_p` of the votes."""

    block_size: int = 32
    top_p: float = 0.6
    guard: int = 16

    def __post_init__(self) -> None:
        check_int("block.block_size", self.block_size, low=1)
        check_float("block.top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_int("block.guard", self.guard, low=1)


@dataclass(kw_only=True)
class RouterConfig:
    """Which router, and its knobs.

    Shared: `kind`, `num_experts`, `num_experts_per_tok` (k; EC's static k), `z_loss_coef`.
    Token choice: `score`, `renormalize`, `capacity_factor` (None = dropless), `aux_loss_coef`,
    `expert_bias` (+ `bias_update_rate`), `n_group`/`topk_group`, `routed_scaling_factor`.
    Expert choice: `pool`, `select`, `gate`, and a timestep-dependent capacity
    `capacity_schedule` with `k_min`, `k_max`, `schedule_sigma`. `gate`: "restricted" (softmax over
    the experts that chose the token; EC-DLM), "full" (the full softmax score; Zhou et al.), or
    "restricted_sigmoid" (σ(l) normalised over the experts that chose the token; EC-DLM's
    `moe_router_activation_function=sigmoid`).
    Both: `block` (dMoE block routing: each block's tokens route only inside its coreset), and
    `scaling_factor`: EC-DLM's `--enable-scaling-factor` — a token's routed gates are multiplied by
    f = E_z[√S / ‖p̂‖₂] (S = `moe.num_shared_experts`, p̂ its routed gates under random logits),
    so the routed part has the shared experts' expected norm: one constant for token choice, a
    table indexed by each token's routed count for expert choice (`dlmoe.routing.scaling`; applied
    in `MoELayer`). Needs shared experts. Not `routed_scaling_factor`, LLaDA2 / DeepSeek-V3's
    fixed hand-set multiplier (2.5) of the same gates: both answer how large the routed part is
    next to the shared one, so they are refused together (the product would match neither model).
    """

    kind: str = "token_choice"
    num_experts: int = 8
    num_experts_per_tok: int = 2
    z_loss_coef: float = 0.0
    # token choice
    score: str = "softmax"
    renormalize: bool = True
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.0
    expert_bias: bool = False
    bias_in_gate: bool = False  # gates from the biased scores (LLaDA-MoE's in-place `p += b`)
    bias_update_rate: float = 1e-3
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    scaling_factor: bool = False  # EC-DLM's --enable-scaling-factor (both kinds; needs shared experts)
    block: BlockRoutingConfig | None = None
    # expert choice
    pool: str = "sequence"
    select: str = "logit"
    gate: str = "restricted"
    capacity_schedule: str | None = None
    k_min: int | None = None
    k_max: int | None = None
    schedule_sigma: float = DEFAULT_SIGMA

    def __post_init__(self) -> None:
        check_choice("router.kind", self.kind, ROUTER_KINDS)
        check_int("router.num_experts", self.num_experts, low=1)
        check_int("router.num_experts_per_tok", self.num_experts_per_tok, low=1, high=self.num_experts)
        check_float("router.z_loss_coef", self.z_loss_coef, low=0.0)
        check_choice("router.score", self.score, SCORE_FUNCTIONS)
        if self.capacity_factor is not None:
            check_float("router.capacity_factor", self.capacity_factor, low=0.0, low_open=True)
        check_float("router.aux_loss_coef", self.aux_loss_coef, low=0.0)
        check_float("router.bias_update_rate", self.bias_update_rate, low=0.0)
        check_float("router.routed_scaling_factor", self.routed_scaling_factor, low=0.0, low_open=True)
        self._check_groups()
        self._check_scaling_factor()
        if self.bias_in_gate and not self.expert_bias:
            raise ValueError(
                "router.bias_in_gate=true needs router.expert_bias=true (it puts that bias into the gates)"
            )
        check_choice("router.pool", self.pool, POOLS)
        check_choice("router.select", self.select, SELECT)
        check_choice("router.gate", self.gate, GATES)
        self._check_schedule()
        if self.kind == "expert_choice":
            tc_only = {
                "capacity_factor": None,
                "aux_loss_coef": 0.0,
                "expert_bias": False,
                "bias_in_gate": False,
                "n_group": None,
            }
            for name, neutral in tc_only.items():
                if getattr(self, name) != neutral:
                    raise ValueError(
                        f"router.{name}={getattr(self, name)!r} applies to token choice only; "
                        f"expert choice is balanced by construction (leave it at {neutral!r})"
                    )
        if self.block is not None:
            if isinstance(self.block, dict):
                self.block = BlockRoutingConfig(**self.block)
            # both kinds: token choice routes top-k inside each block's coreset, expert choice runs EC inside it
            if self.block.guard > self.num_experts:
                raise ValueError(
                    f"router.block.guard must be <= router.num_experts={self.num_experts}, got {self.block.guard} "
                    "(the default, 16, is dMoE's; set block.guard for fewer experts)"
                )

    def _check_groups(self) -> None:
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError(f"router.n_group and router.topk_group go together, got {self.n_group}, {self.topk_group}")
        if self.n_group is not None:
            check_int("router.n_group", self.n_group, low=1, high=self.num_experts)
            if self.num_experts % self.n_group:
                raise ValueError(f"router.n_group={self.n_group} must divide num_experts={self.num_experts}")
            check_int("router.topk_group", self.topk_group, low=1, high=self.n_group)

    def _check_scaling_factor(self) -> None:
        if not isinstance(self.scaling_factor, bool):
            raise ValueError(f"router.scaling_factor must be a bool, got {self.scaling_factor!r}")
        if not self.scaling_factor:
            return
        if self.routed_scaling_factor != 1.0:
            raise ValueError(
                "router.scaling_factor=true (EC-DLM's norm-matching factor) and "
                f"router.routed_scaling_factor={self.routed_scaling_factor} (a fixed multiplier) both set the scale "
                "of the routed gates; use one of them"
            )
        if self.kind == "expert_choice" and self.gate == "full":
            raise ValueError(
                "router.scaling_factor=true assumes a token's routed gates sum to 1 (router.gate='restricted' or "
                "'restricted_sigmoid', EC-DLM's); router.gate='full' gives softmax weights over all experts"
            )

    def _check_schedule(self) -> None:
        if self.capacity_schedule is None:
            return
        if self.kind != "expert_choice":
            raise ValueError(
                f"router.capacity_schedule={self.capacity_schedule!r} (timestep-dependent capacity) needs "
                f"router.kind='expert_choice', got kind={self.kind!r}"
            )
        if self.capacity_schedule not in SCHEDULE_NAMES:
            raise ValueError(
                f"router.capacity_schedule must be one of {list(SCHEDULE_NAMES)}, got {self.capacity_schedule!r}"
            )
        validate_schedule(self.capacity_schedule, self.schedule_sigma)
        if self.k_min is None or self.k_max is None:
            raise ValueError(
                f"router.capacity_schedule={self.capacity_schedule!r} needs router.k_min and router.k_max "
                f"(ints, 1 <= k_min <= k_max <= num_experts), got k_min={self.k_min}, k_max={self.k_max}"
            )
        check_int("router.k_min", self.k_min, low=1, high=self.num_experts)
        check_int("router.k_max", self.k_max, low=1, high=self.num_experts)
        if self.k_min > self.k_max:
            raise ValueError(f"router.k_min must be <= router.k_max, got {self.k_min} > {self.k_max}")

    def expected_experts_per_token(self) -> float:
        """Average experts per token (∝ active expert FLOPs) under r ~ U(0, 1)."""
        if self.capacity_schedule is None:
            return float(self.num_experts_per_tok)
        return expected_k(self.capacity_schedule, self.k_min, self.k_max, sigma=self.schedule_sigma)  # type: ignore[arg-type]


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
class SampleConfig:
    """LLaDA sampling settings used by `dlmoe sample` and the demo."""

    prompt: str = "ROMEO:"
    num_samples: int = 2
    gen_length: int = 64
    block_length: int = 32
    steps: int = 64
    temperature: float = 0.0
    remasking: str = "low_confidence"

    def __post_init__(self) -> None:
        check_int("sample.num_samples", self.num_samples, low=1)
        check_int("sample.gen_length", self.gen_length, low=1)
        check_int("sample.block_length", self.block_length, low=1)
        check_int("sample.steps", self.steps, low=1)
        check_float("sample.temperature", self.temperature, low=0.0)
        check_choice("sample.remasking", self.remasking, REMASKING)


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
