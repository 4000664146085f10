"""Tests for masking.py's ObjMAE part (object_wise_masking): selection, division and alignment
invariants against plain-Python checks, uniformity of every random choice, each padding and relation."""
import itertools

import torch
from hypothesis import given, strategies as st

import masking as M
from test_masking import FAST, assert_uniform, gen

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- ObjMAE

def seq_len(seq_ratio, L):
    return max(1, round(seq_ratio * L))


def objects(ids, valid, labels):
    """The set of labels of the valid slots of every row."""
    lab = labels.gather(1, ids)
    return [set(lab[b][valid[b]].tolist()) for b in range(ids.shape[0])]


def candidates(row):
    """Labels of choosable objects: 1..254 with at least two patches (1-patch objects cannot be split)."""
    values, counts = torch.unique(row, return_counts=True)
    return {v for v, c in zip(values.tolist(), counts.tolist()) if 0 < v < 255 and c >= 2}


def check_object_masks(m, labels, seq_ratio, padding, relation):
    """Invariants every ObjMAE output keeps, checked row by row in plain Python."""
    B, L = labels.shape
    n = m.src_ids.shape[1]
    for t in m:
        assert t.shape == (B, n)
    assert m.src_ids.dtype == torch.long and m.src_valid.dtype == torch.bool
    assert ((m.src_ids >= 0) & (m.src_ids < L) & (m.tgt_ids >= 0) & (m.tgt_ids < L)).all()
    if padding != "throwout":
        assert n == seq_len(seq_ratio, L)
    if padding in ("throwout", "replicate"):
        assert m.src_valid.all() and m.tgt_valid.all()
    for b in range(B):
        src, tgt = set(m.src_ids[b].tolist()), set(m.tgt_ids[b].tolist())
        assert not src & tgt, "source and target share a patch"
        src_real = m.src_ids[b][m.src_valid[b]].tolist()
        tgt_real = m.tgt_ids[b][m.tgt_valid[b]].tolist()
        if padding != "replicate":
            assert len(set(src_real)) == len(src_real) and len(set(tgt_real)) == len(tgt_real)
        assert src_real and tgt_real
        assert m.src_valid[b].tolist() == sorted(m.src_valid[b].tolist(), reverse=True)   # padding after content


@given(st.integers(1, 5), st.integers(2, 40), st.floats(0, 0.99), st.sampled_from(M._PADDINGS),
       st.sampled_from(M._RELATIONS), st.booleans(), st.integers(0, 999))
