"""Loaders for released ViT checkpoints: this project's, official MAE / SemMAE, DINO, iBOT and timm
state dicts, each read with torch.load(weights_only=True) into a model.VisionTransformer.

Parameter names follow timm/MAE/DINO (patch_embed.proj, cls_token, pos_embed, blocks.{i}.attn.qkv,
norm, ...), so these layouts load after prefix stripping; a file that is not one of them fails with
one line naming it. `timm_state_dict` writes a fine-tuned model the other way: a file timm loads.
"""
import math
import os
import pickle
# only to read MAE/SemMAE checkpoints, which pickle their args as one
from argparse import Namespace

import torch
import torch.nn as nn

from model import MODELS, VITS, VisionTransformer, interpolate_pos_embed
from runs import not_a_checkpoint

# DDP, DINO/iBOT's MultiCropWrapper, torch.compile
WRAPPERS = ("module.", "backbone.", "_orig_mod.")
ENCODER_PARTS = ("patch_embed.", "blocks.", "norm.", "fc_norm.")


def read_checkpoint(path):
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist; check the path")
    why = not_a_checkpoint(path)          # not a torch.save zip (or pickle), or a damaged one
    if why:
        raise ValueError(f"{path} is not a checkpoint ({why}); pass the .pth file itself")
    try:
        # MAE/SemMAE training checkpoints carry an argparse Namespace: allow that plain container,
        # nothing else
        with torch.serialization.safe_globals([Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: say which, not a pickle traceback
        # e.g. numpy scalars in a released file's extra entries
        if isinstance(e, pickle.UnpicklingError):
            raise ValueError(f"{path} holds Python objects besides tensors, which "
                             "torch.load(weights_only=True) does not run; if you trust the file, keep "
                             "only its weights: python -c \"import torch; "
                             f"c = torch.load('{path}', weights_only=False); "
                             f"torch.save({{'model': c['model']}}, '{path}.weights.pth')\" and pass that "
                             "file") from None
        first = str(e).splitlines()[0]
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}: {first})") from None


def encoder_state_dict(obj):
    """Find the ViT weights in a loaded checkpoint -> (layout, {timm name: tensor}); empty when
    there are none."""
    if not isinstance(obj, dict):
        return type(obj).__name__, {}
    layout = next((k for k in ("teacher", "student", "state_dict", "model")
                   if isinstance(obj.get(k), dict)), "plain")
    weights = {}
    for key, value in (obj if layout == "plain" else obj[layout]).items():
        if not isinstance(key, str) or not torch.is_tensor(value):
            continue
        while key.startswith(WRAPPERS):
            key = key.split(".", 1)[1]
        # drops heads, decoder, mask_token
        if key in ("cls_token", "pos_embed") or key.startswith(ENCODER_PARTS):
            weights[key] = value
    return layout, weights


