"""The networks: a ViT encoder, the MAE encoder/decoder on index sets (SemMAE and ObjMAE
pre-training) and the SemMAE part learner (SemMAE §3.1).

Parameter names follow timm/MAE/DINO (patch_embed.proj, cls_token, pos_embed,
blocks.{i}.attn.qkv, norm, ...), so official MAE, SemMAE, DINO, iBOT and timm weights load after
prefix stripping (released.py), and our encoders load into timm.

References (cited in the comments as "SemMAE §3.2, Alg. 1", "ObjMAE Table 8", "MAE Table 1f"):
  SemMAE  Li et al., SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders.
          NeurIPS 2022, arXiv:2206.10207
  ObjMAE  Wu & Mo, Object-wise Masked Autoencoders for Fast Pre-training. 2022, arXiv:2205.14338
  MAE     He et al., Masked Autoencoders Are Scalable Vision Learners. CVPR 2022, arXiv:2111.06377
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ---------------------------------------------------------------------------- patches and positions

def patchify(imgs, p):
    """[B, C, H, W] -> [B, L, p*p*C]: patches row-major, pixels in MAE's (p, q, c) order (the pixel
    target)."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, h, w):
    """[B, h*w, p*p*C] in patchify's order -> [B, C, h*p, w*p]."""
    B = x.shape[0]
    x = x.reshape(B, h, w, p, p, -1)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, -1, h * p, w * p)


def patch_stats(pixels):
    """Per-patch mean and std of [B, n, p*p*C] pixels (MAE's norm_pix_loss: unbiased var, eps
    1e-6)."""
    return pixels.mean(dim=-1, keepdim=True), (pixels.var(dim=-1, keepdim=True) + 1e-6) ** 0.5


def gather_tokens(x, ids):
    """x [B, L, D], ids [B, n] -> [B, n, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def sincos_pos_embed(dim, grid):
    """MAE's fixed 2-D sin-cos embedding: [1 + gh*gw, dim], row 0 (cls) is zero. The first half of
    the channels encodes the column and the second half the row (MAE's meshgrid(w, h)), so a 14x14
    table equals MAE's."""
    if dim % 4:
        raise ValueError(f"embed_dim={dim} must be divisible by 4 for the 2-D sin-cos position "
                         "embedding")
    gh, gw = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # [D/4]
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64),
                                torch.arange(gw, dtype=torch.float64), indexing="ij")

    def embed_1d(pos):  # [gh, gw] -> [gh*gw, D/2]
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)  # [L, D]
    return torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb]).float()


def interpolate_pos_embed(pos_embed, grid, src_grid=None):
    """[1, 1+L, D] -> [1, 1 + gh*gw, D]: the cls row is kept, the patch rows are resized bicubically
    on the grid (MAE/DeiT's rule for fine-tuning at another resolution). src_grid defaults to the
    square sqrt(L) grid."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    if src_grid is None:
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise ValueError(f"pos_embed has {patches.shape[1]} patch rows, not a square grid; "
                             "pass src_grid")
        src_grid = (side, side)
    if tuple(src_grid) == tuple(grid):
        return pos_embed
    x = patches.reshape(1, *src_grid, -1).permute(0, 3, 1, 2).float()  # [1, D, sh, sw]
    x = F.interpolate(x, size=tuple(grid), mode="bicubic", align_corners=False)
    x = x.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)  # [1, gh*gw, D]
    return torch.cat([cls, x], dim=1)


def key_mask(valid):
    """valid [B, N] bool (True = a real token) -> SDPA mask [B, 1, 1, N] (True = may be attended
    to); None stays None (random/SemMAE masks have no padding, so SDPA keeps its no-mask kernels).
    The mask is passed as it is, even when every slot happens to be valid: testing that would be a
    host-device sync in every step. Queries are not masked: an invalid slot still gets an output
    (never read), and every row keeps the always-valid cls key, so no row is all -inf."""
    if valid is None:
        return None
    return valid[:, None, None, :]


def with_cls(valid):
    """[B, n] slot validity -> [B, 1+n] with the (always valid) cls slot in front; None stays
    None."""
    return None if valid is None else torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)


# ----------------------------------------------------------------------------- transformer blocks

class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_qkv(self, x):  # [B, N, D] -> 3 x [B, heads, N, D/heads]
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x, mask=None):
        q, k, v = self.split_qkv(x)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, heads, N, D/heads]
        return self.proj(x.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, mask=None):
        x = x + drop_path(self.attn(self.norm1(x), mask), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def run_blocks(blocks, x, mask, grad_checkpointing):
    """The blocks in turn. grad_checkpointing (when a graph is being built): each block keeps only
    its input for the backward pass and runs its forward again there, so activation memory is one
    block's instead of all of them, for about a third more compute (torch.utils.checkpoint; the RNG
    state is replayed, so drop path draws the same)."""
    for blk in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, mask, use_reentrant=False)
        else:
            x = blk(x, mask)
    return x


class PatchEmbed(nn.Module):
    """Holds the Conv2d so the weights are named patch_embed.proj like timm's; see
    VisionTransformer.embed."""

    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)


def init_weights(module):
    """MAE's initialisation: xavier-uniform linears (the patch projection as a linear), unit
    LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
            nn.init.zeros_(m.proj.bias)


