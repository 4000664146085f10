"""Stage 2: MAE pre-training with random, SemMAE or ObjMAE masking.

Each step draws one mask per image, runs the encoder on the source patches only and the decoder on
source + target tokens (model.py), and regresses the target pixels; random masking is the case
source = kept, target = masked. The papers' commands, and what each paper reports: PAPERS.md.

On a laptop, the built-in shapes data (no --data_path), a few minutes on a CPU:
    python pretrain.py --model mae_vit_tiny_patch8 --input_size 64 --epochs 10 --batch_size 64 \
        --blr 1e-3
SemMAE ViT-B/16 on 8 GPUs, with the parts of part_learn.py:
    torchrun --nproc_per_node=8 pretrain.py --mask semmae --accum_iter 8 \
        --data_path IMAGENET/train --regions parts16/regions.pt --output_dir semmae16

References: SemMAE (Li et al., NeurIPS 2022, arXiv:2206.10207), ObjMAE (Wu & Mo 2022,
arXiv:2205.14338), MAE (He et al., CVPR 2022, arXiv:2111.06377).
"""
import argparse
import os
import time

import numpy as np
import torch

import data
import image_cache
import launch
import masking
import model as models
import region_file
import runs
import scenes
import utils
from utils import UsageError


# ----------------------------------------------------------------------------- masks

class Masker:
    """Turns a batch of region cells into (src_ids, tgt_ids, src_valid, tgt_valid) for one step: the
    cells become one label (and score) per patch, the rest is masking.py."""

    def __init__(self, args, patch_size, cell_size, grid, num_parts):
        self.args = args
        self.factor = patch_size // cell_size  # cells per patch side; > 1 only for parts (main)
        self.num_patches = grid[0] * grid[1]
        self.num_parts = num_parts  # semmae: region ids 0..num_parts-1; 'ignore' (255) is one more

    def alpha(self, progress):
        a = self.args
        return a.alpha if a.alpha is not None else masking.alpha_schedule(progress, a.gamma,
                                                                          a.reverse)

    def __call__(self, cell_labels, cell_scores, progress, generator=None):
        a = self.args
        # [B, L] vote, random ties
        labels = region_file.cells_to_patches(cell_labels, self.factor, generator)
        scores = region_file.scores_to_patches(cell_scores, self.factor)   # [B, L]
        if a.mask == "objmae":                                             # ObjMAE §3
            return masking.object_wise_masking(labels, a.seq_ratio, a.padding, a.relation,
                                               scores if a.regions else None, generator=generator)
        # random or SemMAE (SemMAE §3.2, Alg. 1), after the foreground keep of §4.2 when
        # --keep_ratio < 1
        # (drop the least object-like patches, so a patch-8 model costs what a patch-16 one does)
        alpha = self.alpha(progress) if a.mask == "semmae" else None  # None: MAE's random masking
        src_ids, tgt_ids = masking.source_target_ids(labels, a.mask_ratio, alpha,
                                                     num_parts=self.num_parts,
                                                     ignore_label=region_file.IGNORE, scores=scores,
                                                     keep_ratio=a.keep_ratio, generator=generator)
        return src_ids, tgt_ids, None, None  # [B, Lk-M], [B, M]: no padding


