"""The regions file (stage 1 -> stage 2): a region id per grid cell of every image, and the rules
that make them.

- `save_regions` / `load_regions`: the file, written atomically, checked against the dataset when
  read.
- Cells to patches inside the training loop: `cells_to_patches` (parts), `scores_to_patches`.
- Objects per cell from an instance mask (ObjMAE §3.2's 20% rule, §4.1's 5% rule):
  `instance_cells`, `mask_cells` (a mask of any size, resized as its image), `object_ratio`.
- `foreground_iou`: how well regions separate the shapes' objects from the background
  (part_learn.py --eval_iou).
- `coco_instance_masks`: COCO instance annotations (polygons and RLE) as instance-id masks.
- `export`, `merge_shards`: the file written by every rank at once (part_learn.py), a batch in
  memory at a time.

References (cited in the comments as "SemMAE §3.2, Alg. 1", "ObjMAE Table 8", "MAE Table 1f"):
  SemMAE  Li et al., SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders. NeurIPS 2022,
          arXiv:2206.10207
  ObjMAE  Wu & Mo, Object-wise Masked Autoencoders for Fast Pre-training. 2022, arXiv:2205.14338
  MAE     He et al., Masked Autoencoders Are Scalable Vision Learners. CVPR 2022, arXiv:2111.06377
"""
import contextlib
import json
import os
import tempfile
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

import runs
from utils import UsageError

IGNORE = 255                     # region id of a cell with no label


# ---------------------------------------------------------------- the regions file

def save_regions(path, labels, scores, files, meta, masks=None):
    """Write the regions file atomically (temp file in the same folder, then os.replace).
    labels: uint8 [N, gh, gw]; scores: [N, gh, gw] (stored float16) or None; files: N paths
    relative to the data root in dataset order; meta: dict of plain types (method, kind, input_size,
    cell_size, num_regions, object_ratio, source; objects: min_share, min_object). masks: objects
    only, uint8 [N, S, S] or None: the per-pixel object ids the labels were made from (instance ids,
    or 1 = CAM object), on the image resized to S x S, so that a crop can re-apply the 20% and 5%
    rules to its own patches (ObjMAE §3.2, §4.1); S x S bytes an image."""
    labels = torch.as_tensor(labels).to(torch.uint8).contiguous()
    obj = {"labels": labels, "files": [str(f) for f in files], "meta": dict(meta)}
    if masks is not None:
        obj["masks"] = torch.as_tensor(masks).to(torch.uint8).contiguous()
    if scores is not None:
        obj["scores"] = torch.as_tensor(scores).to(torch.float16).contiguous()
    try:      # what every reader would refuse is the writer's bug: stop it here, with its traceback
        check_regions(path, obj, obj["files"], meta.get("input_size"))
    except ValueError as e:
        raise AssertionError(f"save_regions would write a file load_regions refuses: {e}") from None
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
    """mkstemp in folder (for an atomic rename into place), with the mode a plain open() would give:
    mkstemp makes 0600, but other users of a shared cluster folder must read a regions file like a
    checkpoint (0644 under umask 022). -> (fd, path)"""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def load_regions(path, files, input_size):
    """Load and check a regions file against the dataset's files and --input_size.
    -> {'labels': uint8 [N, gh, gw], 'scores': float16 [N, gh, gw] or None, 'masks': uint8 [N, S, S]
    or None, 'files', 'meta'} (memory-mapped: DataLoader workers share the pages)."""
    if not os.path.isfile(path):
        raise ValueError(f"regions file {path} does not exist; make it with part_learn.py first")
    try:                                  # a torch.save file holding a dict of these three
        r = torch.load(path, weights_only=True, mmap=True)
        missing = {"labels", "meta", "files"} - set(r)
    except Exception as e:
        raise ValueError(f"{path} is not a regions file ({type(e).__name__}); "
                         "make it with part_learn.py") from None
    if missing:
        raise ValueError(f"{path} is not a regions file (it has no {', '.join(sorted(missing))}); "
                         "make it with part_learn.py")
    check_regions(path, r, files, input_size)
    return {"labels": r["labels"], "scores": r.get("scores"), "masks": r.get("masks"),
            "files": r["files"], "meta": r["meta"]}


