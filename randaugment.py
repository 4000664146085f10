"""timm's RandAugment policy (MAE fine-tunes with `rand-m9-mstd0.5-inc1`) built from torchvision's
ops.

torchvision's own RandAugment(2, 9) spreads its magnitudes over 31 bins, so m9 is 9/30 of each
range: rotate 9 degrees where timm rotates 27, shear 0.09 vs 0.27, enhance 1 +- 0.27 vs 1 +- 0.81.
timm's policy, which MAE's main_finetune uses (timm.data.auto_augment, rand_augment_transform), is
what is built here:
  - magnitude m on timm's scale of 10 (level = m / 10), each op's argument from that level
    (`op_argument`);
  - two ops drawn with replacement from timm's 15 ('inc1': the versions whose strength increases
    with m), each applied with probability 0.5;
  - with mstd > 0, each applied op draws its own magnitude from N(m, mstd), clipped to [0, 10];
  - a random sign for rotate, shear, translate and the enhance ops ('inc1');
  - geometry with bicubic resampling (MAE passes interpolation 'bicubic') and the mean colour as
    fill.
On a PIL image each op with the same argument gives timm's pixels (test_finetune.py checks rotate,
shear, translate and the enhance ops against the PIL calls timm makes; shear, which torchvision
takes as an angle, can differ by one level in a rare pixel). What still differs from timm: the
random numbers come from torch's generator (so DataLoader seeding and resume control them), not
Python's and numpy's, so a seed gives other draws than timm; and timm picks bilinear or bicubic at
random when no interpolation is set, where MAE sets bicubic, as here.

    RandAugment(**parse("rand-m9-mstd0.5-inc1"), fill=(124, 116, 104))(pil_image)
"""
import math
import re

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

LEVEL_DENOM = 10.0           # timm's magnitude scale: level = magnitude / 10

# timm's op lists, in its order: 'inc1' (MAE) and the default ('inc0')
INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
              "TranslateYRel")
DEFAULT = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
           "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
           "TranslateYRel")
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
          "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}


def parse(aa):
    """timm's RandAugment string -> RandAugment's arguments, 'none' -> None.
    'rand-m9-mstd0.5-inc1' (MAE) -> magnitude 9, 2 ops, magnitude noise 0.5, the increasing ops;
    sections in any order, timm's defaults for those left out (m10, n2, mstd0, inc0)."""
    if aa == "none":
        return None
    parts = aa.split("-")
    out = dict(magnitude=10, num_ops=2, mstd=0.0, increasing=False)
    keys = {"m": ("magnitude", int), "n": ("num_ops", int), "mstd": ("mstd", float),
            "inc": ("increasing", int)}
    sections = [re.fullmatch(r"(mstd|inc|m|n)(\d+(?:\.\d+)?)", part) for part in parts[1:]]
    if parts[0] != "rand" or not all(m and (m[1] == "mstd" or "." not in m[2]) for m in sections):
        raise ValueError(f"--aa {aa} is not timm's 'rand-m<magnitude>-n<ops>-mstd<noise>-inc<0|1>'"
                         " (e.g. rand-m9-mstd0.5-inc1) or 'none'")
    for m in sections:
        name, kind = keys[m[1]]
        out[name] = kind(m[2])
    out["increasing"] = bool(out["increasing"])
    return out


