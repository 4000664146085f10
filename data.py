"""Datasets and the regions file: what the three stages read.

- `PretrainDataset`: image + region cells, cropped (optional) and flipped together (SemMAE §4.1: flip only).
- The regions file (stage 1 -> stage 2): `save_regions` / `load_regions`.
- Cells to patches inside the training loop: `cells_to_patches` (parts), `scores_to_patches`.
- The joint random-resized crop (MAE's pre-training crop, ObjMAE §4.2's random crop) as pure functions on
  tensors: `crop_box`, `resized_crop` (image), `resized_crop_cells` (region cells and scores), `resized_crop_mask`.
- `FolderDataset`: an image folder in ImageNet layout (root/<class>/<file>), or (classes=False) images at any
  depth with or without class folders, optionally with instance masks in a parallel folder (same relative path, .png).
- `to_rgb`: any PIL mode (1, L, LA, P, RGBA, CMYK, I;16, I, F, ...) as the RGB image it shows;
  `unreadable_images`: every image of a folder that cannot be decoded, listed at once.
- `coco_instance_masks`: COCO instance annotations (polygons and RLE) as instance-id masks.
- Objects per cell from an instance mask (ObjMAE §3.2's 20% rule, §4.1's 5% rule): `mask_cells` (a mask of
  any size, resized as its image) over `instance_cells`.
- `CIFAR100`, `Classification`: fine-tuning sets, (transformed image, class).
- `ShapesDataset`: built-in CLEVR-like 2-D scenes with instance masks and a class label, made on the
  fly from (seed, split, index); nothing on disk, nothing downloaded.
- The fast input path (--image_cache): `open_image_cache` (uint8 images decoded once), `CachedPretrainDataset`
  (the same samples, uint8), `device_batch` (crop, flip, normalise on the device).

    python data.py --write OUT --num_images 200 --img_size 64    # shapes as an image folder + masks
    python data.py --verify IMAGENET/train IMAGENET/val             # list every unreadable image, exit 2 if any

References (cited in the comments as "SemMAE §3.2, Alg. 1", "ObjMAE Table 8", "MAE Table 1f"):
  SemMAE  Li et al., SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders. NeurIPS 2022, arXiv:2206.10207
  ObjMAE  Wu & Mo, Object-wise Masked Autoencoders for Fast Pre-training. 2022, arXiv:2205.14338
  MAE     He et al., Masked Autoencoders Are Scalable Vision Learners. CVPR 2022, arXiv:2111.06377
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import zipfile
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFont
from torch._subclasses.fake_tensor import FakeTensorMode   # shapes without memory, for reserve_tensor_file
from tqdm import tqdm

from utils import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255                     # region id of a cell with no label (the regions file, below)


# ----------------------------------------------------------------------------- pre-training samples

def resized(img, size):
    """A PIL image as size x size, the whole image resized bicubically: the regions file's cells and the image cache
    are made on this image (a random-resized crop, where a recipe has one, is cut from the original instead)."""
    return img if img.size == (size, size) else img.resize((size, size), Image.BICUBIC)


class PretrainDataset(torch.utils.data.Dataset):
    """(img [3, S, S] normalised, cell_labels long [S/c, S/c], cell_scores float [S/c, S/c], target).

    Cells come from the regions file (row i), else from the base's instance mask by objmae's rules
    (`instance_cells` at `cell_size`: pass the model's patch size, so the 20% rule is on each patch's own pixels,
    ObjMAE §3.2), else they are all 255 (ignore) with zero scores.

    Augmentation, in this order: without `crop_scale` the whole image resized to S x S (PIL bicubic); with it, MAE's
    random-resized crop cut from the original image (`crop_box` on its H x W, then `resized_crop` to S x S), the
    cells cut by the same box mapped onto their grid (`resized_crop_cells`), and objects (an instance mask, or a
    regions file's `masks`) cropped at the pixel level and their cells recomputed, so the 20% and 5% rules hold on
    the crop; then, with `hflip`, a horizontal flip of image and cells together; then the ImageNet normalisation. SemMAE §4.1: flip only (crop_scale None); MAE: crop (0.2, 1) + flip. Every random
    choice comes from torch's global RNG, in this order (box, then coin), so worker seeding and resume control it.
    """

    def __init__(self, base, input_size, regions=None, hflip=True, cell_size=8, crop_scale=None,
                 crop_ratio=(3 / 4, 4 / 3)):
        if input_size % cell_size:
            raise ValueError(f"--input_size {input_size} is not a multiple of the cell size {cell_size}; "
                             f"use a multiple of {cell_size}")
        self.base, self.size, self.regions, self.hflip = base, input_size, regions, hflip
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.grid = (input_size // cell_size, input_size // cell_size)
        if regions is not None:
            shape = tuple(regions["labels"].shape)
            if shape != (len(base), *self.grid):
                raise ValueError(f"regions labels {shape} do not fit {len(base)} images on a {self.grid[0]}x"
                                 f"{self.grid[1]} grid (input size {input_size} / cell size {cell_size}); "
                                 f"pass the cell size the regions were made with (meta cell_size)")

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, mask, target = self.base.load(i)
        S, extent = self.size, (img.height, img.width)
        box = None if self.crop_scale is None else crop_box(extent, self.crop_scale, self.crop_ratio)
        if box is None:
            x = TF.to_tensor(resized(img, S))                              # [3, S, S] in [0, 1]
        else:                                                              # MAE: the box cut from the original
            x = resized_crop(TF.to_tensor(img), box, S)
        labels, scores = self.cells(i, self.square_mask(mask), box, extent)
        if self.hflip and torch.rand(()) < 0.5:
            x, labels, scores = x.flip(-1), labels.flip(-1), scores.flip(-1)
        x = TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        return x, labels, scores, target

    def square_mask(self, mask):
        """The base's instance mask (or None) at S x S, resized as its image is (nearest: ids stay ids); not read
        with a regions file, which brings its own objects."""
        S = self.size
        if self.regions is None and mask is not None and mask.shape != (S, S):
            mask = np.asarray(Image.fromarray(mask).resize((S, S), Image.NEAREST))
        return mask

    def cells(self, i, mask, box, extent):
        """Region cells and scores of sample i for the crop `box` (top, left, h, w in pixels of the original image,
        extent = its (H, W); None: no crop). mask: the base's instance mask at S x S (the image resized, as the
        regions file's cells are), or None. -> (labels long [gh, gw], scores float [gh, gw])
        Objects (an instance mask, or a regions file of objects with its per-pixel `masks`) are recomputed from the
        cropped mask by ObjMAE's 20% and 5% rules (§3.2, §4.1); parts are resampled nearest; scores by area."""
        S = self.size
        labels, scores, rule = None, torch.zeros(self.grid), (0.2, 0.05)
        if self.regions is not None:
            labels = self.regions["labels"][i].long()
            sc = self.regions["scores"]
            scores = sc[i].float() if sc is not None else scores
            mask = None                                                    # the file's objects, not the base's
            if box is not None and self.regions.get("masks") is not None:
                meta = self.regions["meta"]
                mask, rule = self.regions["masks"][i].numpy(), (meta["min_share"], meta["min_object"])
        elif mask is None:
            labels = torch.full(self.grid, IGNORE, dtype=torch.long)
        if box is not None:
            if labels is not None:
                labels, scores = resized_crop_cells(labels, scores, box, extent)
            if mask is not None:
                mask = resized_crop_mask(mask, box, S, extent)
                labels = None
        if labels is None:                                                 # ObjMAE §3.2, §4.1 on the (cropped) mask
            labels = torch.from_numpy(instance_cells(mask, self.grid, *rule)).long()
        return labels, scores


# ----------------------------------------------------------------------------- the regions file

def save_regions(path, labels, scores, files, meta, masks=None):
    """Write the regions file atomically (temp file in the same folder, then os.replace).
    labels: uint8 [N, gh, gw]; scores: [N, gh, gw] (stored float16) or None; files: N paths
    relative to the data root in dataset order; meta: dict of plain types (method, kind, input_size, cell_size, num_regions, object_ratio, source;
    objects: min_share, min_object). masks: objects only, uint8 [N, S, S] or None: the per-pixel object ids the
    labels were made from (instance ids, or 1 = CAM object), on the image resized to S x S, so that a crop can
    re-apply the 20% and 5% rules to its own patches (ObjMAE §3.2, §4.1); S x S bytes an image."""
    labels = torch.as_tensor(labels).to(torch.uint8).contiguous()
    if labels.dim() != 3 or labels.shape[0] != len(files):
        raise ValueError(f"labels must be [N, gh, gw] with N = {len(files)} files, got {tuple(labels.shape)}")
    obj = {"labels": labels, "files": [str(f) for f in files], "meta": dict(meta)}
    if masks is not None:
        masks = torch.as_tensor(masks).to(torch.uint8).contiguous()
        if masks.dim() != 3 or masks.shape[0] != len(files):
            raise ValueError(f"masks must be [N, S, S] with N = {len(files)} files, got {tuple(masks.shape)}")
        obj["masks"] = masks
    if scores is not None:
        scores = torch.as_tensor(scores).to(torch.float16).contiguous()
        if scores.shape != labels.shape:
            raise ValueError(f"scores shape {tuple(scores.shape)} differs from labels {tuple(labels.shape)}")
        obj["scores"] = scores
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = temp_file(folder, ".regions-")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())                    # on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def temp_file(folder, prefix):
    """mkstemp in folder (for an atomic rename into place), with the mode a plain open() would give: mkstemp makes
    0600, but other users of a shared cluster folder must read a regions file like a checkpoint (0644 under umask
    022). -> (fd, path)"""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def load_regions(path, files, input_size):
    """Load and check a regions file against the dataset's files and --input_size.
    -> {'labels': uint8 [N, gh, gw], 'scores': float16 [N, gh, gw] or None, 'masks': uint8 [N, S, S] or None,
    'files', 'meta'} (memory-mapped: DataLoader workers share the pages)."""
    if not os.path.isfile(path):
        raise ValueError(f"regions file {path} does not exist; make it with part_learn.py first")
    try:
        r = torch.load(path, weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path} is not a regions file ({type(e).__name__}); make it with part_learn.py") from None
    if not isinstance(r, dict) or not {"labels", "files", "meta"} <= r.keys():
        raise ValueError(f"{path} is not a regions file (no labels/files/meta); make it with part_learn.py")
    labels, scores, meta = r["labels"], r.get("scores"), r["meta"]
    if len(r["files"]) != len(files):
        raise ValueError(f"{path} has regions for {len(r['files'])} images but the dataset has {len(files)}; "
                         "make it with part_learn.py on the same data (--data_path / --num_images)")
    for i, (a, b) in enumerate(zip(r["files"], files)):
        if a != b:
            # built-in scenes are named shapes-<split>-<data seed>/..., so the fix is the seed, not a path
            same = ("the same built-in scenes (--data_seed, --num_images)" if a.startswith("shapes-")
                    or b.startswith("shapes-") else "the same --data_path")
            raise ValueError(f"{path} does not match the dataset: image {i} is '{a}' there but '{b}' in "
                             f"the dataset; make it with part_learn.py on {same}")
    if meta.get("input_size") != input_size:
        raise ValueError(f"{path} was made at input size {meta.get('input_size')} but --input_size is "
                         f"{input_size}; pass --input_size {meta.get('input_size')} or remake the regions")
    cell = meta.get("cell_size", 8)
    if not isinstance(cell, int) or not 0 < cell <= input_size or input_size % cell:
        raise ValueError(f"{path} has cell size {cell!r} in its meta, which does not divide input size {input_size}; "
                         "remake it with part_learn.py")
    grid = input_size // cell
    if (not isinstance(labels, torch.Tensor) or labels.dtype != torch.uint8
            or tuple(labels.shape) != (len(files), grid, grid)
            or (scores is not None and tuple(scores.shape) != tuple(labels.shape))):
        raise ValueError(f"{path} holds labels of shape {tuple(getattr(labels, 'shape', ()))}, expected uint8 "
                         f"[{len(files)}, {grid}, {grid}] for input size {input_size} and cell size {cell} "
                         "(and scores of the same shape); remake it with part_learn.py")
    regions = meta.get("num_regions")
    if isinstance(regions, int):                     # parts 0..K-1; objects 1..K (0 = background); 255 = ignore
        top = max((int(torch.where(c == IGNORE, 0, c).max()) for c in labels.split(1 << 16)), default=0)  # in chunks
        if top >= regions + (meta.get("kind") == "objects"):
            raise ValueError(f"{path} holds region id {top} but its meta says {regions} regions "
                             f"({meta.get('kind', 'parts')}); remake it with part_learn.py")
    masks = r.get("masks")
    if masks is not None and (not isinstance(masks, torch.Tensor) or masks.dtype != torch.uint8
                              or tuple(masks.shape) != (len(files), input_size, input_size)):
        raise ValueError(f"{path} holds object masks of shape {tuple(getattr(masks, 'shape', ()))}, expected uint8 "
                         f"[{len(files)}, {input_size}, {input_size}]; remake it with part_learn.py")
    return {"labels": labels, "scores": scores, "masks": masks, "files": r["files"], "meta": meta}


