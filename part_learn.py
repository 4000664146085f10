"""Stage 1: where are the parts or objects of each image? Writes <output_dir>/regions.pt for
pretrain.py, with one of four methods:
  learned       SemMAE §3.1: an attention module (Eq. 1, 2) and a blur + AdaIN decoder (Eq. 3, 4)
                on a frozen ViT learn N part maps by reconstructing the image (Eq. 5, 6).
  attention     SemMAE Table 4's baseline: the frozen encoder's class-token attention per head.
  cam           ObjMAE §3.2, App. A: a ResNet's class activation map; pixels > 0.3 are the object.
  segmentation  ObjMAE §3.2, §4.1: instance masks (shapes, a PNG folder, or a COCO JSON).
Objects are made on cells the size of the pre-training model's patch (the 20% rule sees each patch's
own pixels), parts on 8-px cells. The papers' commands: PAPERS.md.

On a laptop, the built-in shapes data and an encoder from pretrain.py (a few minutes on a CPU):
    python part_learn.py --method learned --encoder_weights output/pretrain/checkpoint-last.pth \
        --input_size 64 --epochs 5 --batch_size 64 --num_images 2000 --eval_iou
SemMAE's parts on 8 GPUs (DINO's ViT-S/8 stands in for SemMAE's iBOT ViT-S/8):
    torchrun --nproc_per_node=8 part_learn.py --method learned --data_path IMAGENET/train \
        --encoder_weights dino_deitsmall8_pretrain.pth --output_dir parts

References: SemMAE (Li et al., NeurIPS 2022, arXiv:2206.10207), ObjMAE (Wu & Mo 2022,
arXiv:2205.14338).
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import data
import image_cache
import launch
import model as models
import region_file
import released
import runs
import scenes
import utils
from utils import UsageError


# ------------------------------------------------------------------------ training the part learner

def load_learner(args, d, encoder):
    """The part learner on this encoder, its Adam optimizer, and with --resume their state ->
    (learner, optimizer, first epoch, steps of it done before a stop, what the rest of it needs)."""
    torch.manual_seed(args.seed)  # same initial weights on every rank
    width = encoder.cls_token.shape[-1]
    learner = models.PartLearner(width, args.num_parts, args.blur, encoder.patch_size).to(d.device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=args.lr)
    if not args.resume:
        return learner, optimizer, 0, 0, None
    ckpt = runs.load_checkpoint(args.resume)
    if "learner" not in ckpt:
        raise UsageError(f"{args.resume} is not a part_learn.py checkpoint; --resume takes this "
                         "stage's checkpoint-last.pth (the encoder goes in --encoder_weights)")
    try:
        learner.load_state_dict(ckpt["learner"])
    except RuntimeError:
        old = ckpt["args"]
        raise UsageError(f"{args.resume} was trained with --num_parts {old.get('num_parts')} on "
                         f"{old.get('encoder_weights')}; pass the same --num_parts and an encoder "
                         "of the same width") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    return (learner, optimizer, ckpt["epoch"] + 1, *runs.resume_partial(ckpt, d, args.resume))


def train_learner(args, d, base, encoder, cache=None):
    """SemMAE §3.1: only the attention module and decoder learn (the encoder is frozen)."""
    learner, optimizer, start_epoch, start_step, carry = load_learner(args, d, encoder)
    runs.start_run(args, d, start_epoch)
    if args.export_only:
        return learner.eval()
    # resize + flip; the fast path's samples are uint8, flipped and normalised in batch_images
    dataset = (data.PretrainDataset(base, args.input_size, hflip=True, cell_size=args.cell_size)
               if cache is None else
               image_cache.CachedPretrainDataset(base, cache, args.input_size, hflip=True,
                                                 cell_size=args.cell_size))
    loader = utils.make_loader(dataset, args.batch_size, args.num_workers, True, args.seed, d)
    if len(loader) == 0:
        raise UsageError(f"{len(dataset)} images give no full batch of {args.batch_size} per rank; "
                         "use a smaller --batch_size")
    ddp = utils.wrap_ddp(learner, d)
    vis = data.PretrainDataset(base, args.input_size, hflip=False, cell_size=args.cell_size)
    vis_imgs = torch.stack([vis[i][0] for i in range(min(8, len(base)))]).to(d.device)  # 8 fixed
    size = sum(p.numel() for p in learner.parameters()) / 1e6
    utils.print0(d, f"part learner: {size:.2f}M params, {len(dataset)} images, "
                    f"epochs {start_epoch}..{args.epochs - 1}")
    iters = len(loader)
    ckpt_path = os.path.join(args.output_dir, "checkpoint-last.pth")
    precision = utils.resolve_precision("auto", d.device)  # the frozen encoder's (encoder_features)

    def run_state(epoch):                   # what a checkpoint holds, epoch = the last finished one
        return {"learner": learner.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "args": vars(args)}
    for epoch in range(start_epoch, args.epochs):
        utils.seed_epoch(args.seed, epoch, d)  # resume = same flips and order
        skip = start_step if epoch == start_epoch else 0  # steps done before a stop
        loader.sampler.set_epoch(epoch, skip * args.batch_size)
        learner.train()
        # the losses are summed on the device and read every --log_every steps: no host sync between
        t0, sums, n = time.time(), torch.zeros(3, dtype=torch.float64, device=d.device), 0
        if skip:                                    # where the stop left the RNGs and the sums
            runs.set_rng_state(carry["rng"])
            sums, n = carry["sums"][0].to(d.device), carry["sums"][1]
        bar = runs.progress(loader, f"epoch {epoch}", iters, d, args.log_every, skip)
        for it, batch in enumerate(bar, start=skip):
            lr = utils.cosine_lr(epoch * iters + it, args.epochs * iters,
                                 args.warmup_epochs * iters, args.lr)
            utils.set_lr(optimizer, lr)
            imgs = batch_images(batch, d.device)
            cls_feat, patch_feat = encoder_features(encoder, imgs)  # F_c [B, C], F [B, C, h, w]
            maps, recon = ddp(cls_feat, patch_feat, imgs.shape[-2:])        # Eq. 1-4
            rec = F.mse_loss(recon, imgs)                                  # Eq. 5
            div = models.diversity_loss(maps)                              # Eq. 6
            loss = rec + args.div_weight * div                             # Eq. 7
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss, rec, div]).detach()
            n += 1
            log_now = (it + 1) % args.log_every == 0 or it + 1 == iters  # and the epoch's last
            if log_now:
                means = (sums / n).tolist()  # the sync: the epoch's means so far
                steps = f"epoch {epoch}, one of steps {it - it % args.log_every}..{it}"
                runs.stop_if_not_finite(means[0], steps, ckpt_path, precision)  # before its ckpt
                bar.set_postfix(loss=f"{means[0]:.4f}", div=f"{means[2]:.3f}", lr=f"{lr:.2e}")
            if it + 1 < iters and runs.stop_requested(d, log_now):  # SIGTERM/SIGUSR1: stop here
                bar.close()
                where = f"after step {it + 1} of {iters} of epoch {epoch}"
                runs.stop_now(ckpt_path, run_state(epoch - 1), d, where, it + 1, (sums.cpu(), n))
        bar.close()
        loss, rec, div = (utils.all_reduce_mean(v, d) for v in means)
        state = run_state(epoch) if d.is_main else None
        if d.is_main:
            record = {"epoch": epoch, "train_loss": loss, "rec_loss": rec, "div_loss": div,
                      "lr": lr, "time_s": round(time.time() - t0, 2)}
            end_epoch(args, record, state, ckpt_path, encoder, learner, vis_imgs)
        if epoch + 1 < args.epochs and runs.stop_requested(d, True):   # a stop in its last step
            runs.stop_now(ckpt_path, state, d, f"after epoch {epoch}")
    return learner.eval()


def end_epoch(args, record, state, ckpt_path, encoder, learner, imgs):
    """Rank 0 at an epoch's end: the log line before the checkpoint (see pretrain.py), then the
    parts and reconstruction of the fixed pictures (SemMAE Figure 4)."""
    runs.append_log(os.path.join(args.output_dir, "log.txt"), record)
    runs.save_checkpoint(ckpt_path, state)
    print(f"epoch {record['epoch']}: loss {record['train_loss']:.4f} "
          f"(rec {record['rec_loss']:.4f}, div {record['div_loss']:.4f}) ({record['time_s']}s)",
          flush=True)
    learner.eval()
    with torch.no_grad():
        maps, recon = learner(*encoder_features(encoder, imgs), imgs.shape[-2:])
    labels, _ = parts_from_maps(maps, (args.input_size // args.cell_size,) * 2)
    path = os.path.join(args.output_dir, f"parts-{record['epoch']:04d}.png")
    save_picture(path, imgs, labels, recon)


# ----------------------------------------------------------------------------- cells from maps

def to_cells(maps, grid):
    """[B, K, h, w] maps on the encoder's patch grid -> [B, K, gh, gw] on the cell grid (a patch-16
    encoder's maps are upsampled bilinearly to the 8-px cells before the argmax; a coarser cell grid
    averages)."""
    if tuple(maps.shape[-2:]) == tuple(grid):
        return maps
    if grid[0] > maps.shape[-2]:
        return F.interpolate(maps, size=tuple(grid), mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(maps, tuple(grid))


def parts_from_maps(maps, grid):
    """Part maps [B, K, h, w] -> (labels uint8 [B, gh, gw] = argmax over the maps, scores [B, gh,
    gw] = the maps' summed mass per cell / its maximum in the image: a small, concentrated part (an
    object) scores high, a part spread over the background low)."""
    cells = to_cells(maps.float(), grid)
    mass = cells.sum(1)                                                    # [B, gh, gw]
    return cells.argmax(1).to(torch.uint8), mass / mass.amax((1, 2), keepdim=True).clamp_min(1e-12)


def batch_images(batch, device):
    """A DataLoader batch -> its normalised images [B, 3, S, S] on the device. The fast path's
    batches are uint8 with their flips beside them (image_cache.CachedPretrainDataset):
    image_cache.device_batch flips and normalises them there."""
    imgs = batch[0].to(device, non_blocking=True)
    return image_cache.device_batch(imgs, batch[4]) if imgs.dtype == torch.uint8 else imgs


def encoder_features(encoder, imgs):
    """Frozen encoder -> F_c [B, C], F [B, C, h, w] (SemMAE §3.1), fp32; no graph, bf16 on CUDA."""

    with torch.no_grad(), utils.autocast(imgs.device):
        tokens = encoder.forward_features(imgs)                            # [B, 1+L, C]
    tokens = tokens.float()
    B, _, C = tokens.shape
    h, w = imgs.shape[-2] // encoder.patch_size, imgs.shape[-1] // encoder.patch_size
    return tokens[:, 0], tokens[:, 1:].transpose(1, 2).reshape(B, C, h, w)


def attention_parts(encoder, imgs, grid):
    """Table 4's baseline: last-layer class-token attention to the patches, a map per head."""
    with torch.no_grad(), utils.autocast(imgs.device):
        attn = encoder.get_last_selfattention(imgs)                        # [B, heads, 1+L, 1+L]
    h, w = imgs.shape[-2] // encoder.patch_size, imgs.shape[-1] // encoder.patch_size
    return parts_from_maps(attn[:, :, 0, 1:].float().unflatten(-1, (h, w)), grid)


