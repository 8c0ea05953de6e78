"""Nested refinement (ear/refine.py): the correction objective, the refined decode on both engines,
its cache, per-row randomness, and the options' checks in the sampler, the pipeline and the CLI."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch

from ear import refine
from ear.__main__ import main
from ear.engine import runner_for
from ear.model import EAR, EARConfig
from ear.order import make_schedule
from ear.pipeline import EARPipeline
from ear.refine import repair_accuracy
from ear.sampler import decode, generate, sample
from tests.helpers import noisy_model, tiny_ear, write_tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")
REFINED = {"temperature": 1.0, "refine": True, "refine_threshold": 0.02}


def _flat_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(6x6 grids of one random code each, labels): a cell's clean token is its neighbours' one."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return torch.randint(0, 16, (n, 1), generator=gen).expand(n, 36).clone(), labels


@pytest.fixture(scope="module")
def trained() -> EAR:
    """A tiny RadAR-order model trained with both losses (about 10 s on one core)."""
    torch.manual_seed(0)
    model = EAR(EARConfig(dim=32, n_layer=2, n_head=2, vocab_size=16, num_classes=3, grid_size=6,
                          schedule="radar", multiple_of=32, correction=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    for step in range(120):
        main_loss, fix_loss = model.training_losses(*_flat_images(32, step + 1))
        (main_loss + fix_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(before)
    return model.eval()


def test_the_correction_objective_learns_to_repair_corrupted_tokens(trained: EAR) -> None:
    tokens, labels = _flat_images(256, 10**6)
    corrupted, corrected = repair_accuracy(trained, tokens, labels, share=0.5, noise_share=1.0)
    assert corrupted < 0.6 and corrected > corrupted + 0.25, (corrupted, corrected)


def test_refinement_repairs_what_parallel_draws_got_wrong(trained: EAR) -> None:
    """At temperature 2 the rings' parallel draws disagree; the correction brings cells back."""
    def agreement(**kwargs) -> float:
        tokens = generate(trained, [i % 3 for i in range(64)], seed=1, temperature=2.0, **kwargs).flatten(1)
        return float((tokens == tokens.mode(1).values[:, None]).float().mean())

    assert agreement(refine=True) > agreement() + 0.05


def test_refined_steps_feed_every_cell_and_check_every_drawn_part_once() -> None:
    sched = make_schedule("radar", 8)
    for first, last in ((0, sched.num_steps - 1), (3, sched.num_steps - 1), (2, 5), (4, 4)):
        spans = refine.spans(sched, first, last)
        b = sched.boundaries
        queried = [c for s in spans for c in range(s.out.start, s.out.stop)]
        checked = [c for s in spans for c in range(s.checked.start, s.checked.stop)]
        assert queried == checked == list(range(b[first], b[last + 1]))
        for s in spans:  # the checked part is the tail of what is fed, right before the queries
            assert s.checked.stop == s.fed.stop and s.fed.stop == s.out.start
        assert spans[-1].fed == slice(b[last], b[last + 1]) and not spans[-1].num_checked


@pytest.mark.parametrize("kwargs", [{"temperature": 1.0}, {"top_k": 5, "top_p": 0.8}, {"greedy": True}])
def test_redrawing_only_the_doubtful_cells_gives_what_redrawing_every_cell_gives(kwargs: dict) -> None:
    from ear.draw import RowSettings, cell_streams, vocab_codes

    gen = torch.Generator().manual_seed(0)
    logits, drawn = torch.randn(3, 20, 64, generator=gen) * 3, torch.randint(0, 64, (3, 20), generator=gen)
    settings = {"cfg_scale": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": False, **kwargs}
    rows = RowSettings.build(3, 64, keys=torch.tensor([1, 2, 3]), **settings)
    streams, codes = refine.redraw_streams(cell_streams(rows.keys, 20)), vocab_codes(64, torch.device("cpu"))
    fixed = torch.zeros(3, 20, dtype=torch.bool)
    fixed[0, :5] = True
    static = refine.correct(logits, drawn, rows, streams, codes, 0.05, fixed, static=True)
    sparse = refine.correct(logits, drawn, rows, streams, codes, 0.05, fixed, static=False)
    assert torch.equal(static[0], sparse[0]) and torch.equal(static[1], sparse[1])
    assert static[1].any() and not static[1][0, :5].any()


def _teacher_forced_cache(model: EAR, ids: torch.Tensor, grid: torch.Tensor) -> list:
    """K/V of a fresh content-only forward of the final grid through the readable model."""
    layout = model.layout()
    ordered = grid.flatten(1)[:, layout.order]
    cache = model.new_cache(ids.shape[0])
    with torch.no_grad():
        cond = model.cls_embedding.lookup(ids).unsqueeze(1)
        x = torch.cat([cond, model.tok_embeddings(ordered)], dim=1)
        model.forward_positions(x, cond, 0, layout, cache)
    return cache


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_after_a_refined_generation_the_cache_is_a_teacher_forced_forward_of_the_final_grid(
        cfg_scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also when only some rows' parts changed and only those were re-fed, on their own."""
    model = noisy_model(correction=True, schedule="radar")
    runner = runner_for(model)
    runner.release()
    refed: list[list[int]] = []
    alone = runner._forward_rows
    monkeypatch.setattr(runner, "_forward_rows", lambda slot, plan, rows: (refed.append(rows.tolist()),
                                                                           alone(slot, plan, rows)))
    states = list(sample(model, [1, 4, 2], seed=5, cfg_scale=cfg_scale, **REFINED))
    final = states[-1]
    assert final.corrected.any() and not final.corrected.all()
    assert refed and all(0 < len(rows) < 3 for rows in refed)
    (slot,) = [s for slots in runner._free.values() for s in slots]
    ids = torch.tensor([1, 4, 2] + ([model.null_class] * 3 if cfg_scale != 1.0 else []))
    grid = final.tokens.repeat(2 if cfg_scale != 1.0 else 1, 1, 1)
    for ours, ref in zip(slot.caches, _teacher_forced_cache(model, ids, grid), strict=True):
        k, v = ours[:, :, 1].transpose(1, 2), ours[:, :, 2].transpose(1, 2)  # float32: q, k, v planes
        assert torch.allclose(k, ref.k, atol=1e-5) and torch.allclose(v, ref.v, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"cfg_scale": 2.0}, {"top_k": 5, "top_p": 0.9}])