# ----------------------------------------------------------------------------- cells -> patches

def cells_to_patches(labels, factor, generator=None):
    """Part cells [B, gh, gw] -> one part per patch [B, (gh/f)*(gw/f)] (row-major patches) by majority vote over
    each f x f block of cells, ties broken at random (uniform over the tied parts: a lowest-id rule would favour
    part 0, and a patch-16 model over 8-px cells has a tie in about one patch in five). Ignore (255) wins only
    when the whole patch is ignore. f = 1 is a reshape. For parts only: objects need ObjMAE's 20% pixel rule on
    the patch's own pixels (ObjMAE §3.2), which cells cannot give, so object regions are made at the patch size.
    Pairwise comparisons, O(f^4) per patch: cheap for the f = 1, 2 that patch 8/16 over 8-px cells need."""
    B, gh, gw = labels.shape
    if gh % factor or gw % factor:
        raise ValueError(f"grid {gh}x{gw} is not a multiple of {factor} cells per patch side")
    if factor == 1:
        return labels.reshape(B, gh * gw)
    f = factor
    v = labels.reshape(B, gh // f, f, gw // f, f).permute(0, 1, 3, 2, 4).reshape(B, -1, f * f)  # [B, L, f*f]
    votes = (v[..., :, None] == v[..., None, :]).sum(-1)                  # [B, L, f*f] count of own label
    real = v != IGNORE
    votes = torch.where(real | ~real.any(-1, keepdim=True), votes, 0)    # ignore loses to any label
    # most votes first; among the cells of tied labels (equally many cells each) a uniform random key picks one
    key = torch.rand(v.shape, device=v.device, generator=generator)       # [B, L, f*f] in [0, 1)
    best = (votes + key).argmax(-1, keepdim=True)
    return v.gather(-1, best).squeeze(-1)


def scores_to_patches(scores, factor):
    """Cell scores [B, gh, gw] -> mean per patch [B, (gh/f)*(gw/f)] (row-major patches)."""
    B = scores.shape[0]
    if factor == 1:
        return scores.reshape(B, -1)
    return F.avg_pool2d(scores[:, None].float(), factor).reshape(B, -1)


# ----------------------------------------------------------------------------- joint random-resized crop
# MAE pre-trains on RandomResizedCrop(scale 0.2-1, bicubic) + flip (MAE Table 1f: crops beat resize-only), ObjMAE
# §4.2 "randomly cropped into 224x224", SemMAE §4.1 "only random horizontal flipping". As MAE's RandomResizedCrop,
# the box is drawn on the original H x W image and cut from it; the region cells (made on the image resized to
# S x S) cover the same H x W, so a box in the original's pixels maps onto them fractionally (`_axis_map`).
# Pure functions on tensors, any device, one image or a batch, so a GPU input path can call the same ones.

def _extent(size):
    """An image size: int (square) or (H, W) -> (H, W)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def crop_box(size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random crop box (top, left, h, w) in pixels of an image of `size` (int: square, or (H, W)), drawn from
    torch's global RNG by torchvision's RandomResizedCrop rule: up to 10 tries of an area share uniform in `scale`
    and an aspect ratio (w / h) log-uniform in `ratio`; the first that fits is placed uniformly at random; if none
    fits, the whole image clipped to the nearest ratio in `ratio`, centred."""
    H, W = _extent(size)
    log_ratio = torch.log(torch.tensor(ratio))                            # float32, as torchvision draws it
    for _ in range(10):
        area = H * W * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]))).item()
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            top = int(torch.randint(0, H - h + 1, size=(1,)).item())
            left = int(torch.randint(0, W - w + 1, size=(1,)).item())
            return top, left, h, w
    h, w = H, W
    if W / H < min(ratio):
        h = max(1, int(round(W / min(ratio))))    # at least one pixel: torchvision's rule would give an empty box
    elif W / H > max(ratio):                      # for a ratio beyond the image's side (99 at 32 px)
        w = max(1, int(round(H * max(ratio))))
    return (H - h) // 2, (W - w) // 2, h, w


