"""Draw the Extend tab's example pictures (our own work, CC0): python assets/examples/make_examples.py"""

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


def sunset() -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE))
    d = ImageDraw.Draw(im)
    for y in range(SIZE):
        t = y / (SIZE - 1)
        d.line((0, y, SIZE, y), fill=(int(250 - 60 * t), int(120 + 60 * t), int(60 + 140 * t)))
    d.ellipse((40, 44, 88, 92), fill=(255, 230, 120))
    d.rectangle((0, 76, SIZE, SIZE), fill=(30, 70, 140))
    for y in range(80, SIZE, 8):
        d.line((34, y, 94, y), fill=(250, 200, 110), width=2)
    return im


if __name__ == "__main__":
    for name, draw in {"smiley": smiley, "heart": heart, "sunset": sunset}.items():
        draw().save(HERE / f"{name}.png", optimize=True)
