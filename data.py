"""Datasets: what the three stages read.

- `PretrainDataset`: image + region cells (region_file.py), cropped (optional) and flipped together
  (SemMAE §4.1: flip only).
- The joint random-resized crop (MAE's pre-training crop, ObjMAE §4.2's random crop) as pure
  functions on tensors: `crop_box`, `resized_crop` (image), `resized_crop_cells` (region cells and
  scores), `resized_crop_mask`.
- `FolderDataset`: an image folder in ImageNet layout (root/<class>/<file>), or (classes=False)
  images at any depth, optionally with instance masks in a parallel folder (same path, .png).
- `to_rgb`: any PIL mode (1, L, LA, P, RGBA, CMYK, I;16, I, F, ...) as the RGB image it shows;
  `unreadable_images`: every image of a folder that cannot be decoded, listed at once.
- `builtin`, `Drawn`: the built-in scenes (shapes.py, scenes.py), drawn once with --scene_cache.
- `CIFAR100`, `Classification`: fine-tuning sets, (transformed image, class); `Foreground`: the
  probe's (image, class, foreground score per cell). Pictures: `denormalise`, `save_with_headings`.
The regions file is region_file.py, the fast input path (--image_cache) image_cache.py.

    python data.py --verify IMAGENET/train IMAGENET/val   # every unreadable image; exit 2 if any

References (cited in the comments as "SemMAE §3.2, Alg. 1", "ObjMAE Table 8", "MAE Table 1f"):
  SemMAE  Li et al., SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders. NeurIPS 2022,
          arXiv:2206.10207
  ObjMAE  Wu & Mo, Object-wise Masked Autoencoders for Fast Pre-training. 2022, arXiv:2205.14338
  MAE     He et al., Masked Autoencoders Are Scalable Vision Learners. CVPR 2022, arXiv:2111.06377
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from torchvision.transforms import v2
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import region_file
from utils import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- pre-training samples

def resized(img, size):
    """A PIL image as size x size, the whole image resized bicubically: the regions file's cells and
    the image cache are made on this image (a random-resized crop, where a recipe has one, is cut
    from the original instead)."""
    return img if img.size == (size, size) else img.resize((size, size), Image.BICUBIC)


class PretrainDataset(torch.utils.data.Dataset):
    """-> (img [3, S, S] normalised, cell_labels long [S/c, S/c], cell_scores float [S/c, S/c],
    target).

    Cells come from the regions file (row i), else from the base's instance mask by ObjMAE's rules
    (region_file.instance_cells at `cell_size`: pass the model's patch size, so the 20% rule is on
    each patch's own pixels, ObjMAE §3.2), else they are all 255 (ignore) with zero scores.

    Augmentation, in this order: without `crop_scale` the whole image resized to S x S (PIL
    bicubic); with it, MAE's random-resized crop cut from the original image (`crop_box` on its H x
    W, then `resized_crop` to S x S), the cells cut by the same box mapped onto their grid
    (`resized_crop_cells`), and objects (an instance mask, or a regions file's `masks`) cropped at
    the pixel level and their cells recomputed, so the 20% and 5% rules hold on the crop; then, with
    `hflip`, a horizontal flip of image and cells together; then the ImageNet normalisation. SemMAE
    §4.1: flip only (crop_scale None); MAE: crop (0.2, 1) + flip. Every random choice comes from
    torch's global RNG, in this order (box, then coin), so worker seeding and resume control it.
    """

    def __init__(self, base, input_size, regions=None, hflip=True, cell_size=8, crop_scale=None,
                 crop_ratio=(3 / 4, 4 / 3)):
        if input_size % cell_size:
            raise ValueError(f"--input_size {input_size} is not a multiple of the cell size "
                             f"{cell_size}; use a multiple of {cell_size}")
        self.base, self.size, self.regions, self.hflip = base, input_size, regions, hflip
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.grid = (input_size // cell_size, input_size // cell_size)
        if regions is not None:
            shape = tuple(regions["labels"].shape)
            if shape != (len(base), *self.grid):
                raise ValueError(f"regions labels {shape} do not fit {len(base)} images on a "
                                 f"{self.grid[0]}x{self.grid[1]} grid (input size {input_size} / "
                                 f"cell size {cell_size}); pass the cell size the regions were made"
                                 " with (meta cell_size)")

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, mask, target = self.base.load(i)
        S, extent = self.size, (img.height, img.width)
        box = (None if self.crop_scale is None else
               crop_box(extent, self.crop_scale, self.crop_ratio))
        if box is None:
            x = TF.to_tensor(resized(img, S))                         # [3, S, S] in [0, 1]
        else:                                                         # MAE: cut from the original
            x = resized_crop(TF.to_tensor(img), box, S)
        labels, scores = self.cells(i, self.square_mask(mask), box, extent)
        if self.hflip and torch.rand(()) < 0.5:
            x, labels, scores = x.flip(-1), labels.flip(-1), scores.flip(-1)
        x = TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        return x, labels, scores, target

    def square_mask(self, mask):
        """The base's instance mask (or None) at S x S, resized as its image is (nearest: ids stay
        ids); not read with a regions file, which brings its own objects."""
        S = self.size
        if self.regions is None and mask is not None and mask.shape != (S, S):
            mask = np.asarray(Image.fromarray(mask).resize((S, S), Image.NEAREST))
        return mask

    def cells(self, i, mask, box, extent):
        """Region cells and scores of sample i for the crop `box` (top, left, h, w in pixels of the
        original image, extent = its (H, W); None: no crop). mask: the base's instance mask at S x S
        (the image resized, as the regions file's cells are), or None.
        -> (labels long [gh, gw], scores float [gh, gw])
        Objects (an instance mask, or a regions file of objects with its per-pixel `masks`) are
        recomputed from the cropped mask by ObjMAE's 20% and 5% rules (§3.2, §4.1); parts are
        resampled nearest; scores by area."""
        S = self.size
        labels, scores, rule = None, torch.zeros(self.grid), (0.2, 0.05)
        if self.regions is not None:
            labels = self.regions["labels"][i].long()
            sc = self.regions["scores"]
            scores = sc[i].float() if sc is not None else scores
            mask = None                                     # the file's objects, not the base's
            if box is not None and self.regions.get("masks") is not None:
                meta = self.regions["meta"]
                mask = self.regions["masks"][i].numpy()
                rule = (meta["min_share"], meta["min_object"])
        elif mask is None:
            labels = torch.full(self.grid, region_file.IGNORE, dtype=torch.long)
        if box is not None:
            if labels is not None:
                labels, scores = resized_crop_cells(labels, scores, box, extent)
            if mask is not None:
                mask = resized_crop_mask(mask, box, S, extent)
                labels = None
        if labels is None:                              # ObjMAE §3.2, §4.1 on the (cropped) mask
            labels = torch.from_numpy(region_file.instance_cells(mask, self.grid, *rule)).long()
        return labels, scores


# ---------------------------------------------------------------- joint random-resized crop
# MAE pre-trains on RandomResizedCrop(scale 0.2-1, bicubic) + flip (MAE Table 1f: crops beat
# resize-only), ObjMAE §4.2 "randomly cropped into 224x224", SemMAE §4.1 "only random horizontal
# flipping". As MAE's RandomResizedCrop, the box is drawn on the original H x W image and cut from
# it; the region cells (made on the image resized to S x S) cover the same H x W, so a box in the
# original's pixels maps onto them fractionally (`_axis_map`). Pure functions on tensors, any
# device, one image or a batch, so the fast input path (image_cache.device_batch) calls the same.

def _extent(size):
    """An image size: int (square) or (H, W) -> (H, W)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def crop_box(size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random crop box (top, left, h, w) in pixels of an image of `size` (int: square, or (H, W)),
    drawn from torch's global RNG by torchvision's RandomResizedCrop rule: up to 10 tries of an area
    share uniform in `scale` and an aspect ratio (w / h) log-uniform in `ratio`; the first that fits
    is placed uniformly at random; if none fits, the whole image clipped to the nearest ratio in
    `ratio`, centred."""
    H, W = _extent(size)
    log_ratio = torch.log(torch.tensor(ratio))                # float32, as torchvision draws it
    for _ in range(10):
        area = H * W * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]))).item()
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            top = int(torch.randint(0, H - h + 1, size=(1,)).item())
            left = int(torch.randint(0, W - w + 1, size=(1,)).item())
            return top, left, h, w
    h, w = H, W       # at least one pixel each way: torchvision's rule gives an empty box for a
    if W / H < min(ratio):                           # ratio beyond the image's side (99 at 32 px)
        h = max(1, int(round(W / min(ratio))))
    elif W / H > max(ratio):
        w = max(1, int(round(H * max(ratio))))
    return (H - h) // 2, (W - w) // 2, h, w


def _boxes(box, n, kind=int):
    """One box (top, left, h, w) or n of them ([n, 4]) -> a list of n 4-tuples of `kind` (int for
    pixels, float for cells, which a box of fractional pixels may cut, as a centre crop's mapped
    onto the original does)."""
    rows = torch.as_tensor(box, dtype=torch.float64).reshape(-1, 4).tolist()
    if len(rows) not in (1, n):
        raise ValueError(f"{len(rows)} crop boxes for {n} images")
    return [tuple(kind(v) for v in r) for r in (rows * n if len(rows) == 1 else rows)]


def resized_crop(x, box, size):
    """Pixels in [0, 1], [3, H, W] or [B, 3, H, W] -> the box (top, left, h, w), or one box per
    image [B, 4], resized to size x size: bicubic with antialias (torchvision's RandomResizedCrop on
    a tensor; MAE's on a PIL image differs by PIL's rounding to 8 bits), clipped to [0, 1] as PIL's
    8-bit output is. The same dtype and device as x."""
    one = x.dim() == 3
    xs = x[None] if one else x
    out = []
    for img, (t, l, h, w) in zip(xs, _boxes(box, len(xs))):
        patch = img[None, :, t:t + h, l:l + w].float()
        if (h, w) != (size, size):
            patch = F.interpolate(patch, size=(size, size), mode="bicubic", align_corners=False,
                                  antialias=True)
        out.append(patch.clamp(0, 1).to(x.dtype))
    out = torch.cat(out)
    return out[0] if one else out


def _axis_map(start, length, extent, g):
    """One axis of a crop on a grid of g cells over `extent` pixels of the original image: the box
    spans pixels [start, start + length) of it, split into g output cells. -> (nearest input cell
    per output cell [g], long: the cell under the output cell's centre; area weights [g, g],
    float64: the share of output cell j that lies in input cell i). float64 is exact here for
    integer boxes: the centre's cell is floor of a ratio of integers < 2**53."""
    j = torch.arange(g, dtype=torch.float64)
    nearest = torch.floor((2 * g * start + (2 * j + 1) * length) / (2 * extent)).long()
    nearest = nearest.clamp(0, g - 1)
    edges = start + torch.arange(g + 1, dtype=torch.float64) * length / g  # output cell edges, px
    cells = torch.arange(g + 1, dtype=torch.float64) * extent / g          # input cell edges, px
    overlap = (torch.minimum(edges[1:, None], cells[None, 1:]) -
               torch.maximum(edges[:-1, None], cells[None, :-1])).clamp_min(0)  # [g_out, g_in]
    return nearest, overlap / (length / g)


def resized_crop_cells(labels, scores, box, size):
    """Region cells over an image of `size` (int: square, or (H, W): the original image, whatever
    the grid's own resolution), labels [gh, gw] or [B, gh, gw] and scores of the same shape (or
    None), -> the cells of the crop `box` (top, left, h, w in that image's pixels; or [B, 4])
    resized to the same grid. Region ids are resampled nearest (the input cell under each output
    cell's centre: ids stay ids); scores by area (the mean of the input cells' scores weighted by
    how much of the output cell each covers)."""
    one = labels.dim() == 2
    lab = labels[None] if one else labels
    sc = None if scores is None else (scores[None] if one else scores)
    B, gh, gw = lab.shape
    H, W = _extent(size)
    out_lab, out_sc = [], []
    for b, (t, l, h, w) in enumerate(_boxes(box, B, float)):
        (ny, wy), (nx, wx) = _axis_map(t, h, H, gh), _axis_map(l, w, W, gw)
        out_lab.append(lab[b][ny.to(lab.device)][:, nx.to(lab.device)])
        if sc is not None:
            wy, wx = wy.to(sc.device), wx.to(sc.device)
            out_sc.append((wy @ sc[b].double() @ wx.T).to(sc.dtype))  # [gh, gw] area-weighted
    out_lab = torch.stack(out_lab)
    out_sc = None if sc is None else torch.stack(out_sc)
    return (out_lab[0], None if out_sc is None else out_sc[0]) if one else (out_lab, out_sc)


def resized_crop_mask(mask, box, size, extent=None):
    """Instance mask np.uint8 [mh, mw] over an image of `extent` (H, W) pixels (None: the mask's own
    size) -> the crop box (top, left, h, w, in the image's pixels) resized to size x size, nearest
    (the mask pixel under each output pixel's centre; float64, exact for integer boxes): ids stay
    ids. A mask stored at S x S for an H x W image (the regions file's, the image cache's) is
    cropped by the same box as the image; the box may be fractional."""
    (mh, mw), (t, l, h, w) = mask.shape, (float(v) for v in box)
    H, W = (mh, mw) if extent is None else extent
    centre = 2 * np.arange(size) + 1                          # output pixel centres, in half pixels
    y = np.floor((2 * size * t + centre * h) * mh / (2 * size * H)).astype(np.int64)
    x = np.floor((2 * size * l + centre * w) * mw / (2 * size * W)).astype(np.int64)
    return np.ascontiguousarray(mask[y.clip(0, mh - 1)[:, None], x.clip(0, mw - 1)[None]])


# ---------------------------------------------------------------- image folders

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # PIL: a bad file


def to_rgb(im):
    """Any PIL image -> an 8-bit RGB image that looks like the file does in a viewer:
    - 16-bit grey ('I;16', 'I;16B', ...): value * 255 / 65535 (PIL's convert would clip at 255:
      mostly white); 32-bit integer ('I'): the same when the values fit 0..65535 (a 16-bit PNG or
      TIFF opened as 'I'), else its min..max stretched to 0..255; float ('F'): 0..1 -> 0..255 when
      the values are in [0, 1], else stretched min..max;
    - transparency (RGBA, LA, PA, or P/L/RGB with a transparent colour): composited over white, as a
      page shows it (dropping the alpha would bring back whatever colour the transparent pixels
      happen to hold);
    - the rest (1, L, P, RGB, CMYK, YCbCr) through PIL's convert('RGB').
    Multi-frame files (GIF, TIFF): the first frame."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        lo, hi = (a.min(), a.max()) if a.size else (0.0, 0.0)
        if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
            a = a * (255 / 65535)
        elif im.mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255
        else:
            a = (a - lo) * (255 / max(hi - lo, 1e-12))
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def read_rgb(path):
    """Open and fully decode an image file -> PIL RGB (to_rgb). Raises one of IMAGE_ERRORS for a bad
    file."""
    with Image.open(path) as im:
        return to_rgb(im)


class FolderDataset:
    """ImageNet layout: root/<class>/<...>/<file>. Classes and files sorted, so every process and
    every stage sees the same order; `.files` are paths relative to root ('n01440764/x.JPEG').
    classes=False (pre-training and part learning, which need no labels): every image under root at
    any depth, class folders or none, target 0; sorted by top-level entry, then path, so a
    class-folder tree lists its files in the same order either way (and gives the same regions
    file)."""

    def __init__(self, root, masks_root=None, classes=True):
        if not os.path.isdir(root):
            layout = ("ImageNet-layout folder (root/<class>/<image>)" if classes
                      else "folder of images")
            raise ValueError(f"image folder {root} does not exist; pass --data_path a {layout}")
        self.root, self.masks_root = root, masks_root
        tops = sorted(os.scandir(root), key=lambda e: e.name)
        self.classes = [e.name for e in tops if e.is_dir()] if classes else []
        self.files, self.targets, self.skipped = [], [], []
        for entry in tops:
            if not entry.is_dir():                        # a file at the top: no class folder
                if classes or not entry.name.lower().endswith(EXTENSIONS):
                    self.skipped.append(entry.name)
                else:
                    self.files.append(entry.name)
                    self.targets.append(0)
                continue
            found = []
            for d, _, names in os.walk(entry.path, followlinks=True):
                for n in names:
                    rel = os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
                    (found if n.lower().endswith(EXTENSIONS) else self.skipped).append(rel)
            self.files += sorted(found)
            self.targets += [self.classes.index(entry.name) if classes else 0] * len(found)
        self.skipped.sort()
        where = "images in class folders" if classes else "images"
        if self.skipped and os.environ.get("RANK", "0") == "0":   # no class shrinks in silence
            more = len(self.skipped) - 5
            shown = ", ".join(self.skipped[:5]) + (f" and {more} more" if more > 0 else "")
            print(f"{root}: skipped {len(self.skipped)} files that are not {where} ({shown}); "
                  f"images are {' '.join(EXTENSIONS)}" + (" in root/<class>/" if classes else ""),
                  flush=True)
        if not self.files:
            where = ("in class sub-folders; expected root/<class>/<image>" if classes
                     else "(at any depth)")
            raise ValueError(f"image folder {root} has no images {where} with one of "
                             f"{', '.join(EXTENSIONS)}")

    def __len__(self):
        return len(self.files)

    def load(self, i):
        """-> (PIL RGB image, instance mask np.uint8 [H, W] or None, class int)"""
        path = os.path.join(self.root, self.files[i])
        try:
            img = read_rgb(path)
        except IMAGE_ERRORS as e:  # read during training: a UsageError (exit 2), said only here
            raise UsageError(f"cannot read image {path} ({e}); delete or replace the file "
                             f"(python data.py --verify {self.root} lists every unreadable image "
                             "at once)") from None
        mask = None
        if self.masks_root is not None:
            mpath = os.path.join(self.masks_root, os.path.splitext(self.files[i])[0] + ".png")
            try:
                with Image.open(mpath) as im:
                    mask = np.array(im)
            except OSError as e:
                raise UsageError(f"cannot read instance mask {mpath} ({e}); every image needs one "
                                 "(all zeros when it has no objects)") from None
            if mask.ndim != 2 or mask.shape != (img.height, img.width) or mask.max(initial=0) > 255:
                raise UsageError(f"instance mask {mpath} must be a single-channel 8-bit PNG of "
                                 f"the image's size {img.height}x{img.width}, got shape "
                                 f"{mask.shape}")
            mask = mask.astype(np.uint8)
        return img, mask, self.targets[i]


class _ReadCheck(torch.utils.data.Dataset):
    """'' for a readable image of a FolderDataset, else why not (unreadable_images' workers)."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        try:
            read_rgb(os.path.join(self.folder.root, self.folder.files[i]))
            return ""
        except IMAGE_ERRORS as e:
            return f"{type(e).__name__}: {e}"


def unreadable_images(folder, num_workers=0):
    """Decode every image of a FolderDataset -> [(relative file, reason)] for those that cannot be
    read, all at once before training (the loader would stop at the first one, mid-epoch)."""
    loader = torch.utils.data.DataLoader(_ReadCheck(folder), batch_size=None,
                                         num_workers=num_workers)
    reasons = tqdm(loader, total=len(folder), desc=f"verify {folder.root}", leave=False,
                   dynamic_ncols=True, disable=not sys.stdout.isatty())  # no \r in a job's log
    return [(folder.files[i], why) for i, why in enumerate(reasons) if why]


# ---------------------------------------------------------------- classification sets

class CIFAR100:
    """torchvision's CIFAR-100 with data.py's .load(i) -> (PIL, mask None, class) interface (32x32
    images; the transforms resize them to --input_size, ObjMAE §4.1)."""

    def __init__(self, root, train, download):
        try:
            self.ds = torchvision.datasets.CIFAR100(root, train=train, download=download)
        except RuntimeError as e:
            raise ValueError(f"CIFAR-100 is not in {root} ({e}); pass --download, or --data_path "
                             "the folder that holds cifar-100-python/") from None
        self.classes = self.ds.classes
        split = "train" if train else "test"
        self.files = [f"{split}/{i:05d}" for i in range(len(self.ds))]     # for regions files

    def __len__(self):
        return len(self.ds)

    def load(self, i):
        img, target = self.ds[i]
        return img, None, target


class Classification(torch.utils.data.Dataset):
    """(transform(image), class) from any data.py-style dataset with .load(i)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, _, target = self.base.load(i)
        return self.transform(img), target


class Foreground(PretrainDataset):
    """(image, class, foreground score per cell [gh, gw]) for the keep_ratio probe (SemMAE §4.2),
    MAE's linear-probe pipeline on the image and its cells together: training, RandomResizedCrop
    (crop_scale = (--crop_min, 1)) + flip, PretrainDataset's joint crop; validation (crop_pct),
    torchvision's Resize(S / crop_pct) + CenterCrop(S), the cells cut to the same box mapped onto
    the original. Scores come from the regions file, else object cells (id 1..254 of the regions or
    of the base's instance masks) count 1 and background 0."""

    def __init__(self, base, input_size, crop_pct=None, **kw):
        super().__init__(base, input_size, **kw)
        self.crop_pct = crop_pct

    def __getitem__(self, i):
        train = self.crop_pct is None
        img, cells, scores, target = super().__getitem__(i) if train else self.centre(i)
        if self.regions is None or self.regions["scores"] is None:
            scores = ((cells > 0) & (cells != region_file.IGNORE)).float()
        return img, target, scores

    def centre(self, i):
        """MAE's validation view of sample i: (img [3, S, S] normalised, labels, scores, target)."""

        img, mask, target = self.base.load(i)
        S, (H, W) = self.size, (img.height, img.width)
        short = int(S / self.crop_pct)  # torchvision Resize(int): shorter side
        nh, nw = (int(short * H / W), short) if W <= H else (short, int(short * W / H))
        top, left = int(round((nh - S) / 2.0)), int(round((nw - S) / 2.0))  # torchvision CenterCrop
        x = v2.functional.resize(img, [nh, nw], interpolation=v2.InterpolationMode.BICUBIC,
                                 antialias=True)
        x = v2.functional.to_image(v2.functional.center_crop(x, S))
        x = v2.functional.normalize(v2.functional.to_dtype(x, torch.float32, scale=True),
                                    IMAGENET_MEAN, IMAGENET_STD)
        box = (top * H / nh, left * W / nw, S * H / nh, S * W / nw)  # in the original's pixels
        labels, scores = self.cells(i, self.square_mask(mask), box, (H, W))
        return x, labels, scores, target


# ---------------------------------------------------------------- pictures

def denormalise(imgs):
    """[B, 3, H, W] normalised images -> [0, 1] pixels on the CPU, for pictures."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (imgs.float().cpu() * std[:, None, None] + mean[:, None, None]).clamp(0, 1)


def save_with_headings(path, images, headings):
    """Pictures that explain themselves: images [R * C, 3, H, W] in [0, 1], row by row, C =
    len(headings) per row -> one PNG: torchvision's grid (1-px black lines) under a white band with
    each column's heading, drawn with PIL's built-in font. Images narrower than their heading are
    enlarged by a whole factor (nearest), so each image pixel becomes a block of one colour;
    otherwise the cells hold the images' pixels as save_image writes them."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), h, font=font) for h in headings]
    scale = max(1, math.ceil((max(b[2] for b in boxes) + 4) / images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    grid = torchvision.utils.make_grid(images, nrow=len(headings), padding=1)   # [3, H', W']
    pixels = grid.mul(255).add(0.5).clamp(0, 255).permute(1, 2, 0)              # as save_image
    pixels = pixels.to(torch.uint8).numpy()
    band = max(b[3] for b in boxes) + 6                      # the headings' height + a margin
    canvas = Image.new("RGB", (pixels.shape[1], band + pixels.shape[0]), "white")
    canvas.paste(Image.fromarray(pixels), (0, band))
    draw, width = ImageDraw.Draw(canvas), images.shape[-1]
    for c, (heading, box) in enumerate(zip(headings, boxes)):
        left = 1 + c * (width + 1)                           # column c's first pixel in the grid
        draw.text((left + (width - box[2]) // 2, 3), heading, fill="black", font=font)
    canvas.save(path)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="List every unreadable image of image folders.")
    p.add_argument("--verify", nargs="+", required=True, metavar="FOLDER",
                   help="image folders (root/<class>/<image>): decode every image, list all "
                        "unreadable ones")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="decoding processes")
    a = p.parse_args()
    bad, total = [], 0
    for root in a.verify:
        try:
            folder = FolderDataset(root)
        except ValueError as e:
            p.exit(2, f"error: {e}\n")
        bad += [(os.path.join(root, f), why) for f, why in unreadable_images(folder, a.num_workers)]
        total += len(folder)
    for path, why in bad:
        print(f"{path}: {why}")
    print(f"{len(bad)} of {total} images cannot be read"
          + ("; delete or replace them" if bad else ""))

    raise SystemExit(2 if bad else 0)
