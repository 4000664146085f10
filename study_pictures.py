"""The study's pictures: SemMAE's masks during training, ObjMAE's source / target / dropped
patches (python study.py --pictures), and MAE's and ObjMAE's rebuilding of an unseen object (the
unseen-object table).

References: SemMAE Li et al., NeurIPS 2022, arXiv:2206.10207; ObjMAE Wu & Mo 2022, arXiv:2205.14338.
"""
import os

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data
import masking
import model as models
import region_file
import shapes
from study_measures import hide_object, load_mae, shapes_objects


# ----------------------------------------------------------------------------- pictures

def font(size=11):
    return ImageFont.load_default(size=size)


def labelled_grid(rows, headings, path, cell=96):
    """rows: list of lists of [3, h, w] images in [0, 1]; each column gets its heading drawn above
    it."""
    top, pad = 16, 2
    ncol = len(headings)
    size = (ncol * (cell + pad) + pad, top + len(rows) * (cell + pad) + pad)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(headings):
        draw.text((pad + j * (cell + pad) + cell / 2, top / 2), text, fill="black", font=font(),
                  anchor="mm")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            x = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(x).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (pad + j * (cell + pad), top + pad + i * (cell + pad)))
    canvas.save(path)
    return path


def show_patches(img, keep, patch, shade=0.25):
    """img [3, H, W] in [0, 1]; keep bool [L]: the patches outside keep are drawn dark."""
    h, w = img.shape[1] // patch, img.shape[2] // patch
    m = keep.float().reshape(1, 1, h, w)
    m = F.interpolate(m, scale_factor=patch, mode="nearest")[0]
    return img * m + shade * img.mean(0, keepdim=True) * (1 - m)


def colour_regions(img, labels, patch, objects=False):
    """Region ids per patch [L] as colours over a grey copy of the image (objects: background 0
    stays grey)."""
    from part_learn import PALETTE
    h, w = img.shape[1] // patch, img.shape[2] // patch
    ids = torch.where(labels == region_file.IGNORE, len(PALETTE) - 1, labels % (len(PALETTE) - 1))
    col = PALETTE[ids].T.reshape(3, h, w)
    col = F.interpolate(col[None], scale_factor=patch, mode="nearest")[0]
    grey = img.mean(0, keepdim=True).expand(3, -1, -1)
    out = 0.7 * col + 0.3 * grey
    if objects:
        bg = (labels == 0).float().reshape(1, 1, h, w)
        bg = F.interpolate(bg, scale_factor=patch, mode="nearest")[0]
        out = bg * grey + (1 - bg) * out
    return out


