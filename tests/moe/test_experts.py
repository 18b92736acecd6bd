"""Expert compute backends: every backend equals the `loop` reference in forward and backward.

Compared quantities: the output rows, and the gradients w.r.t. the input rows and both stacked
weight tensors, for equal counts (the expert-choice bmm path) and ragged counts (experts with 0
rows included), in fp32 (tight) and under bf16 autocast (loose).

torch's grouped GEMM needs 16-byte aligned row strides: `backend="grouped_mm"` takes widths that
are multiples of 8 (others raise), and "auto" falls back to bmm for other widths — so the "auto"
draws mix aligned and unaligned widths. S = 0 rows in total (an expert-parallel rank that received
nothing) must work on every backend.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dlmoe.moe.experts import BACKENDS, Experts, SwiGLU

FAST_BACKENDS = tuple(b for b in BACKENDS if b != "loop")  # compared against "loop"
FP32_RTOL = 1e-5
BF16_RTOL = 2e-2


# ---------------------------------------------------------------------------------------------
# helpers


def _make_experts(num_experts: int, dim: int, hidden: int, backend: str, device: str = "cpu") -> Experts:
    experts = Experts(num_experts, dim, hidden, backend=backend).to(device)
    with torch.no_grad():  # O(1) outputs, so relative comparisons are meaningful
        experts.gate_up_proj.normal_(std=1.0 / math.sqrt(dim))
        experts.down_proj.normal_(std=1.0 / math.sqrt(hidden))
    return experts


def _clone_with_backend(src: Experts, backend: str) -> Experts:
    dst = Experts(src.num_experts, src.dim, src.hidden, backend=backend).to(src.gate_up_proj.device)
    dst.load_state_dict(src.state_dict())
    return dst


def _run(
    experts: Experts,
    x: torch.Tensor,
    counts: torch.Tensor,
    upstream: torch.Tensor | None,
    equal: bool,
    bf16: bool,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Forward + backward of `(y * upstream).sum()` (or `y.sum()`); returns y and the grads
    (x, gate_up_proj, down_proj, and the per-row gate when one is given)."""
    experts.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    args = (x, counts)
    if gate is not None:
        gate = gate.detach().clone().requires_grad_(True)
        args = (x, counts, gate)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        y = experts(*args, equal_counts=equal)
    loss = y.sum() if upstream is None else (y.float() * upstream).sum()
    loss.backward()
    out = (y.detach(), x.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
    return out if gate is None else (*out, gate.grad)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """max |a − e| ≤ rtol · max |e| (norm-relative: robust to tiny individual entries)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), what
    scale = max(e.abs().max().item(), 1e-6) if e.numel() else 1.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:.1e} * {scale:.3e}"


def _compare_backend_to_loop(
    backend: str,
    counts: list[int],
    dim: int,
    hidden: int,
    equal: bool,
    bf16: bool,
    device: str = "cpu",
    with_gate: bool = False,
) -> None:
    num_experts = len(counts)
    counts_t = torch.tensor(counts, dtype=torch.int64, device=device)
    rows = sum(counts)
    ref = _make_experts(num_experts, dim, hidden, "loop", device)
    fast = _clone_with_backend(ref, backend)
    x = torch.randn(rows, dim, device=device)
    upstream = torch.randn(rows, dim, device=device)
    gate = torch.rand(rows, device=device) if with_gate else None
    got = _run(fast, x, counts_t, upstream, equal, bf16, gate)
    want = _run(ref, x, counts_t, upstream, equal, bf16, gate)
    rtol = BF16_RTOL if bf16 else FP32_RTOL
    names = ("y", "grad x", "grad gate_up_proj", "grad down_proj", "grad gate")
    assert len(got) == len(want) == (5 if with_gate else 4)
    for name, g, w in zip(names, got, want, strict=False):
        what = f"{backend} {name} counts={counts} D={dim} F={hidden} bf16={bf16} gate={with_gate}"
        assert_rel_close(g, w, rtol, what)
    # the reference really is per expert: an expert with no rows gets an exactly zero weight gradient
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(got[2][e]) == 0 and torch.count_nonzero(got[3][e]) == 0


@st.composite
def _shapes(draw: st.DrawFn, backend: str, equal: bool, bf16: bool) -> tuple[list[int], int, int]:
    num_experts = draw(st.integers(1, 8))
    aligned = st.sampled_from([8, 16, 24, 32])  # 16-byte aligned rows for torch's grouped GEMM
    if backend == "grouped_mm":
        dim, hidden = draw(aligned), draw(aligned)
    elif backend == "auto":  # both: auto's grouped_mm path needs aligned widths, its bmm fallback the rest
        dim, hidden = draw(st.one_of(aligned, st.integers(4, 32))), draw(st.one_of(aligned, st.integers(4, 32)))
    else:
        dim, hidden = draw(st.integers(4, 32)), draw(st.integers(4, 32))
    if equal:
        counts = [draw(st.integers(1, 9))] * num_experts
    else:
        counts = draw(st.lists(st.integers(0, 9), min_size=num_experts, max_size=num_experts))
        if sum(counts) == 0:  # S = 0 is covered by test_zero_rows_total
            counts[-1] = 1
    return counts, dim, hidden


# ---------------------------------------------------------------------------------------------
# every backend equals the loop reference


@pytest.mark.parametrize("equal", [True, False], ids=["equal_counts", "ragged"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@settings(max_examples=25)
@given(data=st.data())
def test_backend_matches_loop_fp32(backend: str, equal: bool, data: st.DataObject) -> None:
    counts, dim, hidden = data.draw(_shapes(backend, equal, bf16=False))
    with_gate = data.draw(st.booleans(), label="with_gate")
    _compare_backend_to_loop(backend, counts, dim, hidden, equal, bf16=False, with_gate=with_gate)


@pytest.mark.parametrize("equal", [True, False], ids=["equal_counts", "ragged"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@settings(max_examples=15)
@given(data=st.data())
def test_backend_matches_loop_bf16_autocast(backend: str, equal: bool, data: st.DataObject) -> None:
    counts, dim, hidden = data.draw(_shapes(backend, equal, bf16=True))
    with_gate = data.draw(st.booleans(), label="with_gate")
    _compare_backend_to_loop(backend, counts, dim, hidden, equal, bf16=True, with_gate=with_gate)


@pytest.mark.parametrize("with_gate", [False, True])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_ragged_with_empty_experts_explicit(backend: str, with_gate: bool) -> None:
    """A fixed ragged case with empty experts at the start, middle and end."""
    counts = [0, 3, 0, 0, 5, 1, 0]
    _compare_backend_to_loop(backend, counts, dim=16, hidden=8, equal=False, bf16=False, with_gate=with_gate)


@pytest.mark.parametrize("equal", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_gate_scales_each_output_row(backend: str, equal: bool) -> None:
    """Experts(x, counts, gate)[s] = gate[s] · Experts(x, counts)[s]; the gate gets ⟨∂L/∂y_s, Expert(x_s)⟩."""
    counts = torch.tensor([3, 3, 3, 3]) if equal else torch.tensor([2, 0, 5, 1])
    rows = int(counts.sum())
    experts = _make_experts(4, 16, 8, backend)
    x = torch.randn(rows, 16)
    gate = torch.rand(rows)
    gate[1] = 0.0
    gate_g = gate.clone().requires_grad_(True)
    y_gated = experts(x, counts, gate_g, equal_counts=equal)
    y_plain = experts(x, counts, equal_counts=equal).detach()
    assert_rel_close(y_gated.detach(), gate[:, None] * y_plain, FP32_RTOL, "gated rows")
    assert torch.count_nonzero(y_gated[1]) == 0  # a zero gate gives an exactly zero row
    upstream = torch.randn(rows, 16)
    (y_gated * upstream).sum().backward()
    assert_rel_close(gate_g.grad, (upstream * y_plain).sum(-1), FP32_RTOL, "grad gate")


def test_loop_matches_per_row_formula() -> None:
    """The reference itself: row r of expert e is W_d[e] (silu(W_g[e] x) ⊙ W_u[e] x)."""
    experts = _make_experts(3, 6, 5, "loop")
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 6)
    y = experts(x, counts)
    owner = [0, 0, 2, 2, 2]
    for r, e in enumerate(owner):
        w_gu, w_d = experts.gate_up_proj[e], experts.down_proj[e]
        gate, up = w_gu[:5] @ x[r], w_gu[5:] @ x[r]
        torch.testing.assert_close(y[r], w_d @ (F.silu(gate) * up), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# grouped_mm backward with an expanded (stride-0) upstream gradient


@pytest.mark.parametrize("backend", ["grouped_mm", "auto"])
@pytest.mark.parametrize("reduce", ["sum", "mean", "sum_rows"])
def test_grouped_mm_backward_through_expanded_grad(backend: str, reduce: str) -> None:
    """`y.sum()` hands grouped_mm's backward an expanded stride-0 gradient (a known torch gotcha)."""
    counts = torch.tensor([3, 0, 2, 4])
    ref = _make_experts(4, 8, 8, "loop")
    fast = _clone_with_backend(ref, backend)
    x = torch.randn(9, 8)
    losses = {"sum": lambda y: y.sum(), "mean": lambda y: y.mean(), "sum_rows": lambda y: y.sum(0)[1]}
    grads = []
    for experts in (fast, ref):
        xg = x.clone().requires_grad_(True)
        y = experts(xg, counts)
        losses[reduce](y).backward()
        grads.append((xg.grad, experts.gate_up_proj.grad, experts.down_proj.grad))
    for g, w in zip(grads[0], grads[1], strict=True):
        assert_rel_close(g, w, FP32_RTOL, f"{backend} {reduce}")


def test_grouped_mm_backward_expanded_grad_bf16() -> None:
    counts = torch.tensor([1, 5, 0, 2])
    ref = _make_experts(4, 16, 8, "loop")
    fast = _clone_with_backend(ref, "grouped_mm")
    x = torch.randn(8, 16)
    got = _run(fast, x, counts, None, equal=False, bf16=True)
    want = _run(ref, x, counts, None, equal=False, bf16=True)
    for g, w in zip(got, want, strict=True):
        assert_rel_close(g, w, BF16_RTOL, "grouped_mm bf16 y.sum()")


# ---------------------------------------------------------------------------------------------
# one expert with all the rows is a dense SwiGLU


@pytest.mark.parametrize("equal", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_expert_equals_dense_swiglu(backend: str, equal: bool) -> None:
    dim, hidden, rows = 16, 8, 7
    experts = _make_experts(1, dim, hidden, backend)
    dense = SwiGLU(dim, hidden)
    with torch.no_grad():
        dense.gate_up_proj.weight.copy_(experts.gate_up_proj[0])
        dense.down_proj.weight.copy_(experts.down_proj[0])
    x = torch.randn(rows, dim)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = experts(x1, torch.tensor([rows]), equal_counts=equal)
    y_dense = dense(x2)
    assert_rel_close(y, y_dense, FP32_RTOL, "forward")
    upstream = torch.randn(rows, dim)
    (y * upstream).sum().backward()
    (y_dense * upstream).sum().backward()
    assert_rel_close(x1.grad, x2.grad, FP32_RTOL, "grad x")
    assert_rel_close(experts.gate_up_proj.grad[0], dense.gate_up_proj.weight.grad, FP32_RTOL, "grad gate_up")
    assert_rel_close(experts.down_proj.grad[0], dense.down_proj.weight.grad, FP32_RTOL, "grad down")


def test_gate_rows_come_first() -> None:
    """gate_up_proj is [gate; up]: SiLU applies to the first F rows (swapping halves changes y)."""
    experts = _make_experts(1, 8, 4, "loop")
    x = torch.randn(3, 8)
    counts = torch.tensor([3])
    w_gu = experts.gate_up_proj[0].detach()
    expected = F.linear(F.silu(F.linear(x, w_gu[:4])) * F.linear(x, w_gu[4:]), experts.down_proj[0].detach())
    swapped = F.linear(F.silu(F.linear(x, w_gu[4:])) * F.linear(x, w_gu[:4]), experts.down_proj[0].detach())
    y = experts(x, counts).detach()
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y, swapped, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("equal", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_output_dtype_is_bf16(backend: str, equal: bool) -> None:
    experts = _make_experts(2, 16, 8, backend)
    counts = torch.tensor([3, 3])
    x = torch.randn(6, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, counts, equal_counts=equal)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    # master weights and the input stay fp32, and so do their gradients
    assert x.grad.dtype == torch.float32
    assert experts.gate_up_proj.grad.dtype == torch.float32
    assert experts.down_proj.grad.dtype == torch.float32
    # without autocast: fp32 in, fp32 out
    assert experts(x.detach(), counts, equal_counts=equal).dtype == torch.float32


def test_autocast_bf16_is_close_to_fp32() -> None:
    """bf16 autocast tracks fp32 (loosely) — and is actually lower precision (not silently fp32)."""
    experts = _make_experts(3, 32, 16, "loop")
    counts = torch.tensor([4, 0, 5])
    x = torch.randn(9, 32)
    y32 = experts(x, counts).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = experts(x, counts).detach()
    assert_rel_close(y16.float(), y32, BF16_RTOL, "bf16 vs fp32")
    assert not torch.equal(y16.float(), y32)


# ---------------------------------------------------------------------------------------------
# resolve_backend and validation


def test_auto_resolves_by_counts_and_alignment() -> None:
    experts = Experts(2, 8, 16, backend="auto")
    assert experts.resolve_backend(equal_counts=True) == "bmm"
    assert experts.resolve_backend(equal_counts=False) == "grouped_mm"
    for dim, hidden in [(6, 8), (8, 6), (5, 5), (12, 8)]:  # unaligned widths: grouped GEMM can't run
        unaligned = Experts(2, dim, hidden, backend="auto")
        assert unaligned.resolve_backend(equal_counts=True) == unaligned.resolve_backend(equal_counts=False) == "bmm"
    for backend in ("loop", "bmm", "grouped_mm"):
        fixed = Experts(2, 8, 8, backend=backend)
        assert fixed.resolve_backend(True) == fixed.resolve_backend(False) == backend


@pytest.mark.parametrize(("dim", "hidden"), [(6, 8), (8, 6), (5, 5), (4, 4), (12, 16)])
def test_grouped_mm_rejects_unaligned_widths(dim: int, hidden: int) -> None:
    with pytest.raises(ValueError, match="grouped_mm"):
        Experts(2, dim, hidden, backend="grouped_mm")


@pytest.mark.parametrize(("dim", "hidden"), [(6, 8), (8, 6), (5, 5)])
def test_auto_with_unaligned_widths_matches_loop(dim: int, hidden: int) -> None:
    _compare_backend_to_loop("auto", [2, 0, 3], dim, hidden, equal=False, bf16=False)
    _compare_backend_to_loop("auto", [2, 0, 3], dim, hidden, equal=False, bf16=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_experts": 0},
        {"dim": 0},
        {"hidden": -1},
        {"backend": "cutlass"},
        {"num_experts": 2.0},
    ],
)
def test_bad_constructor_args_raise(kwargs: dict) -> None:
    args = {"num_experts": 2, "dim": 8, "hidden": 8, "backend": "auto"} | kwargs
    with pytest.raises(ValueError):
        Experts(**args)


def test_weight_shapes_follow_transformers_layout() -> None:
    experts = Experts(5, 12, 7)
    assert experts.gate_up_proj.shape == (5, 14, 12)
    assert experts.down_proj.shape == (5, 12, 7)


# ---------------------------------------------------------------------------------------------
# no rows at all


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("equal", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_total(backend: str, equal: bool, bf16: bool) -> None:
    """S = 0 (e.g. an expert-parallel rank that received no tokens): empty output, zero weight grads."""
    counts = torch.zeros(3, dtype=torch.int64)
    experts = _make_experts(3, 8, 8, backend)
    x = torch.randn(0, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = experts(x, counts, equal_counts=equal)
    assert y.shape == (0, 8)
    assert y.dtype == (torch.bfloat16 if bf16 else torch.float32)
    y.sum().backward()
    assert x.grad is None or x.grad.shape == (0, 8)  # nothing to differentiate: either is fine
    for w in (experts.gate_up_proj, experts.down_proj):
        assert w.grad is not None and torch.count_nonzero(w.grad) == 0


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("equal", [True, False], ids=["equal_counts", "ragged"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_matches_loop_fp32_cuda(backend: str, equal: bool) -> None:
    cases = [[4, 4, 4, 4], [1] * 8] if equal else [[0, 3, 9, 0, 1], [7], [2, 0, 0, 5, 1, 0, 0, 3]]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 comparison
    try:
        for counts in cases:
            for dim, hidden in [(16, 8), (32, 32), (8, 24)]:
                _compare_backend_to_loop(backend, counts, dim, hidden, equal, bf16=False, device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
