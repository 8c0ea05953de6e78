"""The Extend tab's example photographs and the tests' drawn uploads (the drawings are our own
work, CC0): python assets/examples/make_examples.py"""

import sys
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
HERE = Path(__file__).parent


def smiley() -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(im)
    d.ellipse((14, 14, 114, 114), fill=(255, 204, 51), outline=(200, 140, 20), width=4)
    d.ellipse((42, 42, 54, 60), fill=(70, 45, 20))
    d.ellipse((74, 42, 86, 60), fill=(70, 45, 20))
    d.arc((36, 50, 92, 96), start=20, end=160, fill=(70, 45, 20), width=6)
    return im


def heart() -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(im)
    red = (224, 36, 62)
    d.ellipse((18, 26, 68, 76), fill=red)
    d.ellipse((60, 26, 110, 76), fill=red)
    d.polygon([(21, 60), (107, 60), (64, 110)], fill=red)
    d.ellipse((34, 38, 48, 52), fill=(255, 150, 165))
    return im


def photo_examples(size: int = 256) -> dict[str, Image.Image]:
    """Centred squares of three held-out photographs of ear.train.photos (LGPL / GPL wallpapers
    from Debian that the photo model never trained on; credits in ATTRIBUTION.md)."""
    sys.path.insert(0, str(HERE.parents[1]))
    from ear.train.photos import heldout_photos

    wanted = {"EveningGlow": "photo-evening-glow", "Kite": "photo-kite-sky", "GreenMeadow": "photo-meadow"}
    return {wanted[title]: Image.fromarray(square) for title, square in heldout_photos(size=size)
            if title in wanted}


if __name__ == "__main__":
    for name, draw in {"smiley": smiley, "heart": heart}.items():
        draw().save(HERE / f"{name}.png", optimize=True)  # the tests' uploads
    for name, picture in photo_examples().items():
        picture.save(HERE / f"{name}.jpg", quality=90)  # the Extend tab's examples
