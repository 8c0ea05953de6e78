"""ConvVQ: shapes, ranges, config round trip and the codebook's EMA / dead-code behaviour."""

from __future__ import annotations

import pytest
import torch

from ear.tokenizer.conv_vq import ConvVQ, ConvVQConfig

SMALL = dict(codebook_size=32, codebook_dim=4, channels=(8, 16, 16))


def test_encode_decode_shapes_and_ranges() -> None:
    torch.manual_seed(0)
    vq = ConvVQ(ConvVQConfig(**SMALL)).eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    tokens = vq.encode(images)
    assert tokens.shape == (2, 16, 16) and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 32
    decoded = vq.decode(tokens)
    assert decoded.shape == (2, 3, 64, 64)
    assert decoded.min() >= -1 and decoded.max() <= 1
    # decoding is a function of the tokens only: the same grid decodes to the same picture
    assert torch.equal(vq.decode(tokens), decoded)
    # re-encoding a decoded grid and decoding again stays on valid ids and shapes
    assert vq.decode(vq.encode(decoded)).shape == decoded.shape


def test_bad_inputs_are_rejected() -> None:
    vq = ConvVQ(ConvVQConfig(**SMALL))
    with pytest.raises(ValueError):
        vq.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError):
        vq.decode(torch.full((1, 16, 16), 32))
    with pytest.raises(ValueError):
        ConvVQConfig(image_size=64, grid_size=16, channels=(8, 16))  # factor 4 needs 3 widths


def test_config_round_trip_ignores_asset_keys() -> None:
    config = ConvVQConfig(**SMALL)
    section = {"type": "conv_vq", **config.to_dict()}
    assert ConvVQConfig.from_dict(section) == config


def test_training_forward_updates_codebook_and_restarts_dead_codes() -> None:
    torch.manual_seed(0)
    vq = ConvVQ(ConvVQConfig(**SMALL, dead_threshold=0.5)).train()
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    before = vq.quantizer.embed.clone()
    out = vq(images)
    assert {"loss", "l1", "l2", "commit", "recon", "ids"} <= set(out)
    out["loss"].backward()
    assert vq.encoder.net[0].weight.grad is not None  # straight-through reaches the encoder
    assert not torch.equal(before, vq.quantizer.embed)
    assert bool((vq.quantizer.cluster_size >= 0.5).all())  # every starving code was restarted
    assert torch.allclose(vq.quantizer.embed.norm(dim=1), torch.ones(32), atol=1e-5)

    vq.eval()
    frozen = vq.quantizer.embed.clone()
    vq(images)
    assert torch.equal(frozen, vq.quantizer.embed)  # eval passes never move the codebook


def test_crops_and_full_images_share_statistics() -> None:
    """No spatial normalisation: away from the crop border (the encoder sees 36 px), a crop encodes
    exactly like the same region of the whole image, which is what makes crop training valid."""
    torch.manual_seed(0)
    vq = ConvVQ(ConvVQConfig(**SMALL)).eval()
    for p in vq.encoder.parameters():  # residual branches start at zero; give them some weight
        torch.nn.init.normal_(p, std=0.2)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    full = vq.encoder(images)
    crop = vq.encoder(images[..., 8:56, 8:56])
    assert torch.allclose(full[..., 6:10, 6:10], crop[..., 4:8, 4:8], atol=1e-4)
    assert not torch.allclose(full[..., 2:4, 2:4], crop[..., 0:2, 0:2], atol=1e-4)


def test_frozen_codes_train_the_decoder_only() -> None:
    """A decoder-only step leaves every token grid as it was (encoder and codebook untouched)."""
    torch.manual_seed(0)
    vq = ConvVQ(ConvVQConfig(**SMALL)).train()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    ids, state = vq.encode(images), {k: v.clone() for k, v in vq.state_dict().items()}
    opt = torch.optim.SGD(vq.parameters(), lr=0.1)
    out = vq(images, frozen_codes=True)
    out["loss"].backward()
    opt.step()
    assert all(p.grad is None for p in vq.encoder.parameters())
    changed = {k for k, v in vq.state_dict().items() if not torch.equal(v, state[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    assert torch.equal(vq.encode(images), ids) and torch.equal(out["ids"], ids)