def check_regions(path, r, files, input_size):
    """A regions file's contents r against the dataset's files and --input_size: ValueError naming
    what does not match and the fix."""
    labels, scores, meta, names = r["labels"], r.get("scores"), r["meta"], r["files"]
    if len(names) != len(files):
        raise ValueError(f"{path} has regions for {len(names)} images but the dataset has "
                         f"{len(files)}; make it with part_learn.py on the same data "
                         "(--data_path / --num_images)")
    for i, (a, b) in enumerate(zip(names, files)):
        if a != b:
            # built-in scenes are named shapes-<split>-<data seed>/...: the fix is the seed, not a
            # path
            scenes = a.startswith("shapes-") or b.startswith("shapes-")
            same = ("the same built-in scenes (--data_seed, --num_images)" if scenes
                    else "the same --data_path")
            raise ValueError(f"{path} does not match the dataset: image {i} is '{a}' there but "
                             f"'{b}' in the dataset; make it with part_learn.py on {same}")
    if meta.get("input_size") != input_size:
        made = meta.get("input_size")
        raise ValueError(f"{path} was made at input size {made} but --input_size is {input_size}; "
                         f"pass --input_size {made} or remake the regions")
    cell = meta.get("cell_size", 8)
    if not isinstance(cell, int) or not 0 < cell <= input_size or input_size % cell:
        raise ValueError(f"{path} has cell size {cell!r} in its meta, which does not divide input "
                         f"size {input_size}; remake it with part_learn.py")
    grid = input_size // cell
    if (not isinstance(labels, torch.Tensor) or labels.dtype != torch.uint8
            or tuple(labels.shape) != (len(files), grid, grid)
            or (scores is not None and tuple(scores.shape) != tuple(labels.shape))):
        raise ValueError(f"{path} holds labels of shape {tuple(getattr(labels, 'shape', ()))}, "
                         f"expected uint8 [{len(files)}, {grid}, {grid}] for input size "
                         f"{input_size} and cell size {cell} (and scores of the same shape); "
                         "remake it with part_learn.py")
    regions = meta.get("num_regions")
    if isinstance(regions, int):         # parts 0..K-1; objects 1..K (0 = background); 255 = ignore
        chunks = labels.split(1 << 16)
        top = max((int(torch.where(c == IGNORE, 0, c).max()) for c in chunks), default=0)
        if top >= regions + (meta.get("kind") == "objects"):
            raise ValueError(f"{path} holds region id {top} but its meta says {regions} regions "
                             f"({meta.get('kind', 'parts')}); remake it with part_learn.py")
    masks = r.get("masks")
    if masks is not None and (not isinstance(masks, torch.Tensor) or masks.dtype != torch.uint8
                              or tuple(masks.shape) != (len(files), input_size, input_size)):
        raise ValueError(f"{path} holds object masks of shape "
                         f"{tuple(getattr(masks, 'shape', ()))}, expected uint8 "
                         f"[{len(files)}, {input_size}, {input_size}]; "
                         "remake it with part_learn.py")


# ---------------------------------------------------------------- cells -> patches

