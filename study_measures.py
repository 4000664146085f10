"""What study.py measures itself, as runs with no stage script (Run.stage None): the model step's
time (objmae-speed), the hidden-object error and attention rollout (unseen-object), and the colour
floor of the probe (semmae-masking), the fixed-feature readout of an encoder and the oracle parts
(--primary). Each writes its numbers to its run's log.txt, ending "done".

    python study_measures.py KIND OUT NAME FLAGS...      # as study.py runs them (Run.command)

References: SemMAE Li et al., NeurIPS 2022, arXiv:2206.10207; ObjMAE Wu & Mo 2022, arXiv:2205.14338.
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

import bench
import data
import masking
import model as models
import probe
import region_file
import runs
import scenes
import shapes
import utils


# --------------------------------------------------------------------- study.py's own measurements

def flag(run, out, name):
    """The value of --name in the measurement's command."""
    argv = run.argv(out)
    if f"--{name}" not in argv:    # a command written by an older study.py (study.json's)
        raise ValueError(f"the command of {run.name} has no --{name}; this study.py makes the run "
                         "with it: rerun study.py")
    return argv[argv.index(f"--{name}") + 1]


def scene_objects(base, n, size, patch):
    """(normalised images [n, 3, S, S], object id per patch [n, L]) of the first n scenes of base,
    objects by ObjMAE's 20% rule on each patch's pixels (§3.2) of the scene's instance mask (the
    parts scenes: 0 background, 1 their one object)."""
    pixels = data.PretrainDataset(base, size, hflip=False)
    grid = (size // patch, size // patch)
    imgs, labels = [], []
    for i in range(n):
        img, mask, _ = base.load(i)
        imgs.append(pixels[i][0])
        labels.append(torch.from_numpy(region_file.mask_cells(mask, size, grid)).long().flatten())
    return torch.stack(imgs), torch.stack(labels)


def shapes_objects(n, size, patch, split="train"):
    """scene_objects of the first n built-in shapes scenes (data seed 0)."""
    base = shapes.ShapesDataset(n, img_size=size, seed=0, split=split)
    return scene_objects(base, n, size, patch)


def measure_timing(run, out):
    """Median time of one training step per setting (objmae-speed); writes {'step_ms': {setting:
    ms}}."""
    size, batch = int(flag(run, out, "input_size")), int(flag(run, out, "batch_size"))
    repeats = int(flag(run, out, "repeats"))
    torch.manual_seed(0)
    imgs, labels = shapes_objects(batch, size, 8)
    mae = models.MODELS["mae_vit_tiny_patch8"](img_size=size, norm_pix_loss=True)
    vit = models.VITS["vit_tiny_patch8"](img_size=size, num_classes=20)
    L = mae.grid[0] * mae.grid[1]
    calls = {}
    for setting in flag(run, out, "settings").split(","):
        if setting == "supervised":
            target = torch.randint(0, 20, (batch,))
            net, loss_fn = vit, (lambda: F.cross_entropy(vit(imgs), target))
        elif setting.startswith("mae"):
            ids = masking.mask_to_ids(masking.random_masking(batch, L, float(setting[3:])))
            net, loss_fn = mae, (lambda ids=ids: mae(imgs, *ids)[0])
        else:
            m = masking.object_wise_masking(labels, float(setting[6:]), "zero", "intra")
            net, loss_fn = mae, (lambda m=m: mae(imgs, *m)[0])
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step(loss_fn=loss_fn, opt=opt):
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        calls[setting] = step
    ms = bench.timed_ms(calls, repeats, torch.device("cpu"), warmup=2)
    runs.append_log(os.path.join(out, run.name, "log.txt"),
                     {"step_ms": ms, "threads": 1, "done": True})


def load_mae(path, size):
    ckpt = runs.load_checkpoint(path)
    a = ckpt["args"]
    net = models.MODELS[a["model"]](img_size=size, norm_pix_loss=a["norm_pix_loss"])
    net.load_state_dict(ckpt["model"])
    return net.eval()


def attention_maps(net, fn):
    """Run fn() and return the softmax attention of every encoder and decoder block, [B, heads, N,
    N] each (recomputed from the block's input with q and k, since SDPA does not return them)."""
    maps = {"enc": [], "dec": []}

    def hook(kind):
        def grab(module, inputs, output):
            x, mask = inputs[0], inputs[1] if len(inputs) > 1 else None
            q, k, _ = module.split_qkv(x)
            logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            maps[kind].append(logits.softmax(-1))
        return grab
    handles = [b.attn.register_forward_hook(hook("enc")) for b in net.blocks]
    handles += [b.attn.register_forward_hook(hook("dec")) for b in net.decoder_blocks]
    try:
        result = fn()
    finally:
        for h in handles:
            h.remove()
    return result, maps


def rollout(maps):
    """Abnar & Zuidema (2020): per block, (mean over heads + identity) / 2, rows renormalised; the
    product over blocks. [B, heads, N, N] list -> [B, N, N]: how much each output token draws on
    each input token."""
    result = None
    for a in maps:
        a = a.mean(1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1])
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def hide_object(net, img, labels):
    """Hide every patch of the image's largest object (target) and show the rest (source). ->
    (tgt_ids [1, k], pixels [1, k, p*p*3] of the reconstruction, heat [L] rollout of the hidden
    patches on every patch, share of that rollout on the visible patches), or None when the image
    has no object."""
    counts = torch.bincount(labels, minlength=256)[1:255]
    if counts.max() == 0 or counts.max() == labels.numel():
        return None
    obj = int(counts.argmax()) + 1
    tgt = (labels == obj).nonzero().flatten()[None]                        # [1, k]
    src = (labels != obj).nonzero().flatten()[None]                        # [1, L - k]
    with torch.no_grad():
        (_, pred), maps = attention_maps(net, lambda: net(img[None], src, tgt))
        pixels = net.pred_to_pixels(img[None], tgt, pred)
    enc, dec = rollout(maps["enc"])[0], rollout(maps["dec"])[0]    # [1+s, 1+s], [1+s+k, 1+s+k]
    s, k = src.shape[1], tgt.shape[1]
    to_input = torch.block_diag(enc, torch.eye(k))                # decoder tokens -> encoder inputs
    hidden = (dec @ to_input)[1 + s:].mean(0)                     # [1+s+k]: cls, sources, targets
    heat = torch.zeros(labels.numel())
    heat[src[0]], heat[tgt[0]] = hidden[1:1 + s], hidden[1 + s:]
    return tgt, pixels, heat, float(hidden[1:1 + s].sum())


