"""Tests for model.py and released.py (the checkpoint loaders): tiny models on the CPU, big ones
on the meta device (shapes only, no memory)."""
import argparse

import numpy as np
import pytest
import torch

import model as M
import released

torch.set_num_threads(1)


def rand_ids(B, L, n_src, n_tgt, seed=0):
    """MAE-style disjoint source/target sets, each sorted."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    return perm[:, :n_src].sort(1).values, perm[:, n_src:n_src + n_tgt].sort(1).values


def tiny_mae(**kw):
    torch.manual_seed(0)
    return M.mae_vit_tiny_patch8(img_size=32, **kw)  # 4x4 grid


# ----------------------------------------------------------------------------- constructors

@pytest.mark.parametrize("name", sorted(M.MODELS))
def test_mae_constructors_shapes_and_grads(name):
    real = name in ("mae_vit_tiny_patch8", "mae_vit_small_patch16")
    size = 32 if real else 224  # meta tensors cost nothing; 224 fits patch 8, 14 and 16
    with torch.device("cpu" if real else "meta"):
        m = M.MODELS[name](img_size=size, norm_pix_loss=True)
        p = m.patch_size
        L = (size // p) ** 2
        imgs = torch.randn(2, 3, size, size)
    src, tgt = rand_ids(2, L, L // 4, L - L // 4)
    loss, pred = m(imgs, src.to(imgs.device), tgt.to(imgs.device))
    assert loss.shape == () and pred.shape == (2, L - L // 4, p * p * 3)
    loss.backward()
    assert m.patch_embed.proj.weight.grad is not None and m.decoder_pred.weight.grad is not None
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad  # fixed sin-cos
    if real:
        assert torch.isfinite(loss)


@pytest.mark.parametrize("name", sorted(M.VITS))
def test_vit_constructors_match_mae_encoders(name):
    real = name == "vit_tiny_patch8"
    size = 32 if real else 224  # meta tensors cost nothing; 224 fits patch 8, 14 and 16
    with torch.device("cpu" if real else "meta"):
        vit = M.VITS[name](img_size=size, num_classes=5, drop_path_rate=0.1, global_pool=True)
        mae = M.MODELS["mae_" + name](img_size=size)
        logits = vit(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert vit.pos_embed.grad is not None  # learned in the classifier
    enc = {k: v.shape for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    cls = {k: v.shape for k, v in vit.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    assert enc == {**cls, "norm.weight": enc["norm.weight"], "norm.bias": enc["norm.bias"]}


def test_img_size_not_divisible():
    with pytest.raises(ValueError, match=r"img_size=30.*patch_size=8"):
        M.mae_vit_tiny_patch8(img_size=30)
    with pytest.raises(ValueError, match="img_size"):
        tiny_mae()(torch.randn(1, 3, 40, 40), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))


TIMM_VIT_B16 = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768), "patch_embed.proj.weight": (768, 3, 16, 16),
                "patch_embed.proj.bias": (768,), "norm.weight": (768,), "norm.bias": (768,),
                "head.weight": (1000, 768), "head.bias": (1000,)}
for _i in range(12):
    TIMM_VIT_B16.update({f"blocks.{_i}.norm1.weight": (768,), f"blocks.{_i}.norm1.bias": (768,),
                         f"blocks.{_i}.attn.qkv.weight": (2304, 768), f"blocks.{_i}.attn.qkv.bias": (2304,),
                         f"blocks.{_i}.attn.proj.weight": (768, 768), f"blocks.{_i}.attn.proj.bias": (768,),
                         f"blocks.{_i}.norm2.weight": (768,), f"blocks.{_i}.norm2.bias": (768,),
                         f"blocks.{_i}.mlp.fc1.weight": (3072, 768), f"blocks.{_i}.mlp.fc1.bias": (3072,),
                         f"blocks.{_i}.mlp.fc2.weight": (768, 3072), f"blocks.{_i}.mlp.fc2.bias": (768,)})


def test_names_and_shapes_match_timm_vit_base_patch16_224():
    with torch.device("meta"):
        vit = M.VITS["vit_base_patch16"](num_classes=1000)
        mae = M.mae_vit_base_patch16()
    assert {k: tuple(v.shape) for k, v in vit.state_dict().items()} == TIMM_VIT_B16
    encoder = {k: tuple(v.shape) for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    assert encoder == {k: v for k, v in TIMM_VIT_B16.items() if not k.startswith("head.")}


# ----------------------------------------------------------------------------- patches and positions

def test_patchify_order_and_inverse():
    imgs = torch.randn(2, 3, 16, 24)
    x = M.patchify(imgs, 8)  # [2, 6, 192]
    assert x.shape == (2, 6, 192)
    assert torch.equal(x[:, 4], imgs[:, :, 8:16, 8:16].permute(0, 2, 3, 1).flatten(1))  # row-major, (p, q, c)
    assert torch.equal(M.unpatchify(x, 8, 2, 3), imgs)


def test_gathered_patch_embedding_equals_conv():
    torch.manual_seed(0)
    vit = M.VITS["vit_tiny_patch8"](img_size=32)
    imgs = torch.randn(2, 3, 32, 32)
    conv = vit.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]  # [2, 16, D]
    ids = torch.tensor([[3, 0, 15, 7], [9, 9, 2, 11]])
    out = vit.embed(imgs, ids)  # [2, 1+4, D]
    assert torch.allclose(out[:, 1:], M.gather_tokens(conv, ids), atol=1e-5)
    assert torch.allclose(out[:, 0], (vit.cls_token[0] + vit.pos_embed[:, 0]).expand(2, -1))
    assert torch.allclose(vit.embed(imgs)[:, 1:], conv, atol=1e-5)


def mae_numpy_2d_sincos(dim, size):  # MAE's util/pos_embed.py, re-typed
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32)), axis=0)
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_sincos_equals_mae():
    ours = M.sincos_pos_embed(32, (5, 5))
    assert torch.allclose(ours, torch.from_numpy(mae_numpy_2d_sincos(32, 5)).float(), atol=1e-6)
    assert M.sincos_pos_embed(32, (3, 5)).shape == (16, 32)


def test_interpolate_pos_embed():
    pe = torch.randn(1, 1 + 14 * 14, 16)
    out = M.interpolate_pos_embed(pe, (28, 28))
    assert out.shape == (1, 1 + 28 * 28, 16) and torch.equal(out[:, 0], pe[:, 0])
    assert M.interpolate_pos_embed(pe, (14, 14)) is pe
    assert M.interpolate_pos_embed(pe, (7, 21)).shape == (1, 1 + 7 * 21, 16)
    flat = torch.ones(1, 1 + 6 * 4, 8)
    assert torch.allclose(M.interpolate_pos_embed(flat, (9, 6), src_grid=(6, 4)), torch.ones(1, 1 + 54, 8), atol=1e-5)
    with pytest.raises(ValueError, match="src_grid"):
        M.interpolate_pos_embed(flat, (9, 6))


def test_vit_runs_at_another_resolution():
    vit = M.VITS["vit_tiny_patch8"](img_size=32, num_classes=3)
    assert vit(torch.randn(1, 3, 48, 40)).shape == (1, 3)


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    vit = M.VITS["vit_tiny_patch8"](img_size=32, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    assert not torch.allclose(vit.forward_features(x), vit.forward_features(x))
    vit.eval()
    assert torch.equal(vit.forward_features(x), vit.forward_features(x))


# ----------------------------------------------------------------------------- MAE forward and loss

def reference_mae(m, imgs, mask):
    """MAE's original forward (conv patch embedding, shuffle/unshuffle, loss over masked) with m's weights."""
    B, L = mask.shape
    p = m.patch_size
    x = m.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + m.pos_embed[:, 1:]
    ids_shuffle = torch.argsort(mask.int(), dim=1, stable=True)  # kept first, then masked
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    keep = int((~mask[0]).sum())
    x = M.gather_tokens(x, ids_shuffle[:, :keep])
    x = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(B, -1, -1), x], dim=1)
    for blk in m.blocks:
        x = blk(x)
    x = m.decoder_embed(m.norm(x))
    x_ = torch.cat([x[:, 1:], m.mask_token.repeat(B, L - keep, 1)], dim=1)
    x = torch.cat([x[:, :1], M.gather_tokens(x_, ids_restore)], dim=1) + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        x = blk(x)
    pred = m.decoder_pred(m.decoder_norm(x))[:, 1:]  # [B, L, p*p*3]
    target = imgs.reshape(B, 3, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(B, L, -1)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum(), pred


def test_mae_matches_reference():
    m = tiny_mae(norm_pix_loss=True)
    imgs = torch.randn(3, 3, 32, 32)
    src, tgt = rand_ids(3, 16, 4, 12)
    mask = torch.ones(3, 16, dtype=torch.bool).scatter(1, src, False)
    loss, pred = m(imgs, src, tgt)
    ref_loss, ref_pred = reference_mae(m, imgs, mask)
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    assert torch.allclose(pred, M.gather_tokens(ref_pred, tgt), atol=1e-5)


def test_invalid_slots_carry_nothing():
    m = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    src = torch.arange(0, 6).expand(2, -1)
    tgt = torch.arange(6, 12).expand(2, -1)
    valid = torch.tensor([[True] * 4 + [False] * 2, [True] * 5 + [False]])
    loss, pred = m(imgs, src, tgt, valid, valid)

    changed = M.patchify(imgs, 8)
    changed[0, [4, 5, 10, 11]] += 10.0  # pixels of the invalid sources and targets
    changed[1, [5, 11]] += 10.0
    changed_imgs = M.unpatchify(changed, 8, 4, 4)
    loss2, pred2 = m(changed_imgs, src, tgt, valid, valid)
    assert torch.allclose(loss, loss2, atol=1e-6)
    assert torch.allclose(pred, pred2, atol=1e-5)

    # masking a slot out equals leaving it out
    loss3, pred3 = m(imgs[:1], src[:1, :4], tgt[:1, :4])
    l1, p1 = m(imgs[:1], src[:1], tgt[:1], valid[:1], valid[:1])
    assert torch.allclose(l1, loss3, atol=1e-5) and torch.allclose(p1[:, :4], pred3, atol=1e-5)

    # the loss is the mean over valid targets of the per-patch pixel MSE
    target = M.gather_tokens(M.patchify(imgs, 8), tgt)
    per_patch = ((pred - target) ** 2).mean(-1)
    assert torch.allclose(loss, per_patch[valid].mean(), atol=1e-6)


def test_zero_padding_is_attended_zero_filled_tokens():
    """ObjMAE §3.3 zero padding ("the added patches are filled with zero"): with attend_padding the invalid
    source slots are tokens of zero pixels at their positions and every slot is attended, i.e. the model of an
    image whose padded patches are zero, all slots real; only the valid targets enter the loss. Not the masked
    variant: the valid outputs change."""
    m = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    src = torch.arange(0, 6).expand(2, -1)
    tgt = torch.arange(6, 12).expand(2, -1)
    valid = torch.tensor([[True] * 4 + [False] * 2, [True] * 5 + [False]])
    loss, pred = m(imgs, src, tgt, valid, valid, attend_padding=True)
    zeroed = M.patchify(imgs, 8)
    zeroed[0, [4, 5]] = 0.0                                                # the padded sources, zero-filled
    zeroed[1, 5] = 0.0
    _, ref_pred = m(M.unpatchify(zeroed, 8, 4, 4), src, tgt)              # every slot a real, attended token
    assert torch.allclose(pred, ref_pred, atol=1e-5)
    per_patch = ((pred - M.gather_tokens(M.patchify(imgs, 8), tgt)) ** 2).mean(-1)
    assert torch.allclose(loss, per_patch[valid].mean(), atol=1e-6)
    _, masked_pred = m(imgs, src, tgt, valid, valid)                       # --padding masked
    assert not torch.allclose(pred[valid], masked_pred[valid], atol=1e-3)


def test_all_valid_flags_equal_no_flags():
    m = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    src, tgt = rand_ids(2, 16, 8, 8)
    ones = torch.ones(2, 8, dtype=torch.bool)
    a, b = m(imgs, src, tgt), m(imgs, src, tgt, ones, ones)
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    assert M.key_mask(ones).shape == (2, 1, 1, 8) and M.key_mask(None) is None   # passed as is: no host sync


def test_pred_to_pixels():
    m = tiny_mae(norm_pix_loss=True)
    imgs = torch.rand(2, 3, 32, 32)
    tgt = torch.tensor([[1, 5], [0, 15]])
    raw = M.gather_tokens(M.patchify(imgs, 8), tgt)
    normed = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert torch.allclose(m.pred_to_pixels(imgs, tgt, normed), raw, atol=1e-5)
    assert tiny_mae().pred_to_pixels(imgs, tgt, normed) is normed


def test_last_selfattention_matches_block():
    torch.manual_seed(0)
    vit = M.VITS["vit_tiny_patch8"](img_size=32).eval()
    imgs = torch.randn(2, 3, 32, 32)
    attn = vit.get_last_selfattention(imgs)
    assert attn.shape == (2, 3, 17, 17)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3, 17), atol=1e-5)
    x = vit.embed(imgs)
    for blk in vit.blocks[:-1]:
        x = blk(x)
    last = vit.blocks[-1]
    v = last.attn.split_qkv(last.norm1(x))[2]  # [B, heads, N, hd]
    by_hand = last.attn.proj((attn @ v).transpose(1, 2).flatten(2))
    assert torch.allclose(by_hand, last.attn(last.norm1(x)), atol=1e-5)


# ----------------------------------------------------------------------------- checkpoints

def small_vit(**kw):
    torch.manual_seed(1)
    return M.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, **kw)


def save(tmp_path, obj, name="ckpt.pth"):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


def plus(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def check_loads(path, ref_sd, img_size=None, **kw):
    vit = released.build_encoder_from_checkpoint(path, img_size=img_size, **kw)
    got = vit.state_dict()
    for k in ("cls_token", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias"):
        assert torch.equal(got[k], ref_sd[k]), k
    return vit


def test_layout_plain_and_timm(tmp_path):
    src = small_vit()
    sd = src.state_dict()
    vit = check_loads(save(tmp_path, sd), sd)  # DINO's dino_deitsmall8_pretrain.pth
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(vit.forward_features(x), src.forward_features(x), atol=1e-6)
    timm_sd = {**sd, "head.weight": torch.randn(10, 64), "head.bias": torch.zeros(10)}
    _, info = released.load_encoder_checkpoint(save(tmp_path, timm_sd))
    assert info["layout"] == "plain" and info["img_size"] == 32 and info["depth"] == 2 and info["patch_size"] == 8
    assert info["num_heads"] == 1 and not info["global_pool"]  # 64 // 64


def test_layout_dino_ibot_training(tmp_path):
    sd = small_vit().state_dict()
    student = {k: v + 1 for k, v in sd.items()}
    head = {"head.mlp.0.weight": torch.randn(8, 64), "head.last_layer.weight_g": torch.randn(8, 1)}
    full = {"teacher": {**plus(sd, "backbone."), **head}, "epoch": 3,
            "student": {**plus(student, "module.backbone."), **plus(head, "module.")}}
    check_loads(save(tmp_path, full), sd)  # the teacher
    only_student = {"student": {**plus(student, "module.backbone."), **plus(head, "module."),
                                "module.backbone.masked_embed": torch.zeros(64)}}  # iBOT's student
    check_loads(save(tmp_path, only_student), student)


def test_layout_ibot_release(tmp_path):
    sd = small_vit().state_dict()
    path = save(tmp_path, {"state_dict": {**sd, "head.mlp.0.weight": torch.randn(8, 64)}})
    check_loads(path, sd)


def test_layout_official_mae(tmp_path):
    torch.manual_seed(0)
    mae = M.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, decoder_embed_dim=32,
                                 decoder_depth=1, decoder_num_heads=1)
    full = mae.state_dict()
    check_loads(save(tmp_path, {"model": full}), full)  # encoder + decoder (visualisation releases)
    encoder = {k: v for k, v in full.items() if not k.startswith(("decoder", "mask_token"))}
    check_loads(save(tmp_path, {"model": encoder}), full)  # mae_pretrain_vit_*.pth
    mae_args = argparse.Namespace(model="mae_vit_tiny_patch8", input_size=32)  # what MAE's save_model keeps
    _, info = released.load_encoder_checkpoint(save(tmp_path, {"model": tiny_mae().state_dict(), "args": mae_args}))
    assert info["layout"] == "model" and info["num_heads"] == 3
    _, info = released.load_encoder_checkpoint(save(tmp_path, {"model": encoder, "args": mae_args}))
    assert info["num_heads"] == 1  # the name's sizes do not fit the tensors: embed_dim // 64
    # fine-tuning from it: fc_norm and head start fresh, the unused norm is dropped
    vit = check_loads(save(tmp_path, {"model": encoder}), full, num_classes=7, global_pool=True)
    assert vit.global_pool and vit.head.out_features == 7


def test_layout_mae_finetuned(tmp_path):
    sd = small_vit(global_pool=True, num_classes=10).state_dict()  # fc_norm + head, no norm
    path = save(tmp_path, {"model": sd})
    vit = check_loads(path, sd)
    assert vit.global_pool and torch.equal(vit.fc_norm.weight, sd["fc_norm.weight"])
    with pytest.raises(ValueError, match="global_pool"):
        released.build_encoder_from_checkpoint(path, global_pool=False)


def test_layout_semmae_patch8_grid28(tmp_path):
    torch.manual_seed(0)
    sd = M.VisionTransformer(img_size=224, patch_size=8, embed_dim=32, depth=1, num_heads=1).state_dict()
    assert sd["pos_embed"].shape == (1, 785, 32)
    path = save(tmp_path, {"model": sd})
    assert released.load_encoder_checkpoint(path)[1]["img_size"] == 224
    vit = released.build_encoder_from_checkpoint(path, img_size=64)
    assert vit.grid == (8, 8) and vit.pos_embed.shape == (1, 65, 32)
    assert torch.equal(vit.pos_embed[:, 0], sd["pos_embed"][:, 0])


def test_layout_ours(tmp_path):
    mae = tiny_mae()
    opt = torch.optim.AdamW(mae.parameters())
    path = save(tmp_path, {"model": mae.state_dict(), "optimizer": opt.state_dict(), "epoch": 2,
                           "args": {"model": "mae_vit_tiny_patch8", "input_size": 32, "mask": "objmae"}})
    _, info = released.load_encoder_checkpoint(path)
    assert info["num_heads"] == 3 and info["embed_dim"] == 96 and info["depth"] == 4  # heads from args['model']
    vit = check_loads(path, mae.state_dict(), num_classes=4)
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(vit.forward_features(x), mae.forward_features(x), atol=1e-5)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="nope.pth"):
        released.load_encoder_checkpoint(str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="unknown layout"):
        released.load_encoder_checkpoint(save(tmp_path, {"weights": {"a": torch.zeros(1)}}, "odd.pth"))
    with pytest.raises(ValueError, match="unknown layout"):
        released.load_encoder_checkpoint(save(tmp_path, [torch.zeros(1)], "list.pth"))
    sd = small_vit().state_dict()
    del sd["blocks.1.mlp.fc2.weight"]
    with pytest.raises(ValueError, match=r"broken\.pth.*blocks\.1\.mlp\.fc2\.weight"):
        released.build_encoder_from_checkpoint(save(tmp_path, {"model": sd}, "broken.pth"))
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        released.load_encoder_checkpoint(str(bad))


# ----------------------------------------------------------------------------- part learner

def test_diversity_loss_known_values():
    N = 6
    one_hot = torch.eye(N)[:, None, :].expand(N, 3, N).reshape(1, N, 3 * N)  # disjoint supports
    assert torch.allclose(M.diversity_loss(one_hot), torch.tensor(0.0), atol=1e-7)
    same = torch.rand(2, 1, 49).expand(2, N, 49)
    assert torch.allclose(M.diversity_loss(same), torch.tensor((N * N - N) / N ** 2), atol=1e-6)
    maps = torch.rand(2, N, 5, 5)
    m = maps.flatten(2)
    by_hand = torch.zeros(2)
    for i in range(N):
        for j in range(N):
            cos = (m[:, i] * m[:, j]).sum(-1) / (m[:, i].norm(dim=-1) * m[:, j].norm(dim=-1))
            by_hand += (float(i == j) - cos) ** 2
    assert torch.allclose(M.diversity_loss(maps), (by_hand / N ** 2).mean(), atol=1e-6)


def test_adain_sets_channel_statistics():
    torch.manual_seed(0)
    ada = M.AdaIN(16, 4)
    x, style = torch.randn(2, 4, 8, 8) * 5 + 3, torch.randn(2, 16)
    out = ada(x, style)
    scale, shift = ada.scale(style), ada.shift(style)
    assert torch.allclose(out.mean(dim=(2, 3)), shift, atol=1e-4)
    assert torch.allclose(out.std(dim=(2, 3), unbiased=False), scale.abs(), atol=1e-3)


def test_part_learner_shapes_and_training():
    torch.manual_seed(0)
    pl = M.PartLearner(32, num_parts=4, patch_size=8, widths=(32, 16))
    cls_feat, patch_feat = torch.randn(2, 32), torch.randn(2, 32, 4, 4)
    imgs = torch.rand(2, 3, 32, 32)
    maps, recon = pl(cls_feat, patch_feat, 32)
    assert maps.shape == (2, 4, 4, 4) and recon.shape == (2, 3, 32, 32)
    assert torch.allclose(maps.flatten(2).sum(-1), torch.ones(2, 4), atol=1e-5)  # Eq. 2: softmax over positions
    assert "blur_kernel" not in dict(pl.named_parameters()) and torch.allclose(pl.blur_kernel.sum((1, 2, 3)),
                                                                                torch.ones(4))
    opt = torch.optim.Adam(pl.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        maps, recon = pl(cls_feat, patch_feat, (32, 32))
        loss = torch.nn.functional.mse_loss(recon, imgs) + 0.03 * M.diversity_loss(maps)   # Eq. 7, as part_learn.py
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert pl.w_c1.grad is not None and pl.w_p.weight.grad is not None
