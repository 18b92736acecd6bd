"""`dlmoe experiment capacity-policy` at a tiny scale: static k through the policy is plain sampling,
the generative NLL is the MC-ELBO, FLOPs are measured and monotone, equal-FLOPs pairing, the output
contract, deterministic rendering, and bad options refused before --out is written."""

import contextlib
import dataclasses
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dlmoe.cli import main
from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
from dlmoe.config_io import load_run_config
from dlmoe.diffusion.validation import validation_elbo
from dlmoe.eval.likelihood import draw_masks, mc_log_likelihood, pair_generator
from dlmoe.experiments import SCALES, ExperimentArgs
from dlmoe.experiments.capacity_policy import (
    STATIC,
    Setting,
    check_base,
    default_ranges,
    distinct_fraction,
    proxy_elbo,
    reference_nll,
    render,
    run,
)
from dlmoe.experiments.report_capacity_policy import comparisons, interpolation, less_diverse, paired, verdicts
from dlmoe.model import DiffusionTransformer
from dlmoe.routing.schedules import SCHEDULE_NAMES
from dlmoe.sampling import CapacityPolicy, generate
from tests.experiments.conftest import TINY

SCALE = dataclasses.replace(TINY, steps=3)
EXTRA = {"prompts": 4, "prompt_length": 8, "gen_length": 16, "block_length": 8, "mc_num": 2,
         "schedules": ["linear", "linear_reverse"], "ranges": [[1, 3], [2, 4]]}  # fmt: skip
MASK, E, K = 63, 4, 2
PROMPTS = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]])


def ec_model(seed: int = 0) -> DiffusionTransformer:
    torch.manual_seed(seed)
    router = RouterConfig(kind="expert_choice", num_experts=E, num_experts_per_tok=K)
    config = ModelConfig(
        vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=64, dense_hidden=48,
        moe=MoEConfig(router=router, expert_hidden=16), mask_id=MASK, eos_id=62, init_std=0.2,
    )  # fmt: skip
    return DiffusionTransformer(config).eval()


def sample(model, policy=None):
    return generate(model, PROMPTS, gen_length=8, block_length=4, steps=8, capacity=policy)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cp") / "out"
    args = ExperimentArgs(out=out, scale_name="tiny", corpus=str(corpus), seeds=1, extra=EXTRA)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SCALES, "tiny", SCALE)
        mp.setattr("dlmoe.train.trainer.plot_losses", lambda *a, **k: None)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            results = run(args)
        finally:
            torch.set_num_threads(threads)
    return out, results


# ----------------------------------------------------------------------------- sampling and measures


def test_static_k_through_the_policy_is_plain_sampling_and_a_flat_range_is_static() -> None:
    model = ec_model()
    plain = sample(model)
    static = sample(model, Setting(STATIC, K, K).policy())
    assert torch.equal(plain.generated, static.generated)
    assert static.stats.active_flops == plain.stats.active_flops
    for schedule in SCHEDULE_NAMES:  # k_min = k_max = k: every schedule is static k, exactly
        flat = sample(model, CapacityPolicy(schedule, K, K))
        assert torch.equal(flat.generated, plain.generated), schedule
        assert flat.stats.active_flops == plain.stats.active_flops
    flops = [sample(model, Setting(STATIC, k, k).policy()).stats.active_flops_per_token for k in range(1, E + 1)]
    assert all(a < b for a, b in zip(flops, flops[1:], strict=False)), flops


def test_reference_nll_is_the_mc_elbo_of_eval_likelihood() -> None:
    model = ec_model(1)
    answers = torch.tensor([[20 + i + 3 * j for i in range(8)] for j in range(3)])
    pairs = [(p.tolist(), a.tolist()) for p, a in zip(PROMPTS, answers, strict=True)]
    estimates = mc_log_likelihood(model, pairs, mc_num=4, seed=0)
    drawn = [draw_masks(6, 8, 4, pair_generator(0, p, a)) for p, a in pairs]  # the masks it drew
    masks = torch.stack([m for m, _ in drawn]), torch.stack([w for _, w in drawn])
    ours = reference_nll(model, PROMPTS, answers, masks, K)  # static k = the model's: what it ran
    assert ours.tolist() == pytest.approx([-e.log_likelihood / 8 for e in estimates], rel=1e-5)
    assert not torch.allclose(reference_nll(model, PROMPTS, answers, masks, E), ours)  # k is applied
    assert distinct_fraction(torch.tensor([[1, 1, 2, 3], [5, 5, 5, 5]])) == [0.75, 0.25]