def _boxes(box, n, kind=int):
    """One box (top, left, h, w) or n of them ([n, 4]) -> a list of n 4-tuples of `kind` (int for pixels, float
    for cells, which a box of fractional pixels may cut, as a centre crop's mapped onto the original does)."""
    rows = torch.as_tensor(box, dtype=torch.float64).reshape(-1, 4).tolist()
    if len(rows) not in (1, n):
        raise ValueError(f"{len(rows)} crop boxes for {n} images")
    return [tuple(kind(v) for v in r) for r in (rows * n if len(rows) == 1 else rows)]


def resized_crop(x, box, size):
    """Pixels in [0, 1], [3, H, W] or [B, 3, H, W] -> the box (top, left, h, w), or one box per image [B, 4],
    resized to size x size: bicubic with antialias (torchvision's RandomResizedCrop on a tensor; MAE's on a PIL image
    differs by PIL's rounding to 8 bits), clipped to [0, 1] as PIL's 8-bit output is. The same dtype and device as x."""
    one = x.dim() == 3
    xs = x[None] if one else x
    out = []
    for img, (t, l, h, w) in zip(xs, _boxes(box, len(xs))):
        patch = img[None, :, t:t + h, l:l + w].float()
        if (h, w) != (size, size):
            patch = F.interpolate(patch, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        out.append(patch.clamp(0, 1).to(x.dtype))
    out = torch.cat(out)
    return out[0] if one else out


def _axis_map(start, length, extent, g):
    """One axis of a crop on a grid of g cells over `extent` pixels of the original image: the box spans pixels
    [start, start + length) of it, split into g output cells. -> (nearest input cell per output cell [g], long: the
    cell under the output cell's centre; area weights [g, g], float64: the share of output cell j that lies in input
    cell i). float64 is exact here for integer boxes: the centre's cell is floor of a ratio of integers < 2**53."""
    j = torch.arange(g, dtype=torch.float64)
    nearest = torch.floor((2 * g * start + (2 * j + 1) * length) / (2 * extent)).long().clamp(0, g - 1)
    edges = start + torch.arange(g + 1, dtype=torch.float64) * length / g             # output cell edges, pixels
    cells = torch.arange(g + 1, dtype=torch.float64) * extent / g                      # input cell edges, pixels
    overlap = (torch.minimum(edges[1:, None], cells[None, 1:]) -
               torch.maximum(edges[:-1, None], cells[None, :-1])).clamp_min(0)         # [g_out, g_in]
    return nearest, overlap / (length / g)


def resized_crop_cells(labels, scores, box, size):
    """Region cells over an image of `size` (int: square, or (H, W): the original image, whatever the grid's own
    resolution), labels [gh, gw] or [B, gh, gw] and scores of the same shape (or None), -> the cells of the crop
    `box` (top, left, h, w in that image's pixels; or [B, 4]) resized to the same grid. Region ids are resampled
    nearest (the input cell under each output cell's centre: ids stay ids); scores by area (the mean of the input
    cells' scores weighted by how much of the output cell each covers)."""
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
            out_sc.append((wy @ sc[b].double() @ wx.T).to(sc.dtype))      # [gh, gw] area-weighted means
    out_lab = torch.stack(out_lab)
    out_sc = None if sc is None else torch.stack(out_sc)
    return (out_lab[0], None if out_sc is None else out_sc[0]) if one else (out_lab, out_sc)


def resized_crop_mask(mask, box, size, extent=None):
    """Instance mask np.uint8 [mh, mw] over an image of `extent` (H, W) pixels (None: the mask's own size) -> the
    crop box (top, left, h, w, in the image's pixels) resized to size x size, nearest (the mask pixel under each
    output pixel's centre; float64, exact for integer boxes): ids stay ids. A mask stored at S x S for an H x W image
    (the regions file's, the image cache's) is cropped by the same box as the image; the box may be fractional."""
    (mh, mw), (t, l, h, w) = mask.shape, (float(v) for v in box)
    H, W = (mh, mw) if extent is None else extent
    y = np.floor((2 * size * t + (2 * np.arange(size) + 1) * h) * mh / (2 * size * H)).astype(np.int64)
    x = np.floor((2 * size * l + (2 * np.arange(size) + 1) * w) * mw / (2 * size * W)).astype(np.int64)
    return np.ascontiguousarray(mask[y.clip(0, mh - 1)[:, None], x.clip(0, mw - 1)[None]])


# ----------------------------------------------------------------------------- image folders

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)   # what a bad file raises in PIL


