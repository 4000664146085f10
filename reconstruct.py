"""MAE's reconstruction picture outside a training run: a pre-trained MAE (encoder + decoder) and some images ->
one PNG with a row per image: original | visible (the masked input) | reconstruction (of the masked patches) |
reconstruction with the visible patches pasted, with these headings. Masks: random (MAE), semmae (SemMAE §3.2,
from a regions file of parts) or objmae (ObjMAE §3, from objects: a regions file, or the built-in scenes' own masks).

    python reconstruct.py --checkpoint output/pretrain/checkpoint-last.pth              # built-in shapes scenes
    python reconstruct.py --checkpoint mae_visualize_vit_large.pth cat.jpg dog.png      # official MAE weights
    python reconstruct.py --checkpoint semmae8/checkpoint-last.pth --mask semmae --regions parts/regions.pt \
        --data_path IMAGENET/train n01440764/n01440764_10026.JPEG

Checkpoints: pretrain.py's checkpoint-last.pth, and the official MAE / SemMAE layout, {'model': state dict} with
MAE's decoder names (decoder_embed, mask_token, decoder_pos_embed, decoder_blocks.{i}, decoder_norm, decoder_pred)
as in MAE's mae_visualize_vit_*.pth and its training checkpoints; the encoder-only releases (mae_pretrain_vit_*.pth)
have no decoder and cannot reconstruct. The model is the checkpoint's args.model, else the one of model.MODELS whose
tensors have the checkpoint's shapes, else --model; the image size is the checkpoint's position grid.

References (cited in the comments as "SemMAE §3.2, Alg. 1", "ObjMAE §3"):
  SemMAE  Li et al., SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders. NeurIPS 2022, arXiv:2206.10207
  ObjMAE  Wu & Mo, Object-wise Masked Autoencoders for Fast Pre-training. 2022, arXiv:2205.14338
  MAE     He et al., Masked Autoencoders Are Scalable Vision Learners. CVPR 2022, arXiv:2111.06377
"""
import argparse
import math
import os
from argparse import Namespace

import torch

import data
import launch
import model as models
import pretrain
import released
import runs
import shapes
import utils
from utils import UsageError


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", help="image files (relative to --data_path when it is given); none: the "
                                             "first --num_images of --data_path, of the regions file or of the "
                                             "built-in shapes scenes")
    p.add_argument("--checkpoint", required=True, help="pretrain.py checkpoint or official MAE/SemMAE {'model'} file")
    p.add_argument("--model", default=None, choices=sorted(models.MODELS),
                   help="only when the checkpoint names none and its shapes fit several")
    p.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                   help="the model predicts normalised pixels (shown with each patch's own mean and std); default: "
                        "the checkpoint's args, else off (MAE's visualisation checkpoints predict plain pixels)")
    p.add_argument("--mask", default="random", choices=["random", "semmae", "objmae"])
    p.add_argument("--mask_ratio", type=float, default=None, help="random and semmae (default 0.75)")
    p.add_argument("--alpha", type=float, default=None,
                   help="semmae: 0 = a portion of every part, 1 = whole parts (default 1, the end of training, §3.2)")
    p.add_argument("--seq_ratio", type=float, default=None, help="objmae: source and target length / L (default 0.25)")
    p.add_argument("--padding", default=None, choices=["zero", "masked", "replicate", "random", "throwout"], help="objmae")
    p.add_argument("--relation", default=None, choices=["intra", "inter", "image"], help="objmae")
    p.add_argument("--regions", default=None, help="regions.pt from part_learn.py: parts (semmae) or objects (objmae)")
    p.add_argument("--data_path", default=None, help="the folder the images (and the regions file) are in")
    p.add_argument("--num_images", type=int, default=8, help="images shown when none are named")
    p.add_argument("--data_seed", type=int, default=0, help="which built-in shapes scenes")
    p.add_argument("--output", default="reconstruction.png", help="the PNG to write")
    p.add_argument("--seed", type=int, default=0, help="the masks' random draws")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the checkpoint

