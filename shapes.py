"""The built-in shapes scenes: CLEVR-like 2-D scenes with instance masks and a class label, made on
the fly from (seed, split, index); nothing on disk, nothing downloaded.

`ShapesDataset` has the datasets' interface (files, classes, targets, `load(i)` -> image, instance
mask, class); `write_shapes` saves one as an image folder + instance masks (data.FolderDataset).

    python shapes.py --write OUT --num_images 200 --img_size 64   # an image folder + instance masks

References: ObjMAE Wu & Mo 2022, arXiv:2205.14338 (§4.1's 5% rule, which the object sizes suit).
"""
import argparse
import os

import numpy as np
from PIL import Image, ImageDraw


SHAPES = ("circle", "square", "triangle", "diamond", "ring")
COLOURS = {"red": (205, 45, 40), "green": (45, 165, 60), "blue": (45, 85, 215),
           "yellow": (230, 200, 45)}
# class = colour x shape of the largest object in the scene: 20 classes, sorted as a folder's
CLASSES = sorted(f"{c}_{s}" for c in COLOURS for s in SHAPES)
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}
SUPERSAMPLE = 4                  # shapes are drawn at 4x and box-filtered: anti-aliased edges


class ShapesDataset:
    """Procedural scenes: 1-4 objects (5 shapes x 4 colours, equal-area side 20-42% of the image
    side, so most survive ObjMAE's 5% rule and cover whole 8-px cells) on a textured background
    (smooth noise + gradient + stripes, different in every image).

    Instance ids are 1..k in drawing order; later objects occlude earlier ones. The largest object
    is always drawn last (never occluded) and gives the class: `CLASSES[i] = '<colour>_<shape>'`.
    Every image is a pure function of (seed, split, index), so two processes agree and `seed=0`
    vs `seed=1` (or split 'train' vs 'val') give different images.
    """

    def __init__(self, num_images=2000, img_size=64, seed=0, split="train"):
        if num_images < 1 or img_size < 8:
            raise ValueError(f"ShapesDataset needs num_images >= 1 and img_size >= 8, "
                             f"got {num_images}, {img_size}")
        self.num_images, self.img_size, self.seed = num_images, img_size, seed
        if split not in ("train", "val"):
            raise ValueError(f"ShapesDataset split must be 'train' or 'val', got {split!r}")
        self.split = split
        # virtual names, matched against a regions file's: the seed and split are part of the name,
        # so a regions file made from other scenes fails at load instead of labelling wrong images
        self.files = [f"shapes-{split}-{seed}/{i:06d}.png" for i in range(num_images)]
        self.classes = list(CLASSES)
        self._targets = None

    def __len__(self):
        return self.num_images

    def _objects(self, i):
        """Sample the scene's objects; the generator goes on to the background. -> (rng, objects)"""
        rng = np.random.default_rng([self.seed, ("train", "val").index(self.split), i])
        S, objs = self.img_size, []
        for _ in range(rng.integers(1, 5)):
            side = rng.uniform(0.20, 0.42) * S          # side of the square with the object's area
            shape = int(rng.integers(len(SHAPES)))
            colour = int(rng.integers(len(COLOURS)))
            # radius of the circumscribed circle giving area side^2 (ring: inner radius 0.55 R)
            radius = side * (0.564, 0.707, 0.877, 0.877, 0.674)[shape]
            cx, cy = rng.uniform(radius, S - radius, size=2)
            objs.append(dict(shape=shape, colour=colour, side=side, radius=radius, cx=cx, cy=cy,
                             angle=rng.uniform(0, 2 * np.pi), jitter=rng.normal(0, 12, 3)))
        big = max(range(len(objs)), key=lambda j: objs[j]["side"])
        objs.append(objs.pop(big))                      # the class object goes on top
        return rng, objs

    @staticmethod
    def _class(o):
        return CLASS_ID[f"{list(COLOURS)[o['colour']]}_{SHAPES[o['shape']]}"]

    def target(self, i):
        return self._class(self._objects(i)[1][-1])

    @property
    def targets(self):
        if self._targets is None:                       # lazy: ~20 us per image, no drawing
            self._targets = [self.target(i) for i in range(self.num_images)]
        return self._targets

    def load(self, i):
        """-> (PIL RGB image, instance mask np.uint8 [H, W] (0 = background, 1..k), class int)"""
        if not 0 <= i < self.num_images:
            raise IndexError(i)
        rng, objs = self._objects(i)
        S, s = self.img_size, SUPERSAMPLE
        canvas = Image.new("L", (S * s, S * s), 0)
        draw = ImageDraw.Draw(canvas)
        for j, o in enumerate(objs, 1):
            cx, cy, r = o["cx"] * s, o["cy"] * s, o["radius"] * s
            name = SHAPES[o["shape"]]
            if name == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=j)
            elif name == "ring":
                width = max(1, round(0.45 * r))
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=j, width=width)
            else:                                   # polygons inscribed in the circle of radius r
                n = 3 if name == "triangle" else 4
                t = 2 * np.pi * np.arange(n) / n
                u, v = r * np.cos(t), r * np.sin(t) * (0.65 if name == "diamond" else 1.0)
                ca, sa = np.cos(o["angle"]), np.sin(o["angle"])
                corners = [(float(cx + a * ca - b * sa), float(cy + a * sa + b * ca))
                           for a, b in zip(u, v)]
                draw.polygon(corners, fill=j)
        big = np.asarray(canvas)                                      # [sS, sS]
        n, pix = len(objs) + 1, np.arange(S * s) // s                 # sub-pixel -> pixel row/col
        ids = ((pix[:, None] * S + pix[None]) * n + big).ravel()
        counts = np.bincount(ids, minlength=S * S * n).reshape(S, S, n)
        cover = counts.transpose(2, 0, 1).astype(np.float32) / (s * s)  # [k+1, S, S] shares
        mask = cover.argmax(0).astype(np.uint8)       # most-covered id per pixel (ties: lower id)

        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S                 # [S, S] in [0, 1)
        img = cover[0][..., None] * self._background(rng, xx, yy)
        light = rng.normal(size=2)
        light /= np.linalg.norm(light) + 1e-6
        for j, o in enumerate(objs, 1):                 # flat colour with a soft light gradient
            d = ((xx * S - o["cx"]) * light[0] + (yy * S - o["cy"]) * light[1]) / o["radius"]
            shade = np.clip(1 + 0.2 * d, 0.75, 1.25)[..., None]
            colour = np.array(list(COLOURS.values())[o["colour"]]) + o["jitter"]
            img += cover[j][..., None] * colour * shade
        img += rng.normal(0, 3, img.shape)
        image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
        return image, mask, self._class(objs[-1])

    def _background(self, rng, xx, yy):
        """Muted colour + smooth noise (bilinear from a 4x4 grid) + a gradient + light stripes."""
        S = xx.shape[0]
        base = rng.uniform(70, 180) + rng.normal(0, 15, 3)                 # [3] low saturation
        pos = np.linspace(0, 3, S)
        w = np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(4)[None]))   # [S, 4] bilinear weights
        grid = rng.normal(0, 22, (4, 4, 3))
        noise = np.stack([w @ grid[..., c] @ w.T for c in range(3)], -1)    # [S, S, 3]
        t = rng.uniform(0, 2 * np.pi, 2)
        ramp = rng.uniform(-30, 30) * (xx * np.cos(t[0]) + yy * np.sin(t[0]) - 0.5)
        period = rng.uniform(0.08, 0.25)
        along = xx * np.cos(t[1]) + yy * np.sin(t[1])
        stripes = rng.uniform(4, 16) * np.sin(2 * np.pi * along / period)
        return base + noise + (ramp + stripes)[..., None]                  # [S, S, 3]