@FAST
def test_object_wise_masking_invariants(B, L, seq_ratio, padding, relation, with_scores, seed):
    g = gen(seed)
    alphabet = torch.tensor([0, 1, 2, 3, 255])
    weights = torch.rand(5, generator=g)
    labels = alphabet[torch.multinomial(weights, B * L, replacement=True, generator=g)].view(B, L)
    scores = torch.rand(B, L, generator=g).round(decimals=1) if with_scores else None   # with ties
    m = M.object_wise_masking(labels, seq_ratio, padding, relation, scores, generator=g)
    check_object_masks(m, labels, seq_ratio, padding, relation)
    n = m.src_ids.shape[1]
    for b in range(B):
        cand, row = candidates(labels[b]), labels[b]
        src_lab = set(row[m.src_ids[b][:1]].tolist())   # slot 0 is always real content of the source
        tgt_lab = set(row[m.tgt_ids[b][:1]].tolist())
        region = lambda lab: (row == lab).sum().item()
        if relation == "image" or not cand:
            if padding in ("zero", "throwout"):
                assert m.src_valid[b].sum() == min((L + 1) // 2, n) and m.tgt_valid[b].sum() == min(L // 2, n)
            continue
        (s,) = src_lab
        (t,) = tgt_lab
        if relation == "intra" or (relation == "inter" and len(cand | ({0} if region(0) >= 2 and len(cand) == 1
                                                                     else set())) < 2):
            assert s == t and s in cand
            N = region(s)
            if padding in ("zero", "throwout"):
                assert objects(m.src_ids, m.src_valid, labels)[b] == {s} == objects(m.tgt_ids, m.tgt_valid, labels)[b]
                assert m.src_valid[b].sum() == min((N + 1) // 2, n) and m.tgt_valid[b].sum() == min(N // 2, n)
        else:
            assert s != t and s in cand | {0} and t in cand | {0}
            if 0 in (s, t):
                assert len(cand) == 1                    # background only joins a lone object
            if padding in ("zero", "throwout"):
                assert m.src_valid[b].sum() == min(region(s), n) and m.tgt_valid[b].sum() == min(region(t), n)


def test_object_is_chosen_uniformly_not_by_size_and_never_ignore():
    B = 6000
    row = torch.tensor([0] * 10 + [1] * 2 + [2] * 8 + [3] * 30 + [255] * 40 + [4] * 1)   # 4: a 1-patch object
    labels = row.expand(B, -1)
    m = M.object_wise_masking(labels, 0.2, "zero", "intra", generator=gen())
    chosen = labels.gather(1, m.src_ids[:, :1]).squeeze(1)
    for obj in (1, 2, 3):
        assert_uniform((chosen == obj).double().mean(), 1 / 3, B)
    assert not ((chosen == 0) | (chosen == 255) | (chosen == 4)).any()


def test_intra_split_is_random_and_halves_are_equal():
    B, L = 4000, 20
    row = torch.tensor([0] * 9 + [5] * 11)             # one object, 11 patches: halves of 6 and 5
    labels = row.expand(B, L)
    m = M.object_wise_masking(labels, 0.9, "zero", "intra", generator=gen())   # n = 18: no throwing
    assert (m.src_valid.sum(1) == 6).all() and (m.tgt_valid.sum(1) == 5).all()
    in_src = torch.zeros(B, L).scatter_(1, torch.where(m.src_valid, m.src_ids, 0), 1.0)[:, 9:]   # 0: background
    assert_uniform(in_src.mean(0), 6 / 11, B)


def test_larger_halves_keep_a_random_subset_of_n():
    B, L = 4000, 40
    labels = torch.tensor([0] * 10 + [1] * 30).expand(B, L)   # halves of 15, n = 4
    m = M.object_wise_masking(labels, 0.1, "zero", "intra", generator=gen())
    assert m.src_valid.all() and m.tgt_valid.all() and m.src_ids.shape[1] == 4
    used = torch.zeros(B, L).scatter_(1, torch.cat([m.src_ids, m.tgt_ids], 1), 1.0)[:, 10:]
    assert_uniform(used.mean(0), 8 / 30, B)


def test_padding_modes():
    labels = torch.tensor([[0] * 14 + [1] * 6] * 300)       # object of 6: halves of 3, n = 5
    L = labels.shape[1]
    zero = M.object_wise_masking(labels, 0.25, "zero", generator=gen())
    assert zero.src_valid.sum(1).eq(3).all() and zero.tgt_valid.sum(1).eq(3).all()
    assert (zero.src_ids[:, 3:] == zero.src_ids[:, :1]).all()      # invalid slots repeat the first patch
    rep = M.object_wise_masking(labels, 0.25, "replicate", generator=gen())
    assert rep.src_valid.all() and rep.tgt_valid.all()
    assert (labels.gather(1, rep.src_ids) == 1).all() and (labels.gather(1, rep.tgt_ids) == 1).all()
    assert torch.equal(rep.src_ids[:, 3:], rep.src_ids[:, :2])      # cyclic repeat of the set's own patches
    rnd = M.object_wise_masking(labels, 0.25, "random", generator=gen())
    assert rnd.src_valid.all() and rnd.tgt_valid.all()
    assert (labels.gather(1, rnd.src_ids[:, :3]) == 1).all() and (labels.gather(1, rnd.src_ids[:, 3:]) == 0).all()
    everything = torch.cat([rnd.src_ids, rnd.tgt_ids], 1).sort(1).values
    assert (everything.diff(dim=1) > 0).all()                       # ten distinct patches
    pad = torch.zeros(300, L).scatter_(1, torch.cat([rnd.src_ids[:, 3:], rnd.tgt_ids[:, 3:]], 1), 1.0)[:, :14]
    assert_uniform(pad.mean(0), 4 / 14, 300)                        # padding drawn uniformly from the rest
    thr = M.object_wise_masking(torch.tensor([[0] * 4 + [1] * 6, [0] * 2 + [2] * 8]), 0.25, "throwout",
                                generator=gen())
    assert thr.src_ids.shape[1] == 3 and thr.src_valid.all()        # smallest half in the batch: 6 // 2


def test_random_padding_runs_dry_only_when_2n_exceeds_L():
    labels = torch.tensor([[1, 1, 0, 0, 0]])                  # n = round(0.8 * 5) = 4, 2n = 8 > 5
    m = M.object_wise_masking(labels, 0.8, "random", generator=gen())
    assert m.src_valid.sum() + m.tgt_valid.sum() == 5
    assert not set(m.src_ids[0].tolist()) & set(m.tgt_ids[0].tolist())


def test_inter_object_uses_two_objects_or_background_and_object():
    B = 3000
    two = torch.tensor([0] * 6 + [1] * 5 + [2] * 5 + [3] * 4).expand(B, -1)
    m = M.object_wise_masking(two, 0.5, "zero", "inter", generator=gen())
    s, t = two.gather(1, m.src_ids[:, :1]).squeeze(1), two.gather(1, m.tgt_ids[:, :1]).squeeze(1)
    assert ((s != t) & (s > 0) & (t > 0)).all()
    for a, b in itertools.permutations((1, 2, 3), 2):
        assert_uniform(((s == a) & (t == b)).double().mean(), 1 / 6, B)
    one = torch.tensor([[0] * 6 + [7] * 5 + [255] * 2] * 1000)
    m = M.object_wise_masking(one, 0.5, "zero", "inter", generator=gen())
    s, t = one.gather(1, m.src_ids[:, :1]).squeeze(1), one.gather(1, m.tgt_ids[:, :1]).squeeze(1)
    assert (((s == 0) & (t == 7)) | ((s == 7) & (t == 0))).all()
    assert_uniform((s == 7).double().mean(), 0.5, 1000)
    assert (one.gather(1, m.src_ids)[m.src_valid] == s[:, None].expand(-1, m.src_ids.shape[1])[m.src_valid]).all()


def test_no_object_uses_the_whole_image():
    labels = torch.tensor([[0] * 10 + [255] * 4 + [3]] * 500)   # only a 1-patch object: no choosable object
    L = labels.shape[1]
    for relation in ("intra", "inter"):
        m = M.object_wise_masking(labels, 0.9, "zero", relation, generator=gen())   # n = 14
        assert (m.src_valid.sum(1) == 8).all() and (m.tgt_valid.sum(1) == 7).all()
        used = torch.zeros(500, L).scatter_(1, torch.cat([m.src_ids, m.tgt_ids], 1), 1.0)
        assert (used == 1).all()                                 # every patch, ignore included


def test_scores_pick_the_highest_scoring_patches_first():
    B, L = 2000, 40
    labels = torch.tensor([0] * 10 + [1] * 30).expand(B, L)
    scores = torch.linspace(0, 1, L).expand(B, L).clone()
    scores[:, 30:] = 2.0                                         # ten tied best patches of the object
    m = M.object_wise_masking(labels, 0.1, "zero", "intra", scores, generator=gen())   # n = 4: 8 of 30 used
    used = torch.zeros(B, L).scatter_(1, torch.cat([m.src_ids, m.tgt_ids], 1), 1.0)
    assert (used[:, :30] == 0).all()
    assert_uniform(used[:, 30:].mean(0), 0.8, B)                 # ties among the best broken at random
    src = torch.zeros(B, L).scatter_(1, m.src_ids, 1.0)[:, 30:]
    assert_uniform(src.mean(0), 0.4, B)                          # and the split between halves is random
    inter = M.object_wise_masking(torch.tensor([[1] * 10 + [2] * 10] * 4), 0.1, "zero", "inter",
                                  torch.arange(20.).expand(4, 20), generator=gen())
    assert (inter.src_ids.sort(1).values.remainder(10) >= 8).all() and (inter.tgt_ids.remainder(10) >= 8).all()


def test_image_relation_is_mae_with_alpha():
    B, L = 3000, 16
    labels = torch.tensor([0] * 8 + [1] * 8).expand(B, L)
    scores = torch.arange(16.).expand(B, L)                     # ignored: MAE throws out at random
    m = M.object_wise_masking(labels, 0.25, "zero", "image", scores, generator=gen())
    assert m.src_valid.all() and m.tgt_valid.all() and m.src_ids.shape[1] == 4
    assert_uniform(torch.zeros(B, L).scatter_(1, m.src_ids, 1.0).mean(0), 0.25, B)
    assert_uniform(torch.zeros(B, L).scatter_(1, m.tgt_ids, 1.0).mean(0), 0.25, B)
