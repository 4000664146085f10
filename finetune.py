"""Stage 3: fine-tuning, linear probing (--linprobe), k-NN (--knn) and evaluation (--eval) of a
pre-trained ViT encoder. Flags left at None take the mode's recipe (RECIPES: MAE's main_finetune or
main_linprobe). The papers' commands, and what each paper reports: PAPERS.md. The saved
model-timm.pth loads into timm's VisionTransformer unchanged.

On a laptop, after pretrain.py's laptop run (the built-in shapes data, a few minutes on a CPU):
    python finetune.py --model vit_tiny_patch8 --input_size 64 --epochs 15 --warmup_epochs 2 \
        --finetune output/pretrain/checkpoint-last.pth --batch_size 64 --blr 5e-3 --aa none \
        --mixup 0 --cutmix 0 --reprob 0 --crop_min 0.35
SemMAE ViT-B/16 fine-tuned on 8 GPUs (batch 8 x 32 x 4 = 1024):
    torchrun --nproc_per_node=8 finetune.py --model vit_base_patch16 \
        --finetune semmae16/checkpoint-last.pth --data_path IMAGENET --accum_iter 4

References: SemMAE (Li et al., NeurIPS 2022, arXiv:2206.10207), ObjMAE (Wu & Mo 2022,
arXiv:2205.14338), MAE (He et al., CVPR 2022, arXiv:2111.06377).
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import data
import launch
import masking
import model as models
import probe
import randaugment
import region_file
import released
import runs
import scenes
import utils
from utils import UsageError


# MAE's main_finetune and main_linprobe; batch_size per device (MAE: 32 x 32 GPUs, 512 x 32 GPUs)
RECIPES = {"finetune": dict(batch_size=32, epochs=100, warmup_epochs=5, blr=5e-4, min_lr=1e-6,
                            weight_decay=0.05),
           "linprobe": dict(batch_size=512, epochs=90, warmup_epochs=10, blr=0.1, min_lr=0.0,
                            weight_decay=0.0)}


# ----------------------------------------------------------------------------- model

def build_model(args, num_classes):
    """The --model ViT with a new head: Linear (trunc-normal std 2e-5, MAE fine-tuning) or, for
    --linprobe, BatchNorm without affine + Linear (std 0.01) on a frozen encoder (MAE's probe)."""
    net = models.VITS[args.model](img_size=args.input_size, num_classes=num_classes,
                                  global_pool=args.global_pool,
                                  drop_path_rate=0.0 if args.linprobe else args.drop_path)
    nn.init.trunc_normal_(net.head.weight, std=0.01 if args.linprobe else 2e-5)
    nn.init.zeros_(net.head.bias)
    if args.linprobe:
        net.requires_grad_(False)
        net.head = nn.Sequential(nn.BatchNorm1d(net.head.in_features, affine=False, eps=1e-6),
                                 net.head)
        net.head.requires_grad_(True)
    return net


def load_pretrained(net, path, verbose=True):
    """Encoder weights from any layout released.load_encoder_checkpoint reads, position embedding
    interpolated to net's grid -> (missing, unexpected) keys, printed; anything missing but the
    head (and fc_norm, which global pooling starts fresh, as MAE) stops the run."""
    sd, info = released.load_encoder_checkpoint(path)
    want = (net.patch_embed.proj.out_channels, len(net.blocks), net.patch_size)
    have = (info["embed_dim"], info["depth"], info["patch_size"])
    if want != have:
        fit = models.names_that_fit(*have)
        fix = (f"pass --model {' or '.join(fit)}" if fit else
               f"no --model has these sizes (choices: {', '.join(sorted(models.VITS))})")
        raise UsageError(f"{path} holds a ViT with embed_dim, depth, patch size {have}, but "
                         f"--model has {want}; {fix}")
    sd["pos_embed"] = models.interpolate_pos_embed(sd["pos_embed"], net.grid)  # 14x14 -> 28x28
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a tensor of another shape (an edited or foreign file)
        raise UsageError(f"{path} does not fit --model: {str(e).splitlines()[1].strip()}") from None
    if verbose:
        print(f"loaded {path} ({info['layout']} layout): missing {missing}, "
              f"unexpected {unexpected}", flush=True)
    fresh = ("head.", "fc_norm.") if net.global_pool else ("head.",)
    lacks = [k for k in missing if not k.startswith(fresh)]
    if lacks:
        raise UsageError(f"{path} lacks encoder weights {lacks[:6]}; it is not a complete encoder "
                         "for --model (or pass --global_pool for a fc_norm checkpoint)")
    return missing, unexpected


def load_trained(net, ckpt, args, path):
    """A checkpoint of this script (or a plain/{'model'} state dict with a head: MAE's ViTs)."""
    old = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    sd = dict(ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt)
    fixes = {"model": f"--model {old.get('model')}",
             "linprobe": "--linprobe" if old.get("linprobe") else "no --linprobe",
             "global_pool": "--global_pool" if old.get("global_pool") else "--no-global_pool"}
    for broken, message in (
            (str(old.get("model")).startswith("mae_") or any(str(k).startswith("decoder")
                                                             for k in sd),
             f"{path} is a pre-training checkpoint (encoder + decoder, no classifier); start "
             f"fine-tuning from it with --finetune {path} (--resume continues a finetune.py run, "
             "--eval evaluates one)"),
            ("learner" in ckpt, f"{path} is a part_learn.py checkpoint (a part learner, no "
             "classifier); --resume takes the checkpoint-last.pth of a finetune.py run"),
            *((flag in old and old[flag] != getattr(args, flag), f"{path} was trained with "
               f"{flag}={old.get(flag)} but this run has {flag}={getattr(args, flag)}; pass {fix}")
              for flag, fix in fixes.items()),
            (not any(str(k).startswith("head.") for k in sd), f"{path} holds an encoder without "
             "a classifier (released pre-trained weights?); start fine-tuning from it with "
             f"--finetune {path}")):
        if broken:
            raise UsageError(message)
    if "pos_embed" in sd and sd["pos_embed"].shape != net.pos_embed.shape:
        sd["pos_embed"] = models.interpolate_pos_embed(sd["pos_embed"], net.grid)
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:  # a missing key or a size mismatch: other --model or classes
        raise UsageError(f"{path} does not fit --model {args.model} with this dataset's classes: "
                         f"{str(e).splitlines()[-1].strip()}") from None


# ----------------------------------------------------------------------------- data

def build_transform(args, train):
    """MAE's pipelines in torchvision's transforms: fine-tuning RandomResizedCrop + flip +
    RandAugment + random erasing (per-pixel noise, timm's 'pixel'); linear probing crop + flip;
    validation resize + centre crop. --train_crop bit: BiT's (bilinear) 7/6 resize + random crop."""
    bicubic = v2.InterpolationMode.BICUBIC
    size, mean, std = args.input_size, data.IMAGENET_MEAN, data.IMAGENET_STD
    if not train:
        head = [v2.Resize(int(size / args.crop_pct), interpolation=bicubic, antialias=True),
                v2.CenterCrop(size)]
    else:
        head = [v2.RandomResizedCrop(size, scale=(args.crop_min, 1.0), interpolation=bicubic,
                                     antialias=True),
                v2.RandomHorizontalFlip()]
        if args.train_crop == "bit" and not args.linprobe:
            head[0:1] = [v2.Resize((round(size * 7 / 6),) * 2, antialias=True), v2.RandomCrop(size)]
        policy = None if args.linprobe else randaugment.parse(args.aa)
        if policy:                                                  # fill: the mean colour (timm)
            head.append(randaugment.RandAugment(**policy, fill=[round(255 * m) for m in mean]))
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if train and not args.linprobe and args.reprob > 0:
        tail.append(v2.RandomErasing(args.reprob, value="random"))
    return v2.Compose(head + tail)


def build_datasets(args):
    """-> (train set (None with --eval), validation set, class names). Items are (img, class) or,
    with keep_ratio < 1, (img, class, cell scores)."""
    splits = [False] if args.eval else [True, False]  # is it the training split (--eval: val only)
    if args.data_path is None:
        bases = [scenes.builtin(args.scenes, args.num_images if train else args.num_val_images,
                              args.input_size, args.data_seed, "train" if train else "val",
                              args.scene_cache) for train in splits]
    elif args.dataset == "cifar100":
        bases = [data.CIFAR100(args.data_path, train, args.download) for train in splits]
    else:
        dirs = [os.path.join(args.data_path, "train" if train else "val") for train in splits]
        for folder in dirs:
            if not os.path.isdir(folder):
                raise UsageError(f"{folder} does not exist; --data_path needs train/ and val/ in "
                                 "ImageNet layout (<split>/<class>/<image>)")
        bases = [data.FolderDataset(folder) for folder in dirs]
    if bases[0].classes != bases[-1].classes:
        raise UsageError(f"train and val have different classes ({len(bases[0].classes)} vs "
                         f"{len(bases[-1].classes)}); both need the same class folders")
    sets = []
    for base, train in zip(bases, splits):
        if args.keep_ratio == 1.0:                               # k-NN: both sets as val
            sets.append(data.Classification(base, build_transform(args, train and not args.knn)))
            continue
        path = args.regions if train else args.val_regions
        regions = region_file.load_regions(path, base.files, args.input_size) if path else None
        if regions and regions["scores"] is None and regions["meta"].get("kind") != "objects":
            raise UsageError(f"{path} has parts but no foreground scores; --keep_ratio needs "
                             "part_learn.py's scores")
        cell = regions["meta"]["cell_size"] if regions else 8
        sets.append(data.Foreground(base, args.input_size, regions=regions, hflip=train,
                                    cell_size=cell, crop_pct=None if train else args.crop_pct,
                                    crop_scale=(args.crop_min, 1.0) if train else None))
    return (None if args.eval else sets[0]), sets[-1], bases[0].classes


# ----------------------------------------------------------------------------- train and evaluate

def keep_ids(scores, net, args, generator=None):
    """Cell scores [B, gh, gw] -> ids [B, L_keep] of the most foreground patches (SemMAE §4.2)."""
    factor = net.patch_size // (args.input_size // scores.shape[-1])  # cells per patch side
    return masking.keep_foreground(region_file.scores_to_patches(scores, factor), args.keep_ratio,
                                   generator=generator)


def forward(net, trainable, imgs, ids, linprobe):
    """Logits [B, C]: the whole (DDP) model, or for a linear probe the frozen encoder's features
    (`pool` of the kept tokens) under no_grad, then the (DDP) head: DDP syncs only its gradients."""
    if not linprobe:
        return trainable(imgs)
    with torch.no_grad():
        feats = pool(net, net.forward_features(imgs, ids))                # [B, 1+n, D] -> [B, D]
    return trainable(feats)


def pool(net, x):
    """Tokens [B, 1+n, D] -> [B, D]: the class token, or global_pool's patch mean + fc_norm."""
    return net.fc_norm(x[:, 1:].mean(dim=1)) if net.global_pool else x[:, 0]


@torch.no_grad()
def evaluate(net, loader, d, args):
    """Top-1 and top-5 accuracy over the validation set (each rank's share, counts summed)."""
    net.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=d.device)  # top-1 hits, top-5 hits, images
    g = torch.Generator(d.device).manual_seed(args.seed + d.rank)  # keep_foreground's ties: fixed
    for imgs, target, *scores in loader:
        imgs, target = imgs.to(d.device, non_blocking=True), target.to(d.device, non_blocking=True)
        ids = keep_ids(scores[0].to(d.device), net, args, g) if scores else None
        with utils.autocast(d.device, args.precision):
            logits = forward(net, net.head if args.linprobe else net, imgs, ids, args.linprobe)
        hits = logits.float().topk(min(5, logits.shape[1]), dim=1).indices == target[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), target.new_tensor(len(target))])
    if d.world > 1:
        dist.all_reduce(counts)
    return {"acc1": (counts[0] / counts[2]).item(), "acc5": (counts[1] / counts[2]).item(),
            "n": int(counts[2])}