def to_rgb(im):
    """Any PIL image -> an 8-bit RGB image that looks like the file does in a viewer:
    - 16-bit grey ('I;16', 'I;16B', ...): value * 255 / 65535 (PIL's convert would clip at 255: mostly white);
      32-bit integer ('I'): the same when the values fit 0..65535 (a 16-bit PNG or TIFF opened as 'I'), else
      its min..max stretched to 0..255; float ('F'): 0..1 -> 0..255 when the values are in [0, 1], else
      stretched min..max;
    - transparency (RGBA, LA, PA, or P/L/RGB with a transparent colour): composited over white, as a page
      shows it (dropping the alpha would bring back whatever colour the transparent pixels happen to hold);
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
    """Open and fully decode an image file -> PIL RGB (to_rgb). Raises one of IMAGE_ERRORS for a bad file."""
    with Image.open(path) as im:
        return to_rgb(im)


class FolderDataset:
    """ImageNet layout: root/<class>/<...>/<file>. Classes and files sorted, so every process and
    every stage sees the same order; `.files` are paths relative to root ('n01440764/x.JPEG').
    classes=False (pre-training and part learning, which need no labels): every image under root at any depth,
    class folders or none, target 0; sorted by top-level entry, then path, so a class-folder tree lists its
    files in the same order either way (and gives the same regions file)."""

    def __init__(self, root, masks_root=None, classes=True):
        if not os.path.isdir(root):
            layout = "ImageNet-layout folder (root/<class>/<image>)" if classes else "folder of images"
            raise ValueError(f"image folder {root} does not exist; pass --data_path a {layout}")
        self.root, self.masks_root = root, masks_root
        tops = sorted(os.scandir(root), key=lambda e: e.name)
        self.classes = [e.name for e in tops if e.is_dir()] if classes else []
        self.files, self.targets, self.skipped = [], [], []
        for entry in tops:
            if not entry.is_dir():                                         # a file at the top: no class folder
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
        if self.skipped and os.environ.get("RANK", "0") == "0":  # class counts must not shrink in silence
            more = len(self.skipped) - 5
            shown = ", ".join(self.skipped[:5]) + (f" and {more} more" if more > 0 else "")
            print(f"{root}: skipped {len(self.skipped)} files that are not {where} ({shown}); "
                  f"images are {' '.join(EXTENSIONS)}" + (" in root/<class>/" if classes else ""), flush=True)
        if not self.files:
            if classes:
                raise ValueError(f"image folder {root} has no images in class sub-folders; expected "
                                 f"root/<class>/<image> with one of {', '.join(EXTENSIONS)}")
            raise ValueError(f"image folder {root} has no images (at any depth) with one of {', '.join(EXTENSIONS)}")

    def __len__(self):
        return len(self.files)

    def load(self, i):
        """-> (PIL RGB image, instance mask np.uint8 [H, W] or None, class int)"""
        path = os.path.join(self.root, self.files[i])
        try:
            img = read_rgb(path)
        except IMAGE_ERRORS as e:
            # read during training: a UsageError here, the stage has no other place to say it (exit 2)
            raise UsageError(f"cannot read image {path} ({e}); delete or replace the file (python data.py --verify "
                             f"{self.root} lists every unreadable image at once)") from None
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
                raise UsageError(f"instance mask {mpath} must be a single-channel 8-bit PNG of the image's "
                                 f"size {img.height}x{img.width}, got shape {mask.shape}")
            mask = mask.astype(np.uint8)
        return img, mask, self.targets[i]


class _ReadCheck(torch.utils.data.Dataset):
    """'' for a readable image of a FolderDataset, else why it is not (for unreadable_images' workers)."""

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
    """Decode every image of a FolderDataset -> [(relative file, reason)] for those that cannot be read, all at
    once before training (the loader would stop at the first one, mid-epoch)."""
    loader = torch.utils.data.DataLoader(_ReadCheck(folder), batch_size=None, num_workers=num_workers)
    reasons = tqdm(loader, total=len(folder), desc=f"verify {folder.root}", leave=False, dynamic_ncols=True,
                   disable=not sys.stdout.isatty())                      # no carriage returns in a job's log
    return [(folder.files[i], why) for i, why in enumerate(reasons) if why]


# ----------------------------------------------------------------------------- COCO instance masks

def _rle_counts(counts):
    """pycocotools' compressed RLE string -> run lengths. Each char c holds 5 bits of (c - 48),
    least significant group first; 0x20 = more groups follow; 0x10 in the last group = negative.
    From the 4th run on, a run is stored as the difference to the run two before it."""
    runs, p, s = [], 0, counts.encode() if isinstance(counts, str) else counts
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = s[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x -= 1 << (5 * k)                       # sign-extend
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _decode_segmentation(seg, h, w):
    """One COCO `segmentation` -> bool [h, w]: polygons (list of [x1, y1, x2, y2, ...]) drawn with
    PIL, RLE ({'size', 'counts'} with a list or a compressed string) decoded column-major."""
    if isinstance(seg, list):
        canvas = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        for poly in seg:
            if len(poly) >= 6:
                draw.polygon([(float(poly[k]), float(poly[k + 1])) for k in range(0, len(poly) - 1, 2)], fill=1)
        return np.asarray(canvas, dtype=bool)
    rh, rw = seg["size"]
    runs = seg["counts"] if isinstance(seg["counts"], list) else _rle_counts(seg["counts"])
    if sum(runs) != rh * rw:
        raise UsageError(f"RLE runs sum to {sum(runs)}, not {rh}x{rw}: the COCO annotations are damaged")  # read lazily
    flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool)        # runs start with zeros
    return flat.reshape((rh, rw), order="F")


class CocoMasks(Mapping):
    """{file_name: np.uint8 [H, W] instance ids} that decodes an image's mask only when it is read:
    all of COCO train2014 decoded at once would not fit in memory."""

    def __init__(self, images, anns):
        self.images = {im["file_name"]: im for im in images}
        self.anns = anns                                                    # image id -> annotations

    def __getitem__(self, name):
        im = self.images[name]
        mask = np.zeros((im["height"], im["width"]), np.uint8)
        for k, a in enumerate(self.anns[im["id"]][:254], 1):
            mask[_decode_segmentation(a["segmentation"], im["height"], im["width"])] = k
        return mask

    def __iter__(self):
        return iter(self.images)

    def __len__(self):
        return len(self.images)


def coco_instance_masks(json_path, image_ids=None):
    """COCO instances JSON -> a CocoMasks mapping {file_name: np.uint8 [H, W]}: 0 = background,
    instances 1..k in annotation order (later ones overwrite overlaps, at most 254). Crowd annotations
    (iscrowd=1) mark groups, not single objects, so they stay background (ObjMAE §4.1 picks single
    objects). Masks are decoded when read, one image at a time."""
    try:
        with open(json_path) as f:
            coco = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read COCO annotations {json_path} ({e}); pass an instances_*.json file") from None
    wanted = None if image_ids is None else set(image_ids)
    images = [im for im in coco["images"] if wanted is None or im["id"] in wanted]
    anns = {im["id"]: [] for im in images}
    for a in coco.get("annotations", []):
        if a["image_id"] in anns and not a.get("iscrowd", 0):
            anns[a["image_id"]].append(a)
    return CocoMasks(images, anns)


# ----------------------------------------------------------------------------- objects per cell

def instance_cells(inst_mask, grid, min_share=0.2, min_object=0.05):
    """Instance mask [H, W] (0 = background) -> object id per cell, np.uint8 [gh, gw].

    ObjMAE §3.2: a cell belongs to an object when >= min_share (20%) of its pixels do; when
    several pass, the larger share wins (ties: the lower id). ObjMAE §4.1: objects covering
    < min_object (5%) of the image are dropped first and count as background. Ids keep their
    values from the mask (so they may have gaps); 0 = background.

    The rule is on a patch's own pixels, so objects are made with cells the size of the model's patches (objmae
    §4.1: patch 16 in every experiment): part_learn.py --cell_size 16 for a patch-16 model, and PretrainDataset
    at the patch size for the shapes' masks. Finer cells cannot be merged into it afterwards (a majority vote of
    8-px cells turns a patch that is 25-50% object into background), so pretrain.py refuses object regions whose
    cell size is not its patch size.
    """
    m = np.asarray(inst_mask)
    (H, W), (gh, gw) = m.shape, grid
    if H % gh or W % gw:
        raise ValueError(f"mask size {H}x{W} is not a multiple of the grid {gh}x{gw}; resize it first")
    area = np.bincount(m.ravel(), minlength=256)
    keep = (area >= min_object * H * W - 1e-6) & (np.arange(len(area)) > 0)
    ids = np.flatnonzero(keep)                                            # [n] ascending object ids
    if len(ids) == 0:
        return np.zeros((gh, gw), np.uint8)
    lut = np.zeros(len(area), np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)                                 # 0 = background / dropped
    ch, cw, n = H // gh, W // gw, len(ids) + 1
    cell = (np.arange(H)[:, None] // ch) * gw + np.arange(W)[None] // cw  # [H, W] cell index
    counts = np.bincount((cell * n + lut[m]).ravel(), minlength=gh * gw * n).reshape(gh * gw, n)
    obj = counts[:, 1:]                                                   # [cells, n-1]
    passed = np.where(obj >= min_share * ch * cw - 1e-6, obj, -1)
    best = passed.argmax(1)                                               # first max = lower id
    out = np.where(passed.max(1) >= 0, ids[best], 0)
    return out.reshape(gh, gw).astype(np.uint8)


def object_ratio(labels):
    """Mean object ratio of region cells [N, gh, gw] (or [gh, gw]): mean over every object of
    every image of (its cells / all cells). ObjMAE Eq. 1 counts pixels; we count cells after the
    20% rule, which is what the masking sees: object cells are the model's patches (`instance_cells`), so this
    is the seq_ratio hint of a model whose patch is the cell size. Ids 1..254 are objects. 0.0 when there are
    none."""
    lab = torch.as_tensor(labels).reshape(-1, labels.shape[-2] * labels.shape[-1]).long()
    n, c = lab.shape
    counts = torch.zeros(n, 256, dtype=torch.long).scatter_add_(1, lab, torch.ones_like(lab))[:, 1:IGNORE]
    present = counts > 0
    return float((counts[present].float() / c).mean()) if present.any() else 0.0


def mask_cells(mask, size, grid, min_share=0.2, min_object=0.05):
    """An instance mask of any size -> object id per cell of a size x size image, np.uint8 [gh, gw]: the
    mask is resized the way its image is (nearest, so ids stay ids), then `instance_cells`."""
    if mask.shape != (size, size):
        mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
    return instance_cells(mask, grid, min_share, min_object)


# ----------------------------------------------------------------------------- classification sets

class CIFAR100:
    """torchvision's CIFAR-100 with data.py's .load(i) -> (PIL, mask None, class) interface (32x32 images; the
    transforms resize them to --input_size, ObjMAE §4.1)."""

    def __init__(self, root, train, download):
        try:
            self.ds = torchvision.datasets.CIFAR100(root, train=train, download=download)
        except RuntimeError as e:
            raise ValueError(f"CIFAR-100 is not in {root} ({e}); pass --download, or --data_path the folder "
                             "that holds cifar-100-python/") from None
        self.classes = self.ds.classes
        self.files = [f"{'train' if train else 'test'}/{i:05d}" for i in range(len(self.ds))]  # for regions files

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


# ----------------------------------------------------------------------------- built-in shapes

SHAPES = ("circle", "square", "triangle", "diamond", "ring")
COLOURS = {"red": (205, 45, 40), "green": (45, 165, 60), "blue": (45, 85, 215), "yellow": (230, 200, 45)}
# class = colour x shape of the largest object in the scene: 20 classes, sorted like an image folder's
CLASSES = sorted(f"{c}_{s}" for c in COLOURS for s in SHAPES)
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}
SUPERSAMPLE = 4                  # shapes are drawn at 4x and box-filtered: anti-aliased edges


class ShapesDataset:
    """Procedural scenes: 1-4 objects (5 shapes x 4 colours, equal-area side 20-42% of the image
    side, so most survive objmae's 5% rule and cover whole 8-px cells) on a textured background
    (smooth noise + gradient + stripes, different in every image).

    Instance ids are 1..k in drawing order; later objects occlude earlier ones. The largest object
    is always drawn last (never occluded) and gives the class: `CLASSES[i] = '<colour>_<shape>'`.
    Every image is a pure function of (seed, split, index), so two processes agree and `seed=0`
    vs `seed=1` (or split 'train' vs 'val') give different images.
    """

    def __init__(self, num_images=2000, img_size=64, seed=0, split="train"):
        if num_images < 1 or img_size < 8:
            raise ValueError(f"ShapesDataset needs num_images >= 1 and img_size >= 8, got {num_images}, {img_size}")
        self.num_images, self.img_size, self.seed = num_images, img_size, seed
        if split not in ("train", "val"):
            raise ValueError(f"ShapesDataset split must be 'train' or 'val', got {split!r}")
        self.split = split
        # virtual names, matched against a regions file's: the seed and split are part of the name so a
        # regions file made from other scenes fails at load instead of labelling the wrong images
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
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=j, width=max(1, round(0.45 * r)))
            else:                                       # polygons inscribed in the circle of radius r
                n = 3 if name == "triangle" else 4
                t = 2 * np.pi * np.arange(n) / n
                u, v = r * np.cos(t), r * np.sin(t) * (0.65 if name == "diamond" else 1.0)
                ca, sa = np.cos(o["angle"]), np.sin(o["angle"])
                draw.polygon([(float(cx + a * ca - b * sa), float(cy + a * sa + b * ca)) for a, b in zip(u, v)],
                             fill=j)
        big = np.asarray(canvas)                                           # [sS, sS]
        n, pix = len(objs) + 1, np.arange(S * s) // s                      # sub-pixel -> pixel row/col
        counts = np.bincount(((pix[:, None] * S + pix[None]) * n + big).ravel(), minlength=S * S * n)
        cover = counts.reshape(S, S, n).transpose(2, 0, 1).astype(np.float32) / (s * s)  # [k+1, S, S] shares
        mask = cover.argmax(0).astype(np.uint8)          # most-covered id per pixel (ties: lower id)

        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S                 # [S, S] in [0, 1)
        img = cover[0][..., None] * self._background(rng, xx, yy)
        light = rng.normal(size=2)
        light /= np.linalg.norm(light) + 1e-6
        for j, o in enumerate(objs, 1):                 # flat colour with a soft light gradient
            d = ((xx * S - o["cx"]) * light[0] + (yy * S - o["cy"]) * light[1]) / o["radius"]
            shade = np.clip(1 + 0.2 * d, 0.75, 1.25)[..., None]
            img += cover[j][..., None] * (np.array(list(COLOURS.values())[o["colour"]]) + o["jitter"]) * shade
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
        stripes = rng.uniform(4, 16) * np.sin(2 * np.pi * (xx * np.cos(t[1]) + yy * np.sin(t[1])) / period)
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


