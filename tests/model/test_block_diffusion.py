"""Two-stream block-diffusion forward [x_t ; x_0]: the mask is the stated rule, x_t logits depend on
exactly what the rule lets them see, and they equal what the exact-cache sampler's forward gives."""

import pytest
import torch

from dlmoe.config import BlockRoutingConfig, ModelConfig, MoEConfig, RouterConfig
from dlmoe.model import DiffusionTransformer
from dlmoe.model.attention_mask import two_stream_mask

MASK, W, L = 63, 4, 16  # mask id, attention block size, sequence length (4 blocks)


def model(kind: str | None = "token_choice", block: BlockRoutingConfig | None = None) -> DiffusionTransformer:
    torch.manual_seed(0)
    moe = None
    if kind is not None:
        router = RouterConfig(kind=kind, num_experts=8, num_experts_per_tok=2, block=block)
        moe = MoEConfig(router=router, expert_hidden=16, num_shared_experts=1)
    config = ModelConfig(
        vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32, dense_hidden=48,
        moe=moe, mask_id=MASK, attention="block_causal", attention_block_size=W, init_std=0.2,
    )  # fmt: skip
    return DiffusionTransformer(config).eval()


def streams(batch: int = 2, length: int = L, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, x_0): x_t is x_0 with about half the tokens masked."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, MASK, (batch, length), generator=g)
    noisy = clean.masked_fill(torch.rand(batch, length, generator=g) < 0.5, MASK)
    return noisy, clean


def reference_mask(blocks: list[int], valid: list[bool]) -> torch.Tensor:
    """The rule, one (query, key) pair at a time, over [x_t ; x_0]."""
    n = len(blocks)
    mask = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for q in range(2 * n):
        for k in range(2 * n):
            q_clean, k_clean = q >= n, k >= n
            bq, bk = blocks[q % n], blocks[k % n]
            if not valid[q % n]:
                allowed = True  # padding queries attend everywhere (their output is unused)
            elif not valid[k % n]:
                allowed = False
            elif not q_clean:
                allowed = (not k_clean and bk == bq) or (k_clean and bk < bq)
            else:
                allowed = k_clean and bk <= bq
            mask[q, k] = allowed
    return mask


def test_two_stream_mask_equals_the_rule_built_by_hand() -> None:
    blocks = [-1, -1, 0, 0, 0, 1, 2, 2]  # uneven blocks, negative ids (as prompt blocks of a canvas)
    valid = [[True] * 8, [False, False, True, True, True, True, True, True]]
    got = two_stream_mask(torch.tensor(blocks), torch.tensor(valid), batch=2)
    for b in range(2):
        assert torch.equal(got[b], reference_mask(blocks, valid[b])), b
    no_padding = two_stream_mask(torch.tensor(blocks), None, batch=1)
    assert torch.equal(no_padding[0], reference_mask(blocks, [True] * 8))