def region_cell_size(args, regions, patch_size):
    """The cell size the pre-training samples carry. Objects follow ObjMAE §3.2's 20% rule on each
    patch's own pixels: the shapes' masks are turned into cells the size of a patch, and a regions
    file of objects must have been made at this model's patch size (a vote over finer cells loses
    half-covered objects). Parts may be finer than the patch: Masker takes a vote of their cells,
    ties at random (or export them at the patch size, the maps pooled over the patch: part_learn.py
    --cell_size)."""
    if regions is None:
        return patch_size
    cell_size, objects = regions["meta"]["cell_size"], regions["meta"].get("kind") == "objects"
    for broken, message in (
            (patch_size % cell_size, f"{args.regions} has {cell_size}-px cells, coarser than the "
             f"{patch_size}-px patches of {args.model}; remake it with part_learn.py "
             f"--cell_size {patch_size}"),
            (objects and cell_size != patch_size, f"{args.regions} holds objects on {cell_size}-px "
             f"cells, but the 20% rule (ObjMAE §3.2) must see each {patch_size}-px patch's own "
             f"pixels; remake it with part_learn.py --cell_size {patch_size}"),
            (objects and args.crop_scale and cell_size > 1 and regions.get("masks") is None,
             f"{args.regions} holds objects without their pixel masks, so --crop_scale cannot "
             "re-apply the 20% rule to the cropped patches (ObjMAE §3.2); remake it with "
             "part_learn.py, which stores them")):
        if broken:
            raise UsageError(message)
    return cell_size