# ----------------------------------------------------------------------------- fast input path (--image_cache)
# The default path above decodes and resizes every image in every epoch (PIL: ~3 ms an image at 224 px, so a
# DataLoader worker gives ~300 images/s) and ships float32 batches. The fast path decodes and resizes each image
# once into a uint8 cache file, and a worker only copies 3*S*S bytes and draws the random choices; the batch
# travels as uint8 (4x fewer bytes to pin and copy) and `device_batch` crops, flips and normalises it on the
# device. Cost: 3*S*S bytes of disk an image (ImageNet-1k at 224 px: 1,281,167 x 150,528 B = 193 GB).

def reserve_tensor_file(path, obj):
    """torch.save(obj, path) with space reserved for the tensors' bytes but nothing written there (a sparse file
    where the filesystem allows). `obj` is a dict whose tensors may be FakeTensors (a shape and a dtype, no memory:
    a 193 GB cache never exists in memory). -> {key: byte offset of obj[key]'s data in the file}, so that any
    process can write the rows later with os.pwrite. The file then loads with torch.load like any torch.save file;
    the zip CRC of those records is 0, which torch.load does not check (as after set_crc32_options(False))."""
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    if len(set(sizes.values())) != len(sizes):
        raise RuntimeError(f"reserve_tensor_file tells tensors apart by their size, but two share one: {sizes}")
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(obj, path)
    offsets = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        records = {r.file_size: r for r in z.infolist() if "/data/" in r.filename}   # <archive>/data/<key>
        for k, size in sizes.items():
            f.seek(records[size].header_offset)
            name_len, extra_len = struct.unpack("<26xHH", f.read(30))     # the zip local header (30 bytes + name +
            offsets[k] = records[size].header_offset + 30 + name_len + extra_len   # extra), then the data
    return offsets