@torch.no_grad()
def test_noisy_block_sees_its_own_noisy_block_and_earlier_clean_blocks_only() -> None:
    m = model()
    noisy, clean = streams()
    ratio = (noisy == MASK).float().mean(1)
    b = 2
    own = slice(b * W, (b + 1) * W)
    base = m(noisy, mask_ratio=ratio, clean_input_ids=clean).logits[:, own]

    def block_logits(noisy_: torch.Tensor, clean_: torch.Tensor) -> torch.Tensor:
        return m(noisy_, mask_ratio=ratio, clean_input_ids=clean_).logits[:, own]

    other_noisy = noisy.clone()
    other_noisy[:, : b * W] = 5  # x_t blocks < b ...
    other_noisy[:, (b + 1) * W :] = 7  # ... and > b
    torch.testing.assert_close(block_logits(other_noisy, clean), base, atol=1e-6, rtol=0)
    later_clean = clean.clone()
    later_clean[:, b * W :] = 9  # x_0 blocks >= b
    torch.testing.assert_close(block_logits(noisy, later_clean), base, atol=1e-6, rtol=0)
    previous_clean = clean.clone()
    previous_clean[:, (b - 1) * W : b * W] = 11  # x_0 block b - 1
    assert (block_logits(noisy, previous_clean) - base).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kind,block",
    [("token_choice", None), (None, None), ("token_choice", BlockRoutingConfig(block_size=W, top_p=0.5, guard=3)),
     ("expert_choice", BlockRoutingConfig(block_size=W, top_p=0.5, guard=3))],
    ids=["token_choice", "dense", "token_choice_block_routing", "expert_choice_block_routing"],
)  # fmt: skip
@torch.no_grad()
def test_training_sees_what_the_exact_cache_sampler_sees(kind: str | None, block: BlockRoutingConfig | None) -> None:
    """x_t logits of block b given [x_t ; x_0] (x_t's earlier blocks are noise) = a single-stream
    block-causal forward of [x_0 blocks < b, x_t block b] at block b: the exact-cache sampler's view.
    The length is not a multiple of the block size: routing blocks must still stay inside a stream.

    Routing must be per token or per block for this to be exact. Plain expert choice pools over the
    routed sequence, which here holds 2L tokens, so its selection differs (not tested: not equal)."""
    m = model(kind, block)
    length = L - 2  # blocks of 4, 4, 4, 2
    noisy, clean = streams(length=length)
    noisy = torch.where(torch.arange(length) < 2 * W, torch.randint(3, MASK, noisy.shape), noisy)  # noise, not x_0
    ratio = (noisy == MASK).float().mean(1)
    two_stream = m(noisy, mask_ratio=ratio, clean_input_ids=clean).logits
    for b in range(-(-length // W)):
        own = slice(b * W, min((b + 1) * W, length))
        seen = torch.cat([clean[:, : b * W], noisy[:, own]], dim=1)
        single = m(seen, mask_ratio=ratio).logits[:, own]
        torch.testing.assert_close(two_stream[:, own], single, atol=1e-5, rtol=0)


@torch.no_grad()
def test_two_stream_with_left_padding_and_block_ids() -> None:
    """Padding is invisible in both streams; explicit block ids set the attention blocks."""
    m = model()
    noisy, clean = streams(batch=1)
    pad = 3
    padded = (torch.cat([torch.full((1, pad), 7), noisy], 1), torch.cat([torch.full((1, pad), 7), clean], 1))
    valid = torch.cat([torch.zeros(1, pad), torch.ones(1, L)], dim=1)
    ids = torch.div(torch.arange(L + pad) - pad, W, rounding_mode="floor")
    alone = m(noisy, clean_input_ids=clean).logits
    inside = m(padded[0], attention_mask=valid, block_ids=ids, clean_input_ids=padded[1]).logits[:, pad:]
    torch.testing.assert_close(inside, alone, atol=1e-5, rtol=0)


def test_two_stream_output_and_bad_input() -> None:
    m = model()
    noisy, clean = streams()
    out = m(noisy, clean_input_ids=clean)
    assert out.logits.shape == (2, L, 64)
    assert all(d.valid is None or d.valid.shape == (2, 2 * L) for d in out.dispatches)
    with pytest.raises(ValueError, match="clean_input_ids"):
        m(noisy, clean_input_ids=clean[:, :-1])
    with pytest.raises(ValueError, match="clean_input_ids"):
        m(noisy, clean_input_ids=clean.float())
    with pytest.raises(ValueError, match="no kv_cache and no return_kv"):
        m(noisy, clean_input_ids=clean, return_kv=True)
    cache = m(clean[:, :W], return_kv=True).kv
    with pytest.raises(ValueError, match="no kv_cache"):
        m(noisy[:, W:], clean_input_ids=clean[:, W:], kv_cache=cache, cache_start=W)
    bidirectional = DiffusionTransformer(ModelConfig(vocab_size=64, dim=16, num_layers=1, num_heads=2, moe=None))
    with pytest.raises(ValueError, match="model.attention='block_causal'"):
        bidirectional(noisy, clean_input_ids=clean)