def checkpoint_num_heads(obj, embed_dim):
    """Heads are not visible in the tensors: 'model_args'.num_heads, or 'args'.model when it names
    one of MODELS/VITS of this width (our checkpoints, MAE's), else embed_dim // 64 (right for
    ViT-S/B/L, so DINO, iBOT, MAE)."""
    model_args = obj.get("model_args")
    if isinstance(model_args, dict) and model_args.get("num_heads"):
        return int(model_args["num_heads"])
    args = obj.get("args")
    args = vars(args) if isinstance(args, Namespace) else args
    name = args.get("model") if isinstance(args, dict) else None
    named = (MODELS.get(name) or VITS.get(name)) if isinstance(name, str) else None
    if named and named.keywords["embed_dim"] == embed_dim:
        return named.keywords["num_heads"]
    return max(1, embed_dim // 64)


def load_encoder_checkpoint(path):
    """Encoder weights with timm names from any of the released layouts, and what they describe:
      plain state dict (DINO's dino_deitsmall8_pretrain.pth, timm), {'state_dict'} (iBOT's released
      ViT-S/16), {'teacher', 'student'} with 'module.'/'backbone.' prefixes (DINO/iBOT training; the
      teacher is used), {'model'} (official MAE/SemMAE, encoder only or encoder + decoder,
      fine-tuned with fc_norm; this project's).
    Heads, the MAE decoder and mask token are dropped; sizes come from the tensors, num_heads as
    checkpoint_num_heads says. -> (state_dict, info {embed_dim, depth, num_heads, patch_size,
    img_size (None for a non-square grid), layout, in_chans, mlp_ratio, qkv_bias, global_pool})."""
    obj = read_checkpoint(path)
    layout, sd = encoder_state_dict(obj)
    if "patch_embed.proj.weight" not in sd:
        if isinstance(obj, dict) and "learner" in obj:  # part_learn.py's, on a frozen encoder
            encoder = (obj.get("args") or {}).get("encoder_weights")
            raise ValueError(f"{path} is a part_learn.py checkpoint: it holds the part learner, "
                             f"not an encoder; pass the encoder it ran on, {encoder}")
        top = list(obj)[:8] if isinstance(obj, dict) else layout
        raise ValueError(f"checkpoint {path} has an unknown layout (top level: {top}); expected a ViT "
                         "state dict (DINO, timm), {'state_dict'} (iBOT), {'teacher'/'student'} "
                         "(DINO/iBOT training) or {'model'} (MAE, SemMAE, this project)")
    embed_dim, in_chans, patch_size = sd["patch_embed.proj.weight"].shape[:3]
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=0)
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    num_patches = sd["pos_embed"].shape[1] - 1 if "pos_embed" in sd else 0
    side = math.isqrt(num_patches)
    info = dict(embed_dim=embed_dim, depth=depth, num_heads=checkpoint_num_heads(obj, embed_dim),
                patch_size=patch_size,
                img_size=side * patch_size if side * side == num_patches else None,
                layout=layout, in_chans=in_chans,
                mlp_ratio=4.0 if fc1 is None else fc1.shape[0] / embed_dim,
                qkv_bias="blocks.0.attn.qkv.bias" in sd,
                global_pool="fc_norm.weight" in sd and "norm.weight" not in sd)

    # every key the encoder has must be there, or a random layer would train or probe silently
    with torch.device("meta"):  # names only: no memory, no init cost
        ref = VisionTransformer(patch_size, patch_size, in_chans, 0, embed_dim, depth,
                                info["num_heads"], info["mlp_ratio"], info["qkv_bias"],
                                global_pool=info["global_pool"])
    names = set(ref.state_dict())
    missing, extra = sorted(names - set(sd)), sorted(set(sd) - names)
    if missing or extra:
        raise ValueError(f"checkpoint {path} ({layout} layout) is not a complete ViT encoder: missing "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected {extra[:6]}")
    return sd, info


def build_encoder_from_checkpoint(path, img_size=None, **kwargs):
    """VisionTransformer with a checkpoint's encoder weights; pos_embed resized to img_size's grid
    (default: the checkpoint's). kwargs go to VisionTransformer (num_classes, drop_path_rate,
    global_pool: default as the checkpoint; global_pool on an encoder with `norm` starts fc_norm
    fresh, as MAE's fine-tuning). The head is new."""
    sd, info = load_encoder_checkpoint(path)
    img_size = img_size or info["img_size"]
    if img_size is None:
        raise ValueError(f"checkpoint {path} has a non-square position grid; pass img_size")
    global_pool = kwargs.pop("global_pool", info["global_pool"])
    if global_pool and not info["global_pool"]:
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    model = VisionTransformer(img_size, info["patch_size"], info["in_chans"],
                              embed_dim=info["embed_dim"], depth=info["depth"],
                              num_heads=info["num_heads"], mlp_ratio=info["mlp_ratio"],
                              qkv_bias=info["qkv_bias"], global_pool=global_pool, **kwargs)
    if sd["pos_embed"].shape[1] != model.pos_embed.shape[1]:
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], model.grid)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    fresh = ("head.", "fc_norm.") if global_pool and not info["global_pool"] else ("head.",)
    missing = [k for k in missing if not k.startswith(fresh)]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the encoder: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]} (a fine-tuned checkpoint with fc_norm needs "
                         "global_pool=True)")
    return model


def timm_state_dict(net):
    """The weights under timm's names. A linear probe's BatchNorm (no affine, eval statistics) is
    folded into the linear layer, so timm's VisionTransformer loads the result as a plain head: W' =
    W / sqrt(var + eps), b' = b - W' mean."""
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
    head = net.head
    if isinstance(head, nn.Sequential):
        bn, lin = head
        w = lin.weight / (bn.running_var + bn.eps).sqrt()  # [C, D]
        sd["head.weight"], sd["head.bias"] = w, lin.bias - w @ bn.running_mean
    else:
        sd["head.weight"], sd["head.bias"] = head.weight, head.bias
    return {k: v.detach().clone() for k, v in sd.items()}