def state_and_args(obj):
    """A loaded checkpoint -> (MAE state dict with wrapper prefixes stripped, its saved args as a dict or {})."""
    sd = obj.get("model", obj) if isinstance(obj, dict) else {}
    sd = sd if isinstance(sd, dict) else {}
    weights = {}
    for key, value in sd.items():
        if isinstance(key, str) and torch.is_tensor(value):
            while key.startswith(released.WRAPPERS):
                key = key.split(".", 1)[1]
            weights[key] = value
    saved = obj.get("args") if isinstance(obj, dict) else None
    saved = vars(saved) if isinstance(saved, Namespace) else saved if isinstance(saved, dict) else {}
    return weights, saved


def load_mae(path, name=None, norm_pix_loss=None):
    """-> (MaskedAutoencoderViT with the checkpoint's weights, its model name, the norm_pix_loss used)."""
    sd, saved = state_and_args(released.read_checkpoint(path))
    if "decoder_pred.weight" not in sd or "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        raise ValueError(f"{path} holds no MAE encoder + decoder (no decoder_pred/pos_embed); encoder-only weights "
                         "(MAE's mae_pretrain_vit_*.pth, finetune.py's) cannot reconstruct: pass a pretrain.py "
                         "checkpoint-last.pth or MAE's mae_visualize_vit_*.pth")
    side, patch = math.isqrt(sd["pos_embed"].shape[1] - 1), sd["patch_embed.proj.weight"].shape[-1]
    img_size = side * patch
    shapes = {k: tuple(v.shape) for k, v in sd.items()}

    def fits(ctor):
        if ctor.keywords["patch_size"] != patch:
            return False
        with torch.device("meta"):                                         # names and shapes only
            ref = ctor(img_size=img_size)
        return {k: tuple(v.shape) for k, v in ref.state_dict().items()} == shapes
    name = name or (saved.get("model") if saved.get("model") in models.MODELS else None)
    if name is None:
        found = [n for n, ctor in models.MODELS.items() if fits(ctor)]
        if len(found) != 1:
            raise ValueError(f"{path}: its tensors fit {found or 'none'} of the models {sorted(models.MODELS)}; "
                             "pass --model")
        name = found[0]
    if norm_pix_loss is None:
        norm_pix_loss = bool(saved.get("norm_pix_loss", False))
    net = models.MODELS[name](img_size=img_size, norm_pix_loss=norm_pix_loss)
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise ValueError(f"{path} does not fit --model {name}: {first}") from None
    return net.eval(), name, norm_pix_loss


# ----------------------------------------------------------------------------- the images

class ImageFiles:
    """Image files as a base dataset for data.PretrainDataset: .files relative to root, .load(i) -> (PIL RGB, no
    instance mask, class 0)."""

    def __init__(self, root, files):
        self.root, self.files = root, files
        for f in files:
            if not os.path.isfile(os.path.join(root, f)):
                raise ValueError(f"image {os.path.join(root, f)} does not exist" +
                                 (f"; name images relative to --data_path {root}" if root else ""))

    def __len__(self):
        return len(self.files)

    def load(self, i):
        path = os.path.join(self.root, self.files[i])
        try:
            return data.read_rgb(path), None, 0
        except data.IMAGE_ERRORS as e:
            raise ValueError(f"cannot read image {path} ({e}); pass an image file") from None


class Rows:
    """The given rows of a base dataset (built-in scenes), as a base dataset."""

    def __init__(self, base, rows):
        self.base, self.rows, self.files = base, rows, [base.files[i] for i in rows]

    def __len__(self):
        return len(self.rows)

    def load(self, i):
        return self.base.load(self.rows[i])


