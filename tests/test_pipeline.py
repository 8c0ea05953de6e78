"""EARPipeline on tiny random models: streaming, generation, extension, zoom-out, bad arguments."""

from __future__ import annotations

import io
import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ear import hub
from ear.model import EAR, EARConfig
from ear.pipeline import EARPipeline, Frame
from ear.preview import OUTLINE_RGB
from ear.sampler import SamplingParams
from tests.helpers import CLASS_NAMES, PaletteTokenizer, same_picture, tiny_ear, write_tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, torch_single_thread) -> EARPipeline:
    """The tiny model in our on-disk format, loaded the way users load models."""
    return EARPipeline.from_pretrained(str(write_tiny_model(tmp_path_factory.mktemp("m") / "tiny")))


@pytest.fixture(scope="module")
def palette_pipe(torch_single_thread) -> EARPipeline:
    """A pipeline whose tokenizer reproduces pictures faithfully (blocky), to see kept content."""
    tokenizer = PaletteTokenizer(grid=8, patch=4, levels=4)
    loaded = hub.LoadedModel(name="palette", source="test", model=tiny_ear(tokenizer.codebook_size, grid=8),
                             tokenizer=tokenizer, class_names=list(CLASS_NAMES),
                             presets={"default": {"cfg_scale": 2.0}}, default_preset="default")
    return EARPipeline(loaded, torch.device("cpu"), torch.float32)


def _quadrants(size: int = 200) -> Image.Image:
    """Four flat colours: easy to recognise after any crop, resize and quantisation."""
    arr = np.zeros((size, size, 3), np.uint8)
    h = size // 2
    arr[:h, :h], arr[:h, h:], arr[h:, :h], arr[h:, h:] = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)
    return Image.fromarray(arr)


def test_loads_on_cpu_in_float32_with_config_presets(pipe: EARPipeline) -> None:
    info = pipe.info()
    assert (info["device"], info["dtype"]) == ("cpu", "float32")
    assert pipe.model.output.weight.dtype == torch.float32  # float16 file, float32 model
    assert info["steps"] == 15 and info["grid"] == 8 and info["cached"] is None
    assert pipe.default_settings == SamplingParams(cfg_scale=1.5, temperature=1.0, top_k=0, top_p=1.0)
    assert set(pipe.presets) == {"default", "greedyish"}
    assert pipe.class_names == CLASS_NAMES


def test_stream_yields_a_frame_per_step(pipe: EARPipeline) -> None:
    frames = list(pipe.stream(["cat", 1], seed=0, display_size=64))
    assert len(frames) == pipe.frame_count() == 15
    assert all(isinstance(f, Frame) and len(f.images) == 2 for f in frames)
    assert frames[0].images[0].size == (64, 64)
    assert [f.state.step for f in frames] == list(range(1, 16))
    assert frames[3].caption.startswith("step 4 / 15 · 6 / 64 tokens · ")
    assert frames[-1].state.done


def test_generate_is_reproducible_by_seed(pipe: EARPipeline) -> None:
    a = pipe.generate(0, seed=7, display_size=32)
    b = pipe.generate(0, seed=7, display_size=32)
    c = pipe.generate(0, seed=8, display_size=32)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    last = list(pipe.stream(0, seed=7, display_size=32))[-1]
    assert np.array_equal(np.asarray(last.images[0]), np.asarray(a[0]))  # finished frame = final image


