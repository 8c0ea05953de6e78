"""Dynamic activation (ear.activate): experts are an exact partition of each FFN, all experts on is
the dense model bit for bit, routers learn the experts' norms, and what is stored loads strictly."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from unittest import mock

import pytest
import torch
from torch import nn

from ear.__main__ import main
from ear.activate import (
    ACTIVATION_FILE,
    Activation,
    ActivationConfig,
    balanced_groups,
    distill,
    ffn_inputs,
    lead_rows,
    train_routers,
)
from ear.engine import configure, float32_kernels, runner_for
from ear.flops import SAVING_KEYS, activation_saving, flops_per_image
from ear.model import FeedForward
from ear.pipeline import EARPipeline
from ear.routed import ROW_BUCKET, RoutedFFN
from ear.sampler import decode, generate, sample
from tests.helpers import noisy_model, write_tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def model():
    return noisy_model(grid_size=6).eval()


@pytest.fixture(scope="module")
def samples(model):
    """The model's own samples (the distillation's data: no data set needed)."""
    classes = torch.arange(8) % 10
    return generate(model, classes.tolist(), seed=0, temperature=1.0).reshape(8, -1), classes


def test_experts_partition_each_ffn_into_equal_groups(model) -> None:
    weight = model.layers[0].feed_forward.w1.weight
    groups = balanced_groups(weight, 4)
    assert groups.shape == (4, weight.shape[0] // 4)
    assert sorted(groups.flatten().tolist()) == list(range(weight.shape[0]))
    assert torch.equal(groups, balanced_groups(weight, 4))  # deterministic
    with pytest.raises(ValueError, match="equal experts"):
        balanced_groups(weight, 5)


def test_similar_neurons_share_an_expert() -> None:
    base = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    weight = torch.cat([row + 0.01 * torch.randn(8, 16) for row in base])  # 4 clusters of 8 rows
    groups = sorted(tuple(sorted(g.tolist())) for g in balanced_groups(weight, 4))
    assert groups == [tuple(range(8 * i, 8 * i + 8)) for i in range(4)]


def test_every_expert_on_is_the_dense_model_bit_for_bit(model, samples) -> None:
    tokens, classes = samples
    activation = Activation(model, ActivationConfig(experts=4, tau=1.0))
    with torch.no_grad():
        dense = model(tokens, classes)
        with activation.applied(model) as ffns:
            activated = model(tokens, classes)
        assert all(ffn.active_share == [1.0] for ffn in ffns)
    assert torch.equal(dense, activated)
    assert all(type(block.feed_forward) is FeedForward for block in model.layers)  # dense again


def test_routers_learn_the_expert_norms_and_fewer_experts_run(model, samples) -> None:
    tokens, classes = samples
    activation = Activation(model, ActivationConfig(experts=4, router_hidden=32, tau=0.5))
    inputs = ffn_inputs(model, tokens, classes)
    assert len(inputs) == len(model.layers) and inputs[0].shape[-1] == model.config.dim

    def error(layer: int) -> float:
        x = inputs[layer].reshape(-1, model.config.dim)
        with torch.no_grad():
            target = torch.log1p(activation.expert_norms(layer, model, x))
            return float(nn.functional.mse_loss(activation.routers[layer](x), target))

    before = [error(i) for i in range(len(model.layers))]
    train_routers(activation, model, tokens, classes, steps=150)
    after = [error(i) for i in range(len(model.layers))]
    assert all(a < 0.5 * b for a, b in zip(after, before, strict=True)), (before, after)
    with torch.no_grad():
        dense = model(tokens, classes).argmax(-1)
        with activation.applied(model) as ffns:
            activated = model(tokens, classes).argmax(-1)
    share = sum(s for ffn in ffns for s in ffn.active_share) / len(ffns)
    assert share < 1.0  # fewer experts than all of them ran
    assert (dense == activated).float().mean() > 0.5


def test_distillation_keeps_the_share_near_its_budget(model, samples) -> None:
    tokens, classes = samples
    activation = Activation(model, ActivationConfig(experts=4, router_hidden=16, tau=0.9))
    train_routers(activation, model, tokens, classes, steps=50)

    def share() -> float:
        with torch.no_grad(), activation.applied(model) as ffns:
            model(tokens, classes)
        return sum(s for ffn in ffns for s in ffn.active_share) / len(ffns)

    before = share()
    result = distill(activation, model, tokens, classes, budget=0.5, steps=60, lr=3e-3, weight=5.0)
    assert torch.isfinite(torch.tensor(result["kl"])) and share() < before  # fewer experts run
    assert all(p.requires_grad for p in model.parameters())  # the backbone is unfrozen again
    assert all(type(block.feed_forward) is FeedForward for block in model.layers)


def test_the_activation_file_loads_strictly(model, tmp_path) -> None:
    activation = Activation(model, ActivationConfig(experts=2, router_hidden=8, tau=0.3))
    path = activation.save(tmp_path)
    assert path.name == ACTIVATION_FILE
    loaded = Activation.load(tmp_path, model)
    assert loaded.config == activation.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.groups, activation.groups, strict=True))
    x = torch.randn(5, model.config.dim)
    assert torch.equal(loaded.routers[0](x), activation.routers[0](x))
    other = noisy_model(grid_size=6, dim=32, n_head=2)  # another shape: refused in one sentence
    with pytest.raises(ValueError, match="do not fit this model"):
        Activation.load(tmp_path, other)
    with pytest.raises(ValueError, match="tau >= 0"):
        ActivationConfig(tau=-1)


def test_tuned_experts_learn_and_load_strictly(model, samples, tmp_path) -> None:
    """Distillation with tuned experts moves their own weights (the model's stay), lowers the KL
    below routing alone at the same budget, and the file keeps them: strictly, both ways."""
    tokens, classes = samples
    plain = Activation(model, ActivationConfig(experts=4, router_hidden=16, tau=0.3))
    train_routers(plain, model, tokens, classes, steps=40)
    tuned = plain.with_tuned_experts(model)
    assert tuned.config.tuned and tuned.tuned is not None and plain.tuned is None
    dense = [block.feed_forward.w1.weight.clone() for block in model.layers]
    alone = distill(plain, model, tokens, classes, budget=0.4, steps=40, lr=3e-3, seed=1)
    both = distill(tuned, model, tokens, classes, budget=0.4, steps=40, lr=3e-3, seed=1, expert_lr=3e-3)
    assert both["kl"] < alone["kl"], (both, alone)
    assert all(torch.equal(b.feed_forward.w1.weight, w) for b, w in zip(model.layers, dense, strict=True))
    assert not torch.equal(tuned.tuned[0].w1.weight, dense[0])
    tuned.save(tmp_path / "tuned")
    loaded = Activation.load(tmp_path / "tuned", model)
    assert loaded.config.tuned and torch.equal(loaded.tuned[1].w2.weight, tuned.tuned[1].w2.weight)
    x = torch.randn(3, 5, model.config.dim)
    with torch.no_grad():
        with loaded.applied(model, 0.3) as ffns:
            routed = ffns[0](x)
        with loaded.applied(model, 1.0) as ffns:  # every expert on: the dense weights, bit for bit
            assert torch.equal(ffns[0](x), model.layers[0].feed_forward(x))
        with plain.applied(model, 0.3) as ffns:
            assert not torch.allclose(ffns[0](x), routed)
    # a file whose config and tensors disagree is refused in one sentence
    untuned = Activation(model, plain.config, plain.groups)
    untuned.tuned = tuned.tuned
    untuned.save(tmp_path / "extra")  # tuned tensors, untuned config
    with pytest.raises(ValueError, match="do not fit this model"):
        Activation.load(tmp_path / "extra", model)
    missing = Activation(model, tuned.config, tuned.groups)
    missing.tuned = None
    missing.save(tmp_path / "missing")  # tuned config, no tuned tensors
    with pytest.raises(ValueError, match="do not fit this model"):
        Activation.load(tmp_path / "missing", model)


def test_the_cli_converts_a_model_on_its_own_samples(tmp_path, capsys) -> None:
    folder = write_tiny_model(tmp_path / "tiny")
    args = ["activate", "--model", str(folder), "--experts", "2", "--samples", "8", "--router-steps", "20",
            "--distill-steps", "4", "--quiet", "--out"]
    assert main([*args, str(tmp_path / "act")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["ffn_share"] <= 1 and 0 <= report["agreement"] <= 1
    assert 0 < report["flops_active"] < report["flops_dense"] and 0 < report["ffn_active"] <= 1
    pipe = EARPipeline.from_pretrained(str(folder))
    written = Activation.load(tmp_path / "act", pipe.model)
    assert written.config.experts == 2
    assert {"written": str(tmp_path / "act" / ACTIVATION_FILE), **written.report} == report  # counts kept
    pipe.load_activation(tmp_path / "act")
    with mock.patch("ear.pipeline.activation_saving", side_effect=AssertionError("counted again")):
        assert pipe.info()["activation"]["flops_dense"] == report["flops_dense"]
    assert main([*args, str(tmp_path / "bad"), "--budget", "0"]) == 2  # refused in one sentence
    assert "budget" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_the_cli_moves_an_activation_to_another_dense_lead_without_distilling(tmp_path, capsys) -> None:
    """`ear activate --reuse DIR`: the same experts, routers and gates at the lead (and tau) asked
    for, the rest of the config the file's, measured again on the held-out own samples."""
    folder = write_tiny_model(tmp_path / "tiny")
    made = ["activate", "--model", str(folder), "--experts", "2", "--tau", "0.5", "--samples", "8",
            "--router-steps", "20", "--distill-steps", "4", "--quiet", "--out", str(tmp_path / "act")]
    assert main(made) == 0
    capsys.readouterr()
    moved = ["activate", "--model", str(folder), "--reuse", str(tmp_path / "act"), "--dense-lead", "0.5",
             "--samples", "8", "--quiet", "--out", str(tmp_path / "moved")]
    with mock.patch("ear.activate.distill", side_effect=AssertionError("distilled again")):
        assert main(moved) == 0
    report = json.loads(capsys.readouterr().out)
    model = EARPipeline.from_pretrained(str(folder)).model
    before, after = Activation.load(tmp_path / "act", model), Activation.load(tmp_path / "moved", model)
    assert after.config == replace(before.config, dense_lead=0.5) and after.config.tau == 0.5
    for (name, old), (_, new) in zip(before.tensors()[0].items(), after.tensors()[0].items(), strict=True):
        assert torch.equal(old, new), name
    assert {"written": str(tmp_path / "moved" / ACTIVATION_FILE), **after.report} == report
    assert set(report) >= {"ffn_share", "agreement", "flops_dense", "flops_active", "ffn_active"}
    assert main([*moved[:4], str(tmp_path / "nothing"), *moved[5:]]) == 2
    assert "holds no activation.safetensors" in capsys.readouterr().err


def _greedy_logits(model, classes: list[int], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Every step's guided logits and tokens of a greedy decode (cfg 2) on the runner."""
    logits, tokens = [], []
    for _k, step_logits, step_tokens in decode(model, torch.tensor(classes), lambda _k, lg: lg.argmax(-1),
                                               cfg_scale=2.0, **kwargs):
        logits.append(step_logits.clone())
        tokens.append(step_tokens)
    return torch.cat(logits, 1), torch.cat(tokens, 1)


# The engine's free savings, each with the runner flag that turns it off.
FREE_SAVINGS = {"content-token skip": ("content_outputs", True),
                "shared mask projection": ("share_mask_projection", False)}


@pytest.mark.parametrize("adaln", [True, False])
@pytest.mark.parametrize("saving", FREE_SAVINGS)
def test_the_free_savings_change_no_token(adaln: bool, saving: str) -> None:
    """The last layer runs only the mask queries, and the first layer projects a step's mask
    queries once per image; turning either off gives the same logits and tokens, greedy and
    sampled."""
    model = noisy_model(adaln=adaln).eval()
    runner = runner_for(model)
    flag, off = FREE_SAVINGS[saving]
    saved = _greedy_logits(model, [1, 4, 9])
    drawn = generate(model, [2, 3], seed=5, cfg_scale=1.5)
    setattr(runner, flag, off)
    try:
        full = _greedy_logits(model, [1, 4, 9])
        assert torch.equal(drawn, generate(model, [2, 3], seed=5, cfg_scale=1.5))
    finally:
        setattr(runner, flag, not off)
    assert torch.equal(saved[1], full[1])
    torch.testing.assert_close(saved[0], full[0], rtol=1e-5, atol=1e-5)


def test_the_shared_mask_projection_saves_its_products_exactly() -> None:
    """Counted FLOPs drop by the first layer's qkv products of every mask query but one per step
    and image (CFG rows included)."""
    model = noisy_model().eval()
    runner = runner_for(model)
    shared, _ = flops_per_image(model, [1, 2], cfg_scale=1.5)
    runner.share_mask_projection = False
    try:
        each, _ = flops_per_image(model, [1, 2], cfg_scale=1.5)
    finally:
        runner.share_mask_projection = True
    sched, dim = model.schedule, model.config.dim
    repeated = sched.num_tokens - sched.num_steps  # mask queries projected again without it
    assert each - shared == 2 * repeated * 2 * dim * 3 * dim  # two rows per image (CFG)


@pytest.fixture(scope="module")
def trained(model, samples):
    """Routers and gates after a short stage 1 (a fifth of the tokens gated off)."""
    tokens, classes = samples
    activation = Activation(model, ActivationConfig(experts=4, router_hidden=16, tau=0.5))
    train_routers(activation, model, tokens, classes, steps=40, skip=0.2)
    return activation


@pytest.mark.parametrize("mode", ["grouped", "masked", "capacity"])
def test_every_expert_on_in_the_engine_is_the_dense_model(model, trained, mode: str) -> None:
    dense = _greedy_logits(model, [1, 4, 9])
    routed = _greedy_logits(model, [1, 4, 9], activation=RoutedFFN(trained, 1.0, mode=mode, capacity=1.0))
    assert torch.equal(routed[1], dense[1])
    torch.testing.assert_close(routed[0], dense[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adaln", [True, False])
def test_the_engine_routes_like_the_reference(adaln: bool, samples) -> None:
    """One product per expert (CPU), the static-shape forms (CUDA graphs) and the reference's
    masked FFN stepped through the readable model draw the same tokens."""
    model = noisy_model(grid_size=6, adaln=adaln).eval()
    tokens, classes = samples
    activation = Activation(model, ActivationConfig(experts=4, router_hidden=16))
    train_routers(activation, model, tokens, classes, steps=40, skip=0.2)
    with torch.no_grad(), activation.applied(model, 0.5):
        reference = _greedy_logits(model, [1, 4, 9], engine="reference")
    tuned = activation.with_tuned_experts(model)
    with torch.no_grad():
        for ffn in tuned.tuned:  # experts of their own, unlike the dense FFN's
            for w in ffn.parameters():
                w.mul_(1 + 0.3 * torch.randn_like(w))
        with tuned.applied(model, 0.5):
            tuned_reference = _greedy_logits(model, [1, 4, 9], engine="reference")
    assert not torch.equal(tuned_reference[0], reference[0])
    for mode in ("grouped", "masked", "capacity"):
        for act, ref in ((activation, reference), (tuned, tuned_reference)):
            routed = _greedy_logits(model, [1, 4, 9], activation=RoutedFFN(act, 0.5, mode, capacity=1.0))
            assert torch.equal(routed[1], ref[1]), mode
            torch.testing.assert_close(routed[0], ref[0], rtol=1e-4, atol=1e-4)
    every = _greedy_logits(model, [1, 4, 9], activation=RoutedFFN(tuned, 1.0, "grouped"))
    torch.testing.assert_close(every[0], _greedy_logits(model, [1, 4, 9])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", float32_kernels())
def test_the_experts_run_on_the_runners_own_kernel(trained, kernel: str) -> None:
    """Each expert's slices take the runner's pre-packed kernel (rows padded to a bucket, the
    padding's outputs dropped) and still draw the tokens of the reference's masked FFN."""
    model = noisy_model(grid_size=6).eval()  # the fixture's weights, a runner of its own
    with torch.no_grad(), trained.applied(model, 0.5):
        reference = _greedy_logits(model, [1, 4, 9], engine="reference")
    configure(model, linear=kernel)
    ffn = RoutedFFN(trained, 0.5, "grouped")
    routed = _greedy_logits(model, [1, 4, 9], activation=ffn)
    parts = [part for _weights, part in ffn._layers.values()]
    assert parts and all(w.mode == kernel for part in parts for w in (*part.w13, *part.w2))
    assert all(part.bucket == (1 if kernel == "plain" else ROW_BUCKET) for part in parts)
    assert torch.equal(routed[1], reference[1])
    torch.testing.assert_close(routed[0], reference[0], rtol=1e-4, atol=1e-4)
    # a step of many rows: the padded products, against the dense product with neurons zeroed
    layer = runner_for(model).weights.layers[0]
    h, work = torch.randn(1, 2 * ROW_BUCKET + 5, model.config.dim), torch.zeros(2, dtype=torch.float64)
    masked = RoutedFFN(trained, 0.5, "masked")
    torch.testing.assert_close(ffn(0, layer, h, work), masked(0, layer, h, work), rtol=1e-4, atol=1e-4)


def test_the_budget_knob_moves_the_active_share(model, trained) -> None:
    def active(tau: float) -> float:
        return _last(sample(model, [1, 2], seed=3, activation=RoutedFFN(trained, tau))).ffn_active

    shares = [active(tau) for tau in (0.0, 0.3, 0.6, 1.0)]
    assert shares == sorted(shares) and shares[0] < 0.9 * shares[-1], shares
    assert _last(sample(model, [1, 2], seed=3)).ffn_active == 1.0  # dense
    with pytest.raises(ValueError, match=r"activation must be a number in \[0, 1\]"):
        RoutedFFN(trained, 1.5)
    with pytest.raises(ValueError, match="runs on the cached runner"):
        _last(sample(model, [1], activation=RoutedFFN(trained, 0.5), engine="reference"))


def test_the_dense_lead_keeps_the_first_steps_dense(model, trained) -> None:
    """Steps before the lead are the dense model's (the same logits, teacher-forced greedy), the
    rest are routed; the lead costs FFN work, counted in the active share."""
    sched = model.schedule
    dense, _ = _greedy_logits(model, [1, 4, 9])
    routed, _ = _greedy_logits(model, [1, 4, 9], activation=RoutedFFN(trained, 0.0))
    lead = 0.4
    led, _ = _greedy_logits(model, [1, 4, 9], activation=RoutedFFN(trained, 0.0, lead=lead))
    # the step whose queries start at or after the lead's position is the first one routed
    start = math.ceil(lead * sched.num_tokens)
    first = next(k for k in range(sched.num_steps) if sched.boundaries[k] >= start)
    cut = sched.boundaries[first]
    assert 0 < cut < sched.num_tokens
    torch.testing.assert_close(led[:, :cut], dense[:, :cut], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(led[:, cut:], dense[:, cut:], atol=1e-3)
    assert not torch.allclose(routed[:, :cut], dense[:, :cut], atol=1e-3)

    def active(lead: float) -> float:
        return _last(sample(model, [1, 2], seed=3, activation=RoutedFFN(trained, 0.0, lead=lead))).ffn_active

    shares = [active(x) for x in (0.0, 0.4, 0.8)]
    assert shares == sorted(shares) and shares[-1] < 1, shares
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match=r"dense lead .* a number in \[0, 1\)"):
            RoutedFFN(trained, 0.5, lead=bad)


@pytest.mark.parametrize("lead", [0.0, 0.4])
def test_the_reference_runs_dense_where_the_engine_does(model, samples, trained, lead: float) -> None:
    """Teacher-forced on the same tokens, the engine at a dense lead (tuned experts, grouped) and
    the readable model's one forward under `applied(lead=...)` give the same logits: `lead_rows`
    are the rows the engine runs dense, which distillation and its measurement rely on."""
    tokens, classes = samples
    tuned = trained.with_tuned_experts(model)
    with torch.no_grad():
        for ffn in tuned.tuned:
            for w in ffn.parameters():
                w.mul_(1 + 0.3 * torch.randn_like(w))
        with tuned.applied(model, 0.5, lead=lead):
            reference = model(tokens, classes)
    ordered = tokens[:, list(model.schedule.order)]
    b = model.schedule.boundaries
    engine = torch.cat([logits for _k, logits, _t in decode(
        model, classes, lambda k, _lg: ordered[:, b[k]:b[k + 1]],
        activation=RoutedFFN(tuned, 0.5, "grouped", lead=lead))], 1)
    torch.testing.assert_close(engine, reference, rtol=1e-4, atol=1e-4)
    rows = lead_rows(model, lead)
    assert rows.shape == (2 * model.schedule.num_tokens + 2,) and bool(rows.any()) == (lead > 0)


def test_an_activated_image_is_the_same_alone_and_in_a_crowd(model, trained) -> None:
    routed = RoutedFFN(trained, 0.5)
    crowd = generate(model, [1, 2, 3], seed=[7, 8, 9], activation=routed)
    alone = torch.cat([generate(model, [c], seed=s, row_ids=[i], activation=routed)
                       for i, (c, s) in enumerate(((1, 7), (2, 8), (3, 9)))])
    assert torch.equal(crowd, alone)


def test_a_shut_token_gate_skips_the_ffn(model, samples, trained) -> None:
    """The gate closes for about its `skip` share of tokens after stage 1; a gate shut for every
    token leaves the residual as it was (the FFN contributes nothing) and costs only routing."""
    tokens, classes = samples
    x = ffn_inputs(model, tokens, classes)[0].reshape(-1, model.config.dim)
    closed = float((trained.gates[0](x) < 0).float().mean())
    assert 0.05 < closed < 0.5, closed
    shut = Activation(model, trained.config, trained.groups)
    shut.load_state_dict(trained.state_dict())
    with torch.no_grad():
        for gate in shut.gates:
            gate.bias.fill_(-1e4)
        with shut.applied(model, 0.5) as ffns:
            assert torch.equal(ffns[0](x), torch.zeros_like(x))
    state = _last(sample(model, [1], seed=0, activation=RoutedFFN(shut, 0.5)))
    assert 0 < state.ffn_active < 0.2  # routers and gates only


def _last(states):
    state = None
    for state in states:  # noqa: B007
        pass
    return state


def test_the_pipeline_and_cli_run_a_shipped_activation(tmp_path, capsys) -> None:
    folder = write_tiny_model(tmp_path / "tiny")
    plain = EARPipeline.from_pretrained(str(folder))
    assert not plain.has_activation and plain.info()["activation"] is None
    with pytest.raises(ValueError, match="ships no dynamic activation"):
        plain.generate("cat", activation=0.5)
    Activation(plain.model, ActivationConfig(experts=2, router_hidden=8)).save(folder)
    pipe = EARPipeline.from_pretrained(str(folder))
    assert pipe.info()["activation"]["experts"] == 2
    frames = list(pipe.stream("cat", seed=3, activation=0.0))
    assert "active" in frames[-1].caption and frames[-1].state.ffn_active < 1
    assert len(pipe.generate("cat", seed=3, activation=1.0)) == 1
    out = tmp_path / "cat.png"
    assert main(["generate", "--model", str(folder), "--class", "cat", "--activation", "0.5", "--quiet",
                 "--out", str(out)]) == 0 and out.is_file()
    assert main(["generate", "--model", str(folder), "--class", "cat", "--activation", "2", "--quiet",
                 "--out", str(out)]) == 2
    assert "activation must be a number in [0, 1]" in capsys.readouterr().err


def test_flops_are_counted_without_changing_the_models_runner(model, trained) -> None:
    """The count runs on a plain runner of its own and one thread, then puts both back; the
    dense count (every row) exceeds the skip's, the activated one at tau 0 is smaller still."""
    runner, threads = runner_for(model), torch.get_num_threads()
    every, _ = flops_per_image(model, [1, 2], every_row=True, seed=0)
    skip, dense_share = flops_per_image(model, [1, 2], seed=0)
    active, share = flops_per_image(model, [1, 2], activation=RoutedFFN(trained, 0.0), seed=0)
    assert every > skip > active > 0 and dense_share == 1 and 0 < share < 1
    assert runner_for(model) is runner and torch.get_num_threads() == threads
    assert flops_per_image(model, [1, 2], seed=0)[0] == skip  # counted, the same every time
    saving = activation_saving(model, trained, [1], tau=0.0)
    assert set(saving) == set(SAVING_KEYS) and saving["flops_active"] < saving["flops_dense"]


def test_the_bundled_model_ships_its_activation() -> None:
    pipe = EARPipeline.from_pretrained("ear-emoji")
    info = pipe.info()["activation"]
    assert pipe.has_activation and info["experts"] == 4 and 0 < info["tau"] < 1
    dense = generate(pipe.model, [7], greedy=True)
    assert torch.equal(generate(pipe.model, [7], greedy=True, activation=pipe.routed(1.0)), dense)
    state = _last(sample(pipe.model, [7], seed=0, temperature=0.6, activation=pipe.routed(info["tau"])))
    assert state.ffn_active < 1


def test_the_budget_sweep_plot_draws_each_point_where_it_lies(tmp_path) -> None:
    """bench_activate --plot: each tau's point sits at its FLOPs saving and value, dense beside it."""
    from PIL import Image

    from bench.bench_activate import plot_sweep, sweep_panels
    from bench.chart import COLOURS, MARGIN, PANEL_W, panel_frame

    sweep = [{"tau": t, "flops_ratio": r, "agreement": a, "retrieval": q, "fid": f}
             for t, r, a, q, f in ((0.4, 0.76, 0.70, 0.95, 14.0), (0.6, 0.89, 0.98, 1.0, 12.8),
                                   (1.0, 0.92, 1.0, 1.0, 13.4))]
    result = {"sweep": sweep, "flops_ratio_skip": 0.906, "retrieval_dense": 1.0, "fid_dense": 13.4}
    image = Image.open(plot_sweep(result, tmp_path / "sweep.png")).convert("RGB")
    assert image.width == 3 * (PANEL_W + MARGIN) + MARGIN
    panels = sweep_panels(result)
    for n, (key, panel) in enumerate(zip(("agreement", "retrieval", "fid"), panels, strict=True)):
        points = [(100 * (1 - r["flops_ratio"]), r[key]) for r in sweep]
        dense = (0.0, 1.0 if key == "agreement" else result[f"{key}_dense"])
        frame = panel_frame(panel, n)
        for (x, y), colour in [(p, COLOURS[0]) for p in points[:2]] + [(dense, COLOURS[1])]:
            px, py = frame.at(x, y)
            assert image.getpixel((round(px), round(py))) == colour, (key, x, y)