# ----------------------------------------------------------------------------- ViT encoder

class VisionTransformer(nn.Module):
    """ViT with timm's parameter names. pos_embed is a learned Parameter (checkpoints bring theirs)
    that starts from the 2-D sin-cos table; global_pool averages the patch tokens and uses fc_norm
    instead of norm (MAE)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=0, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0,
                 global_pool=False):
        super().__init__()
        sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if sizes[0] % patch_size or sizes[1] % patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}; "
                             f"use a multiple of {patch_size}")
        self.patch_size, self.global_pool = patch_size, global_pool
        # run_blocks; set by --grad_checkpointing
        self.grad_checkpointing = False
        self.grid = (sizes[0] // patch_size, sizes[1] // patch_size)
        num_patches = self.grid[0] * self.grid[1]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        # linear stochastic-depth decay
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r)
                                     for r in rates])
        if global_pool:
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        init_weights(self)
        self.pos_embed.data.copy_(sincos_pos_embed(embed_dim, self.grid).unsqueeze(0))
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, imgs, ids=None, valid=None):
        """Tokens + positions [B, 1+n, D]: cls, then the patches ids [B, n] (all patches when None).
        The pixels are gathered before the projection so dropped patches cost nothing; invalid slots
        get zero pixels."""
        p = self.patch_size
        B, C, H, W = imgs.shape
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by patch_size={p}")
        grid = (H // p, W // p)
        # rows in the conv weight's (c, p, q) order, so F.linear with proj.weight.flatten(1) equals
        # the Conv2d
        rows = imgs.reshape(B, C, grid[0], p, grid[1], p).permute(0, 2, 4, 1, 3, 5)
        rows = rows.flatten(3).flatten(1, 2)
        # [B, L, D]
        pos = interpolate_pos_embed(self.pos_embed, grid, self.grid)[:, 1:].expand(B, -1, -1)
        if ids is not None:
            # [B, n, C*p*p], [B, n, D]
            rows, pos = gather_tokens(rows, ids), gather_tokens(pos, ids)
            if valid is not None:
                # zero padding carries no content
                rows = rows.masked_fill(~valid.unsqueeze(-1), 0.0)
        proj = self.patch_embed.proj
        x = F.linear(rows, proj.weight.flatten(1), proj.bias) + pos  # [B, n, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_features(self, imgs, ids=None, valid=None, attend_padding=False):
        """Tokens [B, 1+n, D] (cls first) after the final norm (none with global_pool: fc_norm acts
        on the pooled vector). ids [B, n]: which patches; valid [B, n]: invalid slots get zero
        pixels and are never attended to, or with attend_padding are attended as such zero-filled
        tokens (ObjMAE §3.3 zero padding)."""
        x = self.embed(imgs, ids, valid)  # [B, 1+n, D]
        mask = None if attend_padding else key_mask(with_cls(valid))
        x = run_blocks(self.blocks, x, mask, self.grad_checkpointing)
        return x if self.global_pool else self.norm(x)

    def forward(self, imgs):
        x = self.forward_features(imgs)
        x = self.fc_norm(x[:, 1:].mean(dim=1)) if self.global_pool else x[:, 0]  # [B, D]
        return self.head(x)

    def get_last_selfattention(self, imgs):
        """[B, heads, 1+L, 1+L] softmax weights of the last block. SDPA's fused kernels do not
        return them, so they are recomputed from that block's q and k (same scale
        1/sqrt(head_dim))."""
        x = self.embed(imgs)  # [B, 1+L, D]
        for blk in self.blocks[:-1]:
            x = blk(x)
        q, k, _ = self.blocks[-1].attn.split_qkv(self.blocks[-1].norm1(x))
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


# ----------------------------------------------------------------------------- MAE on index sets

class MaskedAutoencoderViT(VisionTransformer):
    """MAE where the encoder sees only the source patches and the decoder only the encoded sources
    plus one mask token per target (ObjMAE §3.4); MAE's random masking is src = kept, tgt = masked.
    The encoder is this class's VisionTransformer part (same names, no head) with a fixed sin-cos
    pos_embed; the decoder uses MAE's names."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_pix_loss=False):
        super().__init__(img_size, patch_size, in_chans, 0, embed_dim, depth, num_heads, mlp_ratio)
        self.pos_embed.requires_grad_(False)  # fixed sin-cos, as MAE
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed(decoder_embed_dim, self.grid).unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            init_weights(m)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_decoder(self, latent, src_ids, tgt_ids, src_valid=None, tgt_valid=None):
        """latent [B, 1+n_src, D] -> pred [B, n_tgt, p*p*C]. The decoder's position embedding goes
        on every token at its own patch (MAE adds it after unshuffling); the order of tokens does
        not matter to attention."""
        x = self.decoder_embed(latent)  # [B, 1+n_src, Dd]
        pos = self.decoder_pos_embed.expand(x.shape[0], -1, -1)  # [B, 1+L, Dd]
        src = x[:, 1:] + gather_tokens(pos[:, 1:], src_ids)
        tgt = self.mask_token + gather_tokens(pos[:, 1:], tgt_ids)  # [B, n_tgt, Dd]
        x = torch.cat([x[:, :1] + pos[:, :1], src, tgt], dim=1)
        mask = None
        if src_valid is not None or tgt_valid is not None:
            valid = [torch.ones_like(ids, dtype=torch.bool) if v is None else v
                     for v, ids in ((src_valid, src_ids), (tgt_valid, tgt_ids))]
            mask = key_mask(with_cls(torch.cat(valid, dim=1)))
        x = run_blocks(self.decoder_blocks, x, mask, self.grad_checkpointing)
        # per-token norm: only the targets are predicted
        x = self.decoder_norm(x[:, -tgt_ids.shape[1]:])
        return self.decoder_pred(x)

    def patch_loss(self, imgs, tgt_ids, pred):
        """MSE per target patch, the mean over its pixels (of each patch's normalised pixels with
        norm_pix_loss) -> [B, n_tgt]."""
        target = gather_tokens(patchify(imgs, self.patch_size), tgt_ids)  # [B, n_tgt, p*p*C]
        if self.norm_pix_loss:
            mean, std = patch_stats(target)
            target = (target - mean) / std
        return ((pred - target) ** 2).mean(dim=-1)

    def forward_loss(self, imgs, tgt_ids, pred, tgt_valid=None):
        """patch_loss, then the mean over the valid target patches."""
        loss = self.patch_loss(imgs, tgt_ids, pred)  # [B, n_tgt]
        if tgt_valid is None:
            return loss.mean()
        return torch.where(tgt_valid, loss, 0.0).sum() / tgt_valid.sum().clamp(min=1)

    def forward(self, imgs, src_ids, tgt_ids, src_valid=None, tgt_valid=None, attend_padding=False):
        """imgs [B, C, H, W]; src_ids [B, n_src], tgt_ids [B, n_tgt] patch indices; *_valid bool
        (False = padding) -> (loss, pred [B, n_tgt, p*p*C] in patchify's order, normalised pixels
        when norm_pix_loss). Padding never enters the loss. It is removed from attention, or with
        attend_padding (ObjMAE §3.3's zero padding) attended: a source padding slot as a token of
        zero pixels at its slot's position, a target one as a mask token there."""
        size = tuple(g * self.patch_size for g in self.grid)
        if tuple(imgs.shape[-2:]) != size:
            raise ValueError(f"images are {tuple(imgs.shape[-2:])} but this model was built for "
                             f"img_size={size}")
        latent = self.forward_features(imgs, src_ids, src_valid, attend_padding)  # [B, 1+n_src, D]
        attended = (None, None) if attend_padding else (src_valid, tgt_valid)
        pred = self.forward_decoder(latent, src_ids, tgt_ids, *attended)
        return self.forward_loss(imgs, tgt_ids, pred, tgt_valid), pred

    def pred_to_pixels(self, imgs, tgt_ids, pred):
        """pred [B, n_tgt, p*p*C] -> pixels, undoing norm_pix_loss with each target patch's own
        mean/std."""
        if not self.norm_pix_loss:
            return pred
        mean, std = patch_stats(gather_tokens(patchify(imgs, self.patch_size), tgt_ids))
        return pred * std + mean