def images_and_regions(args, size):
    """-> (base dataset of the pictured images, their regions {'labels', 'scores', 'meta'} or None)."""
    regions = None
    if args.regions:
        regions = torch.load(args.regions, weights_only=True, mmap=True) if os.path.isfile(args.regions) else None
        if not isinstance(regions, dict) or not {"labels", "files", "meta"} <= regions.keys():
            raise ValueError(f"--regions {args.regions} is not a regions file; make it with part_learn.py")
        if regions["meta"].get("input_size") != size:
            raise ValueError(f"--regions {args.regions} was made at input size {regions['meta'].get('input_size')}, "
                             f"but the checkpoint's model takes {size}-px images; remake it at --input_size {size}")
    if args.data_path is None and not args.images:                        # the built-in scenes
        n = len(regions["files"]) if regions else args.num_images
        base = Rows(shapes.ShapesDataset(n, img_size=size, seed=args.data_seed), range(min(n, args.num_images)))
    elif args.data_path is None:
        if regions:
            raise ValueError("--regions lists images relative to the folder it was made on; pass that --data_path")
        base = ImageFiles("", list(args.images))
    else:
        root = args.data_path
        files = [os.path.relpath(f, root) if os.path.isabs(f) else f for f in args.images]
        if not files:
            files = list(regions["files"][:args.num_images]) if regions else \
                data.FolderDataset(root, classes=False).files[:args.num_images]
        base = ImageFiles(root, [f.replace(os.sep, "/") for f in files])
    if regions is None:
        if args.mask == "objmae" and isinstance(base, ImageFiles):
            raise ValueError("--mask objmae on image files needs their objects: pass --regions from part_learn.py "
                             "(--method cam or segmentation) and the --data_path it was made on")
        return base, None
    row = {f: i for i, f in enumerate(regions["files"])}
    missing = [f for f in base.files if f not in row]
    if missing:
        raise ValueError(f"{missing[0]} is not in --regions {args.regions} ({len(row)} images, e.g. "
                         f"{regions['files'][0]}); name images of the data it was made on")
    rows = [row[f] for f in base.files]
    scores = regions.get("scores")
    return base, {"labels": regions["labels"][rows], "scores": None if scores is None else scores[rows],
                  "meta": regions["meta"]}


# ----------------------------------------------------------------------------- main

def masker_args(args, name, size):
    """pretrain.py's own flags for these masks, so its checks and its Masker apply as they do in training."""
    argv = ["--model", name, "--input_size", str(size), "--mask", args.mask]
    alpha = 1.0 if args.mask == "semmae" and args.alpha is None else args.alpha   # the end of training (§3.2)
    for flag, value in (("--mask_ratio", args.mask_ratio), ("--alpha", alpha), ("--seq_ratio", args.seq_ratio),
                        ("--padding", args.padding), ("--relation", args.relation), ("--regions", args.regions),
                        ("--data_path", args.data_path)):
        if value is not None:
            argv += [flag, str(value)]
    pargs = pretrain.get_args(argv)
    pretrain.check_args(pargs)
    return pargs


def main(args):
    """-> (normalised images [B, 3, S, S], the masks drawn: src_ids, tgt_ids, src_valid, tgt_valid)"""
    utils.check_ranges(args, {**utils.RANGES, "num_images": "[1, 10000]"})   # the picture's rows
    device = launch.init_distributed(args.device).device
    with utils.user_input():                                              # a bad file or flag: one line, exit 2
        net, name, norm_pix = load_mae(args.checkpoint, args.model, args.norm_pix_loss)
        size = net.grid[0] * net.patch_size
        pargs = masker_args(args, name, size)
        base, regions = images_and_regions(args, size)
        cell_size = pretrain.region_cell_size(pargs, regions, net.patch_size)
        dataset = data.PretrainDataset(base, size, regions=regions, hflip=False, cell_size=cell_size)
        samples = [dataset[i] for i in range(len(dataset))]
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--output {args.output}: the folder {out_dir} does not exist; create it or pass another")
    imgs, cells, scores = (torch.stack([s[k] for s in samples]).to(device) for k in range(3))
    num_parts = None
    if regions:
        num_parts = regions["meta"]["num_regions"] + (regions["meta"]["kind"] == "objects")
    masker = pretrain.Masker(pargs, net.patch_size, cell_size, net.grid, num_parts)
    masks = masker(cells, scores, 1.0, generator=torch.Generator(device).manual_seed(args.seed))
    net.to(device)
    zero_pad = pargs.mask == "objmae" and pargs.padding == "zero"          # as pretrain.py trains it (§3.3)
    pretrain.save_reconstructions(args.output, net, imgs, masks, zero_pad)
    print(f"wrote {args.output}: {len(base)} images, {name} from {args.checkpoint} "
          f"({'normalised' if norm_pix else 'plain'} pixels), --mask {args.mask}", flush=True)
    return imgs, masks


if __name__ == "__main__":
    runs.run_stage(main, get_args)