def study_split(run, out, split, size, kind="parts"):
    """The study's whole split of scenes (its --num_images or --val_images), read from
    --scene_cache: the whole split, so the cache's file is the one every other run reads."""
    total = int(flag(run, out, "num_images" if split == "train" else "val_images"))
    return scenes.builtin(kind, total, size, 0, split, flag(run, out, "scene_cache"))


def measure_unseen(run, out):
    """ObjMAE Fig. 2 / 7 on the first --images training and held-out scenes: rel_error = sum of
    squared errors of the reconstruction of the hidden object / that of each hidden patch's own
    mean; rollout_visible = the mean share of the hidden patches' rollout on the visible ones.
    The scenes: with --scenes, the study's (--num_images training and --val_images held-out ones,
    read from --scene_cache); without, the built-in shapes scenes. The hidden object is each
    scene's largest (hide_object): the parts scenes' one object."""
    size, n = int(flag(run, out, "input_size")), int(flag(run, out, "images"))
    net = load_mae(flag(run, out, "checkpoint"), size)
    for split in ("train", "val"):
        if "--scenes" in run.argv(out):
            ds = study_split(run, out, split, size, flag(run, out, "scenes"))
            imgs, labels = scene_objects(ds, n, size, net.patch_size)
        else:
            imgs, labels = shapes_objects(n, size, net.patch_size, split)
        err = base = 0.0
        shares = []
        for img, lab in zip(imgs, labels):
            res = hide_object(net, img, lab)
            if res is None:
                continue
            tgt, pixels, _, share = res
            patches = models.patchify(img[None], net.patch_size)
            target = models.gather_tokens(patches, tgt)                   # [1, k, p*p*3]
            err += float(((pixels - target) ** 2).sum())
            base += float(((target - target.mean(-1, keepdim=True)) ** 2).sum())
            shares.append(share)
        runs.append_log(os.path.join(out, run.name, "log.txt"),
                         {"split": split, "images": len(shares), "rel_error": err / base,
                          "rollout_visible": sum(shares) / len(shares)})
    runs.append_log(os.path.join(out, run.name, "log.txt"), {"done": True})