mae_vit_base_patch16 = partial(MaskedAutoencoderViT, patch_size=16, embed_dim=768, depth=12,
                               num_heads=12, decoder_embed_dim=512, decoder_depth=8,
                               decoder_num_heads=16)         # MAE
mae_vit_base_patch8 = partial(MaskedAutoencoderViT, patch_size=8, embed_dim=768, depth=12,
                              num_heads=12, decoder_embed_dim=512, decoder_depth=8,
                              decoder_num_heads=16)          # SemMAE 8x8
mae_vit_large_patch16 = partial(MaskedAutoencoderViT, patch_size=16, embed_dim=1024, depth=24,
                                num_heads=16, decoder_embed_dim=512, decoder_depth=8,
                                decoder_num_heads=16)        # MAE
mae_vit_small_patch16 = partial(MaskedAutoencoderViT, patch_size=16, embed_dim=384, depth=12,
                                num_heads=6, decoder_embed_dim=192, decoder_depth=4,
                                decoder_num_heads=3)        # ObjMAE Table 1
mae_vit_small_patch8 = partial(MaskedAutoencoderViT, patch_size=8, embed_dim=384, depth=12,
                               num_heads=6, decoder_embed_dim=192, decoder_depth=4,
                               decoder_num_heads=3)         # DINO ViT-S/8's encoder