def cells_to_patches(labels, factor, generator=None):
    """Part cells [B, gh, gw] -> one part per patch [B, (gh/f)*(gw/f)] (row-major patches) by
    majority vote over each f x f block of cells, ties broken at random (uniform over the tied
    parts: a lowest-id rule would favour part 0, and a patch-16 model over 8-px cells has a tie in
    about one patch in five). Ignore (255) wins only when the whole patch is ignore. f = 1 is a
    reshape. For parts only: objects need ObjMAE's 20% pixel rule on the patch's own pixels (ObjMAE
    §3.2), which cells cannot give, so object regions are made at the patch size. Pairwise
    comparisons, O(f^4) per patch: cheap for the f = 1, 2 that patch 8/16 over 8-px cells need."""
    B, gh, gw = labels.shape
    if gh % factor or gw % factor:
        raise ValueError(f"grid {gh}x{gw} is not a multiple of {factor} cells per patch side")
    if factor == 1:
        return labels.reshape(B, gh * gw)
    f = factor
    v = labels.reshape(B, gh // f, f, gw // f, f).permute(0, 1, 3, 2, 4)
    v = v.reshape(B, -1, f * f)                                       # [B, L, f*f]
    votes = (v[..., :, None] == v[..., None, :]).sum(-1)              # [B, L, f*f] own label count
    real = v != IGNORE
    votes = torch.where(real | ~real.any(-1, keepdim=True), votes, 0)  # ignore loses to any label
    # most votes first; among the cells of tied labels (equally many cells each) a uniform random
    # key picks one
    key = torch.rand(v.shape, device=v.device, generator=generator)   # [B, L, f*f] in [0, 1)
    best = (votes + key).argmax(-1, keepdim=True)
    return v.gather(-1, best).squeeze(-1)


def scores_to_patches(scores, factor):
    """Cell scores [B, gh, gw] -> mean per patch [B, (gh/f)*(gw/f)] (row-major patches)."""
    B = scores.shape[0]
    if factor == 1:
        return scores.reshape(B, -1)
    return F.avg_pool2d(scores[:, None].float(), factor).reshape(B, -1)


# ---------------------------------------------------------------- objects per cell

def instance_cells(inst_mask, grid, min_share=0.2, min_object=0.05):
    """Instance mask [H, W] (0 = background) -> object id per cell, np.uint8 [gh, gw].

    ObjMAE §3.2: a cell belongs to an object when >= min_share (20%) of its pixels do; when
    several pass, the larger share wins (ties: the lower id). ObjMAE §4.1: objects covering
    < min_object (5%) of the image are dropped first and count as background. Ids keep their
    values from the mask (so they may have gaps); 0 = background.

    The rule is on a patch's own pixels, so objects are made with cells the size of the model's
    patches (ObjMAE §4.1: patch 16 in every experiment): part_learn.py --cell_size 16 for a
    patch-16 model, and PretrainDataset at the patch size for the shapes' masks. Finer cells cannot
    be merged into it afterwards (a majority vote of 8-px cells turns a patch that is 25-50% object
    into background), so pretrain.py refuses object regions whose cell size is not its patch size.
    """
    m = np.asarray(inst_mask)
    (H, W), (gh, gw) = m.shape, grid
    if H % gh or W % gw:
        raise ValueError(f"mask size {H}x{W} is not a multiple of the grid {gh}x{gw}; "
                         "resize it first")
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
    20% rule, which is what the masking sees: object cells are the model's patches
    (`instance_cells`), so this is the seq_ratio hint of a model whose patch is the cell size. Ids
    1..254 are objects. 0.0 when there are none."""
    lab = torch.as_tensor(labels).reshape(-1, labels.shape[-2] * labels.shape[-1]).long()
    n, c = lab.shape
    counts = torch.zeros(n, 256, dtype=torch.long).scatter_add_(1, lab, torch.ones_like(lab))
    counts = counts[:, 1:IGNORE]                                      # [N, 254] cells per object
    present = counts > 0
    return float((counts[present].float() / c).mean()) if present.any() else 0.0


def mask_cells(mask, size, grid, min_share=0.2, min_object=0.05):
    """An instance mask of any size -> object id per cell of a size x size image, np.uint8 [gh, gw]:
    the mask is resized the way its image is (nearest, so ids stay ids), then `instance_cells`."""
    if mask.shape != (size, size):
        mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
    return instance_cells(mask, grid, min_share, min_object)


# ---------------------------------------------------------------- evaluation on the shapes' objects

def foreground_iou(regions, dataset):
    """How well regions separate objects from background, against the true object cells (mask_cells
    of the shapes' masks on the regions' grid), mean over the images that have objects:
      top:    IoU of the k highest-scoring cells (k = the true object cells) with the object cells
              (needs scores; without, the object cells of an objects file);
      parts:  IoU of the union of the regions that are mostly object, i.e. whether the parts
              themselves split objects from background, whatever their scores;
      bottom: IoU of the k lowest-scoring cells (None without scores): far above `top` means the
              score ranks the objects last (an MAE's class-token attention does: RESULTS.md);
      chance: IoU of k cells drawn at random (fixed seed), what `top` is worth without information.
    """
    S, cell = regions["meta"]["input_size"], regions["meta"]["cell_size"]
    grid = (S // cell, S // cell)
    top, bottom, parts, chance, g = [], [], [], [], torch.Generator().manual_seed(0)
    iou = lambda pred, true: float((pred & true).sum() / (pred | true).sum())    # noqa: E731
    for i in range(len(dataset)):
        true = mask_cells(dataset.load(i)[1], S, grid) > 0
        true = torch.from_numpy(true).flatten()                            # [gh*gw]
        k = int(true.sum())
        if k == 0:
            continue
        labels = regions["labels"][i].flatten().long()
        if regions["scores"] is not None:
            score = regions["scores"][i].flatten().float()
            pred, last = torch.zeros_like(true), torch.zeros_like(true)
            pred[score.topk(k).indices] = True
            last[(-score).topk(k).indices] = True
            bottom.append(iou(last, true))
        else:
            pred = (labels > 0) & (labels != IGNORE)
        top.append(iou(pred, true))
        drawn = torch.zeros_like(true)
        drawn[torch.randperm(true.numel(), generator=g)[:k]] = True
        chance.append(iou(drawn, true))
        hits = torch.zeros(256).index_add_(0, labels, true.float())  # object cells per region id
        sizes = torch.bincount(labels, minlength=256).float()
        union = (hits > sizes / 2)[labels]  # the regions that are mostly object
        parts.append(iou(union, true))
    return {"iou_top": float(np.mean(top)), "iou_bottom": float(np.mean(bottom)) if bottom else None,
            "iou_parts": float(np.mean(parts)),
            "iou_chance": float(np.mean(chance)), "images": len(top)}


# ---------------------------------------------------------------- COCO instance masks

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
                points = [(float(poly[k]), float(poly[k + 1])) for k in range(0, len(poly) - 1, 2)]
                draw.polygon(points, fill=1)
        return np.asarray(canvas, dtype=bool)
    rh, rw = seg["size"]
    runs = seg["counts"] if isinstance(seg["counts"], list) else _rle_counts(seg["counts"])
    if sum(runs) != rh * rw:                  # read lazily, during training: a UsageError (exit 2)
        raise UsageError(f"RLE runs sum to {sum(runs)}, not {rh}x{rw}: "
                         "the COCO annotations are damaged")
    flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool)        # runs start with zeros
    return flat.reshape((rh, rw), order="F")


class CocoMasks(Mapping):
    """{file_name: np.uint8 [H, W] instance ids} that decodes an image's mask only when it is read:
    all of COCO train2014 decoded at once would not fit in memory."""

    def __init__(self, images, anns):
        self.images = {im["file_name"]: im for im in images}
        self.anns = anns                                              # image id -> annotations

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
    instances 1..k in annotation order (later ones overwrite overlaps, at most 254). Crowd
    annotations (iscrowd=1) mark groups, not single objects, so they stay background (ObjMAE §4.1
    picks single objects). Masks are decoded when read, one image at a time."""
    try:
        with open(json_path) as f:
            coco = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read COCO annotations {json_path} ({e}); "
                         "pass an instances_*.json file") from None
    wanted = None if image_ids is None else set(image_ids)
    images = [im for im in coco["images"] if wanted is None or im["id"] in wanted]
    anns = {im["id"]: [] for im in images}
    for a in coco.get("annotations", []):
        if a["image_id"] in anns and not a.get("iscrowd", 0):
            anns[a["image_id"]].append(a)
    return CocoMasks(images, anns)


# ---------------------------------------------------------------- the export, sharded over ranks
# part_learn.py writes the regions file with every rank at once: each writes the rows of its block
# of images to a shard as they come (one batch in memory), then rank 0 copies the shards' bytes into
# a file laid out as save_regions' (image_cache.reserve_tensor_file), so no process holds it whole.

def object_counts(labels):
    """Region cells uint8 [B, gh, gw] -> (cells of all objects, number of objects, largest id other
    than ignore or -1): the sums behind object_ratio (ids 1..254 are objects) and the segmentation's
    region count, integers that add up over batches and ranks in any order, so a sharded export
    gives the single-process meta."""
    lab = labels.reshape(labels.shape[0], -1).long()
    counts = torch.zeros(lab.shape[0], 256, dtype=torch.long).scatter_add_(1, lab,
                                                                           torch.ones_like(lab))
    objects = counts[:, 1:IGNORE]
    real = lab[lab != IGNORE]
    return int(objects.sum()), int((objects > 0).sum()), int(real.max()) if real.numel() else -1


def export(items, label_fn, grid, has_scores, args, d, desc, out, mask_side=0):
    """Run label_fn over every item, rank r taking the r-th contiguous block of items, and write the
    rows to this rank's shard <out>.rank<r>.tmp as they come (labels uint8 [rows, gh, gw], then
    scores float16, then with mask_side > 0 the object masks uint8 [rows, mask_side, mask_side]), so
    a rank holds one batch, never its whole share. -> (object cells, objects, largest id) summed /
    maxed over all ranks."""
    import image_cache                  # here: image_cache imports data, which imports this file
    n, cells, pixels = len(items), grid[0] * grid[1], mask_side * mask_side
    lo, hi = d.rank * n // d.world, (d.rank + 1) * n // d.world
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(items, range(lo, hi)),
                                         batch_size=args.batch_size, num_workers=args.num_workers,
                                         pin_memory=d.device.type == "cuda")
    sums, top, row = torch.zeros(2, dtype=torch.long), -1, 0
    shard = f"{out}.rank{d.rank}.tmp"
    fd = os.open(shard, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for batch in runs.progress(loader, desc, None, d):
            lab, sc, masks = label_fn(batch)
            lab = lab.to(torch.uint8).cpu()
            image_cache.pwrite_all(fd, lab, row * cells)
            if has_scores:
                image_cache.pwrite_all(fd, sc.to(torch.float16).cpu(),
                                       (hi - lo) * cells + 2 * row * cells)
            if pixels:
                image_cache.pwrite_all(fd, masks.to(torch.uint8).cpu(),
                                       (hi - lo) * cells * (1 + 2 * has_scores) + row * pixels)
            obj_cells, objs, batch_top = object_counts(lab)
            sums, top = sums + torch.tensor([obj_cells, objs]), max(top, batch_top)
            row += len(lab)
        os.fsync(fd)
    except BaseException:                                # Ctrl-C or a full disk: no stray shard
        with contextlib.suppress(OSError):
            os.unlink(shard)
        raise
    finally:
        os.close(fd)
    if d.world > 1:                                      # NCCL reduces device tensors only
        sums, tops = sums.to(d.device), torch.tensor([top], device=d.device)
        dist.all_reduce(sums)
        dist.all_reduce(tops, op=dist.ReduceOp.MAX)
        sums, top = sums.cpu(), int(tops)
    return int(sums[0]), int(sums[1]), top


def merge_shards(out, n, grid, has_scores, files, meta, d, mask_side=0):
    """The regions file `out` (save_regions' format, atomic) from the ranks' shards, without any
    process holding it: rank 0 reserves the final file (image_cache.reserve_tensor_file: torch.save
    without the tensors' bytes) and copies each shard's bytes to their place in it, 16 MB at a time,
    then renames it into place and deletes the shards. The shards are next to `out`, so it must be
    on a filesystem every node sees."""
    import image_cache
    if d.world > 1:
        dist.barrier()                                   # every shard is on disk
    if d.is_main:
        cells, folder = grid[0] * grid[1], os.path.dirname(os.path.abspath(out))
        obj = {"labels": image_cache.fake_tensor((n, *grid), torch.uint8),
               "files": [str(f) for f in files], "meta": dict(meta)}  # in save_regions' order
        if has_scores:
            obj["scores"] = image_cache.fake_tensor((n, *grid), torch.float16)
        if mask_side:
            obj["masks"] = image_cache.fake_tensor((n, mask_side, mask_side), torch.uint8)
        tmp_fd, tmp = temp_file(folder, ".regions-")
        os.close(tmp_fd)
        try:
            offsets = image_cache.reserve_tensor_file(tmp, obj)
            fd = os.open(tmp, os.O_WRONLY)
            try:
                for r in range(d.world):
                    lo, hi = r * n // d.world, (r + 1) * n // d.world
                    with open(f"{out}.rank{r}.tmp", "rb") as shard:  # labels, scores, masks
                        copy_bytes(shard, fd, offsets["labels"] + lo * cells, (hi - lo) * cells)
                        if has_scores:
                            copy_bytes(shard, fd, offsets["scores"] + 2 * lo * cells,
                                       2 * (hi - lo) * cells)
                        if mask_side:
                            px = mask_side * mask_side
                            copy_bytes(shard, fd, offsets["masks"] + lo * px, (hi - lo) * px)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, out)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        runs.fsync_dir(folder)
        for r in range(d.world):
            os.unlink(f"{out}.rank{r}.tmp")
    if d.world > 1:
        dist.barrier()  # the file is in place when every rank returns


def copy_bytes(src, fd, offset, nbytes, chunk=16 << 20):
    """nbytes from the file object src (from where it stands) to offset of the open file fd, a chunk
    at a time."""
    while nbytes:
        buf = memoryview(src.read(min(chunk, nbytes)))
        if not buf:
            raise RuntimeError(f"shard {src.name} ended {nbytes} bytes early")
        nbytes -= len(buf)
        while buf:                                       # os.pwrite may write less than asked
            done = os.pwrite(fd, buf, offset)
            buf, offset = buf[done:], offset + done