def fake_tensor(shape, dtype):
    """A tensor with a shape and dtype but no storage, for reserve_tensor_file."""
    with FakeTensorMode():
        return torch.empty(shape, dtype=dtype)


def pwrite_all(fd, tensor, offset):
    """Write a CPU tensor's bytes at `offset` of the open file fd (os.pwrite may write less than asked)."""
    view = memoryview(tensor.contiguous().numpy()).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _CacheRows(torch.utils.data.Dataset):
    """What the cache stores of image i: uint8 [3, S, S], resized exactly as PretrainDataset resizes it (PIL
    bicubic), the original's (H, W) (int32 [2], where the crop box is drawn), and the instance mask resized as
    PretrainDataset resizes it (nearest), or an empty tensor."""

    def __init__(self, base, size, with_masks):
        self.base, self.size, self.with_masks = base, size, with_masks

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, mask, _ = self.base.load(i)
        S = self.size
        extent = torch.tensor([img.height, img.width], dtype=torch.int32)
        img = resized(img, S)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()  # [3, S, S]
        if not self.with_masks:
            return x, extent, torch.empty(0, dtype=torch.uint8)
        if mask is None:
            raise ValueError(f"image {self.base.files[i]} has no instance mask but image 0 has one")
        if mask.shape != (S, S):
            mask = np.asarray(Image.fromarray(mask).resize((S, S), Image.NEAREST))
        return x, extent, torch.from_numpy(np.array(mask, dtype=np.uint8))   # a writable copy