mae_vit_huge_patch14 = partial(MaskedAutoencoderViT, patch_size=14, embed_dim=1280, depth=32,
                               num_heads=16, decoder_embed_dim=512, decoder_depth=8,
                               decoder_num_heads=16)         # MAE
mae_vit_tiny_patch8 = partial(MaskedAutoencoderViT, patch_size=8, embed_dim=96, depth=4,
                              num_heads=3, decoder_embed_dim=64, decoder_depth=2,
                              decoder_num_heads=2)          # CPU demos and tests

MODELS = {"mae_vit_base_patch16": mae_vit_base_patch16, "mae_vit_base_patch8": mae_vit_base_patch8,
          "mae_vit_large_patch16": mae_vit_large_patch16,
          "mae_vit_small_patch16": mae_vit_small_patch16,
          "mae_vit_tiny_patch8": mae_vit_tiny_patch8, "mae_vit_small_patch8": mae_vit_small_patch8,
          "mae_vit_huge_patch14": mae_vit_huge_patch14}
# classifiers with the same encoder sizes: "vit_base_patch16", ... (kwargs: img_size, num_classes,
# drop_path_rate, ...)
VITS = {name[len("mae_"):]: partial(VisionTransformer, **{k: ctor.keywords[k] for k in
                                                          ("patch_size", "embed_dim", "depth",
                                                           "num_heads")})
        for name, ctor in MODELS.items()}


def names_that_fit(embed_dim, depth, patch_size, names=VITS):
    """The model names among `names` whose encoder has these sizes (for load errors that name the
    fix)."""
    return [n for n, c in names.items()
            if (c.keywords["embed_dim"], c.keywords["depth"], c.keywords["patch_size"])
            == (embed_dim, depth, patch_size)]


# ----------------------------------------------------------------------- SemMAE part learner (§3.1)