def write_shapes(dataset, out_dir):
    """Save a ShapesDataset as out_dir/images/<class>/<name>.png (ImageNet layout) and its instance
    masks as out_dir/masks/<class>/<name>.png, for FolderDataset(images, masks_root=masks)."""
    for sub in ("images", "masks"):
        for c in dataset.classes:
            os.makedirs(os.path.join(out_dir, sub, c), exist_ok=True)
    for i, f in enumerate(dataset.files):
        img, mask, target = dataset.load(i)
        rel = os.path.join(dataset.classes[target], os.path.basename(f))
        img.save(os.path.join(out_dir, "images", rel))
        Image.fromarray(mask, "L").save(os.path.join(out_dir, "masks", rel))
    return len(dataset)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Write the built-in shapes scenes as an image folder "
                                            "+ instance masks.")
    p.add_argument("--write", required=True, metavar="OUT",
                   help="output folder (gets images/ and masks/)")
    p.add_argument("--num_images", type=int, default=2000)
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "val"])
    a = p.parse_args()
    ds = ShapesDataset(a.num_images, a.img_size, a.seed, a.split)
    n = write_shapes(ds, a.write)
    print(f"wrote {n} images of {a.img_size}x{a.img_size} in {len(ds.classes)} classes to "
          f"{os.path.join(a.write, 'images')} and their instance masks to "
          f"{os.path.join(a.write, 'masks')}")