def build_cam_net(args):
    """torchvision ResNet from a state-dict file; the class count comes from its fc layer."""
    try:
        sd = torch.load(args.cam_weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read --cam_weights {args.cam_weights} ({type(e).__name__}); "
                         "pass a torchvision ResNet state dict (.pth)") from None
    if not isinstance(sd, dict) or not torch.is_tensor(sd.get("fc.weight")):
        raise UsageError(f"--cam_weights {args.cam_weights} is not a torchvision ResNet state dict "
                         "(no fc.weight)")
    net = getattr(torchvision.models, args.cam_arch)(weights=None, num_classes=len(sd["fc.weight"]))
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise UsageError(f"--cam_weights {args.cam_weights} does not fit --cam_arch {args.cam_arch}"
                         f": {str(e).splitlines()[1].strip()}") from None
    return net.eval()


def cam_objects(net, imgs, cell, threshold, min_share, min_object=0.05):
    """ObjMAE Appendix A, Eq. 2: M_c(x, y) = sum_k w_k^c f_k(x, y) for the top class c, / its
    maximum; pixels above threshold are the object; an object under min_object of the image is
    background (ObjMAE §4.1's 5% rule, applied to the pre-training data); a cell is object (1) when
    >= min_share of its pixels are. Score = mean map per cell. -> (labels uint8 [B, gh, gw], scores
    [B, gh, gw], object pixels uint8 [B, S, S]: 1 = object, for the crop)"""
    with torch.no_grad(), utils.autocast(imgs.device):
        x = imgs
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            x = getattr(net, name)(x)
        f = x.float()  # [B, K, h, w] last conv layer
        logits = net.fc(f.mean((2, 3)))                                    # [B, classes]
        w = net.fc.weight.float()[logits.argmax(1)]  # [B, K] w^c of the top class
        cam = torch.einsum("bk,bkhw->bhw", w, f).clamp_min(0)             # Eq. 2
    cam = cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-12)           # range 0-1
    cam = F.interpolate(cam[:, None], size=imgs.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam[:, 0]                                                        # [B, S, S]
    pixels = cam > threshold                                               # [B, S, S] object pixels
    big = pixels.float().mean((1, 2), keepdim=True) >= min_object - 1e-6   # [B, 1, 1] the 5% rule
    pixels = pixels & big
    share = F.avg_pool2d(pixels.float()[:, None], cell)[:, 0]  # [B, gh, gw] object pixel share
    scores = F.avg_pool2d(cam[:, None], cell)[:, 0]
    return (share >= min_share - 1e-6).to(torch.uint8), scores, pixels.to(torch.uint8)


class SegmentationCells(torch.utils.data.Dataset):
    """Object id per cell from instance masks (ObjMAE §3.2: 20% rule; §4.1: under 5% dropped),
    and the instance mask resized to the input size as its image is (nearest), for the crop. ->
    (uint8 [gh, gw], [S, S])"""

    def __init__(self, base, args, coco_masks=None):
        self.base, self.args, self.coco = base, args, coco_masks
        self.grid = (args.input_size // args.cell_size,) * 2

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        a, S = self.args, self.args.input_size
        mask = (self.coco[os.path.basename(self.base.files[i])] if self.coco is not None
                else self.base.load(i)[1])                  # COCO: only the annotation is read
        if mask.shape != (S, S):
            mask = np.asarray(Image.fromarray(mask).resize((S, S), Image.NEAREST))
        cells = region_file.instance_cells(mask, self.grid, a.min_share, a.min_object)
        return torch.from_numpy(cells), torch.from_numpy(np.array(mask, dtype=np.uint8))


def load_coco(args, base):
    with utils.user_input():                                               # not a COCO JSON: exit 2
        masks = region_file.coco_instance_masks(args.coco)  # decoded lazily, per image
    missing = [f for f in base.files if os.path.basename(f) not in masks]  # COCO: bare names
    if missing:
        raise UsageError(f"{len(missing)} images in --data_path are not in --coco {args.coco} "
                         f"(first: {missing[0]}); pass the annotations of these images")
    return masks



# ----------------------------------------------------------------------------- export

def make_regions(base, args, d, nets, out, cache=None):
    """The chosen method over `base` in order -> the regions file `out` (written by the ranks
    together) and its meta. `cache`: open_image_cache's, for the fast input path."""
    grid = (args.input_size // args.cell_size,) * 2
    if args.method == "segmentation":                                      # only the masks are read
        images = SegmentationCells(base, args, load_coco(args, base) if args.coco else None)
    elif cache is not None:
        images = image_cache.CachedPretrainDataset(base, cache, args.input_size, hflip=False,
                                            cell_size=args.cell_size)
    else:
        images = data.PretrainDataset(base, args.input_size, hflip=False, cell_size=args.cell_size)
    meta = {"method": args.method, "input_size": args.input_size, "cell_size": args.cell_size,
            "object_ratio": None}
    if args.method == "learned":
        encoder, learner = nets

        def label_fn(batch):
            cls_feat, patch_feat = encoder_features(encoder, batch_images(batch, d.device))
            with torch.no_grad():
                return (*parts_from_maps(learner.part_maps(cls_feat, patch_feat), grid), None)
        meta.update(kind="parts", num_regions=args.num_parts, source=args.encoder_weights)
    elif args.method == "attention":
        encoder = nets[0]

        def label_fn(batch):
            return (*attention_parts(encoder, batch_images(batch, d.device), grid), None)
        meta.update(kind="parts", num_regions=encoder.blocks[-1].attn.num_heads,
                    source=args.encoder_weights)
    elif args.method == "cam":
        net = nets[0]

        def label_fn(batch):
            return cam_objects(net, batch_images(batch, d.device), args.cell_size,
                               args.cam_threshold, args.min_share, args.min_object)
        meta.update(kind="objects", num_regions=1, source=f"{args.cam_arch} {args.cam_weights}")
    else:
        def label_fn(batch):
            return batch[0], None, batch[1]
        meta.update(kind="objects", source=args.coco or args.masks or "shapes instance masks")
    has_scores = args.method != "segmentation"
    # objects keep their per-pixel masks (S x S bytes an image), so pretrain.py's crop re-applies
    # the 20% and 5% rules to the cropped patch (ObjMAE §3.2, §4.1); 1-px cells are their own mask
    mask_side = args.input_size if meta["kind"] == "objects" and args.cell_size > 1 else 0
    if meta["kind"] == "objects":
        meta.update(min_share=args.min_share, min_object=args.min_object)
    obj_cells, objs, top = region_file.export(images, label_fn, grid, has_scores, args, d,
                                              f"export {args.method}", out, mask_side)
    if meta["kind"] == "objects":                                  # = region_file.object_ratio
        meta["object_ratio"] = obj_cells / (objs * grid[0] * grid[1]) if objs else 0.0
        if args.method == "segmentation":
            meta["num_regions"] = max(top, 0)
    region_file.merge_shards(out, len(base), grid, has_scores, base.files, meta, d, mask_side)
    return meta


# ----------------------------------------------------------------------------- pictures

PALETTE = torch.tensor([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60],
                        [250, 190, 212], [0, 128, 128], [220, 190, 255], [170, 110, 40],
                        [255, 250, 200], [128, 0, 0], [170, 255, 195],
                        [0, 0, 0]]) / 255.0                  # 16 colours, then ignore = black



def save_picture(path, imgs, labels, recon=None, kind="parts"):
    """SemMAE Figure 4: one row per image: the image | its regions colour-coded (nearest upsampling,
    over a grey copy of the image) | the reconstruction (learned), under the headings image | parts
    (or objects) | reconstruction."""
    images = data.denormalise(imgs)
    ids = labels.long().cpu()
    ids = torch.where(ids == region_file.IGNORE, len(PALETTE) - 1, ids % (len(PALETTE) - 1))
    colours = PALETTE[ids].permute(0, 3, 1, 2)                             # [B, 3, gh, gw]
    colours = F.interpolate(colours, size=images.shape[-2:], mode="nearest")
    columns = [images, 0.7 * colours + 0.3 * images.mean(1, keepdim=True)]
    if recon is not None:
        columns.append(data.denormalise(recon))
    grid = torch.stack(columns, 1).flatten(0, 1)                          # [B * columns, 3, H, W]
    scale = max(1, 128 // grid.shape[-1])  # small demo images: enlarge
    grid = F.interpolate(grid, scale_factor=scale, mode="nearest") if scale > 1 else grid
    data.save_with_headings(path, grid, ["image", kind, "reconstruction"][:len(columns)])


# ----------------------------------------------------------------------------- main

def main(args):
    # Check the flags, set up DDP and the output folder (nothing is written before every check):
    check_args(args)
    d = launch.init_distributed(args.device, args.dist_timeout)
    runs.prepare_output_dir(args, d)                                       # resolves --resume auto
    check_rules(args, RESUME_RULES)

    # Data and the frozen networks (the encoder for parts, the ResNet for CAM):
    with utils.user_input():  # a bad folder or checkpoint: exit 2
        base = (scenes.builtin(args.scenes, args.num_images, args.input_size, args.data_seed,
                             scene_cache=args.scene_cache)
                if args.data_path is None else
                data.FolderDataset(args.data_path, masks_root=args.masks, classes=False))
    nets = ()
    if args.method in ("learned", "attention"):
        # sizes and patch size from the checkpoint; a missing encoder key is an error, never a
        # random encoder
        with utils.user_input():
            encoder = released.build_encoder_from_checkpoint(args.encoder_weights,
                                                           img_size=args.input_size)
        encoder = encoder.to(d.device).eval().requires_grad_(False)
        utils.print0(d, f"encoder {args.encoder_weights}: width {encoder.cls_token.shape[-1]}, "
                        f"patch {encoder.patch_size}, {len(encoder.blocks)} blocks, "
                        f"{encoder.blocks[-1].attn.num_heads} heads")
        nets = (encoder,)
    elif args.method == "cam":
        nets = (build_cam_net(args).to(d.device),)

    # Start the run (the folder, its lock, args.json), then train the part learner (a learned run
    # starts once its --resume checkpoint is read, in train_learner):
    if args.method != "learned":
        runs.start_run(args, d)
    runs.print_args(d, args)
    cache = None  # fast input path: uint8 images decoded once, flipped/normalised on the device
    if args.image_cache:
        cache = image_cache.open_image_cache(args.image_cache, base, args.input_size,
                                             args.num_workers, d.rank, d.world)
    if args.method == "learned":
        nets = (nets[0], train_learner(args, d, base, nets[0], cache))

    # Export the regions file, and picture its first images:
    out = os.path.join(args.output_dir, "regions.pt")
    meta = make_regions(base, args, d, nets, out, cache)
    if d.is_main:
        labels = region_file.load_regions(out, base.files, args.input_size)["labels"]  # mmap
        vis = data.PretrainDataset(base, args.input_size, hflip=False, cell_size=args.cell_size)
        n = min(8, len(base))
        save_picture(os.path.join(args.output_dir, "regions.png"),
                     torch.stack([vis[i][0] for i in range(n)]), labels[:n], kind=meta["kind"])
        ratio = "" if meta["object_ratio"] is None else (
            f", mean object ratio {meta['object_ratio']:.3f} (ObjMAE's --seq_ratio for a "
            f"patch-{args.cell_size} model)")
        print(f"wrote {out}: {meta['kind']} of {len(base)} images on a "
              f"{labels.shape[1]}x{labels.shape[2]} grid, {meta['num_regions']} regions{ratio}",
              flush=True)

    # Shapes only: how well the regions find the true objects of held-out images:
    if args.eval_iou:  # held-out images: another split
        val = scenes.builtin(args.scenes, args.eval_images, args.input_size, args.data_seed, "val",
                           args.scene_cache)
        out = os.path.join(args.output_dir, "regions-val.pt")
        make_regions(val, args, d, nets, out)  # not in the cache: the default path
        if d.is_main:
            regions = region_file.load_regions(out, val.files, args.input_size)
            iou = region_file.foreground_iou(regions, val)
            runs.append_log(os.path.join(args.output_dir, "log.txt"), {"method": args.method,
                                                                       **iou})
            bottom = ("" if iou["iou_bottom"] is None else
                      f" (lowest-scoring {iou['iou_bottom']:.3f})")
            print(f"foreground IoU on {iou['images']} held-out shapes images ({args.method}): "
                  f"top-scoring cells {iou['iou_top']:.3f}{bottom}, mostly-object regions "
                  f"{iou['iou_parts']:.3f} (random cells {iou['iou_chance']:.3f})", flush=True)
    runs.end_run()


# ----------------------------------------------------------------------------- flags, their rules

# The flags that act with some methods only (get_args' groups): refused with any other --method.
METHOD_FLAGS = {
    ("learned",): ("num_parts", "blur", "div_weight", "epochs", "lr", "warmup_epochs", "log_every"),
    ("learned", "attention"): ("encoder_weights",),
    ("cam",): ("cam_weights", "cam_arch", "cam_threshold"),
    ("cam", "segmentation"): ("min_share", "min_object"), ("segmentation",): ("masks", "coco")}
# {flag: (acts when, where it acts)}, for utils.refuse_unused (methods=methods: each lambda keeps
# its own tuple)
UNUSED = {flag: (lambda a, methods=methods: a.method in methods,
                 "with --method " + " or ".join(methods))
          for methods, flags in METHOD_FLAGS.items() for flag in flags}
UNUSED.update(eval_images=(lambda a: a.eval_iou, "with --eval_iou"),
              image_cache=(lambda a: a.method != "segmentation",
                           "with the methods that read images (not segmentation)"),
              **scenes.BUILTIN_FLAGS)

WEIGHTS = {"learned": "encoder_weights", "attention": "encoder_weights", "cam": "cam_weights"}
# Each rule between flags once: (broken when, the one line saying so and the fix); {a.x} is a flag,
# {w} the method's weights flag, {path} its value.
RULES = [
    (lambda a: a.blur % 2 == 0, "--blur {a.blur} must be an odd kernel size (SemMAE §4.1: 7)"),
    (lambda a: a.input_size % a.cell_size, "--input_size {a.input_size} is not a multiple of "
     "--cell_size {a.cell_size}; use a multiple of {a.cell_size}"),
    (lambda a: a.method in WEIGHTS and not getattr(a, WEIGHTS[a.method]),
     "--method {a.method} needs --{w} <file>"),
    (lambda a: a.method in WEIGHTS and not os.path.isfile(getattr(a, WEIGHTS[a.method])),
     "--{w} {path} does not exist; check the path"),
    (lambda a: (a.method == "segmentation" and a.data_path is not None
                and (a.masks is None) == (a.coco is None)),
     "--method segmentation on an image folder needs exactly one of --masks <folder> or --coco "
     "<instances.json>"),
    (lambda a: a.method == "segmentation" and a.data_path is None and (a.masks or a.coco),
     "the built-in shapes data brings its own masks; --masks/--coco need --data_path"),
    (lambda a: a.eval_iou and a.data_path is not None,
     "--eval_iou measures against the shapes' true objects; omit --data_path"),
]
# After --resume auto is resolved (runs.prepare_output_dir): a path, or None for a new run.
RESUME_RULES = [
    (lambda a: a.resume and a.method != "learned", "--resume continues a part learner: it is for "
     "--method learned only; --method {a.method} writes into an --output_dir that holds no "
     "checkpoint-last.pth"),
    (lambda a: a.export_only and not (a.method == "learned" and a.resume), "--export_only "
     "re-exports a trained part learner: pass --method learned --resume <ckpt>"),
    # a finished run: never replaced by a new one
    (lambda a: os.path.isfile(os.path.join(a.output_dir, "regions.pt")) and not a.resume,
     "--output_dir {a.output_dir} already holds a finished run ({a.output_dir}/regions.pt); pass "
     "another --output_dir (or, for --method learned, --resume auto to continue or re-export it)"),
]


def check_rules(args, rules):
    """utils.check_rules with the weights flag of the method ({w}) and its path ({path})."""
    w = WEIGHTS.get(args.method)
    utils.check_rules(args, rules, w=w, path=getattr(args, w) if w else None)


def check_args(args):
    """The flags alone, before any work: each range once (utils.RANGES), the rules between flags,
    the flags that do nothing with this --method."""
    if args.cell_size is None:
        args.cell_size = 16 if args.method in ("cam", "segmentation") else 8
    utils.check_ranges(args)
    check_rules(args, RULES)
    utils.refuse_unused(args, get_args([]), {k: (acts(args), where)
                                             for k, (acts, where) in UNUSED.items()})


def get_args(argv=None):
    # The defaults reproduce SemMAE §4.1's parts (6 parts, blur 7, lambda 0.03, on 8-px cells) and
    # ObjMAE's object rules (§3.2, §4.1: 20% of a cell, 5% of the image); PAPERS.md: the papers'
    # commands. Ranges: utils.RANGES.

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="learned",
                   choices=["learned", "attention", "cam", "segmentation"])
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None,
                   help="folder of images at any depth (no labels read); omitted = built-in shapes")
    g.add_argument("--num_images", type=int, default=2000,
                   help="size of the built-in shapes dataset")
    g.add_argument("--data_seed", type=int, default=0,
                   help="which shapes scenes (--seed changes only the training randomness)")
    scenes.add_scene_flags(g)
    g.add_argument("--input_size", type=int, default=224,
                   help="images are resized to this (no crop)")
    g.add_argument("--cell_size", type=int, default=None,
                   help="pixels per region cell; default 8 for parts (SemMAE §4.2), 16 for "
                        "objects: the patch of the model that will use them (ObjMAE §3.2's 20%% "
                        "rule, §4.1)")
    g = p.add_argument_group("--method learned and attention: the frozen encoder (SemMAE §4.1)")
    g.add_argument("--encoder_weights", default=None,
                   help="DINO/iBOT release or training checkpoint, MAE/SemMAE or pretrain.py "
                        "checkpoint")
    g = p.add_argument_group("--method learned only: the part learner (SemMAE §3.1, §4.1)")
    g.add_argument("--num_parts", type=int, default=6,
                   help="N (SemMAE §4.1: 6, ViT-S's head count)")
    g.add_argument("--blur", type=int, default=7, help="blur kernel size (SemMAE §4.1: 7)")
    g.add_argument("--div_weight", type=float, default=0.03,
                   help="lambda of Eq. 7 (SemMAE §4.1: 0.03)")
    g = p.add_argument_group("--method cam (App. A; --min_share, --min_object: and segmentation)")
    g.add_argument("--cam_weights", default=None,
                   help="torchvision ResNet state dict (ImageNet-1k trained)")
    g.add_argument("--cam_arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50"],
                   help="ResNet-50 (ObjMAE App. A); ResNet-34 for ImageNet-100 (ObjMAE §4.1)")
    g.add_argument("--cam_threshold", type=float, default=0.3, help="object pixels have map > this")
    g.add_argument("--min_share", type=float, default=0.2,
                   help="a cell is object at >= this share of pixels")
    g.add_argument("--min_object", type=float, default=0.05,
                   help="drop objects under this share of the image (ObjMAE §4.1)")
    g = p.add_argument_group("--method segmentation only")
    g.add_argument("--masks", default=None,
                   help="instance PNG folder, same relative names as the images")
    g.add_argument("--coco", default=None, help="COCO instances JSON for the images in --data_path")
    g = p.add_argument_group("optimisation (--method learned; SemMAE gives its cost: 2 A100 hours)")
    g.add_argument("--epochs", type=int, default=4,
                   help="about 2 A100 hours of ImageNet-1k at ViT-S/8")
    g.add_argument("--warmup_epochs", type=int, default=1, help="linear lr warm-up, then cosine")
    g.add_argument("--batch_size", type=int, default=64, help="per device (every method)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam")
    g = runs.add_run_flags(p, "output/part_learn", training=False)
    g.add_argument("--export_only", action="store_true",
                   help="learned: export regions from --resume")
    g.add_argument("--eval_iou", action="store_true",
                   help="shapes only: also export held-out images, print the foreground IoU")
    g.add_argument("--eval_images", type=int, default=200,
                   help="held-out shapes images for --eval_iou")
    g.add_argument("--image_cache", default=None, metavar="FILE",
                   help="fast input path: decode every image once into FILE (uint8; the file that "
                        "pretrain.py reads), flip and normalise on the device")
    return p.parse_args(argv)


if __name__ == "__main__":
    runs.run_stage(main, get_args)