def test_the_static_form_cuda_graphs_replay_gives_the_eager_tokens_and_cache(kwargs: dict) -> None:
    """`static_refinement` (what graphed refined steps run: every row's re-fed part fed again,
    every checked cell redrawn and selected) draws and corrects what the eager form does, known
    cells included, and leaves the cache a teacher-forced forward of the final grid."""
    model = noisy_model(correction=True, schedule="radar")
    runner = runner_for(model)
    known = torch.full((8, 8), -1)
    known[3:5, 3:5] = 7  # the centre: known cells after the prefix (the masked form)
    settings = {"seed": 5, "known": known, **REFINED, **kwargs}
    runner.static_refinement = False
    eager = list(sample(model, [1, 4, 2], **settings))[-1]
    runner.release()
    runner.static_refinement = True
    try:
        static = list(sample(model, [1, 4, 2], **settings))[-1]
    finally:
        runner.static_refinement = None
    assert eager.corrected.any() and not eager.corrected.all()
    assert torch.equal(static.tokens, eager.tokens) and torch.equal(static.corrected, eager.corrected)
    (slot,) = [s for slots in runner._free.values() for s in slots]
    guided = kwargs.get("cfg_scale", 1.0) != 1.0
    ids = torch.tensor([1, 4, 2] + ([model.null_class] * 3 if guided else []))
    grid = static.tokens.repeat(2 if guided else 1, 1, 1)
    for ours, ref in zip(slot.caches, _teacher_forced_cache(model, ids, grid), strict=True):
        k, v = ours[:, :, 1].transpose(1, 2), ours[:, :, 2].transpose(1, 2)
        assert torch.allclose(k, ref.k, atol=1e-5) and torch.allclose(v, ref.v, atol=1e-5)


def test_an_image_is_the_same_alone_and_in_a_crowd_with_refinement() -> None:
    model = noisy_model(correction=True)
    crowd = generate(model, [1, 2, 3], seed=[7, 7, 9], row_ids=[0, 1, 0], cfg_scale=[1.5, 2.0, 1.0],
                     **{**REFINED, "temperature": [1.0, 0.8, 1.0]})
    alone = [generate(model, [1], seed=7, cfg_scale=1.5, **REFINED),
             generate(model, [2], seed=7, row_ids=[1], cfg_scale=2.0, **{**REFINED, "temperature": 0.8}),
             generate(model, [3], seed=9, **REFINED)]
    assert torch.equal(crowd, torch.cat(alone))
    assert not torch.equal(crowd, generate(model, [1, 2, 3], seed=[7, 7, 9], row_ids=[0, 1, 0],
                                           cfg_scale=[1.5, 2.0, 1.0], temperature=[1.0, 0.8, 1.0]))


@pytest.mark.parametrize("kwargs", [{"cfg_scale": 2.0}, {"top_k": 5, "top_p": 0.9}, {"use_cache": False},
                                    {"greedy": True}])
def test_the_runner_and_the_reference_refine_alike(kwargs: dict) -> None:
    model = noisy_model(correction=True)
    known = torch.full((8, 8), -1)
    known[:2] = 5  # known cells are never corrected
    runs = [list(sample(model, [2, 3], seed=4, known=known, engine=engine, **REFINED, **kwargs))
            for engine in ("runner", "reference")]
    fast, ref = runs[0][-1], runs[1][-1]
    assert torch.equal(fast.tokens, ref.tokens) and torch.equal(fast.corrected, ref.corrected)
    assert (fast.tokens[:, :2] == 5).all() and not fast.corrected[:, :2].any()
    assert [s.step for s in runs[0]] == [s.step for s in runs[1]]


