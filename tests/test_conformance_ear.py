"""The EAR engine against vectors produced by the official EAR code (../shared/conformance)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ear.model import EAR, EARConfig
from ear.order import make_schedule, spiral_order
from ear.sampler import decode, generate

VARIANTS = {"adaln31": ("arms", True), "plain16": ("rings", False)}
TOL = 5e-6  # float32 round-off; the reference's smallest greedy gap is 1e-2


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, conformance_dir):
    name = request.param
    schedule, adaln = VARIANTS[name]
    meta = json.loads((conformance_dir / f"ear_{name}_tiny.json").read_text())
    args = meta["model_args"]
    config = EARConfig(dim=args["dim"], n_layer=args["n_layer"], n_head=args["n_head"],
                       vocab_size=args["vocab_size"], num_classes=args["num_classes"],
                       class_dropout_prob=args["class_dropout_prob"], schedule=schedule, adaln=adaln)
    model = EAR(config)
    model.load_weights(load_file(conformance_dir / f"ear_{name}_tiny.safetensors"))
    vectors = load_file(conformance_dir / f"ear_{name}_tiny_vectors.safetensors")
    return name, model.eval(), vectors


def test_conformance_spiral_all_sizes(conformance_dir):
    ref = json.loads((conformance_dir / "spiral.json").read_text())
    for n, cells in ref["unfold_indices"].items():
        assert list(spiral_order(int(n))) == cells
        assert list(divmod(spiral_order(int(n))[0], int(n))) == ref["start_cell_row_col"][n]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_conformance_schedule_cells(conformance_dir, name):
    ref = json.loads((conformance_dir / "spiral.json").read_text())["grid16"][name]
    schedule = make_schedule(VARIANTS[name][0], 16)
    assert [list(g) for g in schedule.groups] == [s["new_raster_cells"] for s in ref["steps"]]
    assert list(schedule.sizes) == ref["tokens_per_step"]


def test_conformance_layout(variant):
    _, model, vec = variant
    layout = model.layout()
    assert torch.equal(layout.rope, vec["ref_freqs_cis"][:257])
    assert torch.equal(torch.cat([layout.rope, layout.rope]), vec["ref_freqs_cis"])
    assert torch.equal(layout.train_mask, vec["ref_train_mask"])
    assert torch.equal(layout.infer_mask, vec["ref_infer_mask"])
    assert torch.equal(layout.order, vec["ref_spiral_indices"])


def test_conformance_training_logits_and_loss(variant):
    _, model, vec = variant
    logits = model(vec["train_idx"], vec["train_cond"])
    torch.testing.assert_close(logits, vec["train_logits"], atol=TOL, rtol=0)
    model.train()
    model.cls_embedding.dropout_prob = 0.0  # the reference turned the label drop off the same way
    try:
        loss = model.loss(vec["train_idx"], vec["train_cond"])
    finally:
        model.cls_embedding.dropout_prob = model.config.class_dropout_prob
        model.eval()
    torch.testing.assert_close(loss, vec["train_loss"], atol=TOL, rtol=0)


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_conformance_greedy_generation(variant, cfg):
    _, model, vec = variant
    tag = "cfg1" if cfg == 1.0 else "cfg2"
    steps = list(decode(model, vec["gen_cond"], lambda _k, logits: logits.argmax(-1), cfg_scale=cfg))
    assert len(steps) == model.schedule.num_steps
    for k, logits, _ in steps:
        torch.testing.assert_close(logits, vec[f"gen_{tag}_step{k}_logits"], atol=TOL, rtol=0)
    spiral_tokens = torch.cat([tokens for _, _, tokens in steps], dim=1)
    assert torch.equal(spiral_tokens, vec[f"gen_{tag}_tokens_spiral"])
    grid = generate(model, vec["gen_cond"], cfg_scale=cfg, greedy=True)
    assert torch.equal(grid.flatten(1), vec[f"gen_{tag}_tokens"])


def test_conformance_cfg_raw_logits(variant):
    """The doubled CFG batch: conditional and null-class halves, checked through the training path
    on the final grid (the reference's own cross-check)."""
    _, model, vec = variant
    grid, cond = vec["gen_cfg2_tokens"], vec["gen_cond"]
    both = model(torch.cat([grid, grid]), torch.cat([cond, torch.full_like(cond, model.null_class)]))
    bounds = model.schedule.boundaries
    for k in range(model.schedule.num_steps):
        torch.testing.assert_close(both[:, bounds[k]:bounds[k + 1]], vec[f"gen_cfg2_step{k}_rawlogits"],
                                   atol=TOL, rtol=0)


def test_conformance_incremental_steps(variant):
    _, model, vec = variant
    steps = decode(model, vec["inc_cond"], lambda _k, logits: logits.argmax(-1))
    _, logits0, tokens0 = next(steps)
    torch.testing.assert_close(logits0, vec["inc_step0_logits"], atol=TOL, rtol=0)
    assert torch.equal(tokens0, vec["inc_step0_tokens"])
    _, logits1, _ = next(steps)
    torch.testing.assert_close(logits1, vec["inc_step1_logits"], atol=TOL, rtol=0)


def test_conformance_cached_decode_teacher_forced(variant):
    _, model, vec = variant
    targets = vec["train_idx"][:, model.layout().order]
    bounds = model.schedule.boundaries
    expected = vec["train_logits"]
    for use_cache in (True, False):
        teacher = lambda k, _logits: targets[:, bounds[k]:bounds[k + 1]]  # noqa: E731
        for k, logits, _ in decode(model, vec["train_cond"], teacher, use_cache=use_cache):
            torch.testing.assert_close(logits, expected[:, bounds[k]:bounds[k + 1]], atol=TOL, rtol=0)


@pytest.mark.parametrize("size", ["B", "L", "XL"])
def test_conformance_released_manifest_loads_strictly(conformance_dir, size):
    """Shape-only: the released checkpoints' keys load strictly, built on the meta device."""
    manifest = json.loads((conformance_dir / "manifests" / f"ear_adaln_{size}_keys.json").read_text())
    with torch.device("meta"):
        model = EAR(EARConfig.official(size))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest["keys"]
    assert model.num_params() == manifest["total_parameters"]
    fake = {k: torch.empty(shape, device="meta") for k, shape in manifest["keys"].items()}
    model.load_weights(fake)
    with pytest.raises(ValueError, match=r"missing keys: norm\.weight"):
        model.load_weights({k: v for k, v in fake.items() if k != "norm.weight"})
