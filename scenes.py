"""Built-in scenes with real parts: one object made of three textured parts, the class a set of textures.

The shapes scenes (shapes.ShapesDataset) are flat-coloured objects whose class is colour x shape: a classifier on
the mean colour alone gets most of what an encoder gets, and "semantic parts" collapse to object vs background.
These scenes are built so that SemMAE's parts (SemMAE §3.1) and ObjMAE's objects (ObjMAE §3.2) are real:

- one object made of three squares (its parts) in a row, a column or an L, each 28-34% of the image side (18-22 px
  at 64 px, about 2.5 patches of 8: several patches of each part hold that part alone); the object covers about 24
  of the 64 patches of a 64-px image at patch 8, so ObjMAE's seq_ratio changes how many of them the encoder sees;
- each part a texture with a 4-px period, resolvable inside an 8-px patch: stripes at 0, 45, 90 or 135
  degrees, checks, or dots (TEXTURES), drawn in two colours drawn at random per part, so colour says nothing;
- the class is the set of the object's three textures, in any order along the object: the 20 sets of 3 of
  the 6 textures (CLASSES). One part's texture leaves 10 classes open, two leave 4: no single part decides;
- a plain background, with pixel noise in half of the scenes.

`PartsDataset` has ShapesDataset's interface (files, classes, targets, `load(i)` -> image, instance mask,
class), plus `part_mask(i)` (0 = background, 1..3 = the object's squares). Every scene is a pure
function of (seed, split, index).

`builtin` makes the stages' built-in scenes (--scenes shapes | parts); with --scene_cache DIR they
are drawn once into a file there (`Drawn`) and every later run reads them from it.

    python scenes.py --write OUT --num_images 200 --img_size 64   # as an image folder + instance masks

References: SemMAE Li et al., NeurIPS 2022, arXiv:2206.10207; ObjMAE Wu & Mo 2022, arXiv:2205.14338.
"""
import argparse
import itertools
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import region_file
from utils import UsageError

TEXTURES = ("stripes-0", "stripes-45", "stripes-90", "stripes-135", "checks", "dots")
CLASSES = sorted("+".join(TEXTURES[t] for t in c) for c in itertools.combinations(range(len(TEXTURES)), 3))
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}
PERIOD = 4                       # texture period in pixels: two periods across an 8-px patch
NUM_PARTS = 3
SIDE = (0.28, 0.34)              # a part's side as a share of the image side: 18-22 px at 64 px, ~2.5 patches of 8
# the object's three squares, (column, row) on a grid of squares: in a row, in a column, or one of four L shapes
LAYOUTS = [np.array(p) for p in ([(0, 0), (1, 0), (2, 0)], [(0, 0), (0, 1), (0, 2)], [(0, 0), (1, 0), (0, 1)],
                                 [(0, 0), (1, 0), (1, 1)], [(0, 0), (0, 1), (1, 1)], [(1, 0), (0, 1), (1, 1)])]


def texture(kind, x, y):
    """The 0/1 pattern of texture `kind` at pixel coordinates x, y (arrays, any phase already added)."""
    name = TEXTURES[kind]
    if name.startswith("stripes"):
        t = np.deg2rad(float(name.split("-")[1]))
        return ((x * np.cos(t) + y * np.sin(t)) / PERIOD) % 1 < 0.5
    if name == "checks":
        return (np.floor(x / (PERIOD / 2)) + np.floor(y / (PERIOD / 2))) % 2 == 1
    return ((x % PERIOD) < PERIOD / 2) & ((y % PERIOD) < PERIOD / 2)       # dots: 2x2 on a 4-px grid


def two_colours(rng):
    """Two random RGB colours at least 80 apart in grey level: a visible texture, no class in its colour."""
    while True:
        c = rng.uniform(0, 255, (2, 3))
        if abs(c[0].mean() - c[1].mean()) >= 80:
            return c