def test_a_state_shows_the_corrections_made_so_far() -> None:
    model = noisy_model(correction=True, schedule="radar")
    states = list(sample(model, [1], seed=2, **REFINED))
    plain = list(sample(model, [1], seed=2, temperature=1.0))
    for before, after in pairwise(states):
        assert (after.corrected >= before.corrected).all()  # cumulative
    # the first part is drawn exactly as without refinement; only later steps may redraw it
    assert torch.equal(states[0].tokens, plain[0].tokens) and not states[0].corrected.any()
    assert all(s.corrected is None for s in plain)


def test_greedy_decoding_with_refinement_off_is_todays_path() -> None:
    model = noisy_model(correction=True)
    today = generate(model, [1, 6], greedy=True, cfg_scale=2.0)
    assert torch.equal(generate(model, [1, 6], greedy=True, cfg_scale=2.0, refine=False), today)
    picked = torch.cat([t for _, _, t in decode(model, torch.tensor([1, 6]), lambda k, lg: lg.argmax(-1),
                                                cfg_scale=2.0)], dim=1)
    assert torch.equal(picked, today.flatten(1)[:, list(model.schedule.order)])


def test_the_correction_flag_adds_no_weights_and_is_checked() -> None:
    with_head, without = noisy_model(correction=True), noisy_model()
    assert with_head.state_dict().keys() == without.state_dict().keys()
    assert EARConfig.from_dict(with_head.config.to_dict()).correction is True
    with pytest.raises(ValueError, match="correction must be true or false"):
        EARConfig(correction="yes")
    main_loss, fix_loss = without.train().training_losses(torch.zeros(2, 64, dtype=torch.long),
                                                          torch.tensor([0, 1]))
    assert fix_loss is None and main_loss.ndim == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"refine": True, "refine_threshold": 0.0}, "threshold must be a probability in"),
    ({"refine": True, "refine_threshold": 1.0}, "threshold must be a probability in"),
    ({"refine": True, "refine_threshold": "low"}, "threshold must be a probability in"),
    ({"refine": "yes"}, "refine must be true or false"),
])
def test_bad_refinement_values_give_one_sentence(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        next(sample(noisy_model(correction=True), [1], **kwargs))
    assert str(info.value).count(". ") == 0


def test_refinement_of_a_model_without_the_head_is_one_sentence() -> None:
    with pytest.raises(ValueError, match="needs a model trained with the correction objective"):
        next(sample(noisy_model(), [1], refine=True))


@pytest.fixture(scope="module")
def refined_dir(tmp_path_factory) -> Path:
    model = tiny_ear(32, 8, seed=0, correction=True)
    return write_tiny_model(tmp_path_factory.mktemp("refined") / "tiny", model=model)


def test_the_pipeline_refines_by_default_where_the_model_has_the_head(refined_dir: Path,
                                                                      tiny_dir: Path) -> None:
    pipe = EARPipeline.from_pretrained(str(refined_dir), device="cpu")
    assert pipe.can_refine and pipe.info()["refinement"] is True
    states = list(pipe.states(["cat"], seed=3, temperature=1.0))
    assert states[-1].corrected is not None
    off = list(pipe.states(["cat"], seed=3, temperature=1.0, refine=False))
    assert off[-1].corrected is None
    plain = EARPipeline.from_pretrained(str(tiny_dir), device="cpu")
    assert not plain.can_refine and list(plain.states(["cat"], seed=3))[-1].corrected is None
    with pytest.raises(ValueError, match="correction objective"):
        plain.states(["cat"], refine=True)


def test_the_cli_refines_and_bad_values_are_one_line(refined_dir: Path, tiny_dir: Path, tmp_path: Path,
                                                     capsys) -> None:
    out = str(tmp_path / "out.png")
    assert main(["generate", "--model", str(refined_dir), "--class-id", "0", "--refine",
                 "--refine-threshold", "0.1", "--out", out, "--quiet"]) in (0, None)
    assert Path(out).is_file()
    capsys.readouterr()
    for argv, phrase in ((["--model", str(tiny_dir), "--refine"], "correction objective"),
                         (["--model", str(refined_dir), "--refine-threshold", "2"], "threshold")):
        code = main(["generate", *argv, "--class-id", "0", "--out", out, "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and phrase in err and err.count("\n") == 1, err


def test_the_training_free_requery_bench_keeps_plain_sampling_at_keep_one() -> None:
    """bench_requery's slow loop: keeping every draw is greedy decoding token for token; a lower
    keep re-queries the rest; a keep outside (0, 1] is refused in one sentence."""
    from bench.bench_requery import requery_decode

    model = noisy_model(schedule="radar")
    labels = torch.tensor([1, 4, 7])
    plain, changed = requery_decode(model, labels, model.schedule, 0.0, 1.0)
    assert changed == 0 and torch.equal(plain, generate(model, labels.tolist(), greedy=True))
    requeried, changed = requery_decode(model, labels, model.schedule, 0.0, 0.5)
    assert requeried.shape == plain.shape and 0 < changed < 0.5
    centre = model.schedule.order[0]  # the first step's one cell is always kept
    assert torch.equal(requeried.flatten(1)[:, centre], plain.flatten(1)[:, centre])
    with pytest.raises(ValueError, match=r"keep is the share .* in \(0, 1\]"):
        requery_decode(model, labels, model.schedule, 0.0, 0.0)