def measure_colour(run, out):
    """What the probe can get from colour alone: the probe's own patches (finetune.py's --keep_ratio
    0.25 on the scenes' object cells), their mean RGB (3 numbers per image), a multinomial logistic
    regression (L-BFGS, deterministic) fitted on the training scenes; writes top-1 and how often the
    colour is right on the held-out ones (the class is '<colour>_<shape>')."""
    import finetune
    size, n, n_val = (int(flag(run, out, k)) for k in ("input_size", "num_images", "val_images"))
    args = finetune.get_args(["--linprobe", "--keep_ratio", "0.25", "--input_size", str(size),
                              "--num_images", str(n), "--num_val_images", str(n_val),
                              "--data_seed", "0"])
    finetune.check_args(args)
    train, val, classes = finetune.build_datasets(args)
    g = torch.Generator().manual_seed(0)

    def features(ds):
        rgb, ys = [], []
        for i in range(len(ds)):
            img, y, scores = ds[i]
            ids = masking.keep_foreground(region_file.scores_to_patches(scores[None], 1), args.keep_ratio,
                                          generator=g)
            patches = models.gather_tokens(models.patchify(img[None], 8), ids)   # [1, k, 8*8*3]
            rgb.append(patches.reshape(-1, 8 * 8, 3).mean((0, 1)))             # [3]
            ys.append(y)
        return torch.stack(rgb), torch.tensor(ys)
    (x, y), (x_val, y_val) = features(train), features(val)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_val = (x - mu) / sd, (x_val - mu) / sd
    w = torch.zeros(3, len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500)

    def loss():
        opt.zero_grad()
        value = F.cross_entropy(x @ w + b, y) + 1e-3 * w.square().sum()
        value.backward()
        return value
    opt.step(loss)
    pred = (x_val @ w + b).argmax(1)
    colour = [c.split("_")[0] for c in classes]
    colour_right = sum(colour[p] == colour[t] for p, t in zip(pred.tolist(), y_val.tolist()))
    runs.append_log(os.path.join(out, run.name, "log.txt"),
                     {"val_acc1": (pred == y_val).float().mean().item(),
                      "colour_acc": colour_right / len(y_val), "done": True})


# --------------------------------------------------------------------- the probe (issue: one per encoder)