class PartsDataset:
    """Scenes of one three-part textured object (module docstring). `num_images`, `img_size` as ShapesDataset."""

    def __init__(self, num_images=2000, img_size=64, seed=0, split="train"):
        if num_images < 1 or img_size < 8:
            raise ValueError(f"PartsDataset needs num_images >= 1 and img_size >= 8, got {num_images}, {img_size}")
        if split not in ("train", "val"):
            raise ValueError(f"PartsDataset split must be 'train' or 'val', got {split!r}")
        self.num_images, self.img_size, self.seed, self.split = num_images, img_size, seed, split
        # virtual names: a regions file made from other scenes fails at load (region_file.load_regions)
        self.files = [f"parts-{split}-{seed}/{i:06d}.png" for i in range(num_images)]
        self.classes = list(CLASSES)
        self._targets = None

    def __len__(self):
        return self.num_images

    def _scene(self, i):
        """Draw the scene's random choices; the generator goes on to the colours. -> (rng, dict)"""
        rng = np.random.default_rng([self.seed, ("train", "val").index(self.split), i, 7])
        S = self.img_size
        cls = int(rng.integers(len(CLASSES)))
        kinds = [TEXTURES.index(t) for t in CLASSES[cls].split("+")]
        order = rng.permutation(NUM_PARTS)                                  # textures in any order along the object
        layout = LAYOUTS[int(rng.integers(len(LAYOUTS)))]                  # [3, 2] square positions (col, row)
        cols, rows = layout[:, 0].max() + 1, layout[:, 1].max() + 1
        side = rng.uniform(*SIDE) * S
        side = min(side, (S - 2) / max(cols, rows))                         # the whole object fits
        x0, y0 = rng.uniform(1, S - 1 - cols * side), rng.uniform(1, S - 1 - rows * side)
        boxes = [(x0 + c * side, y0 + r * side) for c, r in layout]
        return rng, dict(cls=cls, kinds=[kinds[j] for j in order], side=side, boxes=boxes)

    def target(self, i):
        return self._scene(i)[1]["cls"]

    @property
    def targets(self):
        if self._targets is None:                       # lazy, no drawing
            self._targets = [self.target(i) for i in range(self.num_images)]
        return self._targets

    def _parts(self, o):
        """-> part id per pixel np.uint8 [S, S]: 0 background, 1..3 the object's squares."""
        S = self.img_size
        y, x = np.mgrid[0:S, 0:S] + 0.5                                    # pixel centres
        parts = np.zeros((S, S), np.uint8)
        for p, (bx, by) in enumerate(o["boxes"], 1):
            parts[(x >= bx) & (x < bx + o["side"]) & (y >= by) & (y < by + o["side"])] = p
        return parts

    def part_mask(self, i):
        """True part ids per pixel, np.uint8 [S, S] (0 = background, 1..3 = the object's parts)."""
        return self._parts(self._scene(i)[1])

    def part_kinds(self, i):
        """The texture (index into TEXTURES) of parts 1..3 of scene i. -> list of 3 ints"""
        return self._scene(i)[1]["kinds"]

    def load(self, i):
        """-> (PIL RGB image, instance mask np.uint8 [H, W] (0 = background, 1 = the object), class int)"""
        if not 0 <= i < self.num_images:
            raise IndexError(i)
        rng, o = self._scene(i)
        S = self.img_size
        parts = self._parts(o)
        y, x = np.mgrid[0:S, 0:S].astype(np.float64)
        img = np.empty((S, S, 3))
        img[:] = rng.uniform(0, 255, 3)                                    # plain background ...
        if rng.random() < 0.5:                                              # ... or with pixel noise
            img += rng.normal(0, rng.uniform(5, 20), img.shape)
        for p, kind in enumerate(o["kinds"], 1):
            colours = two_colours(rng)
            dx, dy = rng.uniform(0, PERIOD, 2)                              # random phase
            on = texture(kind, x + dx, y + dy)
            here = parts == p
            img[here] = np.where(on[here][:, None], colours[1], colours[0])
        img += rng.normal(0, 3, img.shape)
        image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
        return image, (parts > 0).astype(np.uint8), o["cls"]