def images_with_objects(base, regions, input_size, cell_size, d, chunk=4096):
    """bool [N]: which images have an object ObjMAE can mask, a region id in 1..254 on >= 2 patches
    (masking.py's rule: a 1-patch object cannot be split into source and target). Read from the
    regions file's labels (objects are on the model's patches), else from the shapes' own masks by
    the 20% and 5% rules (ObjMAE §3.2, §4.1). ObjMAE §4.1 drops the rest (COCO: 72,452 of 82,783
    images kept); so does the dataset here, before any crop."""
    grid = (input_size // cell_size,) * 2
    if regions is None:
        rows = (region_file.mask_cells(base.load(i)[1], input_size, grid)
                for i in runs.progress(range(len(base)), "objects per image", None, d))
        labels = torch.from_numpy(np.stack(list(rows)))
    else:
        labels = regions["labels"]
    found = []
    for lo in range(0, len(labels), chunk):  # a memory-mapped file, a chunk at a time
        lab = labels[lo:lo + chunk].reshape(-1, grid[0] * grid[1]).long()
        counts = torch.zeros(len(lab), 256, dtype=torch.long).scatter_add_(1, lab,
                                                                           torch.ones_like(lab))
        found.append((counts[:, 1:region_file.IGNORE] >= 2).any(1))
    return torch.cat(found)


# ----------------------------------------------------------------------------- the flags' rules

# Each rule between flags once: (broken when, the one line saying so and the fix); {a.x} is a flag.
RULES = [
    (lambda a: a.crop_scale is not None and not 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1,
     "--crop_scale {a.crop_scale[0]} {a.crop_scale[1]} must be 0 < MIN <= MAX <= 1"),
    (lambda a: not 0 < a.crop_ratio[0] <= a.crop_ratio[1] <= 100,
     "--crop_ratio {a.crop_ratio[0]} {a.crop_ratio[1]} must be 0 < MIN <= MAX <= 100"),
    # what a regions file from part_learn.py gives
    (lambda a: a.mask == "semmae" and a.regions is None,
     "--mask semmae needs part labels: run part_learn.py first, then pass --regions "
     "<output_dir>/regions.pt"),
    (lambda a: a.mask == "objmae" and a.data_path is not None and a.regions is None,
     "--mask objmae on an image folder needs objects: run part_learn.py --method cam (or "
     "segmentation), then pass --regions <output_dir>/regions.pt"),
    # a crop mixes with --keep_ratio: the scores are cropped with the image (by area), so the
    # kept patches are still the crop's most foreground ones (SemMAE §4.2's rule, on what the
    # model sees)
    (lambda a: a.keep_ratio < 1.0 and a.regions is None,
     "--keep_ratio < 1 needs foreground scores: pass --regions from part_learn.py"),
    (lambda a: a.compile and a.compile not in torch.compiler.list_backends(exclude_tags=()),
     lambda a: f"--compile {a.compile} is not a torch.compile backend; choose from "
               f"{', '.join(torch.compiler.list_backends())}"),
]
SCHEDULE = (lambda a: a.mask == "semmae" and a.alpha is None,
            "with --mask semmae and no --alpha (the schedule alpha = progress ** gamma)")
OBJMAE = (lambda a: a.mask == "objmae", "with --mask objmae")
LOOKAHEAD = (lambda a: a.lookahead, "with --lookahead")
# The flags that do nothing in a mode (get_args' groups): {flag: (acts when, where it acts)}.
UNUSED = {
    "gamma": SCHEDULE, "reverse": SCHEDULE,
    "alpha": (lambda a: a.mask == "semmae", "with --mask semmae"),
    "mask_ratio": (lambda a: a.mask != "objmae",
                   "with --mask random or semmae (objmae's lengths: --seq_ratio)"),
    "keep_ratio": (lambda a: a.mask != "objmae",
                   "with --mask random or semmae (objmae already drops non-object patches)"),
    "seq_ratio": OBJMAE, "padding": OBJMAE, "relation": OBJMAE,
    "crop_ratio": (lambda a: a.crop_scale is not None,
                   "with --crop_scale (the crop's aspect ratio)"),
    "blr": (lambda a: a.lr is None, "without --lr (which overrides it)"),
    "lookahead_k": LOOKAHEAD, "lookahead_alpha": LOOKAHEAD, **scenes.BUILTIN_FLAGS}


def check_args(args):
    """The flags alone, before any work: each range once (utils.RANGES), the rules between flags,
    the flags that do nothing in the chosen mode."""
    utils.check_ranges(args)
    utils.check_rules(args, RULES)
    utils.refuse_unused(args, get_args([]), {k: (acts(args), where)
                                             for k, (acts, where) in UNUSED.items()})


def check_mask_count(args, num_patches):
    """MAE's rounding must leave at least one patch to see and one to predict (random and
    semmae)."""
    L = num_patches if args.keep_ratio == 1.0 else max(1, int(num_patches * args.keep_ratio))
    num_masked = masking.masked_count(L, args.mask_ratio)
    if not 0 < num_masked < L:
        larger = "--input_size" + (" or --keep_ratio" if args.keep_ratio < 1.0 else "")
        raise UsageError(f"--mask_ratio {args.mask_ratio} masks {num_masked} of the {L} patches "
                         f"{'kept' if args.keep_ratio < 1.0 else 'of an image'}; it must mask at "
                         f"least one and leave one (or pass a larger {larger})")


# ----------------------------------------------------------------------------- data and resume

def build_dataset(args, d):
    """-> (base images, regions or None, cell size, training set). The shapes scenes carry their own
    instance masks; a folder needs a regions file. ObjMAE §4.1: images without an object are
    dropped."""
    with utils.user_input():  # a bad folder, file or size: exit 2
        base = (scenes.builtin(args.scenes, args.num_images, args.input_size, args.data_seed,
                             scene_cache=args.scene_cache)
                if args.data_path is None else data.FolderDataset(args.data_path, classes=False))
        regions = (region_file.load_regions(args.regions, base.files, args.input_size)
                   if args.regions else None)
        patch_size = models.MODELS[args.model].keywords["patch_size"]
        cell_size = region_cell_size(args, regions, patch_size)
        augment = dict(regions=regions, hflip=args.hflip, cell_size=cell_size,
                       crop_scale=args.crop_scale, crop_ratio=tuple(args.crop_ratio))
        # fast path: uint8 images from the cache, crop/flip/normalise on the device; built-in
        # scenes drawn once (--scene_cache) are such a cache already
        cache = None
        if args.image_cache:
            cache = image_cache.open_image_cache(args.image_cache, base, args.input_size,
                                                 args.num_workers, d.rank, d.world)
        elif isinstance(base, scenes.Drawn):
            cache = image_cache.load_image_cache(base.path, base.files, args.input_size)
        if cache:
            dataset = image_cache.CachedPretrainDataset(base, cache, args.input_size, **augment)
        else:
            dataset = data.PretrainDataset(base, args.input_size, **augment)
    if args.mask == "objmae":
        keep = images_with_objects(base, regions, args.input_size, cell_size,
                                   d).nonzero().flatten().tolist()
        utils.print0(d, f"--mask objmae: dropped {len(base) - len(keep)} of {len(base)} images "
                        f"with no object (ObjMAE §4.1), training on {len(keep)}")
        if not keep:
            raise UsageError(f"--mask objmae: none of the {len(base)} images has an object; pass "
                             "--regions with objects (part_learn.py --method cam or segmentation)")
        dataset = torch.utils.data.Subset(dataset, keep)
    return base, regions, cell_size, dataset


def resume(args, net, optimizer, scaler, d):
    """--resume: the weights, optimizer and loss scale of a pretrain.py run -> (first epoch,
    micro-batches of it already done, what the rest of it needs) (runs.resume_partial)."""
    ckpt = runs.load_checkpoint(args.resume)
    old = ckpt["args"] if isinstance(ckpt.get("args"), dict) else {}
    other = "part_learn.py" if "learner" in ckpt else "finetune.py" if "linprobe" in old else None
    for broken, message in (
            # e.g. an official MAE/SemMAE file
            (not isinstance(ckpt.get("args"), dict) or "optimizer" not in ckpt,
             f"{args.resume} is not a checkpoint of pretrain.py (no args and optimizer state; "
             "released MAE/SemMAE weights?); --resume continues a pretrain.py run from its "
             "checkpoint-last.pth; to fine-tune released weights: finetune.py --finetune "
             f"{args.resume}"),
            # another stage's run: no --model of this one fits it
            (other, f"{args.resume} is a checkpoint of {other}, not of pretrain.py; --resume "
             "continues a pretrain.py run from its checkpoint-last.pth"),
            (old.get("model") != args.model, f"{args.resume} holds a {old.get('model')} model, "
             f"not --model {args.model}; resume with --model {old.get('model')}")):
        if broken:
            raise UsageError(message)
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # another --input_size (pos_embed), or an edited tensor
        raise UsageError(f"{args.resume} does not fit this run's model: "
                         f"{str(e).splitlines()[1].strip()}; resume with the flags the run started "
                         "with (its args.json)") from None
    utils.load_optimizer(optimizer, ckpt["optimizer"], args.resume)
    utils.load_scaler(scaler, ckpt.get("scaler"))
    return (ckpt["epoch"] + 1, *runs.resume_partial(ckpt, d, args.resume))


# ----------------------------------------------------------------------------- main

def main(args):
    # Check the flags, set up DDP and the output folder (nothing is written before every check
    # passed):
    check_args(args)
    d = launch.init_distributed(args.device, args.dist_timeout)
    # auto -> what this device does
    args.precision = utils.resolve_precision(args.precision, d.device)
    summary_writer = runs.summary_writer_class(args.tensorboard)  # optional: installed, or one line
    runs.prepare_output_dir(args, d)                                       # resolves --resume auto
    torch.manual_seed(args.seed)  # same initial weights on every rank

    # Data (images and their region cells, augmented together: data.PretrainDataset):
    base, regions, cell_size, dataset = build_dataset(args, d)
    loader = utils.make_loader(dataset, args.batch_size, args.num_workers, True, args.seed, d)
    utils.check_accum(loader, len(dataset), args)

    # Create model and masker:
    with utils.user_input():  # --input_size not a multiple of the patch
        net = models.MODELS[args.model](img_size=args.input_size,
                                        norm_pix_loss=args.norm_pix_loss).to(d.device)
    net.grad_checkpointing = args.grad_checkpointing
    num_parts = None  # semmae: the region ids 0..num_parts-1 ('ignore', 255, is one more)
    if regions:
        num_parts = regions["meta"]["num_regions"] + (regions["meta"]["kind"] == "objects")
    masker = Masker(args, net.patch_size, cell_size, net.grid, num_parts)
    if args.mask != "objmae":
        check_mask_count(args, masker.num_patches)

    # Setup optimizer (MAE's AdamW, lr = blr * effective batch / 256; ObjMAE Table 2 adds
    # Lookahead):
    base_lr, eff_batch = utils.scaled_lr(args, d)
    optimizer = torch.optim.AdamW(utils.param_groups(net, args.weight_decay), lr=base_lr,
                                  betas=tuple(args.opt_betas), eps=args.opt_eps,
                                  # one kernel for all params
                                  fused=True if d.device.type == "cuda" else None)
    if args.lookahead:
        optimizer = utils.Lookahead(optimizer, args.lookahead_k, args.lookahead_alpha)
    scaler = utils.grad_scaler(d.device, args.precision)  # fp16 only; a no-op otherwise
    start_epoch, start_step, carry = 0, 0, None
    if args.resume:
        start_epoch, start_step, carry = resume(args, net, optimizer, scaler, d)
    ddp = utils.wrap_ddp(net, d)
    # the checkpoints keep net's parameter names
    step_net = torch.compile(ddp, backend=args.compile) if args.compile else ddp

    # Start the run (the folder, its lock, args.json):
    runs.start_run(args, d, start_epoch)
    runs.print_args(d, args)
    tb = summary_writer(args.tensorboard) if summary_writer and d.is_main else None
    utils.print0(d, f"{args.model}: {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M params, "
                    f"{len(dataset)} images, effective batch {eff_batch}, lr {base_lr:.2e}, "
                    f"epochs {start_epoch}..{args.epochs - 1}")
    # fixed images and masks for the pictures, drawn from their own generator so they do not
    # disturb the training RNG (and a resumed run draws the same ones)
    vis_set = data.PretrainDataset(base, args.input_size, regions=regions, hflip=False,
                                   cell_size=cell_size)
    vis = [vis_set[i] for i in range(min(8, len(vis_set)))]
    vis_imgs, vis_cells, vis_scores = (torch.stack([v[k] for v in vis]).to(d.device)
                                       for k in range(3))

    iters = utils.batches_per_epoch(loader, args.accum_iter)  # leftovers < accum_iter are skipped
    total_iters, warmup_iters = args.epochs * iters, args.warmup_epochs * iters
    ckpt_path = os.path.join(args.output_dir, "checkpoint-last.pth")

    def run_state(epoch):                   # what a checkpoint holds, epoch = the last finished one
        return {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch, "args": vars(args)}
    zero_pad = args.mask == "objmae" and args.padding == "zero"   # ObjMAE §3.3: attended zeros
    # Train:
    for epoch in range(start_epoch, args.epochs):
        utils.seed_epoch(args.seed, epoch, d)  # resume = same masks, flips and worker seeds
        skip = start_step if epoch == start_epoch else 0  # micro-batches done before a stop
        loader.sampler.set_epoch(epoch, skip * args.batch_size)
        ddp.train()
        # the loss is summed on the device and read every --log_every steps: no host sync in the
        # other steps
        t0, loss_sum, n_sum = time.time(), torch.zeros((), dtype=torch.float64, device=d.device), 0
        if skip:                                    # where the stop left the RNGs and the sums
            runs.set_rng_state(carry["rng"])
            loss_sum, n_sum = carry["sums"][0].to(d.device), carry["sums"][1]
        # plain lines outside a tty
        bar = runs.progress(loader, f"epoch {epoch}", iters, d, args.log_every, skip)
        for it, (imgs, cells, scores, _, *choices) in enumerate(bar, start=skip):
            if it == iters:  # the leftover micro-batches
                break
            i = epoch * iters + it
            if it % args.accum_iter == 0:
                lr = utils.cosine_lr(i, total_iters, warmup_iters, base_lr, args.min_lr)
                utils.set_lr(optimizer, lr)
            # alpha is recomputed every iteration from the fraction of training done, so it reaches
            # 1 at the last step whatever --epochs is (Algorithm 1, line 7, per step not per epoch)
            progress = i / max(1, total_iters - 1)
            imgs, cells, scores = (x.to(d.device, non_blocking=True) for x in (imgs, cells, scores))
            if imgs.dtype == torch.uint8:  # the fast path -> the default path's tensors (boxes: CPU)
                flips, boxes = choices
                imgs = image_cache.device_batch(imgs, flips, boxes if args.crop_scale else None)
            src_ids, tgt_ids, src_valid, tgt_valid = masker(cells, scores, progress)
            sync = (it + 1) % args.accum_iter == 0
            with utils.no_sync_unless(ddp, sync, d):
                with utils.autocast(d.device, args.precision):
                    loss, _ = step_net(imgs, src_ids, tgt_ids, src_valid, tgt_valid,
                                       attend_padding=zero_pad)
                scaler.scale(loss / args.accum_iter).backward()
            if sync:
                scaler.step(optimizer)  # fp16: unscale, skip a step with inf
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            n_sum += 1
            # always at the epoch's last step
            log_now = (it + 1) % args.log_every == 0 or it + 1 == iters
            if log_now:
                loss_value = loss_sum.item() / n_sum  # the sync: the epoch's mean so far
                runs.stop_if_not_finite(loss_value, "one of steps "
                                                    f"{i - (it % args.log_every)}..{i} (epoch "
                                                    f"{epoch})",
                                         # before any checkpoint of this epoch
                                         ckpt_path, args.precision)
                shown = {"alpha": f"{masker.alpha(progress):.3f}"} if args.mask == "semmae" else {}
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", **shown)
                if tb:
                    tb.add_scalar("train/loss", loss_value, i + 1)
                    tb.add_scalar("train/lr", lr, i + 1)
            # SIGTERM/SIGUSR1: stop after this step
            if sync and it + 1 < iters and runs.stop_requested(d, log_now):
                bar.close()
                where = f"after step {it + 1} of {iters} of epoch {epoch}"
                runs.stop_now(ckpt_path, run_state(epoch - 1), d, where, it + 1, (loss_sum.cpu(),
                                                                                  n_sum))
        bar.close()

        # Log, checkpoint and picture the epoch:
        train_loss = utils.all_reduce_mean(loss_value, d)
        state = run_state(epoch) if d.is_main else None
        if d.is_main:
            # the log line first: a run killed before the checkpoint redoes the epoch, and the
            # resume cuts the log
            # back to the checkpoint (runs.start_run), so every epoch is in the log once
            record = {"epoch": epoch, "train_loss": train_loss, "lr": lr,
                      "time_s": round(time.time() - t0, 2)}
            if args.mask == "semmae":
                record["alpha"] = masker.alpha(progress)
            runs.append_log(os.path.join(args.output_dir, "log.txt"), record)
            if tb:
                tb.add_scalar("epoch/train_loss", train_loss, epoch)
                tb.flush()
            if (epoch + 1) % args.ckpt_every == 0 or epoch + 1 == args.epochs:
                runs.save_checkpoint(ckpt_path, state)
            if args.save_every and (epoch + 1) % args.save_every == 0:
                runs.save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"),
                                     state)
            print(f"epoch {epoch}: loss {train_loss:.4f} lr {lr:.2e} ({record['time_s']}s)",
                  flush=True)
            if args.vis_every and ((epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs):
                g = torch.Generator(d.device).manual_seed(args.seed)
                net.eval()
                save_reconstructions(os.path.join(args.output_dir, f"recon-{epoch:04d}.png"), net,
                                     vis_imgs,
                                     masker(vis_cells, vis_scores, progress, generator=g), zero_pad)
        # a stop in the epoch's last step
        if epoch + 1 < args.epochs and runs.stop_requested(d, True):
            runs.stop_now(ckpt_path, state, d, f"after epoch {epoch}")
    if tb:
        tb.close()
    runs.end_run()


# ----------------------------------------------------------------------------- pictures

def save_reconstructions(path, net, imgs, masks, attend_padding=False):
    """One row per image: original | visible (source) patches | reconstruction of the targets |
    reconstruction with the visible patches pasted, with these headings. Dropped patches (ObjMAE)
    stay grey."""
    src_ids, tgt_ids, src_valid, tgt_valid = masks
    p = net.patch_size
    with torch.no_grad():
        _, pred = net(imgs, src_ids, tgt_ids, src_valid, tgt_valid, attend_padding=attend_padding)
        pred = net.pred_to_pixels(imgs, tgt_ids, pred)  # de-normalise norm_pix_loss
    patches = models.patchify(imgs, p)                                     # [B, L, p*p*3]
    mean = torch.tensor(data.IMAGENET_MEAN).repeat(p * p)                  # pixel order (p, q, c)
    std = torch.tensor(data.IMAGENET_STD).repeat(p * p)
    blank = ((0.5 - mean) / std).expand_as(patches)  # grey where nothing is shown

    def place(canvas, ids, values, valid):
        # padding slots repeat real ids; send them to a spare row L so they never overwrite a real
        # patch
        L = canvas.shape[1]
        ids = ids if valid is None else torch.where(valid, ids, L)
        canvas = torch.cat([canvas, canvas[:, :1]], 1)                    # [B, L+1, p*p*3]
        canvas.scatter_(1, ids[..., None].expand_as(values), values)
        return canvas[:, :L]

    src_pixels = patches.gather(1, src_ids[..., None].expand(-1, -1, patches.shape[-1]))
    visible = place(blank, src_ids, src_pixels, src_valid)
    recon = place(blank, tgt_ids, pred, tgt_valid)
    pasted = place(recon, src_ids, src_pixels, src_valid)
    h, w = imgs.shape[2] // p, imgs.shape[3] // p
    columns = [models.unpatchify(x, p, h, w) for x in (patches, visible, recon, pasted)]
    grid = torch.stack(columns, 1).flatten(0, 1)                            # [B*4, 3, H, W]
    data.save_with_headings(path, data.denormalise(grid), ["original", "visible", "reconstruction",
                                                           "pasted"])


# ----------------------------------------------------------------------------- flags

def get_args(argv=None):
    # The defaults are SemMAE §4.1's recipe (MAE's): they reproduce SemMAE's ViT-B/16 run at batch
    # 4096; the flags of the other papers' settings are in PAPERS.md. Ranges: utils.RANGES.
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="mae_vit_base_patch16", choices=sorted(models.MODELS),
                   help="MAE's, SemMAE Table 1 left's; SemMAE's main: ViT-B/8, ObjMAE's: ViT-S/16")
    g.add_argument("--input_size", type=int, default=224, help="all three papers: 224")
    g.add_argument("--data_path", default=None,
                   help="folder of images at any depth (no labels read); omitted = built-in shapes")
    g.add_argument("--num_images", type=int, default=2000, help="size of the built-in shapes")
    g.add_argument("--data_seed", type=int, default=0, help="which shapes scenes (not --seed)")
    scenes.add_scene_flags(g)
    g.add_argument("--regions", default=None,
                   help="regions.pt from part_learn.py (parts or objects per cell)")
    g = p.add_argument_group("masking (all masks)")
    g.add_argument("--mask", default="random", choices=["random", "semmae", "objmae"])
    g.add_argument("--mask_ratio", type=float, default=0.75, help="random, semmae (MAE: 0.75)")
    g.add_argument("--keep_ratio", type=float, default=1.0,
                   help="keep this share of most-foreground patches, then mask (SemMAE 8x8: 0.25)")
    g = p.add_argument_group("--mask semmae only")
    g.add_argument("--gamma", type=float, default=2.0, help="alpha = progress**gamma (Table 3)")
    g.add_argument("--alpha", type=float, default=None, help="fixed, instead of the schedule")
    g.add_argument("--reverse", action="store_true", help="alpha goes 1 -> 0 (Table 3)")
    g = p.add_argument_group("--mask objmae only")
    g.add_argument("--seq_ratio", type=float, default=0.25,
                   help="source and target length / L (§3.3; Table 4: 1/4; Table 5, COCO: 0.34)")
    g.add_argument("--padding", default="zero",
                   choices=["zero", "masked", "replicate", "random", "throwout"],
                   help="§3.3, Table 8; zero: attended zero tokens (§3.3); masked (not the "
                        "paper's): removed from attention too; throwout: the batch minimum, one "
                        "host sync a step")
    g.add_argument("--relation", default="intra", choices=["intra", "inter", "image"],
                   help="source and target from one object (§3, Table 6's best), two objects, or "
                        "the image")
    g = p.add_argument_group("augmentation (of the image and its region cells together)")
    g.add_argument("--crop_scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random-resized crop area, e.g. 0.2 1.0 (MAE; ObjMAE §4.2); default: none,"
                        " the whole image resized (SemMAE §4.1: flip only)")
    g.add_argument("--crop_ratio", type=float, nargs=2, default=(3 / 4, 4 / 3),
                   metavar=("MIN", "MAX"),
                   help="the crop's aspect ratio range (RandomResizedCrop's, as MAE)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flip (SemMAE §4.1, MAE); --no-hflip: ObjMAE §4.2")
    g = p.add_argument_group("optimisation (SemMAE §4.1, MAE's recipe; ObjMAE's: Tables 2-3)")
    g.add_argument("--epochs", type=int, default=800, help="SemMAE §4.1, ObjMAE Table 3: 800")
    g.add_argument("--warmup_epochs", type=int, default=40, help="SemMAE §4.1, ObjMAE Table 3: 40")
    g.add_argument("--batch_size", type=int, default=64, help="per device (x accum x world: 4096)")
    g.add_argument("--accum_iter", type=int, default=1)
    g.add_argument("--blr", type=float, default=1.5e-4, help="lr = blr * effective batch / 256")
    g.add_argument("--lr", type=float, default=None, help="absolute lr; overrides --blr")
    g.add_argument("--min_lr", type=float, default=0.0, help="cosine's end (ObjMAE Table 2: 1e-5)")
    g.add_argument("--weight_decay", type=float, default=0.05, help="all three papers: 0.05")
    g.add_argument("--opt_betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("B1", "B2"),
                   help="AdamW betas: MAE's, which SemMAE follows (§4.1); ObjMAE Table 2: 0.9 "
                        "0.999")
    g.add_argument("--opt_eps", type=float, default=1e-8, help="AdamW eps (MAE, ObjMAE Table 2)")
    g.add_argument("--lookahead", action="store_true", help="AdamW in Lookahead (ObjMAE Table 2)")
    g.add_argument("--lookahead_k", type=int, default=5, help="Zhang et al. 2019: 5")
    g.add_argument("--lookahead_alpha", type=float, default=0.5, help="Zhang et al. 2019: 0.5")
    g.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="regress normalised pixels per patch (MAE §3, Table 1d; SemMAE's released "
                        "command)")
    g = runs.add_run_flags(p, "output/pretrain")
    g.add_argument("--ckpt_every", type=int, default=1,
                   help="write checkpoint-last.pth every N epochs and at the end (ViT-B: 1.3 GB)")
    g.add_argument("--save_every", type=int, default=0, help="keep checkpoint-<epoch>.pth every N")
    g.add_argument("--vis_every", type=int, default=10, help="a reconstruction PNG every N epochs")
    g.add_argument("--image_cache", default=None, metavar="FILE",
                   help="fast input path: decode every image once into FILE (uint8; ImageNet at "
                        "224: 193 GB), then crop, flip and normalise on the device")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model; e.g. aot_eager: traces without kernels")
    return p.parse_args(argv)


if __name__ == "__main__":
    runs.run_stage(main, get_args)