def gaussian_kernel(size):
    """[size, size] normalised Gaussian; sigma = 0.3 * ((size - 1) / 2 - 1) + 0.8 (OpenCV's default
    for a size, 1.4 for the paper's 7x7) since the paper gives only the size."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"blur={size} must be an odd kernel size")
    sigma = 0.3 * ((size - 1) / 2 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


class AdaIN(nn.Module):
    """Eq. 3: normalise each channel over its positions, then scale by [W_s F_c]_i and shift by [W_b
    F_c]_i."""

    def __init__(self, style_dim, channels, eps=1e-5):
        super().__init__()
        self.scale, self.shift = nn.Linear(style_dim, channels), nn.Linear(style_dim, channels)
        self.eps = eps
        nn.init.ones_(self.scale.bias)  # starts near a plain instance norm (StyleGAN's style bias)

    def forward(self, x, style):  # x [B, ch, H, W], style [B, C]
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + self.eps).sqrt()
        scale, shift = self.scale(style)[:, :, None, None], self.shift(style)[:, :, None, None]
        return scale * (x - mean) / std + shift


class PartLearner(nn.Module):
    """Attention module (Eq. 1, 2) + fixed blur + StyleGAN-like decoder (Eq. 3, 4) on a frozen
    encoder's features. The decoder has one conv + AdaIN + LeakyReLU level at the patch grid, then
    one per 2x upsampling until the patch_size factor is covered (widths[i] channels at level i, the
    last repeated), then a 3x3 conv to RGB."""

    def __init__(self, embed_dim, num_parts=6, blur=7, patch_size=16, widths=(128, 64, 32, 16, 16)):
        super().__init__()
        C, N = embed_dim, num_parts
        # Eq. 1: one tanh -> sigmoid channel re-weighting MLP (C -> C -> C, as MA-CNN's channel
        # grouping) per part, stacked [N, C_out, C_in] so all parts run in one einsum; nn.Linear's
        # default init
        bound = 1 / math.sqrt(C)
        self.w_c1 = nn.Parameter(torch.empty(N, C, C).uniform_(-bound, bound))
        self.b_c1 = nn.Parameter(torch.empty(N, C).uniform_(-bound, bound))
        self.w_c2 = nn.Parameter(torch.empty(N, C, C).uniform_(-bound, bound))
        self.b_c2 = nn.Parameter(torch.empty(N, C).uniform_(-bound, bound))
        self.w_p = nn.Linear(C, C, bias=False)  # Eq. 2: W_p (part tokens)
        self.w = nn.Linear(C, C, bias=False)  # Eq. 2: W (patch tokens)
        self.register_buffer("blur_kernel", gaussian_kernel(blur).expand(N, 1, blur, blur).clone(),
                             persistent=False)

        # the grid, then one per 2x up to the image size
        levels = 1 + max(0, math.ceil(math.log2(patch_size)))
        chans = [N] + [widths[min(i, len(widths) - 1)] for i in range(levels)]
        self.convs = nn.ModuleList([nn.Conv2d(a, b, 3, padding=1)
                                    for a, b in zip(chans[:-1], chans[1:])])
        self.adains = nn.ModuleList([AdaIN(C, b) for b in chans[1:]])
        self.to_rgb = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def part_maps(self, cls_feat, patch_feat):
        """cls_feat [B, C] (F_c), patch_feat [B, C, h, w] (F) -> M [B, N, h, w], softmax over the
        h*w positions."""
        B, C, h, w = patch_feat.shape
        g = torch.tanh(torch.einsum("noc,bc->bno", self.w_c1, cls_feat) + self.b_c1)  # [B, N, C]
        g = torch.sigmoid(torch.einsum("noc,bnc->bno", self.w_c2, g) + self.b_c2)
        parts = cls_feat[:, None, :] * g  # [B, N, C]  Eq. 1: F_p
        q = self.w_p(parts)  # [B, N, C]
        k = self.w(patch_feat.flatten(2).transpose(1, 2))  # [B, h*w, C]
        # Eq. 2, scaled by 1/sqrt(C) like dot-product attention (the paper has no temperature):
        # unscaled logits of C-dim features saturate the softmax into one-hot maps at the start
        logits = q @ k.transpose(1, 2) / math.sqrt(C)  # [B, N, h*w]
        return torch.softmax(logits, dim=-1).view(B, -1, h, w)

    # fixed (a buffer, not learned) depthwise Gaussian: removes texture from the maps
    def blur(self, maps):
        pad = self.blur_kernel.shape[-1] // 2
        padded = F.pad(maps, [pad] * 4, mode="replicate")
        return F.conv2d(padded, self.blur_kernel, groups=maps.shape[1])

    def decode(self, maps, cls_feat, out_size):
        """Eq. 3, 4: blurred maps (space) + class token (texture, via AdaIN) -> image [B, 3,
        *out_size]."""
        h, w = maps.shape[-2:]
        # each map then averages 1: softmax values ~1/(h*w) sit below AdaIN's eps
        x = self.blur(maps * (h * w))
        for i, (conv, adain) in enumerate(zip(self.convs, self.adains)):
            if i > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = F.leaky_relu(adain(conv(x), cls_feat), 0.2)
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)
        return self.to_rgb(x)

    def forward(self, cls_feat, patch_feat, out_size):
        """-> (maps [B, N, h, w] before the blur, recon [B, 3, H, W])."""
        if isinstance(out_size, int):
            out_size = (out_size, out_size)
        maps = self.part_maps(cls_feat, patch_feat)
        return maps, self.decode(maps, cls_feat, out_size)


def diversity_loss(maps):
    """Eq. 6: (1/N^2) sum_ij (I_ij - cos(m_i, m_j))^2 over the N maps [B, N, h*w] (or [B, N, h, w]),
    batch mean."""
    m = F.normalize(maps.flatten(2), dim=-1)  # [B, N, h*w]
    sim = m @ m.transpose(1, 2)  # [B, N, N] cosine similarities
    eye = torch.eye(m.shape[1], dtype=sim.dtype, device=sim.device)
    return ((sim - eye) ** 2).sum(dim=(1, 2)).mean() / m.shape[1] ** 2
