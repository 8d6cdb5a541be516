"""Derive the oracle fixture's input images (run once; the outputs are committed).

Usage: python tools/oracle/make_fixture_images.py [REFERENCE_DIR] [OUT_DIR]

Sources: the authors' sample radiographs A..E (224x224 RGB PNG, tests/data/reference/sample_png)
and four ImageMagick 6.8.9-9 reference PNGs (512-scale, tests/data/reference/preprocessing).
The derived images exercise fastai's validation ``Resize(224)`` crop: non-square images, sides in
{230, 237, 453..509} where the crop side is ``min(w, h) - 1``, sides larger than, equal to and
smaller than 224 (upscaling), an RGB PNG with distinct channels, a JPEG and a 16-bit grayscale PNG.
Everything is deterministic (PIL operations and a fixed-seed numpy generator).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _gray(img: Image.Image) -> Image.Image:
    return img.convert("L")


def main(ref: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    src = {k: Image.open(ref / "sample_png" / f"{k}.png").convert("RGB") for k in "ABCDE"}
    g = {k: _gray(v) for k, v in src.items()}
    rng = np.random.Generator(np.random.PCG64(20240601))
    made: dict[str, Image.Image] = {}
    made["A_rot90_224.png"] = g["A"].transpose(Image.Transpose.ROTATE_90)
    made["B_fliplr_224.png"] = g["B"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    made["A_230x230.png"] = g["A"].resize((230, 230), Image.BICUBIC)  # crop side 229
    made["B_237x260.png"] = g["B"].resize((237, 260), Image.BICUBIC)  # crop side 236
    made["C_453x480.png"] = g["C"].resize((453, 480), Image.LANCZOS)  # crop side 452
    made["D_509x509.png"] = g["D"].resize((509, 509), Image.LANCZOS)  # crop side 508
    made["E_480x470.png"] = g["E"].resize((480, 470), Image.LANCZOS)  # crop side 469
    made["D_400x230.png"] = g["D"].resize((400, 230), Image.BILINEAR)  # wide, crop side 229
    made["E_224x300.png"] = g["E"].resize((224, 300), Image.BILINEAR)  # tall, exact 224 width
    made["E_500x700.png"] = g["E"].resize((500, 700), Image.LANCZOS)  # crop side 499
    made["C_crop_180x200.png"] = g["C"].crop((20, 10, 200, 210))  # smaller -> upscaling
    made["D_150x150.png"] = g["D"].resize((150, 150), Image.LANCZOS)  # smaller -> upscaling
    made["A_97x131.png"] = g["A"].resize((97, 131), Image.LANCZOS)  # much smaller, non-square
    made["E_rot15_224.png"] = g["E"].rotate(15, resample=Image.BILINEAR, fillcolor=0)
    made["B_inverted_224.png"] = Image.fromarray(255 - np.asarray(g["B"]))
    made["A_B_blend_260x260.png"] = Image.blend(g["A"], g["B"], 0.5).resize((260, 260), Image.BICUBIC)
    a = np.asarray(g["C"], dtype=np.float64)
    noisy = np.clip(a + rng.normal(0.0, 6.0, a.shape), 0, 255).round().astype(np.uint8)
    made["C_noise_224.png"] = Image.fromarray(noisy)
    d = np.asarray(g["D"], dtype=np.float64) / 255.0
    made["D_gamma_300x256.png"] = Image.fromarray((255 * d ** 0.6).round().astype(np.uint8)).resize((300, 256), Image.BICUBIC)
    # RGB PNG with distinct channels (a tinted, channel-shifted version of A)
    ra = np.asarray(src["A"].resize((300, 280), Image.BICUBIC), dtype=np.float64)
    rgb = np.stack([ra[..., 0], np.roll(ra[..., 1], 7, axis=1) * 0.85, 255 - ra[..., 2] * 0.7], -1)
    made["A_rgb_300x280.png"] = Image.fromarray(rgb.clip(0, 255).round().astype(np.uint8), mode="RGB")
    for name, im in made.items():
        im.save(out / name)
    # JPEG
    g["B"].resize((256, 256), Image.BICUBIC).save(out / "B_256x256.jpg", quality=90)
    # 16-bit grayscale PNG (v16 = v8 * 257) and its exact 8-bit equivalent, which is what the
    # oracle is fed: Pillow's convert('RGB') would clip the 16-bit image to white in fastai.
    c8 = np.asarray(g["C"].resize((240, 250), Image.BICUBIC), dtype=np.uint8)
    Image.fromarray(c8.astype(np.uint16) * 257).save(out / "C_16bit_240x250.png")
    Image.fromarray(c8).save(out / "C_16bit_240x250.as8bit.png")
    for name in ("RG1_UNCR", "RG1_UNCI", "RG3_UNCR", "RG3_UNCI"):
        shutil.copyfile(ref / "preprocessing" / "im_6.8.9-9" / f"{name}.png", out / f"im689_{name}.png")


if __name__ == "__main__":
    ref = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "tests" / "data" / "reference"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else REPO / "tests" / "data" / "oracle" / "images"
    main(ref, out)
