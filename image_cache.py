"""The fast input path (--image_cache), opt-in: each image decoded and resized once into a uint8
cache file that every epoch, rank and run then reads through a memory map.

- `open_image_cache`: the cache of a dataset at S x S, written first (every rank its own rows) when
  it does not exist, checked against the dataset (as the regions file is) when it does.
- `CachedPretrainDataset`: data.PretrainDataset's samples from the cache, the image left uint8.
- `device_batch`: crop, flip and normalise the uint8 batch on the device.
- `reserve_tensor_file`, `pwrite_all`: a torch.save file whose tensors' bytes any process writes
  later (also part_learn.py's sharded regions export).

The default path (data.PretrainDataset) decodes and resizes every image in every epoch (PIL: ~3 ms
an image at 224 px, so a DataLoader worker gives ~300 images/s) and ships float32 batches. Here a
worker only copies 3*S*S bytes and draws the random choices; the batch travels as uint8 (4x fewer
bytes to pin and copy). Cost: 3*S*S bytes of disk an image (ImageNet-1k at 224 px: 1,281,167 x
150,528 B = 193 GB).

References: MAE He et al., CVPR 2022, arXiv:2111.06377 (the random-resized crop the batches get).
"""
import contextlib
import os
import shutil
import struct
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
# FakeTensorMode has no public alias; torch.serialization.skip_data (public) writes FakeTensors (its
# materialize_fake_tensors), the one way to torch.save a file larger than memory without its bytes
from torch._subclasses.fake_tensor import FakeTensorMode
from tqdm import tqdm

import data
import runs


# ---------------------------------------------------------------- a torch.save file written later

def reserve_tensor_file(path, obj):
    """torch.save(obj, path) with space reserved for the tensors' bytes but nothing written there (a
    sparse file where the filesystem allows). `obj` is a dict whose tensors may be FakeTensors (a
    shape and a dtype, no memory: a 193 GB cache never exists in memory). -> {key: byte offset of
    obj[key]'s data in the file}, so that any process can write the rows later with os.pwrite. The
    file then loads with torch.load like any torch.save file; the zip CRC of those records is 0,
    which torch.load does not check (as after set_crc32_options(False))."""
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    if len(set(sizes.values())) != len(sizes):
        raise RuntimeError(f"reserve_tensor_file tells tensors apart by their size, but two share "
                           f"one: {sizes}")
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(obj, path)
    offsets = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        records = {r.file_size: r for r in z.infolist() if "/data/" in r.filename}  # .../data/<key>
        for k, size in sizes.items():
            # a zip record: a 30-byte local header (name and extra field lengths at bytes 26-29),
            # the name, the extra field (torch's alignment padding), then the data
            f.seek(records[size].header_offset)
            name_len, extra_len = struct.unpack("<26xHH", f.read(30))
            offsets[k] = records[size].header_offset + 30 + name_len + extra_len
    return offsets


def fake_tensor(shape, dtype):
    """A tensor with a shape and dtype but no storage, for reserve_tensor_file."""
    with FakeTensorMode():
        return torch.empty(shape, dtype=dtype)


def pwrite_all(fd, tensor, offset):
    """Write a CPU tensor's bytes at `offset` of the open file fd (os.pwrite may write less than
    asked)."""
    view = memoryview(tensor.contiguous().numpy()).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# ---------------------------------------------------------------- writing and opening the cache

class _CacheRows(torch.utils.data.Dataset):
    """What the cache stores of image i: uint8 [3, S, S], resized exactly as data.PretrainDataset
    resizes it (PIL bicubic), the original's (H, W) (int32 [2], where the crop box is drawn), and
    the instance mask resized as data.PretrainDataset resizes it (nearest), or an empty tensor."""

    def __init__(self, base, size, with_masks):
        self.base, self.size, self.with_masks = base, size, with_masks

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, mask, _ = self.base.load(i)
        S = self.size
        extent = torch.tensor([img.height, img.width], dtype=torch.int32)
        pixels = np.asarray(data.resized(img, S), dtype=np.uint8).copy()
        x = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()       # [3, S, S]
        if not self.with_masks:
            return x, extent, torch.empty(0, dtype=torch.uint8)
        if mask is None:
            raise ValueError(f"image {self.base.files[i]} has no instance mask but image 0 has one")
        if mask.shape != (S, S):
            mask = np.asarray(Image.fromarray(mask).resize((S, S), Image.NEAREST))
        return x, extent, torch.from_numpy(np.array(mask, dtype=np.uint8))   # a writable copy


