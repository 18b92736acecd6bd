"""EC-DLM's scaling factor (`--enable-scaling-factor`): routed gates rescaled to the shared experts' norm.

With S always-on shared experts (each with weight 1) and routed gates that sum to 1, the routed
part of a token's output is much smaller than the shared part: its gate vector has norm
‖p̂‖₂ ≤ 1 against the shared part's √S. EC-DLM multiplies a token's routed gates by

    f(k) = E_z[ √S / ‖p̂_k‖₂ ],   z ~ N(0, I_E),   p = score(z),

where p̂_k is the token's k routed scores (renormalised to sum 1, or raw): the two parts then
have the same expected norm under a random router. f is a property of (E, S, the score function,
renormalisation) only — not of the weights — so it is a fixed Monte Carlo estimate:

- **Token choice** (`tc_scaling_factor`, EC-DLM's `compute_tc_scaling_factor`): every token has
  the same k, and its experts are its k largest scores: one constant per router.
- **Expert choice** (`ec_scaling_table`, EC-DLM's `compute_ec_scaling_factors`): a token receives
  anywhere from 0 to E experts, so f is a table [E + 1] indexed by each token's routed count
  (f(0) = 1: such a token has no routed gate to scale). The experts that chose a token are *not*
  its k largest scores — each expert ranks tokens, not the other way round — and EC-DLM's code
  accordingly takes the first k entries of p (`all_probs[:k_routed]`, unsorted: with iid z, a
  uniformly random k-subset), renormalised (EC gates are a softmax over the chosen experts).
  Taking the k largest instead would give larger factors (E = 512, S = 2: f(32) ≈ 7.2, not 5.4).

Determinism: every rank and every reload must scale identically, so the estimate is a pure
function of its arguments — `NUM_DRAWS` draws of a CPU `torch.Generator` seeded `SEED`, in
float64 — memoised per process (never written to disk: EC-DLM's json cache file is a shared
mutable file across ranks and runs, and recomputing takes well under a second). All k come
from one draw matrix: with p in the order used (sorted descending for TC), cumulative sums give
each k's normaliser, and ‖p̂_k‖₂ = √(cumsum(p²)_k) / cumsum(p)_k.

Letters: E experts, S shared experts, n draws.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from dlmoe._checks import check_choice, check_int
from dlmoe.routing.token_choice import SCORE_FUNCTIONS

NUM_DRAWS = 10_000  # EC-DLM's num_samples
SEED = 42  # EC-DLM's np.random.seed(42)
_CHUNK = 1_000  # draws per block: bounds memory at 1000·E float64 whatever E


def ec_scaling_table(num_experts: int, num_shared: int) -> Tensor:
    """[E + 1] float32 on the CPU: entry k = f(k) for a token that k experts chose (EC-DLM's EC table).

    f(0) = 1, f(1) = √S exactly (p̂_1 = [1]), increasing in k. Softmax scores over a random
    k-subset of the E experts, renormalised (the restricted EC gates); see the module docstring.
    A fresh tensor each call: callers may modify it without touching the cache.
    """
    check_int("num_experts", num_experts, low=1)
    check_int("num_shared", num_shared, low=1)
    factors = _mean_factors(num_experts, num_shared, "softmax", True, False)
    return torch.tensor(factors, dtype=torch.float32, device="cpu")  # CPU even under `with torch.device("meta")`


def tc_scaling_factor(
    num_experts: int, k: int, num_shared: int, score: str = "softmax", renormalize: bool = True
) -> float:
    """f for token choice with a fixed top-k (EC-DLM's `compute_tc_scaling_factor`).

    The k largest of score(z) (softmax or sigmoid), renormalised to sum 1 or — `renormalize`
    False — the raw top-k scores, as the token-choice router's gates are.
    """
    check_int("num_experts", num_experts, low=1)
    check_int("k", k, low=1, high=num_experts)
    check_int("num_shared", num_shared, low=1)
    check_choice("score", score, SCORE_FUNCTIONS)
    if not isinstance(renormalize, bool):
        raise ValueError(f"renormalize must be a bool, got {renormalize!r} ({type(renormalize).__name__})")
    return _mean_factors(num_experts, num_shared, score, renormalize, True)[k]


def cache_clear() -> None:
    """Forget the memoised estimates (they are recomputed, bit for bit, on the next call)."""
    _mean_factors.cache_clear()


@functools.cache
def _mean_factors(num_experts: int, num_shared: int, score: str, renormalize: bool, largest: bool) -> tuple[float, ...]:
    """(f(0) = 1, f(1), …, f(E)) in float64: the mean over `NUM_DRAWS` draws of √S / ‖p̂_k‖₂.

    `largest`: p̂_k holds the k largest scores (token choice), else the first k (a random subset:
    expert choice). A tuple, so the cached value itself cannot be mutated.
    """
    generator = torch.Generator(device="cpu").manual_seed(SEED)
    shared_norm = math.sqrt(num_shared)
    total_E = torch.zeros(num_experts, dtype=torch.float64, device="cpu")
    for start in range(0, NUM_DRAWS, _CHUNK):
        draws = min(_CHUNK, NUM_DRAWS - start)
        z_nE = torch.randn(draws, num_experts, generator=generator, dtype=torch.float64, device="cpu")
        p_nE = torch.softmax(z_nE, dim=-1) if score == "softmax" else torch.sigmoid(z_nE)
        if largest:
            p_nE = p_nE.sort(dim=-1, descending=True).values
        norm_nE = p_nE.square().cumsum(dim=-1).sqrt()  # ‖p_{1..k}‖₂ for every k
        if renormalize:
            norm_nE = norm_nE / p_nE.cumsum(dim=-1)
        total_E += (shared_norm / norm_nE).sum(dim=0)
    factors = (total_E / NUM_DRAWS).tolist()
    if renormalize:
        factors[0] = shared_norm  # p̂_1 = [1] in every draw: exact, not the rounded mean of equal terms
    return (1.0, *factors)