# lags (dx, dy) of `texture_features`: each texture changes at some of them and not at others (stripes-0 at
# (2, 0) but never at (0, 1); checks at (2, 0) and (0, 2) but not at (2, 2); dots at half of them)
LAGS = ((1, 0), (0, 1), (1, 1), (1, -1), (2, 0), (0, 2), (2, 2), (2, -2))


def texture_features(image, region):
    """Hand-made texture statistics of a region, for checking what the scenes' classes depend on: for each lag
    of LAGS, the mean absolute grey-level difference between pixel pairs that both lie in the region, over the
    region's grey-level spread (colour and contrast removed). image [H, W, 3] uint8, region bool [H, W] -> [8]"""
    grey = np.asarray(image, np.float64).mean(2)
    H, W = grey.shape
    out = []
    for dx, dy in LAGS:
        ys, xs = slice(max(0, -dy), H - max(0, dy)), slice(0, W - dx)
        ys2, xs2 = slice(max(0, dy), H - max(0, -dy)), slice(dx, W)
        both = region[ys, xs] & region[ys2, xs2]
        diff = np.abs(grey[ys, xs] - grey[ys2, xs2])[both]
        out.append(diff.mean() if diff.size else 0.0)
    spread = grey[region].std() + 1e-6 if region.any() else 1.0
    return np.array(out) / spread


def colour_features(ds):
    """What colour alone says: the mean RGB of the whole image and of the object's pixels, 6 numbers
    a scene. -> (features float64 [N, 6], classes [N])"""
    feats, ys = [], []
    for i in range(len(ds)):
        img, inst, cls = ds.load(i)
        img = np.asarray(img, np.float64)
        feats.append(np.concatenate([img.mean((0, 1)), img[inst == 1].mean(0)]))
        ys.append(cls)
    return torch.tensor(np.array(feats)), torch.tensor(ys)


def part_texture_features(ds, which=None):
    """texture_features of one part (which = 0..2, in drawing order) or their mean over the three
    parts (None: the whole object). -> (features float64 [N, 8], classes [N])"""
    feats, ys = [], []
    for i in range(len(ds)):
        img, _, cls = ds.load(i)
        parts = ds.part_mask(i)
        per_part = [texture_features(np.asarray(img), parts == p) for p in (1, 2, 3)]
        feats.append(np.mean(per_part, 0) if which is None else per_part[which])
        ys.append(cls)
    return torch.tensor(np.array(feats)), torch.tensor(ys)


def write_parts(dataset, out_dir):
    """Save a PartsDataset as out_dir/images/<class>/<name>.png and out_dir/masks/... (shapes.write_shapes)."""
    import shapes
    return shapes.write_shapes(dataset, out_dir)


# ----------------------------------------------------------------------------- the built-in scenes, drawn once

# The built-in scenes' flags act only without --data_path; each stage's UNUSED refuses them with it
# (a user who asks for --num_images 5000 of a folder would otherwise train on all of it).
BUILTIN = (lambda a: a.data_path is None, "without --data_path (on the built-in scenes)")
BUILTIN_FLAGS = dict.fromkeys(("num_images", "data_seed", "scenes", "scene_cache"), BUILTIN)


def add_scene_flags(group):
    """The stages' flags for the built-in scenes (used without --data_path)."""
    group.add_argument("--scenes", default="shapes", choices=["shapes", "parts"],
                       help="built-in scenes: shapes.py's, or scenes.py's objects of textured "
                            "parts")
    group.add_argument("--scene_cache", default=None, metavar="DIR",
                       help="draw the built-in scenes once into DIR; later runs read them there")