def open_image_cache(path, base, size, num_workers=4, rank=0, world=1):
    """The --image_cache file for `base` at size x size: checked against the images (as the regions file is) when it
    exists, written first when it does not. Under torchrun every rank writes its own contiguous block of rows into
    the one file that rank 0 reserved, then rank 0 renames it into place (atomic: a killed run leaves no cache, only
    <path>.tmp). The file is a torch.save dict {'images': uint8 [N, 3, S, S], 'masks': uint8 [N, S, S] (datasets
    with instance masks), 'files', 'meta'}, read through a memory map, so every DataLoader worker and every rank on
    a machine share its pages. It must be on a filesystem that every node sees. -> the checked cache.
    'sizes' (int32 [N, 2]) holds each original's (H, W): the crop box is drawn on the original, as in
    PretrainDataset, and mapped onto the stored square (`cache_box`)."""
    if os.path.isdir(path):
        raise ValueError(f"--image_cache {path} is a folder; pass a file name (e.g. {os.path.join(path, 'cache.pt')})")
    exists = [os.path.isfile(path)]
    if world > 1:                                   # rank 0 decides, so all ranks take the same branch
        dist.broadcast_object_list(exists, src=0)
    if not exists[0]:
        write_image_cache(path, base, size, num_workers, rank, world)
    return load_image_cache(path, base.files, size)


def write_image_cache(path, base, size, num_workers, rank, world):
    n, tmp = len(base), f"{path}.tmp"
    with_masks = base.load(0)[1] is not None
    row = 3 * size * size
    need = n * (row + (size * size if with_masks else 0))
    if rank == 0:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < need:
            raise ValueError(f"--image_cache {path} needs {need / 1e9:.1f} GB ({n} images x 3 x {size} x {size} bytes) "
                             f"but {folder} has {free / 1e9:.1f} GB free; pass a path on a larger disk, or omit "
                             "--image_cache to decode the images every epoch")
        obj = {"images": fake_tensor((n, 3, size, size), torch.uint8), "sizes": fake_tensor((n, 2), torch.int32),
               "files": list(base.files),
               "meta": {"kind": "image_cache", "input_size": size, "resize": "PIL bicubic, whole image"}}
        if with_masks:
            obj["masks"] = fake_tensor((n, size, size), torch.uint8)
        offsets = reserve_tensor_file(tmp, obj)
        print(f"writing the image cache {path}: {n} images at {size} px, {need / 1e9:.2f} GB", flush=True)
    offsets = [offsets if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(offsets, src=0)  # also the barrier: the reserved file exists now
    offsets = offsets[0]
    lo, hi = rank * n // world, (rank + 1) * n // world
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(_CacheRows(base, size, with_masks), range(lo, hi)),
                                         batch_size=64, num_workers=num_workers,
                                         generator=torch.Generator())   # leaves the global RNG (the run's) alone
    fd = os.open(tmp, os.O_WRONLY)
    try:
        i = lo
        for imgs, sizes, masks in tqdm(loader, desc="image cache", disable=rank != 0 or not sys.stdout.isatty(),
                                       leave=False, dynamic_ncols=True):
            pwrite_all(fd, imgs, offsets["images"] + i * row)             # rows i .. i+b-1, in order
            pwrite_all(fd, sizes, offsets["sizes"] + i * 8)
            if with_masks:
                pwrite_all(fd, masks, offsets["masks"] + i * size * size)
            i += len(imgs)
        os.fsync(fd)
    except BaseException:                           # Ctrl-C or a full disk: no half-written cache left behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    if world > 1:
        dist.barrier()                              # every rank's rows are on disk
    if rank == 0:
        fsync_path(tmp)
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)                            # the rename too
        finally:
            os.close(fd)
    if world > 1:
        dist.barrier()


def load_image_cache(path, files, size):
    """Open and check an image cache against the dataset's files and the input size (like load_regions).
    -> {'images': uint8 [N, 3, S, S], 'masks': uint8 [N, S, S] or None, 'files', 'meta', 'path'}, memory-mapped."""
    if not os.path.isfile(path):
        raise ValueError(f"image cache {path} does not exist on this machine; put --image_cache on a filesystem "
                         "that every node sees")
    try:
        c = torch.load(path, weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path} is not an image cache ({type(e).__name__}); pass another --image_cache path, or "
                         "delete it to write a new one") from None
    if not isinstance(c, dict) or not isinstance(c.get("meta"), dict) or c["meta"].get("kind") != "image_cache":
        raise ValueError(f"{path} is not an image cache; pass another --image_cache path, or delete it to write one")
    if len(c["files"]) != len(files):
        raise ValueError(f"image cache {path} holds {len(c['files'])} images but the dataset has {len(files)}; pass "
                         "the --image_cache of this --data_path (or delete it to write a new one)")
    for i, (a, b) in enumerate(zip(c["files"], files)):
        if a != b:
            raise ValueError(f"image cache {path} does not match the dataset: image {i} is '{a}' there but '{b}' in "
                             "the dataset; pass the --image_cache of this --data_path (or delete it to write a new one)")
    if "sizes" not in c:
        raise ValueError(f"image cache {path} does not hold the images' original sizes (written by an older version); "
                         "delete it to write a new one")
    if c["meta"].get("input_size") != size or tuple(c["images"].shape) != (len(files), 3, size, size):
        raise ValueError(f"image cache {path} holds images of {c['meta'].get('input_size')} px but --input_size is "
                         f"{size}; pass --input_size {c['meta'].get('input_size')} or another --image_cache path")
    return {"images": c["images"], "sizes": c["sizes"], "masks": c.get("masks"), "files": c["files"],
            "meta": c["meta"], "path": path}