def object_patches(base, size, patch):
    """[N, L] bool: the class object's patches of every scene, by ObjMAE's 20% rule (§3.2) on the
    scene's own instance mask (the parts scenes: their one object; shapes: the largest, drawn last,
    the one that names the class); a scene whose object loses every patch keeps them all."""
    grid = (size // patch, size // patch)
    rows = []
    for i in range(len(base)):
        mask = base.load(i)[1]
        cells = torch.from_numpy(region_file.mask_cells(mask, size, grid)).flatten()
        mine = cells == int(mask.max())
        rows.append(mine if mine.any() else torch.ones_like(mine))
    return torch.stack(rows)


@torch.no_grad()
def encoder_features(net, base, on_object, blocks=4, batch=256):
    """The encoder's patch tokens of every scene, each pooled two ways (the mean of all patches, of
    the class object's) and taken two ways: the final tokens (after the last norm; k-NN's, as in
    DINO's eval_knn.py) and the tokens of the last `blocks` blocks side by side (before the final
    norm; the logistic regression's, as DINO's linear evaluation of a ViT-S concatenates its last 4
    blocks, Caron et al. 2021, arXiv:2104.14294; chosen by measurement on the parts scenes, against
    the last block alone: RESULTS.md, the pilot gate).
    Unaugmented, normalised as in training. -> {"all" | "obj": (final [N, D], blocks [N, blocks*D])}"""
    pixels = data.PretrainDataset(base, base.img_size, hflip=False)
    L = net.grid[0] * net.grid[1]
    pooled = {"all": ([], []), "obj": ([], [])}
    for start in range(0, len(base), batch):
        idx = range(start, min(start + batch, len(base)))
        imgs = torch.stack([pixels[i][0] for i in idx])                       # [B, 3, S, S]
        hidden = []                                                          # the last blocks' outputs
        hooks = [b.register_forward_hook(lambda m, i, o: hidden.append(o[:, 1:])) for b in net.blocks[-blocks:]]
        try:
            final = net.forward_features(imgs, torch.arange(L).expand(len(idx), L))[:, 1:]  # [B, L, D]
        finally:
            for h in hooks:
                h.remove()
        last = torch.cat(hidden, -1)                                          # [B, L, blocks*D]
        weight = on_object[start:start + len(idx)].float().unsqueeze(-1)      # [B, L, 1]
        for tokens, j in ((final, 0), (last, 1)):
            pooled["all"][j].append(tokens.mean(1))
            pooled["obj"][j].append((tokens * weight).sum(1) / weight.sum(1))
    return {pool: tuple(torch.cat(t) for t in pair) for pool, pair in pooled.items()}


def encoder(run, out, size, seed):
    """The run's --checkpoint, or with --checkpoint none the random MAE pretrain.py starts from at
    --seed (torch.manual_seed, then the model)."""
    path = flag(run, out, "checkpoint")
    if path != "none":
        return load_mae(path, size)
    torch.manual_seed(seed)
    return models.MODELS[flag(run, out, "model")](img_size=size, norm_pix_loss=True).eval()


def measure_probe(run, out):
    """One encoder measured by two deterministic classifiers on fixed features (probe.py): a
    converged L2 logistic regression (on the last --blocks blocks' tokens) and DINO's k-NN (on the
    final tokens), each on two poolings of the patch tokens (all patches; the class object's). The
    encoder is a pre-training run's checkpoint, or with --checkpoint none the random one
    pretrain.py starts from at --seed (torch.manual_seed, then the model). Writes lin_all, lin_obj, knn_all, knn_obj (top-1 %) and the chosen weight decays."""
    size, seed = int(flag(run, out, "input_size")), int(flag(run, out, "seed"))
    net = encoder(run, out, size, seed)
    record = {}
    sets = [study_split(run, out, split, size, flag(run, out, "scenes")) for split in ("train", "val")]
    (y, y_val) = (torch.tensor(s.targets) for s in sets)
    blocks = int(flag(run, out, "blocks"))
    feats = [encoder_features(net, s, object_patches(s, size, net.patch_size), blocks) for s in sets]
    for pool in ("all", "obj"):
        (x, x_blocks), (x_val, x_val_blocks) = feats[0][pool], feats[1][pool]
        fit = probe.logistic_probe(x_blocks, y, x_val_blocks, y_val, len(sets[0].classes))
        votes = probe.knn_predict(x, y, x_val, len(sets[0].classes))
        record.update({f"lin_{pool}": 100 * fit["acc"], f"wd_{pool}": fit["weight_decay"],
                       f"knn_{pool}": 100 * (votes == y_val).float().mean().item()})
    runs.append_log(os.path.join(out, run.name, "log.txt"), {**record, "done": True})


def measure_oracle_parts(run, out):
    """SemMAE on oracle parts: a regions file of the parts scenes' true part masks (background and
    the object's parts, 0..3) on 8-px cells, each cell its most common part (SemMAE §4.2 learns
    parts at 8x8). The learned parts of part_learn.py are measured against the same scenes."""
    size, n = int(flag(run, out, "input_size")), int(flag(run, out, "num_images"))
    base = scenes.builtin("parts", n, size, 0, "train", flag(run, out, "scene_cache"))
    cell = 8
    grid = size // cell
    parts = torch.stack([torch.from_numpy(base.part_mask(i)).long() for i in range(n)])  # [N, S, S]
    votes = F.one_hot(parts, 4).view(n, grid, cell, grid, cell, 4).sum((2, 4))         # [N, g, g, 4]
    meta = {"method": "oracle", "kind": "parts", "input_size": size, "cell_size": cell,
            "num_regions": 4, "source": "scenes.py's true part masks"}
    folder = os.path.join(out, run.name)
    region_file.save_regions(os.path.join(folder, "regions.pt"), votes.argmax(-1), None,
                             base.files, meta)
    runs.append_log(os.path.join(folder, "log.txt"), {"done": True})


def measure_scenes(run, out):
    """What the parts scenes' classes depend on, at the study's size (test_scenes.py checks the same
    at a small one): a logistic regression (probe.logistic_probe) on the mean colour (chance is
    1/20), on one part's texture statistics, and on the whole object's."""
    size = int(flag(run, out, "input_size"))
    sets = [study_split(run, out, split, size) for split in ("train", "val")]
    record = {}
    for key, fn in (("colour", scenes.colour_features),
                    ("one_part", lambda ds: scenes.part_texture_features(ds, 1)),
                    ("whole_object", scenes.part_texture_features)):
        (x, y), (x_val, y_val) = fn(sets[0]), fn(sets[1])
        record[key] = 100 * probe.logistic_probe(x, y, x_val, y_val, len(sets[0].classes))["acc"]
    runs.append_log(os.path.join(out, run.name, "log.txt"), {**record, "done": True})


def patch_places(base, i, patch):
    """Where each patch of parts scene i lies: 0 background, 1 wholly inside one part, 2 across a
    border; and the texture kind there (-1 where not inside one part). -> (long [L], long [L])"""
    parts = torch.from_numpy(base.part_mask(i)).long()                               # [S, S]
    g = parts.shape[0] // patch
    cells = parts.view(g, patch, g, patch).permute(0, 2, 1, 3).reshape(g * g, -1)   # [L, p*p]
    one = (cells == cells[:, :1]).all(1)
    place = torch.where(one, (cells[:, 0] > 0).long(), 2)
    kinds = torch.tensor([-1] + base.part_kinds(i))[cells[:, 0]]
    return place, torch.where(place == 1, kinds, -1)


@torch.no_grad()
def measure_texture(run, out):
    """What an encoder holds of the parts scenes' textures, beside the pilot gate: (1) per patch
    wholly inside one part, how well its token tells that part's texture (6 kinds): the logistic
    regression and k-NN of measure_probe, fitted on the training scenes' patches, scored on the
    held-out ones; (2) the MAE's reconstruction loss (norm_pix_loss, a random 75% of the patches
    hidden) on the held-out scenes, by where the hidden patch lies: inside one part, background,
    across a border. A prediction of zero (each patch's own mean) scores 1.0 there. The first
    --images scenes of each split (of --num_images, --val_images)."""
    size, n, seed = (int(flag(run, out, k)) for k in ("input_size", "images", "seed"))
    net = encoder(run, out, size, seed)
    L, gen = net.grid[0] * net.grid[1], torch.Generator().manual_seed(0)
    feats, record = {}, {}
    for split in ("train", "val"):
        base = study_split(run, out, split, size)
        plain = scenes.PartsDataset(len(base), size, 0, split)  # part masks and kinds, no image drawn
        pixels = data.PretrainDataset(base, size, hflip=False)
        imgs = torch.stack([pixels[i][0] for i in range(n)])                 # [n, 3, S, S]
        places, kinds = (torch.stack(t) for t in
                         zip(*(patch_places(plain, i, net.patch_size) for i in range(n))))  # [n, L]
        tokens = net.forward_features(imgs, torch.arange(L).expand(n, L))[:, 1:]   # [n, L, D]
        feats[split] = tokens[kinds >= 0], kinds[kinds >= 0]
        if split == "val":
            ids = torch.rand(n, L, generator=gen).argsort(1)
            src, tgt = ids[:, :L // 4], ids[:, L // 4:]                      # [n, L/4], [n, 3L/4]
            pred = net.forward_decoder(net.forward_features(imgs, src), src, tgt)
            loss = net.patch_loss(imgs, tgt, pred)                           # [n, 3L/4]
            where = places.gather(1, tgt)
            for k, name in enumerate(("background", "texture", "border")):
                record[f"loss_{name}"] = loss[where == k].mean().item()
                record[f"share_{name}"] = (where == k).float().mean().item()
    (x, y), (x_val, y_val) = feats["train"], feats["val"]
    record["patch_lin"] = 100 * probe.logistic_probe(x, y, x_val, y_val, 6)["acc"]
    record["patch_knn"] = 100 * (probe.knn_predict(x, y, x_val, 6) == y_val).float().mean().item()
    runs.append_log(os.path.join(out, run.name, "log.txt"), {**record, "done": True})


MEASURES = {"timing": measure_timing, "unseen": measure_unseen, "colour": measure_colour,
            "readout": measure_probe, "oracle": measure_oracle_parts, "scenes": measure_scenes,
            "texture": measure_texture}


class Given:
    """A measurement run as its command line gives it (name, flags), for MEASURES."""

    def __init__(self, name, flags):
        self.name, self.flags = name, flags

    def argv(self, out):
        return self.flags


if __name__ == "__main__":      # python study_measures.py KIND OUT NAME FLAGS... (study.py's runs)
    kind, out_dir, run_name, *run_flags = sys.argv[1:]
    torch.set_num_threads(1)
    try:
        with utils.user_input():
            MEASURES[kind](Given(run_name, run_flags), out_dir)
    except utils.UsageError as e:
        utils.die(str(e))