def test_class_names_ids_and_synonyms(pipe: EARPipeline) -> None:
    assert pipe.class_id("dog") == 1 and pipe.class_id("DOG ") == 1 and pipe.class_id("2") == 2
    assert pipe.class_id("goldfish") == 2 and pipe.class_id(np.int64(0)) == 0
    assert pipe.class_id("Puppy") == 1 and pipe.default_class == pipe.class_names[1]  # config alias
    with pytest.raises(ValueError, match=r"Did you mean 'dog'"):
        pipe.class_id("dgo")
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        pipe.class_id(3)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        pipe.class_id(True)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"cfg_scale": -1.0}, "cfg_scale must be a finite number >= 0"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, r"top_p must lie in \(0, 1\]"),
        ({"seed": -3}, "seed"),
        ({"schedule": "zigzag"}, "schedule must be one of"),
        ({"display_size": 2}, "display_size"),
    ],
)
def test_bad_sampling_arguments_fail_at_call_time(pipe: EARPipeline, kwargs, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        pipe.stream(0, **kwargs)  # no iteration needed: checked before any work


def test_bad_classes_and_batches(pipe: EARPipeline) -> None:
    with pytest.raises(ValueError, match="Unknown class"):
        pipe.stream("unicorn")
    with pytest.raises(ValueError, match="between 1 and 64"):
        pipe.generate([])
    with pytest.raises(ValueError, match="device"):
        EARPipeline.from_pretrained("ear-emoji", device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        EARPipeline.from_pretrained("ear-emoji", dtype="float8")


def test_keep_sizes_and_bad_keep(pipe: EARPipeline) -> None:
    assert pipe.keep_sizes() == [1, 2, 3, 4, 5, 6, 7]
    for keep in (0, 8, 2.0, True):
        with pytest.raises(ValueError, match=r"keep must be one of \[1, 2, 3, 4, 5, 6, 7\]"):
            pipe.extend(_quadrants(), keep)
    with pytest.raises(ValueError, match="not an image format"):
        pipe.extend(b"not an image", 4)


def test_extension_keeps_the_encoded_centre(pipe: EARPipeline) -> None:
    image = _quadrants()
    prefix = pipe.encode_centre(image, 4)
    frames = list(pipe.extend(image, 4, "cat", seed=1, display_size=32))
    steps = pipe.model.schedule.square_steps()[4]
    assert len(frames) == pipe.frame_count(keep=4) == 15 - steps + 1
    order = torch.tensor(pipe.model.schedule.order)
    first, last = frames[0].state, frames[-1].state
    assert first.step == steps and first.num_known == 16  # the first frame shows the kept centre
    assert torch.equal(last.tokens[0].flatten()[order[:16]], prefix)
    assert pipe.centre_box(4) == (2, 2, 6, 6)


def test_extension_shows_the_users_picture_in_the_centre(palette_pipe: EARPipeline) -> None:
    image = _quadrants()
    frames = list(palette_pipe.extend(image, 4, None, seed=3, display_size=32))  # unconditional
    final = np.asarray(frames[-1].images[0]).astype(int)
    centre = final[8:24, 8:24]  # cells 2..5 of 8 at 4 px per cell
    expected = np.asarray(_quadrants(16)).astype(int)
    assert np.abs(centre - expected).mean() < 40  # palette quantisation only
    outside = final[:8].reshape(-1, 3)
    assert np.abs(outside - expected.reshape(-1, 3).mean(0)).mean() > 0  # something was generated
    first = np.asarray(frames[0].images[0]).astype(int)
    assert np.abs(first[8:24, 8:24] - expected).mean() < 40


@pytest.mark.parametrize("source", ["rgba", "bytes", "path"])
def test_extension_accepts_any_image_source(palette_pipe: EARPipeline, tmp_path: Path, source: str) -> None:
    img = _quadrants(40).convert("RGBA")
    if source == "bytes":
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        img = buf.getvalue()
    elif source == "path":
        img.convert("P").save(tmp_path / "a.gif")
        img = tmp_path / "a.gif"
    frames = list(palette_pipe.extend(img, 6, 0, seed=0, display_size=16))
    assert frames[-1].state.done


def test_zoom_out_frame_count_and_continuity(palette_pipe: EARPipeline) -> None:
    keep, times, transition = 4, 3, 5
    frames = list(palette_pipe.zoom_out(_quadrants(), times, keep, "dog", seed=0, transition=transition,
                                        display_size=32))
    per_round = 15 - palette_pipe.model.schedule.square_steps()[keep] + 1
    assert len(frames) == times * per_round + (times - 1) * transition
    assert len(frames) == palette_pipe.frame_count(keep, times, transition)
    assert frames[0].caption.startswith("zoom 1 / 3 · step")
    assert frames[-1].caption.startswith("zoom 3 / 3 · step 15 / 15")
    # The bridge ends with the previous picture squeezed into the centre square, and the next
    # round starts from (the tokens of) that same picture there, outlined as the kept square.
    bridge_end = np.asarray(frames[per_round + transition - 1].images[0]).astype(float)
    next_start = np.asarray(frames[per_round + transition].images[0]).astype(float)
    assert np.all(next_start[8, 8:24] == OUTLINE_RGB)

    def cells(a: np.ndarray) -> np.ndarray:  # mean colour of each 4x4-pixel cell of the centre
        return a[8:24, 8:24].reshape(4, 4, 4, 4, 3).mean(axis=(1, 3))

    inner = (slice(1, 3), slice(1, 3))  # away from the outline
    assert np.abs(cells(bridge_end)[inner] - cells(next_start)[inner]).max() <= 43  # palette step / 2


def test_zoom_out_bad_arguments(palette_pipe: EARPipeline) -> None:
    with pytest.raises(ValueError, match="times"):
        palette_pipe.zoom_out(_quadrants(), 0, 4)
    with pytest.raises(ValueError, match="keep"):
        palette_pipe.zoom_out(_quadrants(), 2, 8)
    with pytest.raises(ValueError, match="transition"):
        palette_pipe.zoom_out(_quadrants(), 2, 4, transition=-1)


@pytest.fixture(scope="module")
def emoji_pipe(torch_single_thread) -> EARPipeline:
    if next(r for r in hub.list_models() if r.name == hub.DEFAULT_MODEL).status != "bundled":
        pytest.skip("assets/ear-emoji is not complete yet")
    return EARPipeline.from_pretrained(hub.DEFAULT_MODEL)


@pytest.mark.parametrize("example", ["smiley", "heart"])
def test_bundled_model_keeps_a_recognisable_centre(emoji_pipe: EARPipeline, example: str) -> None:
    """With the trained embedded tokenizer the kept centre is visibly the user's picture: much
    closer to it than the picture's own mean colour is."""
    pipe = emoji_pipe
    image = Image.open(hub.ASSETS / "examples" / f"{example}.png").convert("RGB")
    first = next(iter(pipe.extend(image, 12, seed=0, display_size=64, outline=False)))
    left, top, right, bottom = pipe.centre_box(12)
    cell = 64 // pipe.grid
    got = np.asarray(first.images[0]).astype(float)[top * cell:bottom * cell, left * cell:right * cell]
    want = np.asarray(image.resize((12 * cell, 12 * cell), Image.Resampling.LANCZOS)).astype(float)
    assert np.abs(got - want).mean() < 0.6 * np.abs(want - want.mean(axis=(0, 1))).mean()


@pytest.fixture(scope="module")
def photo_pipe(torch_single_thread) -> EARPipeline:
    if next(r for r in hub.list_models() if r.name == hub.PHOTO_MODEL).status != "bundled":
        pytest.skip("assets/ear-photo is not complete yet")
    return EARPipeline.from_pretrained(hub.PHOTO_MODEL)


@pytest.mark.parametrize("example", sorted(p.name for p in (hub.ASSETS / "examples").glob("*.jpg")))
def test_photo_model_keeps_the_kept_photograph_and_continues_its_colours(photo_pipe: EARPipeline,
                                                                         example: str) -> None:
    """Extend of an example photograph (never trained on) with the photo model: the kept centre
    is the photograph, and the grown border is closer to the photo's colours than to white."""
    pipe = photo_pipe
    image = Image.open(hub.ASSETS / "examples" / example).convert("RGB")
    frames = list(pipe.extend(image, 8, seed=0, display_size=64, outline=False))
    left, top, right, bottom = pipe.centre_box(8)
    cell = 64 // pipe.grid
    final = np.asarray(frames[-1].images[0]).astype(float)
    got = final[top * cell:bottom * cell, left * cell:right * cell]
    want = np.asarray(image.resize((8 * cell, 8 * cell), Image.Resampling.LANCZOS)).astype(float)
    assert np.abs(got - want).mean() < 0.6 * np.abs(want - want.mean(axis=(0, 1))).mean() + 8
    border = np.ones(final.shape[:2], dtype=bool)
    border[top * cell:bottom * cell, left * cell:right * cell] = False
    mean = want.mean(axis=(0, 1))
    assert np.abs(final[border] - mean).mean() < np.abs(final[border] - 255.0).mean()


def test_config_alias_to_a_missing_class_is_refused(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["class_aliases"] = {"heart": "red heart"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="red heart"):
        EARPipeline.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def styled(tmp_path_factory, torch_single_thread) -> EARPipeline:
    """Three classes in two styles: class embeddings 0-2 draw style "Flat", 3-5 "Shaded"."""
    folder = write_tiny_model(tmp_path_factory.mktemp("styled") / "m", styles=["Flat", "Shaded"])
    return EARPipeline.from_pretrained(str(folder))


def test_styles_choose_the_class_embedding(styled: EARPipeline) -> None:
    assert styled.styles == ["Flat", "Shaded"] and styled.info()["styles"] == ["Flat", "Shaded"]
    assert styled.labels([0, 1, 2], "shaded") == [3, 4, 5]
    assert styled.labels([0, 1, 2], 0) == [0, 1, 2]
    assert styled.labels([0, 0, 0], seed=0) == [0, 3, 0]  # unset: images alternate, from the seed
    assert styled.labels([0, 0], seed=1) == [3, 0]
    assert styled.labels([2, 2], seed=0, first_row=1) == [5, 2]  # bulk: row j of a run
    null = styled.model.null_class
    assert styled.labels([null], "Shaded") == [null]  # unconditional stays unconditional
    with pytest.raises(ValueError, match=r"Unknown style 'Noto'.*Flat, Shaded"):
        styled.labels([0], "Noto")


def test_style_decides_the_picture(styled: EARPipeline) -> None:
    """Greedy, so the per-row noise does not matter: an image of a two-image request without a
    style is the same picture as one asked for in that image's style."""
    greedy = {"temperature": 0.0, "cfg_scale": 1.0, "display_size": 32}
    both = styled.generate(["cat", "cat"], seed=0, **greedy)
    flat, shaded = (styled.generate("cat", seed=0, style=s, **greedy)[0] for s in ("Flat", "Shaded"))
    assert same_picture(both[0], flat) and same_picture(both[1], shaded)  # batch of 2 vs alone
    assert not np.array_equal(np.asarray(flat), np.asarray(shaded))


def test_shared_class_and_style_embedding_draws_as_the_per_style_table(styled: EARPipeline,
                                                                         tmp_path: Path) -> None:
    """A shared model (class row + style row) and a per-(class, style) model whose rows are those
    sums, other weights equal, draw the same tokens for every label the pipeline gives, on the fast
    engine and the reference path; the null class is the null row alone."""
    from ear.sampler import sample

    config = {**styled.model.config.to_dict(), "num_classes": 3, "num_styles": 2}
    shared = EAR(EARConfig.from_dict(config)).eval()
    state = {k: v for k, v in styled.model.state_dict().items() if not k.startswith("cls_embedding.")}
    gen = torch.Generator().manual_seed(1)
    classes, styles = torch.randn(4, 32, generator=gen), torch.randn(2, 32, generator=gen)
    shared.load_weights({**state, "cls_embedding.embedding_table.weight": classes,
                         "cls_embedding.style_table.weight": styles})
    pipe = EARPipeline.from_pretrained(str(write_tiny_model(tmp_path / "shared", styles=["Flat", "Shaded"],
                                                            shared=True, model=shared)))
    loaded = pipe.model.cls_embedding  # weights as stored (float16), class + style added in float32
    rows = loaded.embedding_table.weight.detach()
    table = torch.cat([(loaded.style_table.weight.detach()[:, None] + rows[:3]).reshape(6, 32), rows[3:]])
    assert torch.equal(loaded.table(), table)
    per_style = EAR(styled.model.config).eval()
    per_style.load_weights({**{k: v for k, v in pipe.model.state_dict().items() if not k.startswith("cls_")},
                            "cls_embedding.embedding_table.weight": table})
    assert pipe.model.config.num_styles == 2 and pipe.model.null_class == 6
    labels = pipe.labels([0, 1, 2, 0], seed=1) + pipe.labels([2], "Shaded") + [pipe.model.null_class]
    assert labels == [*styled.labels([0, 1, 2, 0], seed=1), 5, 6]
    for engine in ("runner", "reference"):
        a, b = (deque(sample(m, labels, seed=3, cfg_scale=1.5, engine=engine), maxlen=1)[0].tokens
                for m in (pipe.model, per_style))
        assert torch.equal(a, b)


def test_shared_styles_are_validated_at_load(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path / "m", styles=["A", "B"], shared=True)
    config = json.loads((folder / "config.json").read_text())
    for styles in (["A"], []):  # one name per shared style
        (folder / "config.json").write_text(json.dumps({**config, "styles": styles}))
        with pytest.raises(ValueError, match=r"num_styles\) but names"):
            EARPipeline.from_pretrained(str(folder))
    for bad in (-1, 1.5, "2", True):
        model = {**config["model"], "num_styles": bad}
        (folder / "config.json").write_text(json.dumps({**config, "model": model}))
        with pytest.raises(ValueError, match="num_styles must be a whole number"):
            EARPipeline.from_pretrained(str(folder))


def test_a_seed_picks_one_of_a_style_s_drawings(tmp_path: Path) -> None:
    """Three classes, two styles, two drawings each (label = (style x 2 + drawing) x 3 + class): a
    fixed style takes its drawings in turn over seeds and rows; "Any" takes the next drawing once
    both styles had their turn, so 4 seeds show all 4 pictures."""
    pipe = EARPipeline.from_pretrained(str(write_tiny_model(tmp_path / "m", styles=["Flat", "Shaded"],
                                                            drawings=2)))
    assert pipe.drawings == 2 and pipe.model.config.num_classes == 12
    from ear.app_support import styles_summary  # Model info's line

    assert styles_summary(pipe.info()) == "Flat, Shaded (2 drawings each: a seed picks one)"
    assert [pipe.labels([1], "Flat", seed=s)[0] for s in range(4)] == [1, 4, 1, 4]
    assert [pipe.labels([1], "Shaded", seed=s)[0] for s in range(4)] == [7, 10, 7, 10]
    assert [pipe.labels([1], seed=s)[0] for s in range(5)] == [1, 7, 4, 10, 1]
    assert pipe.labels([0, 0, 0, 0], seed=0) == [0, 6, 3, 9]  # a request's rows, as seeds in turn
    assert pipe.labels([2, 2], seed=1, first_row=1) == [5, 11]  # bulk: row j of a run
    assert pipe.labels([pipe.model.null_class], "Flat") == [pipe.model.null_class]
    greedy = {"temperature": 0.0, "cfg_scale": 1.0, "display_size": 32}
    pictures = [np.asarray(pipe.generate("cat", seed=s, style="Flat", **greedy)[0]) for s in range(2)]
    assert not np.array_equal(*pictures)  # two class embeddings, two pictures
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for bad, phrase in ((3, "x 3 drawing"), (0, "drawings 0"), (1.5, "drawings 1.5"),
                        (True, "drawings True")):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "drawings": bad}))
        with pytest.raises(ValueError, match=phrase):
            EARPipeline.from_pretrained(str(tmp_path / "m"))
    unstyled = {k: v for k, v in config.items() if k != "styles"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(unstyled))
    with pytest.raises(ValueError, match="only with styles"):
        EARPipeline.from_pretrained(str(tmp_path / "m"))


def test_style_errors(styled: EARPipeline, pipe: EARPipeline, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown style"):
        styled.stream("cat", style="Noto")  # checked before the first frame
    with pytest.raises(ValueError, match="has no styles"):
        pipe.stream("cat", style="Flat")
    folder = write_tiny_model(tmp_path / "m", styles=["A", "B"])
    config = json.loads((folder / "config.json").read_text())
    for bad, phrase in ((["A", "B", "C"], "3 style"), (["A", "A"], "distinct"), ("AB", "distinct")):
        (folder / "config.json").write_text(json.dumps({**config, "styles": bad}))
        with pytest.raises(ValueError, match=phrase):
            EARPipeline.from_pretrained(str(folder))