def builtin(name, num_images, img_size, seed, split="train", scene_cache=None):
    """The built-in scenes `name` ('shapes': shapes.py, 'parts': scenes.py); with scene_cache (a
    folder) they are drawn once into a file there and read from it by every later run."""
    import shapes
    kinds = {"shapes": shapes.ShapesDataset, "parts": PartsDataset}
    base = kinds[name](num_images, img_size=img_size, seed=seed, split=split)
    return Drawn(base, scene_cache) if scene_cache else base


class Drawn:
    """A built-in scene set drawn once: every image, instance mask (and the parts scenes' part
    masks) as uint8 tensors in `folder/<names>.pt`, written atomically by the first run that
    names the folder and memory-mapped by every other. Same interface as the scenes it holds.
    The file is also an image cache (image_cache.load_image_cache's layout: images uint8
    [N, 3, S, S], sizes, masks, files, meta), so pretrain.py takes the fast input path on it with
    no second copy."""

    def __init__(self, base, folder):
        self.files, self.classes, self.targets = base.files, base.classes, base.targets
        self.num_images, self.img_size = base.num_images, base.img_size
        name = f"{base.files[0].split('/')[0]}-{base.num_images}x{base.img_size}.pt"
        self.path = os.path.join(folder, name)
        if not os.path.isfile(self.path):
            self._draw(base, folder)
        try:
            self.tensors = torch.load(self.path, mmap=True, weights_only=True)
        except Exception as e:      # any unpickling or zip error: the file is not what we wrote
            raise UsageError(f"scene cache {self.path} cannot be read ({type(e).__name__}); "
                             "delete it to draw the scenes again") from None
        if self.tensors.get("files") != self.files:
            raise UsageError(f"scene cache {self.path} holds other scenes; delete it to draw these"
                             " again")
        if self.tensors.get("meta", {}).get("kind") != "image_cache":
            raise UsageError(f"scene cache {self.path} was written by an older version; delete it"
                             " to draw the scenes again")

    def _draw(self, base, folder):
        S, n = base.img_size, base.num_images
        out = {"images": torch.empty(n, 3, S, S, dtype=torch.uint8),
               "sizes": torch.full((n, 2), S, dtype=torch.int32),
               "masks": torch.empty(n, S, S, dtype=torch.uint8),
               "meta": {"kind": "image_cache", "input_size": S, "resize": "none: drawn at S"}}
        if hasattr(base, "part_mask"):
            out["parts"] = torch.empty(n, S, S, dtype=torch.uint8)
        for i in tqdm(range(n), desc=f"draw {os.path.basename(self.path)}", leave=False,
                      dynamic_ncols=True, disable=not sys.stdout.isatty()):
            img, mask, _ = base.load(i)
            out["images"][i] = torch.as_tensor(np.array(img)).permute(2, 0, 1)
            out["masks"][i] = torch.as_tensor(mask)
            if "parts" in out:
                out["parts"][i] = torch.from_numpy(base.part_mask(i))
        out["files"] = list(self.files)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = region_file.temp_file(folder, os.path.basename(self.path))
        with os.fdopen(fd, "wb") as f:
            torch.save(out, f)
        os.replace(tmp, self.path)  # another process drawing the same scenes writes the same bytes

    def __len__(self):
        return self.num_images

    def load(self, i):
        """-> (PIL RGB image, instance mask np.uint8 [H, W], class int), as the scenes' own load."""
        if not 0 <= i < self.num_images:
            raise IndexError(i)
        image = Image.fromarray(self.tensors["images"][i].permute(1, 2, 0).numpy(), "RGB")
        return image, self.tensors["masks"][i].numpy(), self.targets[i]

    def part_mask(self, i):
        return self.tensors["parts"][i].numpy()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", required=True, metavar="OUT", help="folder for images/<class>/ and masks/<class>/")
    p.add_argument("--num_images", type=int, default=2000)
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=("train", "val"))
    a = p.parse_args()
    print(f"wrote {write_parts(PartsDataset(a.num_images, a.img_size, a.seed, a.split), a.write)} scenes to {a.write}")