def open_image_cache(path, base, size, num_workers=4, rank=0, world=1):
    """The --image_cache file for `base` at size x size: checked against the images (as the regions
    file is) when it exists, written first when it does not. Under torchrun every rank writes its
    own contiguous block of rows into the one file that rank 0 reserved, then rank 0 renames it
    into place (atomic: a killed run leaves no cache, only <path>.tmp). The file is a torch.save
    dict {'images': uint8 [N, 3, S, S], 'sizes': int32 [N, 2], 'masks': uint8 [N, S, S] (datasets
    with instance masks), 'files', 'meta'}, read through a memory map, so every DataLoader worker
    and every rank on a machine share its pages. It must be on a filesystem that every node sees.
    'sizes' holds each original's (H, W): the crop box is drawn on the original, as in
    data.PretrainDataset, and mapped onto the stored square (`cache_box`). -> the checked cache."""
    if os.path.isdir(path):
        raise ValueError(f"--image_cache {path} is a folder; pass a file name "
                         f"(e.g. {os.path.join(path, 'cache.pt')})")
    exists = [os.path.isfile(path)]
    if world > 1:                               # rank 0 decides: every rank takes the same branch
        dist.broadcast_object_list(exists, src=0)
    if not exists[0]:
        write_image_cache(path, base, size, num_workers, rank, world)
    return load_image_cache(path, base.files, size)


def reserve_cache(path, tmp, base, size, with_masks):
    """Rank 0: check the disk has room, then reserve the cache file `tmp`. -> reserve_tensor_file's
    offsets."""
    n = len(base)
    need = n * (3 * size * size + (size * size if with_masks else 0))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ValueError(f"--image_cache {path} needs {need / 1e9:.1f} GB ({n} images x 3 x "
                         f"{size} x {size} bytes) but {folder} has {free / 1e9:.1f} GB free; "
                         "pass a path on a larger disk, or omit --image_cache to decode the images "
                         "every epoch")
    obj = {"images": fake_tensor((n, 3, size, size), torch.uint8),
           "sizes": fake_tensor((n, 2), torch.int32), "files": list(base.files),
           "meta": {"kind": "image_cache", "input_size": size,
                    "resize": "PIL bicubic, whole image"}}
    if with_masks:
        obj["masks"] = fake_tensor((n, size, size), torch.uint8)
    offsets = reserve_tensor_file(tmp, obj)
    print(f"writing the image cache {path}: {n} images at {size} px, {need / 1e9:.2f} GB",
          flush=True)
    return offsets


def write_image_cache(path, base, size, num_workers, rank, world):
    """Write the cache of open_image_cache: rank 0 reserves <path>.tmp, every rank writes its block
    of rows, rank 0 renames it into place."""
    n, tmp, px = len(base), f"{path}.tmp", size * size
    with_masks = base.load(0)[1] is not None
    offsets = [reserve_cache(path, tmp, base, size, with_masks) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(offsets, src=0)  # also the barrier: the reserved file exists now
    offsets = offsets[0]
    lo, hi = rank * n // world, (rank + 1) * n // world
    rows = torch.utils.data.Subset(_CacheRows(base, size, with_masks), range(lo, hi))
    loader = torch.utils.data.DataLoader(rows, batch_size=64, num_workers=num_workers,
                                         generator=torch.Generator())  # not the run's global RNG
    fd = os.open(tmp, os.O_WRONLY)
    try:
        i = lo
        for imgs, sizes, masks in tqdm(loader, desc="image cache", leave=False, dynamic_ncols=True,
                                       disable=rank != 0 or not sys.stdout.isatty()):
            pwrite_all(fd, imgs, offsets["images"] + i * 3 * px)        # rows i .. i+b-1, in order
            pwrite_all(fd, sizes, offsets["sizes"] + i * 8)
            if with_masks:
                pwrite_all(fd, masks, offsets["masks"] + i * px)
            i += len(imgs)
        os.fsync(fd)                                # the file's pages on this node, header too
    except BaseException:                           # Ctrl-C or a full disk: no half-written cache
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    if world > 1:
        dist.barrier()                              # every rank's rows are on disk
    if rank == 0:
        os.replace(tmp, path)
        runs.fsync_dir(os.path.dirname(os.path.abspath(path)))   # the rename too
    if world > 1:
        dist.barrier()


def load_image_cache(path, files, size):
    """Open and check an image cache against the dataset's files and the input size (as
    region_file.load_regions checks a regions file).
    -> {'images': uint8 [N, 3, S, S], 'masks': uint8 [N, S, S] or None, 'files', 'meta', 'path'},
    memory-mapped."""
    if not os.path.isfile(path):
        raise ValueError(f"image cache {path} does not exist on this machine; put --image_cache "
                         "on a filesystem that every node sees")
    try:
        c = torch.load(path, weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path} is not an image cache ({type(e).__name__}); pass another "
                         "--image_cache path, or delete it to write a new one") from None
    meta = c.get("meta") if isinstance(c, dict) else None
    if not (isinstance(meta, dict) and meta.get("kind") == "image_cache" and "sizes" in c):
        raise ValueError(f"{path} is not an image cache; pass another --image_cache path, "
                         "or delete it to write one")
    if len(c["files"]) != len(files):
        raise ValueError(f"image cache {path} holds {len(c['files'])} images but the dataset has "
                         f"{len(files)}; pass the --image_cache of this --data_path (or delete it "
                         "to write a new one)")
    for i, (a, b) in enumerate(zip(c["files"], files)):
        if a != b:
            raise ValueError(f"image cache {path} does not match the dataset: image {i} is '{a}' "
                             f"there but '{b}' in the dataset; pass the --image_cache of this "
                             "--data_path (or delete it to write a new one)")
    if meta.get("input_size") != size or tuple(c["images"].shape) != (len(files), 3, size, size):
        raise ValueError(f"image cache {path} holds images of {meta.get('input_size')} px but "
                         f"--input_size is {size}; pass --input_size {meta.get('input_size')} or "
                         "another --image_cache path")
    return {"images": c["images"], "sizes": c["sizes"], "masks": c.get("masks"),
            "files": c["files"], "meta": meta, "path": path}