def picture_semmae(study, out, images=3):
    """SemMAE's masks for a few images at training progress 0, 0.25, 0.5, 0.75, 1 with gamma 2
    (alpha = progress^2): from some patches of every part to whole parts (SemMAE §3.2, Fig. 3). The
    masker is pretrain.py's, on the study's learned parts."""
    import pretrain
    parts = study.parts("learned")
    b = study.b
    path = os.path.join(out, parts.name, "regions.pt")
    args = pretrain.get_args(["--mask", "semmae", "--gamma", "2", "--regions", path])
    base = shapes.ShapesDataset(b["num_images"], img_size=b["input_size"], seed=0)
    regions = region_file.load_regions(args.regions, base.files, b["input_size"])
    ds = data.PretrainDataset(base, b["input_size"], regions=regions, hflip=False)
    num_parts = regions["meta"]["num_regions"] + 1
    grid = (b["input_size"] // 8,) * 2
    masker = pretrain.Masker(args, 8, regions["meta"]["cell_size"], grid, num_parts)
    progress = (0.0, 0.25, 0.5, 0.75, 1.0)
    rows = []
    for i in range(images):
        img, cells, scores, _ = ds[i]
        pix = data.denormalise(img[None])[0]
        row = [pix, colour_regions(pix, cells.flatten(), 8)]
        for p in progress:
            g = torch.Generator().manual_seed(0)
            src, _, _, _ = masker(cells[None], scores[None], p, generator=g)
            keep = torch.zeros(cells.numel(), dtype=torch.bool)
            keep[src[0]] = True
            row.append(show_patches(pix, keep, 8))
        rows.append(row)
    heads = ["image", "parts"] + [f"p {p} (a {p ** 2:.2g})" for p in progress]
    return labelled_grid(rows, heads, os.path.join(out, "semmae-masks.png"))


def picture_objmae(study, out, images=4):
    """ObjMAE's source, target and dropped patches (seq_ratio 0.25, zero padding) for a few scenes,
    objects from their instance masks (ObjMAE §3, Fig. 3)."""
    size = study.b["input_size"]
    imgs, labels = shapes_objects(images, size, 8)
    g = torch.Generator().manual_seed(0)
    m = masking.object_wise_masking(labels, 0.25, "zero", "intra", generator=g)
    rows = []
    for i in range(images):
        pix = data.denormalise(imgs[i:i + 1])[0]
        src = torch.zeros(labels.shape[1], dtype=torch.bool)
        tgt = torch.zeros_like(src)
        src[m.src_ids[i][m.src_valid[i]]] = True
        tgt[m.tgt_ids[i][m.tgt_valid[i]]] = True
        rows.append([pix, colour_regions(pix, labels[i], 8, objects=True),
                     show_patches(pix, src, 8), show_patches(pix, tgt, 8),
                     show_patches(pix, ~(src | tgt), 8)])
    return labelled_grid(rows, ["image", "objects", "source", "target", "dropped"],
                         os.path.join(out, "objmae-masks.png"))


def picture_unseen(study, out, images=4):
    """unseen-object.png: for a few training scenes, the visible patches, MAE's and ObjMAE's
    reconstruction of the hidden object (visible patches pasted) and their attention rollout from
    the hidden patches (Fig. 7)."""
    size = study.b["input_size"]
    nets = [load_mae(os.path.join(out, r.name, "checkpoint-last.pth"), size)
            for r in (study.objmae_mae(0), study.objmae(0))]   # the table's two rows
    imgs, labels = shapes_objects(images * 2, size, 8)
    rows = []
    for img, lab in zip(imgs, labels):
        cols, recons, heats = None, [], []
        for net in nets:
            res = hide_object(net, img, lab)
            if res is None:
                break
            tgt, pixels, heat, _ = res
            patches = models.patchify(img[None], 8).clone()
            patches[0, tgt[0]] = pixels[0]
            recons.append(data.denormalise(models.unpatchify(patches, 8, size // 8, size // 8))[0])
            heats.append(heat)
            hidden = torch.zeros(lab.numel(), dtype=torch.bool)
            hidden[tgt[0]] = True
        if len(recons) < 2:
            continue
        pix = data.denormalise(img[None])[0]
        cols = [pix, show_patches(pix, ~hidden, 8)] + recons
        grid = size // 8
        up = lambda x: F.interpolate(x.float().reshape(1, 1, grid, grid), scale_factor=8,
                                     mode="nearest")[0]
        # red = where the hidden patches' rollout goes (scaled to the image's top visible patch);
        # blue = the hidden object
        for heat in heats:
            h = up(torch.where(hidden, 0.0, heat) / heat[~hidden].max())
            grey = pix.mean(0, keepdim=True).expand(3, -1, -1)
            red = 0.35 * grey + 0.65 * torch.cat([h, 0.3 * h, 0.1 * (1 - h)])
            blue = 0.5 * grey + 0.5 * torch.tensor([0.2, 0.4, 1.0])[:, None, None]
            cols.append(torch.where(up(hidden).bool(), blue, red))
        rows.append(cols)
        if len(rows) == images:
            break
    heads = ["image", "visible", "MAE", "ObjMAE", "MAE rollout", "ObjMAE rollout"]
    return labelled_grid(rows, heads, os.path.join(out, "unseen-object.png"))