@torch.no_grad()
def features(net, dataset, d, args):
    """The frozen encoder's feature of every image [N, D] (`pool`) and its class [N], in order."""
    net.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size,
                                         num_workers=args.num_workers)
    feats, targets = [], []
    for imgs, target in runs.progress(loader, "features", None, d):
        with utils.autocast(d.device, args.precision):
            x = net.forward_features(imgs.to(d.device, non_blocking=True))   # [B, 1+L, D]
        feats.append(pool(net, x).float().cpu())
        targets.append(target)
    return torch.cat(feats), torch.cat(targets)


def knn_accuracy(net, train_set, val_set, num_classes, d, args):
    """Top-1, top-5 of DINO's weighted k-NN (probe.knn_votes) of val features among train ones."""
    train_feats, train_labels = features(net, train_set, d, args)
    val_feats, val_labels = features(net, val_set, d, args)
    votes = probe.knn_votes(train_feats, train_labels, val_feats, num_classes, args.knn_k,
                            args.knn_t)
    hits = votes.topk(min(5, num_classes), dim=1).indices == val_labels[:, None]            # [M, 5]
    return {"acc1": hits[:, 0].double().mean().item(), "acc5": hits.any(1).double().mean().item(),
            "n": len(val_labels)}


def soft_cross_entropy(logits, target):
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def make_mixup(args, num_classes):
    """MixUp or CutMix on the batch, 50/50 when both are on (timm's switch_prob 0.5); None: off."""
    if args.linprobe:
        return None
    ops = ([v2.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup > 0 else []) + \
          ([v2.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix > 0 else [])
    return v2.RandomChoice(ops) if ops else None


# ----------------------------------------------------------------------------- optimiser and resume

def build_optimizer(args, net, base_lr):
    """Fine-tuning: AdamW with layer-wise lr decay (MAE's main_finetune; ObjMAE Table 2). Linear
    probing: LARS (MAE's, for batch 16384: a step moves w by ~lr * trust * |w|, too little at batch
    64) or SGD with momentum for small batches (DINO, MoCo v3); ObjMAE Table 2 adds Lookahead."""
    if not args.linprobe:
        groups = utils.param_groups_lrd(net, args.weight_decay, args.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=tuple(args.opt_betas),
                                      eps=args.opt_eps)
    elif args.opt == "lars":
        optimizer = utils.LARS(net.head.parameters(), lr=base_lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(net.head.parameters(), lr=base_lr, momentum=0.9,
                                    weight_decay=args.weight_decay)
    if args.lookahead:
        optimizer = utils.Lookahead(optimizer, args.lookahead_k, args.lookahead_alpha)
    return optimizer


def resume(args, net, optimizer, scaler, d):
    """--resume a finetune.py run -> (first epoch, best top-1 so far, *runs.resume_partial)."""
    ckpt = runs.load_checkpoint(args.resume)
    load_trained(net, ckpt, args, args.resume)
    if "optimizer" not in ckpt:
        raise UsageError(f"{args.resume} has no optimizer state; --resume continues a run of this "
                         "script")
    utils.load_optimizer(optimizer, ckpt["optimizer"], args.resume)
    utils.load_scaler(scaler, ckpt.get("scaler"))
    partial = runs.resume_partial(ckpt, d, args.resume)
    return (ckpt["epoch"] + 1, ckpt.get("max_acc1", 0.0), *partial)


# ----------------------------------------------------------------------------- main

def main(args):
    # Check the flags, set up DDP and the output folder (nothing is written before every check):
    check_args(args)
    d = launch.init_distributed(args.device, args.dist_timeout)
    args.precision = utils.resolve_precision(args.precision, d.device)  # auto: what the device does
    summary_writer = runs.summary_writer_class(args.tensorboard)  # optional: installed, or one line
    if args.knn and d.world > 1:
        raise UsageError("--knn runs in one process: python finetune.py --knn ...")
    if not (args.eval or args.knn):  # --eval and --knn write nothing
        runs.prepare_output_dir(args, d)  # resolves --resume auto
    torch.manual_seed(args.seed)  # same initial head (and encoder, from scratch) on every rank

    # Data and model (a new head on the pre-trained encoder):
    with utils.user_input():  # a bad folder, regions file or checkpoint: exit 2
        train_set, val_set, classes = build_datasets(args)
        net = build_model(args, len(classes))
        if args.finetune:
            load_pretrained(net, args.finetune, verbose=d.is_main)
    net.to(d.device)
    net.grad_checkpointing = args.grad_checkpointing
    mine = torch.utils.data.Subset(val_set, range(d.rank, len(val_set), d.world))  # every world-th
    val_loader = torch.utils.data.DataLoader(mine, batch_size=args.batch_size,
                                             num_workers=args.num_workers,
                                             pin_memory=d.device.type == "cuda")

    # --knn and --eval measure and stop:
    if args.knn:
        stats = knn_accuracy(net, train_set, val_set, len(classes), d, args)
        print(f"{args.finetune or 'a random encoder'}: k-NN (k {args.knn_k}, T {args.knn_t:g}) "
              f"top-1 {100 * stats['acc1']:.2f}% top-5 {100 * stats['acc5']:.2f}% on "
              f"{stats['n']} validation images ({len(train_set)} training images)", flush=True)
        return stats
    if args.eval:
        if args.resume == "auto":  # evaluate this --output_dir's last checkpoint
            args.resume = os.path.join(args.output_dir, "checkpoint-last.pth")
        load_trained(net, runs.load_checkpoint(args.resume), args, args.resume)
        stats = evaluate(net, val_loader, d, args)
        utils.print0(d, f"{args.resume}: top-1 {100 * stats['acc1']:.2f}% top-5 "
                        f"{100 * stats['acc5']:.2f}% on {stats['n']} validation images")
        runs.end_run()
        return stats

    # Setup optimizer (lr = blr * effective batch / 256, MAE) and resume:
    loader = utils.make_loader(train_set, args.batch_size, args.num_workers, True, args.seed, d)
    utils.check_accum(loader, len(train_set), args)
    base_lr, eff_batch = utils.scaled_lr(args, d)
    optimizer = build_optimizer(args, net, base_lr)
    scaler = utils.grad_scaler(d.device, args.precision)  # fp16 only; a no-op otherwise
    start_epoch, max_acc1, start_step, carry = (resume(args, net, optimizer, scaler, d)
                                                if args.resume else (0, 0.0, 0, None))
    module = net.head if args.linprobe else net
    trainable = utils.wrap_ddp(module, d)
    mixup = make_mixup(args, len(classes))
    smoothing = 0.0 if args.linprobe else args.smoothing

    # Start the run (the folder, its lock, args.json):
    runs.start_run(args, d, start_epoch)
    runs.print_args(d, args)
    tb = summary_writer(args.tensorboard) if summary_writer and d.is_main else None
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    utils.print0(d, f"{args.model}{' (linear probe)' if args.linprobe else ''}: "
                    f"{trained / 1e6:.2f}M trained params, {len(classes)} classes, "
                    f"{len(train_set)} train / {len(val_set)} val images, effective batch "
                    f"{eff_batch}, lr {base_lr:.2e}, epochs {start_epoch}..{args.epochs - 1}")

    iters = utils.batches_per_epoch(loader, args.accum_iter)  # leftovers < accum_iter are skipped
    total_iters, warmup_iters = args.epochs * iters, args.warmup_epochs * iters
    ckpt_path = os.path.join(args.output_dir, "checkpoint-last.pth")

    def run_state(epoch):                   # what a checkpoint holds, epoch = the last finished one
        return {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "scaler": scaler.state_dict(), "max_acc1": max_acc1, "args": vars(args)}
    # Train:
    for epoch in range(start_epoch, args.epochs):
        utils.seed_epoch(args.seed, epoch, d)  # resume = same crops, mixes and drop paths
        skip = start_step if epoch == start_epoch else 0  # micro-batches done before a stop
        loader.sampler.set_epoch(epoch, skip * args.batch_size)
        net.train(not args.linprobe)   # linear probe: the encoder stays in eval mode, only the
        module.train()                 # head trains
        t0, loss_sum, n_sum = time.time(), 0.0, 0
        if skip:                                    # where the stop left the RNGs and the sums
            runs.set_rng_state(carry["rng"])
            loss_sum, n_sum = carry["sums"]
        bar = runs.progress(loader, f"epoch {epoch}", iters, d, args.log_every, skip)
        for it, (imgs, target, *scores) in enumerate(bar, start=skip):
            if it == iters:  # the leftover micro-batches
                break
            if it % args.accum_iter == 0:
                lr = utils.cosine_lr(epoch * iters + it, total_iters, warmup_iters, base_lr,
                                     args.min_lr)
                utils.set_lr(optimizer, lr)
            imgs = imgs.to(d.device, non_blocking=True)
            target = target.to(d.device, non_blocking=True)
            ids = keep_ids(scores[0].to(d.device), net, args) if scores else None
            soft = F.one_hot(target, len(classes)).float()                      # [B, C]
            if mixup is not None:
                imgs, soft = mixup(imgs, target)  # mixed one-hot targets
            soft = soft * (1 - smoothing) + smoothing / len(classes)  # commutes with mixing (timm)
            sync = (it + 1) % args.accum_iter == 0
            with utils.no_sync_unless(trainable, sync, d):
                with utils.autocast(d.device, args.precision):
                    loss = soft_cross_entropy(forward(net, trainable, imgs, ids, args.linprobe),
                                              soft)
                scaler.scale(loss / args.accum_iter).backward()
            if sync:
                scaler.step(optimizer)  # fp16: unscale, skip a step with inf
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            loss_value = loss.item()
            runs.stop_if_not_finite(loss_value, f"epoch {epoch} step {it}", ckpt_path,
                                    args.precision)
            loss_sum, n_sum = loss_sum + loss_value, n_sum + 1
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if tb and ((it + 1) % args.log_every == 0 or it + 1 == iters):
                tb.add_scalar("train/loss", loss_value, epoch * iters + it + 1)
                tb.add_scalar("train/lr", lr, epoch * iters + it + 1)
            if sync and it + 1 < iters and runs.stop_requested(d, True):  # SIGTERM/SIGUSR1
                bar.close()  # (the loss is read every step here)
                where = f"after step {it + 1} of {iters} of epoch {epoch}"
                runs.stop_now(ckpt_path, run_state(epoch - 1), d, where, it + 1, (loss_sum, n_sum))
        bar.close()

        # Evaluate, log and checkpoint the epoch:
        train_loss = utils.all_reduce_mean(loss_sum / n_sum, d)
        stats = evaluate(net, val_loader, d, args)
        max_acc1 = max(max_acc1, stats["acc1"])
        state = run_state(epoch) if d.is_main else None
        if d.is_main:  # the log line before the checkpoint: see pretrain.py
            record = {"epoch": epoch, "train_loss": train_loss, "lr": lr, "val_acc1": stats["acc1"],
                      "val_acc5": stats["acc5"], "val_images": stats["n"], "max_acc1": max_acc1,
                      "time_s": round(time.time() - t0, 2)}
            runs.append_log(os.path.join(args.output_dir, "log.txt"), record)
            if tb:
                for k in ("train_loss", "val_acc1", "val_acc5"):
                    tb.add_scalar(f"epoch/{k}", record[k], epoch)
                tb.flush()
            runs.save_checkpoint(ckpt_path, state)
            print(f"epoch {epoch}: loss {train_loss:.4f} lr {lr:.2e} val top-1 "
                  f"{100 * stats['acc1']:.2f}% top-5 {100 * stats['acc5']:.2f}% "
                  f"(max {100 * max_acc1:.2f}%, {record['time_s']}s)", flush=True)
        if epoch + 1 < args.epochs and runs.stop_requested(d, True):  # a stop in its last step
            runs.stop_now(ckpt_path, state, d, f"after epoch {epoch}")
    if tb:
        tb.close()
    if d.is_main:  # timm's names, a probe's BatchNorm folded into its head
        path = os.path.join(args.output_dir, "model-timm.pth")
        runs.save_checkpoint(path, released.timm_state_dict(net))
        print(f"{path} loads into timm.models.vision_transformer.VisionTransformer(img_size="
              f"{args.input_size}, patch_size={net.patch_size}, embed_dim="
              f"{net.cls_token.shape[-1]}, depth={len(net.blocks)}, num_heads="
              f"{net.blocks[0].attn.num_heads}, num_classes={len(classes)}, global_pool="
              f"'{'avg' if args.global_pool else 'token'}')", flush=True)
    runs.end_run()
    return {"max_acc1": max_acc1}


# ----------------------------------------------------------------------------- flags, their rules

# The flags that do nothing in a mode (get_args' groups): {flag: (acts when, where it acts)}.
TUNING = (lambda a: not a.linprobe and not a.knn, "in fine-tuning (without --linprobe or --knn)")
REGIONS = (lambda a: a.keep_ratio < 1.0, "with --keep_ratio < 1 (the probe's foreground scores)")
KNN, LOOKAHEAD = (lambda a: a.knn, "with --knn"), (lambda a: a.lookahead, "with --lookahead")
UNUSED = {**dict.fromkeys(("drop_path", "aa", "reprob", "mixup", "cutmix", "smoothing", "opt_eps",
                           "layer_decay", "opt_betas", "grad_checkpointing", "train_crop"), TUNING),
          "crop_min": (lambda a: a.linprobe or a.train_crop == "rrc",
                       "with --train_crop rrc (or --linprobe)"),
          "opt": (lambda a: a.linprobe, "with --linprobe"), "knn_k": KNN, "knn_t": KNN,
          "keep_ratio": (lambda a: a.linprobe, "with --linprobe (SemMAE §4.2): fine-tuning sees "
                                               "every patch"),
          "regions": REGIONS, "val_regions": REGIONS, "lookahead_k": LOOKAHEAD,
          "lookahead_alpha": LOOKAHEAD, "blr": (lambda a: a.lr is None, "without --lr (which "
                                                                        "overrides it)"),
          "finetune": (lambda a: not a.eval, "without --eval (which evaluates --resume, a model "
                                             "with its head)"),
          "download": (lambda a: a.dataset == "cifar100", "with --dataset cifar100"),
          "num_val_images": scenes.BUILTIN, **scenes.BUILTIN_FLAGS}
# Each rule between flags once: (broken when, the one line saying so and the fix); {a.x} is a flag.
RULES = [
    (lambda a: a.input_size % models.VITS[a.model].keywords["patch_size"],
     "--input_size {a.input_size} is not divisible by the patch size {patch} of {a.model}; use a "
     "multiple of {patch}"),
    (lambda a: a.eval and not a.resume, "--eval needs the trained model: pass --resume CKPT"),
    (lambda a: a.finetune and not os.path.isfile(a.finetune),
     "--finetune {a.finetune} does not exist; pass a pre-trained checkpoint (pretrain.py's "
     "checkpoint-last.pth, MAE's or SemMAE's released .pth, a timm state dict)"),
    (lambda a: a.knn and (a.linprobe or a.eval or a.resume), "--knn measures a frozen --finetune "
     "encoder with no training; drop --linprobe, --eval and --resume"),
    (lambda a: (a.keep_ratio < 1.0 and a.data_path is not None
                and not (a.val_regions and (a.regions or a.eval))),
     "--keep_ratio < 1 on real images needs foreground scores: run part_learn.py on train/ and "
     "val/, then pass --regions <train regions.pt> --val_regions <val regions.pt>"),
    (lambda a: a.dataset == "cifar100" and a.data_path is None, "--dataset cifar100 needs "
     "--data_path (the folder holding cifar-100-python/)"),
    (lambda a: a.linprobe and a.batch_size < 2,
     "--linprobe needs --batch_size >= 2: the probe's head starts with a BatchNorm (MAE's linear "
     "probe), which needs two images per batch"),
]


def check_args(args):
    """The flags alone, before any work: UNUSED, the mode's recipe, utils.RANGES, then RULES."""
    utils.refuse_unused(args, get_args([]), {k: (acts(args), where)
                                             for k, (acts, where) in UNUSED.items()})
    for k, v in RECIPES["linprobe" if args.linprobe else "finetune"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.global_pool is None:                       # MAE's probe and DINO's k-NN: class token
        args.global_pool = not (args.linprobe or args.knn)
    utils.check_ranges(args)
    patch = models.VITS[args.model].keywords["patch_size"]
    utils.check_rules(args, RULES, patch=patch)
    with utils.user_input():                                   # not timm's RandAugment string
        randaugment.parse(args.aa)


def get_args(argv=None):
    # The defaults reproduce MAE's fine-tuning recipe (main_finetune), which SemMAE's Table 2 uses;
    # flags left at None take the mode's recipe (RECIPES). Other papers: PAPERS.md. utils.RANGES.
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and mode")
    g.add_argument("--model", default="vit_base_patch16", choices=sorted(models.VITS))
    g.add_argument("--input_size", type=int, default=224)
    g.add_argument("--finetune", help="pre-trained encoder: ours, MAE's, SemMAE's or timm's")
    g.add_argument("--linprobe", action="store_true", help="a linear head on the frozen encoder")
    g.add_argument("--eval", action="store_true", help="top-1/top-5 of --resume on the val set")
    g.add_argument("--knn", action="store_true",
                   help="top-1/top-5 of DINO's weighted k-NN on the frozen --finetune features")
    g.add_argument("--global_pool", action=argparse.BooleanOptionalAction, default=None,
                   help="mean patch token + fc_norm (fine-tuning's default) or the class token")
    g.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth (fine-tuning)")
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None,
                   help="train/ and val/ in ImageNet layout, or CIFAR-100's; omitted = shapes")
    g.add_argument("--dataset", default="folder", choices=["folder", "cifar100"])
    g.add_argument("--download", action="store_true", help="cifar100: download into --data_path")
    g.add_argument("--num_images", type=int, default=2000, help="shapes: training images")
    g.add_argument("--num_val_images", type=int, default=500, help="shapes: validation images")
    g.add_argument("--data_seed", type=int, default=0, help="shapes: which scenes")
    scenes.add_scene_flags(g)
    g.add_argument("--regions", help="regions.pt of the training images (foreground scores)")
    g.add_argument("--val_regions", help="regions.pt of the validation images")
    g.add_argument("--keep_ratio", type=float, default=1.0,
                   help="probe the most foreground fraction of patches (SemMAE 8x8: 0.25)")
    g = p.add_argument_group("augmentation (MAE's; fine-tuning only but --crop_min, --crop_pct)")
    g.add_argument("--train_crop", default="rrc", choices=["rrc", "bit"],
                   help="rrc: RandomResizedCrop (MAE); bit: BiT's 7/6 resize + crop (ObjMAE §4.2)")
    g.add_argument("--crop_min", type=float, default=0.08, help="RandomResizedCrop's smallest area")
    g.add_argument("--crop_pct", type=float, default=0.875, help="val: resize to size/crop_pct")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1",
                   help="timm's RandAugment string (MAE's; randaugment.py) or 'none'")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0 = off)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g = p.add_argument_group("optimisation (None = the mode's recipe, RECIPES)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--warmup_epochs", type=int)
    g.add_argument("--batch_size", type=int, help="per device; effective = batch * accum * world")
    g.add_argument("--accum_iter", type=int, default=1)
    g.add_argument("--blr", type=float, help="lr = blr * effective batch / 256")
    g.add_argument("--lr", type=float, help="absolute lr; overrides --blr")
    g.add_argument("--min_lr", type=float)
    g.add_argument("--weight_decay", type=float)
    g.add_argument("--layer_decay", type=float, default=0.65, help="layer-wise lr decay (1 = off)")
    g.add_argument("--opt_betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"),
                   help="fine-tuning AdamW betas (MAE's main_finetune, ObjMAE Table 2)")
    g.add_argument("--opt_eps", type=float, default=1e-8, help="AdamW eps (MAE, ObjMAE Table 2)")
    g.add_argument("--lookahead", action="store_true", help="Lookahead around it (ObjMAE Table 2)")
    g.add_argument("--lookahead_k", type=int, default=5, help="not in ObjMAE; Zhang et al.: 5")
    g.add_argument("--lookahead_alpha", type=float, default=0.5, help="Zhang et al. 2019: 0.5")
    g = p.add_argument_group("linear probing only (--linprobe)")
    g.add_argument("--opt", default="lars", choices=["lars", "sgd"],
                   help="LARS (MAE, for batches of thousands) or SGD with momentum (small batches)")
    g = p.add_argument_group("k-NN only (--knn; DINO, Caron et al. 2021, §4.1: k 20, T 0.07)")
    g.add_argument("--knn_k", type=int, default=20, help="neighbours that vote")
    g.add_argument("--knn_t", type=float, default=0.07, help="votes exp(similarity / T)")
    runs.add_run_flags(p, "output/finetune")
    return p.parse_args(argv)


if __name__ == "__main__":
    runs.run_stage(main, get_args)