def op_argument(name, magnitude, negate=False):
    """timm's argument of op `name` at `magnitude` (0..10), before the random sign (negate = the
    sign drawn): Rotate 30 * level degrees; ShearX/Y 0.3 * level; TranslateX/YRel 0.45 * level of
    the image side; the enhance ops 0.1 + 1.8 * level, or with 'Increasing' 1 +- 0.9 * level (at
    least 0.1); Posterize int(4 * level) bits kept, PosterizeIncreasing 4 - that; Solarize
    threshold int(256 * level), SolarizeIncreasing 256 - that; SolarizeAdd int(110 * level) added
    below 128. None for the ops without an argument."""
    level = magnitude / LEVEL_DENOM
    sign = -1.0 if negate else 1.0
    if name == "Rotate":
        return sign * 30.0 * level
    if name in ("ShearX", "ShearY"):
        return sign * 0.3 * level
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * 0.45 * level
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return 0.1 + 1.8 * level
    if name.endswith("Increasing") and not name.startswith(("Posterize", "Solarize")):
        return max(0.1, 1.0 + sign * 0.9 * level)
    if name.startswith("Posterize"):
        bits = int(4 * level)
        return 4 - bits if name == "PosterizeIncreasing" else bits
    if name.startswith("Solarize") and name != "SolarizeAdd":
        threshold = int(256 * level)
        return 256 - threshold if name == "SolarizeIncreasing" else threshold
    if name == "SolarizeAdd":
        return int(110 * level)
    return None


def apply_op(img, name, arg, fill, interpolation=v2.InterpolationMode.BICUBIC):
    """One op on a PIL RGB image with its argument (op_argument's, sign included)."""
    if name == "AutoContrast":
        return F.autocontrast(img)
    if name == "Equalize":
        return F.equalize(img)
    if name == "Invert":
        return F.invert(img)
    if name == "Rotate":
        return F.rotate(img, arg, interpolation=interpolation, fill=fill)
    if name.startswith("Posterize"):
        return img if arg >= 8 else F.posterize(img, arg)
    if name == "SolarizeAdd":             # brighten the pixels below 128 by arg (no torchvision op)
        lut = [min(255, v + arg) if v < 128 else v for v in range(256)]
        return img.point(lut * len(img.getbands()))
    if name.startswith("Solarize"):
        return F.solarize(img, arg)
    if name.startswith("Color"):
        return F.adjust_saturation(img, arg)
    if name.startswith("Contrast"):
        return F.adjust_contrast(img, arg)
    if name.startswith("Brightness"):
        return F.adjust_brightness(img, arg)
    if name.startswith("Sharpness"):
        return F.adjust_sharpness(img, arg)
    shear, shift = [0.0, 0.0], [0, 0]
    if name in ("ShearX", "ShearY"):     # timm's shear factor as torchvision's angle, at the origin
        shear[name == "ShearY"] = math.degrees(math.atan(arg))
    else:                              # a share of the image side, in pixels (timm's sign)
        side = img.size[0] if name == "TranslateXRel" else img.size[1]
        shift[name == "TranslateYRel"] = -arg * side
    return F.affine(img, angle=0.0, translate=shift, scale=1.0, shear=shear,
                    interpolation=interpolation, fill=fill, center=[0, 0])


class RandAugment(torch.nn.Module):
    """timm's rand-m<magnitude>-n<num_ops>-mstd<mstd>-inc<increasing> on PIL images (module
    docstring)."""

    def __init__(self, magnitude=9, num_ops=2, mstd=0.5, increasing=True, fill=(128, 128, 128),
                 prob=0.5):
        super().__init__()
        self.magnitude, self.num_ops, self.mstd, self.prob = magnitude, num_ops, mstd, prob
        self.ops = INCREASING if increasing else DEFAULT
        self.fill = list(fill)

    def forward(self, img):
        for k in torch.randint(len(self.ops), (self.num_ops,)).tolist():  # with replacement (timm)
            if torch.rand(()) >= self.prob:
                continue
            m = self.magnitude
            if self.mstd > 0:
                m = float(torch.normal(float(m), float(self.mstd), ()))
            m = min(max(m, 0.0), LEVEL_DENOM)
            name = self.ops[k]
            negate = name in SIGNED and bool(torch.rand(()) < 0.5)
            img = apply_op(img, name, op_argument(name, m, negate), self.fill)
        return img

    def __repr__(self):
        return (f"RandAugment(magnitude={self.magnitude}, num_ops={self.num_ops}, "
                f"mstd={self.mstd}, ops={'increasing' if self.ops is INCREASING else 'default'}, "
                f"p={self.prob})")