# ---------------------------------------------------------------- samples and batches

class CachedPretrainDataset(data.PretrainDataset):
    """data.PretrainDataset's samples from the image cache: the same random choices from torch's
    global RNG in the same order (crop box, then coin), applied to the cells here (small), but the
    image is returned as it is in the cache, uint8 [3, S, S], with the choices beside it for
    `device_batch`: (img uint8 [3, S, S], cell_labels long, cell_scores float, target, flip bool [],
    box long [4] (top, left, h, w)). The box is drawn on the original's H x W (the cache's 'sizes'),
    so the cells are the default path's exactly; the image is cut from the stored S x S square with
    that box rounded to its pixels (`cache_box`), which is close to, not equal to, the default
    path's cut from the original (README: the fast input path). `cache` is open_image_cache's.
    Forked DataLoader workers share its memory map; spawned ones get only its path and map the file
    themselves (pickling the map would copy the whole cache)."""

    def __init__(self, base, cache, input_size, regions=None, hflip=True, cell_size=8,
                 crop_scale=None, crop_ratio=(3 / 4, 4 / 3)):
        super().__init__(base, input_size, regions, hflip, cell_size, crop_scale, crop_ratio)
        self.cache_path, self.cache = cache["path"], cache

    def __getstate__(self):
        return {**self.__dict__, "cache": None}

    def __getitem__(self, i):
        if self.cache is None:              # a spawned worker: the parent process checked the file
            c = torch.load(self.cache_path, weights_only=True, mmap=True)
            self.cache = {"images": c["images"], "sizes": c["sizes"], "masks": c.get("masks")}
        img, S, masks = self.cache["images"][i], self.size, self.cache["masks"]  # img: in the map
        extent = tuple(int(v) for v in self.cache["sizes"][i])            # the original's (H, W)
        mask = None if masks is None else masks[i].numpy()                # already S x S
        box = None
        if self.crop_scale is not None:
            box = data.crop_box(extent, self.crop_scale, self.crop_ratio)
        labels, scores = self.cells(i, mask, box, extent)
        box = (0, 0, S, S) if box is None else cache_box(box, extent, S)
        flip = bool(self.hflip and torch.rand(()) < 0.5)
        if flip:
            labels, scores = labels.flip(-1), scores.flip(-1)
        return img, labels, scores, self.base.targets[i], torch.tensor(flip), torch.tensor(box)


def cache_box(box, extent, size):
    """A crop box (top, left, h, w) in pixels of an H x W original -> the same box on its size x
    size resized copy, edges rounded to the nearest pixel (halves up), at least 1 pixel each way."""
    (t, l, h, w), (H, W) = box, extent
    top, left = (2 * t * size + H) // (2 * H), (2 * l * size + W) // (2 * W)
    bottom, right = (2 * (t + h) * size + H) // (2 * H), (2 * (l + w) * size + W) // (2 * W)
    top, left = min(top, size - 1), min(left, size - 1)
    return top, left, max(1, bottom - top), max(1, right - left)


_MEAN_STD = {}


def device_batch(imgs, flips, boxes=None):
    """The fast path's image ops on the batch's own device, in data.PretrainDataset's order: uint8
    [B, 3, S, S] -> [0, 1] (as TF.to_tensor), each image's crop box [B, 4] resized back to S x S
    (`data.resized_crop`; None = no crop; keep the boxes on the CPU, reading them is then no device
    sync), flipped where flips [B] is True, normalised with ImageNet's mean and std (as
    TF.normalize). -> float [B, 3, S, S], the default path's tensors up to float rounding."""
    x = imgs.float().div(255)
    if boxes is not None:
        x = data.resized_crop(x, boxes, x.shape[-1])
    x = torch.where(flips.to(x.device, non_blocking=True)[:, None, None, None], x.flip(-1), x)
    if x.device not in _MEAN_STD:       # made once per device: a host-to-device copy is a sync
        _MEAN_STD[x.device] = (torch.tensor(data.IMAGENET_MEAN, device=x.device)[:, None, None],
                               torch.tensor(data.IMAGENET_STD, device=x.device)[:, None, None])
    mean, std = _MEAN_STD[x.device]
    return x.sub(mean).div(std)