def test_static_proxy_is_the_validation_elbo() -> None:
    model = ec_model(2)
    batches = [torch.randint(3, 60, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    proxy = proxy_elbo(model, batches, Setting(STATIC, K, K).policy(), antithetic=True)
    plain = validation_elbo(model, batches, mask_id=MASK, two_stream=False, antithetic=True)
    assert proxy["elbo"] == pytest.approx(plain.nats_per_token, rel=1e-6)
    assert proxy["experts_per_token"] == E * (16 * K // E) / 16
    scheduled = proxy_elbo(model, batches, CapacityPolicy("linear", 1, K), antithetic=True)
    assert 1 <= scheduled["experts_per_token"] <= K and scheduled["flops_per_token"] <= proxy["flops_per_token"]
    fewer = proxy_elbo(model, batches, Setting(STATIC, 1, 1).policy(), antithetic=True)
    assert fewer["experts_per_token"] == 1 and fewer["flops_per_token"] < proxy["flops_per_token"]


# ----------------------------------------------------------------------------- equal FLOPs


def _point(name: str, flops: float, nll: list[float], *, static: bool, k: int = 1, elbo: float = 3.0) -> dict:
    proxy = {"elbo": elbo, "flops_per_token": flops, "experts_per_token": k}
    schedule = STATIC if static else name.split()[0]
    return {"setting": name, "schedule": schedule, "k_min": k, "k_max": k, "static": static, "flops_per_token": flops,
            "experts_per_token": k, "nll": nll, "agreement": [1.0] * len(nll), "distinct": [0.5] * len(nll),
            "proxy": proxy}  # fmt: skip


def test_interpolation_and_pairing_on_hand_made_numbers() -> None:
    assert interpolation([1.0, 2.0, 4.0], 3.0) == (1, 2, 0.5)
    assert interpolation([1.0, 2.0, 4.0], 1.0) == (0, 1, 0.0) and interpolation([1.0, 2.0, 4.0], 4.0) == (1, 2, 1.0)
    assert interpolation([1.0, 2.0], 0.5) is None and interpolation([1.0, 2.0], 2.5) is None
    statics = [_point("static k=1", 1.0, [4.0, 6.0], static=True, k=1, elbo=4.0),
               _point("static k=2", 2.0, [2.0, 2.0], static=True, k=2, elbo=3.0)]  # fmt: skip
    point = _point("linear_reverse [1, 2]", 1.25, [3.0, 3.0], static=False, elbo=3.5)
    base = {"points": [*statics, point]}
    got = paired(base, point)  # static at 1.25: 0.75·(4, 6) + 0.25·(2, 2) = (3.5, 5.0); proxy 3.75
    assert got["bracket"] == [1, 2] and got["weight"] == 0.25
    assert got["nll"] == pytest.approx([-0.5, -2.0]) and got["proxy"] == pytest.approx(-0.25)
    assert paired(base, _point("linear [1, 2]", 3.0, [1.0, 1.0], static=False)) is None
    results = {"bases": [base]}
    (comp,) = comparisons(results)
    assert comp["nll"]["mean"] == pytest.approx(-1.25) and comp["interpolable"] and not less_diverse(comp)
    ((v, _),) = verdicts(results)
    assert v.seeds == 2 and "linear_reverse [1, 2]" in v.claim
    assert default_ranges(2, 4) == ((1, 4), (2, 4), (1, 3)) and default_ranges(1, 2) == ((1, 2),)


# ----------------------------------------------------------------------------- the experiment


def test_output_contract(finished: tuple[Path, dict]) -> None:
    out, results = finished
    assert json.loads((out / "experiment.json").read_text())["experiment"] == "capacity-policy"
    assert set(results) == {"experiment", "options", "sweep", "bases", "controls", "summary"}
    (base,) = results["bases"]
    assert base["trained_here"] and base["model"]["router"] == "expert_choice" and base["model"]["k"] == K
    names = [p["setting"] for p in base["points"]]
    assert names == [f"static k={k}" for k in range(1, 5)] + [
        f"{s} [{lo}, {hi}]" for s in ("linear", "linear_reverse") for lo, hi in ((1, 3), (2, 4))
    ]
    for p in base["points"]:
        assert len(p["nll"]) == len(p["distinct"]) == len(p["agreement"]) == 4
        assert all(math.isfinite(v) and v > 0 for v in p["nll"]) and p["forwards"] == 16
    assert base["points"][3]["agreement"] == [1.0] * 4  # static k_max is the reference
    assert len(results["controls"]["base"]) == 1 and "routed_contribution" in results["controls"]["base"][0]
    assert set(results["summary"]) == {"delta_nll", "verdicts"} and len(results["summary"]["verdicts"]) == 4
    md = (out / "results.md").read_text()
    assert md.startswith("## capacity-policy") and "Routed-experts-off control" in md and "Δ gen NLL" in md
    assert md.count("**reproduced**") + md.count("**contradicted**") + md.count("**inconclusive**") == 4
    for name in ("quality_flops.png", "equal_flops_deltas.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "runs" / "base" / "seed0" / "metrics.csv").is_file()
    generations = json.loads((out / "generations.json").read_text())["seed0"]
    assert len(generations["texts"]["static k=1"]) == 4 and len(generations["ids"]["static k=4"][0]) == 16


def test_flops_are_measured_monotone_and_schedules_sit_inside_the_frontier(finished: tuple[Path, dict]) -> None:
    _, results = finished
    points = results["bases"][0]["points"]
    length = EXTRA["prompt_length"] + EXTRA["gen_length"]  # no cache: every forward feeds the whole canvas
    static = {p["k_min"]: p for p in points if p["static"]}
    assert [static[k]["experts_per_token"] for k in range(1, 5)] == [
        E * (length * k // E) / length for k in range(1, 5)
    ]
    flops = [static[k]["flops_per_token"] for k in range(1, 5)]
    assert all(a < b for a, b in zip(flops, flops[1:], strict=False))
    for p in points:
        if not p["static"]:
            assert (
                static[p["k_min"]]["flops_per_token"] <= p["flops_per_token"] <= static[p["k_max"]]["flops_per_token"]
            )
            assert static[p["k_min"]]["proxy"]["flops_per_token"] <= p["proxy"]["flops_per_token"]


def test_render_is_deterministic_and_reads_only_the_archive(finished: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = finished
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("results.json", "provenance.json"):
        shutil.copyfile(out / name, raw / name)
    first, second = render(raw), render(raw)
    assert first.markdown == second.markdown and first.series == second.series
    assert json.loads(json.dumps(first.series)) == json.loads((out / "plots.json").read_text())
    assert first.markdown in (out / "results.md").read_text()
    assert first.series["quality_flops"]["static"]["k"] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- refusals


def test_bad_options_are_refused_before_anything_is_written(tiny_args) -> None:
    cases = [
        ({"extra": {"prompts": 5}}, "prompts must be <= 4"),
        ({"extra": EXTRA | {"prompt_length": 20}}, "prompt_length \\+ gen_length = 36 must be <= seq_len=32"),
        ({"extra": EXTRA | {"gen_length": 12}}, "gen_length=12 must be a multiple of block_length=8"),
        ({"extra": EXTRA | {"denoising_steps": 3}}, "steps=3 must be a multiple of the number of blocks"),
        ({"extra": EXTRA | {"mc_num": 0}}, "mc_num must be >= 1"),
        ({"extra": EXTRA | {"denoising_steps": 17}}, "denoising_steps must be <= 16"),
        ({"extra": EXTRA | {"k_max": 5}}, "k_max must be <= 4"),
        ({"extra": EXTRA | {"ranges": [[1, 5]]}}, "ranges k_max must be <= 4"),
        ({"extra": EXTRA | {"ranges": [[3, 3]]}}, "ranges k_max must be >= 4"),
        ({"extra": EXTRA | {"ranges": [3, 4]}}, "ranges must hold \\[k_min, k_max\\] pairs"),
        ({"extra": EXTRA | {"schedules": ["constant"]}}, "'constant' is the static baseline"),
        ({"extra": EXTRA | {"schedules": "linear"}}, "schedules must be a non-empty list"),
        ({"extra": {"tune": False}}, "unknown experiment options \\['tune'\\]"),
        ({"base_run": "/no/such/run", "seeds": 2}, "--base-run gives one: pass --seeds 1"),
        ({"base_run": "/no/such/run"}, "is not a run folder"),
        ({"mcq": ("x.jsonl",)}, "takes no --mcq"),
    ]
    for kwargs, match in cases:
        args = tiny_args("bad", **kwargs)
        with pytest.raises(ValueError, match=match):
            run(args)
        assert not args.out.exists(), kwargs


def test_the_base_must_route_rows_on_their_own_by_expert_choice(tmp_path: Path) -> None:
    def config(*overrides: str):
        return load_run_config(None, [f"run_dir={tmp_path}", *overrides])

    check_base(config("model.moe.router.kind=expert_choice"))
    with pytest.raises(ValueError, match="routes with 'token_choice'; a capacity policy needs an expert_choice"):
        check_base(config("model.moe.router.kind=token_choice"))
    with pytest.raises(ValueError, match="router.pool='batch'"):
        check_base(config("model.moe.router.kind=expert_choice", "model.moe.router.pool=batch"))


def test_cli_runs_the_experiment_and_reports_bad_input_in_one_line(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "cli"
    argv = ["experiment", "capacity-policy", "--out", str(out), "--corpus", str(corpus), "--base-run", str(tmp_path)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([*argv, "--seeds", "1"]) == 2
    assert "is not a run folder" in err.getvalue() and not out.exists()