class CachedPretrainDataset(PretrainDataset):
    """PretrainDataset's samples from the image cache: the same random choices from torch's global RNG in the same
    order (crop box, then coin), applied to the cells here (small), but the image is returned as it is in the
    cache, uint8 [3, S, S], with the choices beside it for `device_batch`:
    (img uint8 [3, S, S], cell_labels long, cell_scores float, target, flip bool [], box long [4] (top, left, h, w)).
    The box is drawn on the original's H x W (the cache's 'sizes'), so the cells are the default path's exactly;
    the image is cut from the stored S x S square with that box rounded to its pixels (`cache_box`), which is
    close to, not equal to, the default path's cut from the original (README: the fast input path)
    `cache` is open_image_cache's. Forked DataLoader workers share its memory map; spawned ones get only its path
    and map the file themselves (pickling the map would copy the whole cache)."""

    def __init__(self, base, cache, input_size, regions=None, hflip=True, cell_size=8, crop_scale=None,
                 crop_ratio=(3 / 4, 4 / 3)):
        super().__init__(base, input_size, regions, hflip, cell_size, crop_scale, crop_ratio)
        self.cache_path, self.cache = cache["path"], cache

    def __getstate__(self):
        return {**self.__dict__, "cache": None}

    def __getitem__(self, i):
        if self.cache is None:                      # a spawned worker: the parent process checked the file
            c = torch.load(self.cache_path, weights_only=True, mmap=True)
            self.cache = {"images": c["images"], "sizes": c["sizes"], "masks": c.get("masks")}
        img, S = self.cache["images"][i], self.size                       # [3, S, S] uint8, a view of the map
        extent = tuple(int(v) for v in self.cache["sizes"][i])            # the original's (H, W)
        mask = None if self.cache["masks"] is None else self.cache["masks"][i].numpy()   # already S x S
        box = None if self.crop_scale is None else crop_box(extent, self.crop_scale, self.crop_ratio)
        labels, scores = self.cells(i, mask, box, extent)
        box = (0, 0, S, S) if box is None else cache_box(box, extent, S)
        flip = bool(self.hflip and torch.rand(()) < 0.5)
        if flip:
            labels, scores = labels.flip(-1), scores.flip(-1)
        return img, labels, scores, self.base.targets[i], torch.tensor(flip), torch.tensor(box)


def cache_box(box, extent, size):
    """A crop box (top, left, h, w) in pixels of an H x W original -> the same box on its size x size resized
    copy, edges rounded to the nearest pixel (halves up), at least 1 pixel each way."""
    (t, l, h, w), (H, W) = box, extent
    top, left = (2 * t * size + H) // (2 * H), (2 * l * size + W) // (2 * W)
    bottom, right = (2 * (t + h) * size + H) // (2 * H), (2 * (l + w) * size + W) // (2 * W)
    top, left = min(top, size - 1), min(left, size - 1)
    return top, left, max(1, bottom - top), max(1, right - left)


_MEAN_STD = {}


def device_batch(imgs, flips, boxes=None):
    """The fast path's image ops on the batch's own device, in PretrainDataset's order: uint8 [B, 3, S, S] -> [0, 1]
    (as TF.to_tensor), each image's crop box [B, 4] resized back to S x S (`resized_crop`; None = no crop; keep the
    boxes on the CPU, reading them is then no device sync), flipped where flips [B] is True, normalised with
    ImageNet's mean and std (as TF.normalize). -> float [B, 3, S, S], the default path's tensors up to float
    rounding."""
    x = imgs.float().div(255)
    if boxes is not None:
        x = resized_crop(x, boxes, x.shape[-1])
    x = torch.where(flips.to(x.device, non_blocking=True)[:, None, None, None], x.flip(-1), x)
    if x.device not in _MEAN_STD:                   # made once per device: a host-to-device copy is a sync
        _MEAN_STD[x.device] = (torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None],
                               torch.tensor(IMAGENET_STD, device=x.device)[:, None, None])
    mean, std = _MEAN_STD[x.device]
    return x.sub(mean).div(std)


# ----------------------------------------------------------------------------- pictures

def denormalise(imgs):
    """[B, 3, H, W] normalised images -> [0, 1] pixels on the CPU, for pictures."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (imgs.float().cpu() * std[:, None, None] + mean[:, None, None]).clamp(0, 1)


def save_with_headings(path, images, headings):
    """Pictures that explain themselves: images [R * C, 3, H, W] in [0, 1], row by row, C = len(headings) per
    row -> one PNG: torchvision's grid (1-px black lines) under a white band with each column's heading, drawn
    with PIL's built-in font. Images narrower than their heading are enlarged by a whole factor (nearest), so
    each image pixel becomes a block of one colour; otherwise the cells hold the images' pixels as save_image
    writes them."""
    font = ImageFont.load_default()
    boxes = [ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), h, font=font) for h in headings]
    scale = max(1, math.ceil((max(b[2] for b in boxes) + 4) / images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    grid = torchvision.utils.make_grid(images, nrow=len(headings), padding=1)            # [3, H', W']
    pixels = grid.mul(255).add(0.5).clamp(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()  # as save_image
    band = max(b[3] for b in boxes) + 6                                   # the headings' height + a margin
    canvas = Image.new("RGB", (pixels.shape[1], band + pixels.shape[0]), "white")
    canvas.paste(Image.fromarray(pixels), (0, band))
    draw, width = ImageDraw.Draw(canvas), images.shape[-1]
    for c, (heading, box) in enumerate(zip(headings, boxes)):
        left = 1 + c * (width + 1)                                        # column c's first pixel in the grid
        draw.text((left + (width - box[2]) // 2, 3), heading, fill="black", font=font)
    canvas.save(path)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Write the built-in shapes scenes as an image folder + instance masks, "
                                            "or list every unreadable image of image folders.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", metavar="OUT", help="output folder (gets images/ and masks/)")
    what.add_argument("--verify", nargs="+", metavar="FOLDER",
                      help="image folders (root/<class>/<image>): decode every image, list all unreadable ones")
    p.add_argument("--num_images", type=int, default=2000)
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="--verify: decoding processes")
    a = p.parse_args()
    if a.verify:
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
        print(f"{len(bad)} of {total} images cannot be read" + ("; delete or replace them" if bad else ""))
        raise SystemExit(2 if bad else 0)
    ds = ShapesDataset(a.num_images, a.img_size, a.seed, a.split)
    n = write_shapes(ds, a.write)
    print(f"wrote {n} images of {a.img_size}x{a.img_size} in {len(ds.classes)} classes to "
          f"{os.path.join(a.write, 'images')} and their instance masks to {os.path.join(a.write, 'masks')}")

