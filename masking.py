"""Which patches a masked autoencoder sees and which it rebuilds: MAE, SemMAE and ObjMAE masking.

Read it top to bottom, it follows the papers:
  1. MAE's random masking, the baseline both papers start from, and its rounding (`masked_count`).
  2. SemMAE (SemMAE §3.2, Algorithm 1): a per-part budget that moves from "mask a portion of every
     part" (alpha = 0) to "mask whole parts" (alpha = 1) as training goes (alpha = progress ** gamma),
     then a uniform random subset inside each part. Plus the 8x8-patch trick of §4.2: keep only the
     most foreground-like patches. `source_target_ids` is a whole step: keep, mask, index sets.
  3. ObjMAE (ObjMAE §3): one object per image, its patches split into a source half (encoder input)
     and a target half (what the decoder rebuilds), both aligned to a fixed length n; everything else
     in the image is dropped.

Conventions. Patches are numbered 0..L-1 in row-major order. A boolean mask is True where a patch is
masked (MAE's convention). Every function is batched over the first dimension with no Python loop over
samples or patches, runs on its inputs' device, never synchronises with the device unless its
docstring says so, and is deterministic for a given `torch.Generator` (which must live on that device).
Ties are always broken at random, never by patch or part order: we sort keys made of an integer part
plus uniform float64 noise in [0, 1), or shuffle first and then sort stably.

Imports only torch: copy this file into another project as it is. What a training step needs from it:
  random or SemMAE:  src_ids, tgt_ids = source_target_ids(part_labels, 0.75, alpha, num_parts=K,
                                                          ignore_label=255, scores=scores, keep_ratio=0.25)
  ObjMAE:            src_ids, tgt_ids, src_valid, tgt_valid = object_wise_masking(object_labels, 0.25)
then the model's encoder takes the src_ids patches and its decoder rebuilds the tgt_ids patches.

References (cited in the comments as "SemMAE §3.2, Alg. 1", "ObjMAE Table 8", "MAE Table 1f"):
  SemMAE  Li et al., SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders. NeurIPS 2022, arXiv:2206.10207
  ObjMAE  Wu & Mo, Object-wise Masked Autoencoders for Fast Pre-training. 2022, arXiv:2205.14338
  MAE     He et al., Masked Autoencoders Are Scalable Vision Learners. CVPR 2022, arXiv:2111.06377
"""
from typing import NamedTuple

import torch

_IGNORE = 255           # region label of cells that belong to nothing (regions file convention)
_NUM_LABELS = 256       # object labels are uint8 values: 0 = background, 1..254 = objects, 255 = ignore
_PADDINGS = ("zero", "masked", "replicate", "random", "throwout")
_RELATIONS = ("intra", "inter", "image")


# ----------------------------------------------------------------------------- 1. MAE

def masked_count(num_patches, mask_ratio):
    """MAE's rounding (MAE's `random_masking`: len_keep = int(L * (1 - mask_ratio))): of L patches keep
    int(L * (1 - mask_ratio)) and mask the rest, M = L - int(L * (1 - mask_ratio)). Every mask in this file has
    exactly M masked patches per row (196 patches at 0.75: M = 147; SemMAE §3.2 keeps MAE's 75%). Plain Python
    ints and floats in, an int out: no tensor, no device sync."""
    _check_count(num_patches, "num_patches", 1)
    _check_ratio(mask_ratio, "mask_ratio")
    return num_patches - int(num_patches * (1 - mask_ratio))


def random_masking(batch_size, num_patches, mask_ratio, *, device=None, generator=None):
    """MAE's uniform random masking (the baseline of both papers; SemMAE Table 3 "Random masking").

    Returns a bool mask [B, L], True = masked, with exactly M = L - int(L * (1 - mask_ratio)) masked
    patches in every row. Each row is an independent uniformly random M-subset.
    """
    _check_count(batch_size, "batch_size", 1)
    _check_count(num_patches, "num_patches", 1)
    _check_ratio(mask_ratio, "mask_ratio")
    num_keep = num_patches - masked_count(num_patches, mask_ratio)
    order = _noise((batch_size, num_patches), device, generator).argsort(dim=1)  # [B, L] a random permutation
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=order.device)
    return mask.scatter_(1, order[:, num_keep:], True)


def _noise(shape, device, generator):
    """Uniform float64 noise in [0, 1): 53 random bits, so ties between draws practically never happen."""
    return torch.rand(shape, dtype=torch.float64, device=device, generator=generator)


# ----------------------------------------------------------------------------- 2. SemMAE

def alpha_schedule(progress, gamma, reverse=False):
    """SemMAE's interpolation weight (SemMAE Algorithm 1 line 7, Fig. 3, Table 3).

    alpha = progress ** gamma, progress = fraction of training done in [0, 1] (the paper uses
    epoch / total_epochs; we update it every iteration). gamma = 2 is the paper's choice; alpha = 0 is
    "mask 75% patches" of every part, alpha = 1 "mask 75% parts". reverse=True gives 1 - progress ** gamma,
    the "1 -> 0" row of Table 3. Note 0 ** 0 = 1: gamma = 0 is a constant alpha = 1.
    """
    _check_ratio(progress, "progress", high_inclusive=True)
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma >= 0:
        raise ValueError(f"gamma must be a number >= 0, got {gamma!r}")
    alpha = float(progress) ** gamma
    return 1.0 - alpha if reverse else alpha


def part_mask_counts(part_sizes, mask_ratio, alpha, *, generator=None):
    """How many patches to mask in each part: SemMAE §3.2, Algorithm 1.

    part_sizes: integer [B, K], patches per part (parts may be empty); row b sums to L_b.
    Returns long [B, K]: row b sums to exactly M_b = L_b - int(L_b * (1 - mask_ratio)), every count is
    within 1 of its real-valued quota (below) and never above the part's size.

    The quota is Algorithm 1's interpolation
        num_mask1 = mask_ratio * size                                   (line 1: a portion of every part)
        num_mask2 = whole parts in a uniformly random order until the budget L * mask_ratio, the
                    last one partly                                      (lines 2-6)
        quota     = (1 - alpha) * num_mask1 + alpha * num_mask2          (line 8)
    Randomness: the part order is the argsort of the generator's first draw, torch.rand((B, K), float64);
    a second draw breaks rounding ties (tests replay the first to check against a reference).
    """
    _check_labels(part_sizes, "part_sizes", dims="[B, K]")
    _check_ratio(mask_ratio, "mask_ratio")
    _check_ratio(alpha, "alpha", high_inclusive=True)
    _check_range_on_cpu(part_sizes, 0, torch.iinfo(torch.int64).max, "part_sizes")
    sizes = part_sizes.long()                                              # [B, K]
    B, K = sizes.shape
    total = sizes.sum(1, keepdim=True).double()                            # [B, 1] L per sample
    # M in float64 is the same IEEE arithmetic as Python's int(L * (1 - r)), so it matches masked_count.
    budget = (total - torch.floor(total * (1.0 - mask_ratio))).long()     # [B, 1] M per sample

    # Line 1: the same share of every part.
    mask1 = mask_ratio * sizes.double()                                   # [B, K]
    # Lines 2-6: shuffle the parts, walk them in that order filling the budget L * r with whole parts;
    # `marks` is the budget left when a part is reached, so a part gets min(size, what is left).
    order = _noise((B, K), sizes.device, generator).argsort(1)            # [B, K] random part order
    shuffled = sizes.gather(1, order).double()
    marks = total * mask_ratio - shuffled.cumsum(1) + shuffled
    mask2 = torch.minimum(marks.clamp(min=0), shuffled)
    mask2 = torch.empty_like(mask2).scatter_(1, order, mask2)            # unshuffle_parts
    # Line 8: interpolate.
    quota = (1.0 - alpha) * mask1 + alpha * mask2                          # [B, K] real-valued, sums to L * r

    # Rounding. Algorithm 1 is silent on it and returns real counts; an encoder batch needs exactly M
    # patches per sample. We use the largest-remainder method: floor every quota, then give one more patch
    # to the M - sum(floors) parts with the largest fractional parts (ties at random), only to parts that
    # are not full. Since sum(quota) = L * r and M - L * r is in [0, 1), at most one extra patch per part
    # with a fractional quota is needed, so every count is floor or ceil of its quota.
    base = torch.minimum(quota.floor(), sizes.double())
    # Fractions quantised to 1e-9 so float noise (0.2499999.. vs 0.25) counts as a tie, not as an order.
    frac = torch.round((quota - base) * 1e9)
    key = torch.where(base < sizes, frac, -2.0) + _noise((B, K), sizes.device, generator)   # integer + [0, 1)
    ranked = key.argsort(1, descending=True)                              # part ids, most deserving first
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(K, device=sizes.device).expand(B, K))
    extra = budget - base.sum(1, keepdim=True).long()                     # [B, 1] patches still to place
    return base.long() + (rank < extra).long()


def semantic_guided_masking(part_labels, mask_ratio, alpha, *, num_parts=None, ignore_label=None, generator=None):
    """SemMAE's semantic-guided masking (SemMAE §3.2): Algorithm 1's count per part, then a uniformly
    random subset of that many patches inside each part.

    part_labels: integer [B, L], the part of every patch in 0..num_parts-1 (argmax of the part maps), or
        ignore_label.
    mask_ratio: in [0, 1) (0.75 in the paper). alpha: in [0, 1], e.g. alpha_schedule(progress, 2).
    num_parts: K. Pass it on the training path; when None it is read from the labels (max + 1 over the
        labels that are not ignore_label), which costs one device sync.
    ignore_label: None, or the label of patches that belong to no part (255 in a regions file: cells no
        method could label). Those patches form one extra part K, masked by Algorithm 1 like the real
        parts (given a real part's id instead, they would be masked as if they belonged to that part).
    Returns a bool mask [B, L], True = masked, exactly M = L - int(L * (1 - mask_ratio)) per row.
    """
    _check_labels(part_labels, "part_labels")
    _check_ratio(mask_ratio, "mask_ratio")
    _check_ratio(alpha, "alpha", high_inclusive=True)
    labels = part_labels.long()                                           # [B, L]
    if ignore_label is not None:
        _check_count(ignore_label, "ignore_label", 0)
        ignored = labels == ignore_label                                  # [B, L]
        labels = torch.where(ignored, 0, labels)                          # checked below as a part id
    if num_parts is None:
        lo, hi = (int(v) for v in torch.aminmax(labels))                  # the documented sync
        if lo < 0:
            raise ValueError(f"part_labels must be >= 0, got a minimum of {lo}")
        num_parts = hi + 1
    else:
        _check_count(num_parts, "num_parts", 1)
        _check_range_on_cpu(labels, 0, num_parts - 1, "part_labels")
    if ignore_label is not None:                                          # the ignored patches: one more part, K
        labels = torch.where(ignored, num_parts, labels)
        num_parts += 1
    B, L = labels.shape
    sizes = torch.zeros(B, num_parts, dtype=torch.long, device=labels.device)
    sizes.scatter_add_(1, labels, torch.ones_like(labels))               # [B, K] patches per part
    counts = part_mask_counts(sizes, mask_ratio, alpha, generator=generator)   # [B, K] Algorithm 1

    # Sort the patches by (part, random): each part becomes a run of positions in a random order, and
    # masking the first counts[k] positions of part k's run masks a uniformly random subset of it.
    order = (labels.double() + _noise((B, L), labels.device, generator)).argsort(1)   # [B, L]
    part = labels.gather(1, order)                                        # part of each sorted position
    start = sizes.cumsum(1) - sizes                                       # [B, K] where each part's run begins
    rank = torch.arange(L, device=labels.device) - start.gather(1, part)  # position inside its own part
    hit = rank < counts.gather(1, part)
    return torch.zeros(B, L, dtype=torch.bool, device=labels.device).scatter_(1, order, hit)


def keep_foreground(scores, keep_ratio, *, generator=None):
    """SemMAE with 8x8 patches (SemMAE §4.2): "we leverage the learned attention maps to remove 3/4
    patches that are most likely to be the background", so a patch-8 model costs what a patch-16 one does.

    scores: float [B, L], foreground likelihood per patch. keep_ratio: in (0, 1] (1/4 in the paper).
    Returns long [B, L_keep], L_keep = max(1, int(L * keep_ratio)): the indices of the highest-scoring
    patches, ascending. Equal scores are broken at random. Mask inside the kept set (its labels gathered
    with these indices), then map back with keep.gather(1, ids).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be a float tensor [B, L], got {getattr(scores, 'shape', type(scores).__name__)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if not isinstance(keep_ratio, (int, float)) or isinstance(keep_ratio, bool) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    B, L = scores.shape
    num_keep = max(1, int(L * keep_ratio))
    shuffle = _noise((B, L), scores.device, generator).argsort(1)         # random order first, then a stable
    best = scores.gather(1, shuffle).argsort(dim=1, descending=True, stable=True)[:, :num_keep]   # sort by score
    return shuffle.gather(1, best).sort(1).values                         # [B, L_keep] ascending


def mask_to_ids(mask, *, num_masked=None):
    """A mask [B, L] (True = masked, the same count M in every row) -> (ids_keep [B, L-M], ids_masked [B, M]),
    each in ascending patch order: the encoder's source set and the decoder's target set (ObjMAE §3.4:
    MAE is the case target = every masked patch).

    num_masked: M. Pass it on the training path; when None it is read from the mask, which costs one
    device sync (and checks that every row has the same count).
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor [B, L], got {getattr(mask, 'dtype', type(mask).__name__)} "
                         f"{tuple(getattr(mask, 'shape', ()))}")
    L = mask.shape[1]
    if num_masked is None:
        lo, hi = (int(v) for v in torch.aminmax(mask.sum(1)))            # the documented sync
        if lo != hi:
            raise ValueError(f"mask must mask the same number of patches in every row, got {lo} to {hi}")
        num_masked = lo
    _check_count(num_masked, "num_masked", 0)
    if num_masked > L:
        raise ValueError(f"num_masked must be <= L = {L}, got {num_masked}")
    order = mask.to(torch.uint8).argsort(dim=1, stable=True)              # kept, then masked, each ascending
    return order[:, :L - num_masked], order[:, L - num_masked:]


def source_target_ids(part_labels, mask_ratio, alpha=None, *, num_parts=None, ignore_label=None, scores=None,
                      keep_ratio=1.0, generator=None):
    """The index sets an MAE step takes under random or SemMAE masking, with SemMAE's foreground keep
    (SemMAE §4.2) when keep_ratio < 1: keep_foreground -> mask inside the kept set -> mask_to_ids ->
    map the ids back to the full patch grid.

    part_labels: integer [B, L], as for semantic_guided_masking (with num_parts and ignore_label passed on).
    alpha: in [0, 1] for SemMAE (§3.2, e.g. alpha_schedule(progress, 2)); None for MAE's random masking
        (SemMAE Table 3 "Random masking"), where part_labels only give B, L and the device.
    scores: float [B, L], foreground likelihood per patch; needed when keep_ratio < 1, unused otherwise.
    keep_ratio: in (0, 1]. The kept set has L_k = max(1, int(L * keep_ratio)) patches (L_k = L for 1); the
        others are in neither set, the model never sees them.
    Returns (src_ids [B, L_k - M], tgt_ids [B, M]), M = masked_count(L_k, mask_ratio): patch ids in [0, L),
    ascending, disjoint, together the kept set. Draws from the generator in this order: keep_foreground,
    then the masking. No device sync when num_parts is given (or alpha is None).
    """
    _check_labels(part_labels, "part_labels")
    if not isinstance(keep_ratio, (int, float)) or isinstance(keep_ratio, bool) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    labels, keep = part_labels, None
    if keep_ratio < 1:
        if scores is None:
            raise ValueError("scores [B, L] are needed to keep the foreground (keep_ratio < 1)")
        keep = keep_foreground(scores, keep_ratio, generator=generator)   # [B, L_k] ascending patch ids
        labels = labels.gather(1, keep)                                   # [B, L_k] the kept patches' parts
    B, L = labels.shape
    if alpha is None:
        mask = random_masking(B, L, mask_ratio, device=labels.device, generator=generator)
    else:
        mask = semantic_guided_masking(labels, mask_ratio, alpha, num_parts=num_parts, ignore_label=ignore_label,
                                       generator=generator)
    src_ids, tgt_ids = mask_to_ids(mask, num_masked=masked_count(L, mask_ratio))   # ids in the kept set
    if keep is not None:                                                  # back to full-grid patch ids
        src_ids, tgt_ids = keep.gather(1, src_ids), keep.gather(1, tgt_ids)
    return src_ids, tgt_ids


# ----------------------------------------------------------------------------- 3. ObjMAE

class ObjectMasks(NamedTuple):
    """ObjMAE's index sets, each [B, n]. ids are patch indices in [0, L); a slot with valid = False is
    padding that carries no patch ("zero" and "masked" padding): the model gives it no content and no loss,
    and for "zero" feeds it as a zero-filled token that is attended (ObjMAE §3.3), for "masked" removes it
    from attention as well. Its id repeats the set's first patch, so gathers stay in range and source and
    target never share a patch, padding included. The order of the slots carries no meaning."""
    src_ids: torch.Tensor    # [B, n] long: the encoder's input patches (source, ObjMAE §3.1)
    tgt_ids: torch.Tensor    # [B, n] long: the patches the decoder rebuilds (target)
    src_valid: torch.Tensor  # [B, n] bool
    tgt_valid: torch.Tensor  # [B, n] bool


def _choose_regions(labels, relation, generator):
    """Selection (ObjMAE §3.2 "we uniformly sample an object on an image", §4.5 inter-object).

    Returns (src_in, tgt_in, split): bool [B, L] membership of the source region and the target region,
    and bool [B, 1] `split` = this row's one region (in src_in) is divided into two halves, as in
    intra-object masking, instead of giving the whole source and target regions.
    An object is a label in 1..254 with at least 2 patches (a 1-patch object cannot be divided into two
    non-empty halves, so it is never chosen). An image with no such object uses the whole image.
    """
    B, L = labels.shape
    device = labels.device
    if relation == "image":                                               # MAE with alpha (ObjMAE Table 9)
        return (torch.ones(B, L, dtype=torch.bool, device=device), torch.zeros(B, L, dtype=torch.bool, device=device),
                torch.ones(B, 1, dtype=torch.bool, device=device))
    counts = torch.zeros(B, _NUM_LABELS, dtype=torch.long, device=device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))               # [B, 256] patches per label
    value = torch.arange(_NUM_LABELS, device=device)
    candidate = (value > 0) & (value != _IGNORE) & (counts >= 2)          # [B, 256] choosable objects
    if relation == "inter":
        # "Sometimes, there is only one object in the image, so we regard the background as one object"
        # (ObjMAE Fig. 6): background (label 0) joins only then, and only when it has >= 2 patches.
        alone = candidate.sum(1, keepdim=True) == 1
        candidate = candidate | ((value == 0) & (counts >= 2) & alone)
    # Draw the rank r of the chosen candidate uniformly in [0, count); the candidate of rank r is the first
    # label whose running count of candidates exceeds r. For "inter" a second rank, uniform among the
    # other count - 1, gives a uniformly random ordered pair (source object, target object).
    num_candidates = candidate.sum(1, keepdim=True)                       # [B, 1]
    running = candidate.cumsum(1)                                         # [B, 256]
    noise = _noise((B, 2), device, generator)
    first_rank = (noise[:, :1] * num_candidates).long()                   # [B, 1] uniform in [0, count): u < 1
    first = (running > first_rank).to(torch.uint8).argmax(1, keepdim=True)   # argmax: first True
    if relation == "intra":
        src_in = (labels == first) | (num_candidates == 0)                # no object: the whole image
        return src_in, torch.zeros_like(src_in), torch.ones(B, 1, dtype=torch.bool, device=device)
    second_rank = (noise[:, 1:] * (num_candidates - 1).clamp(min=0)).long()
    second_rank = second_rank + (second_rank >= first_rank).long()        # skip the first choice
    second = (running > second_rank).to(torch.uint8).argmax(1, keepdim=True)
    pair = num_candidates >= 2
    # Fewer than two regions: fall back to splitting the one region there is (one object covering all
    # non-ignored patches), or the whole image (no object at all), as intra-object masking would.
    src_in = (labels == first) | (num_candidates == 0)
    tgt_in = (labels == second) & pair
    return src_in, tgt_in, ~pair


def _lexsort(primary, secondary, device, generator):
    """Permutation [B, L] sorting each row by (primary, secondary), remaining ties in a random order."""
    order = _noise(primary.shape, device, generator).argsort(1)
    order = order.gather(1, secondary.gather(1, order).argsort(dim=1, stable=True))
    return order.gather(1, primary.gather(1, order).argsort(dim=1, stable=True))


def object_wise_masking(object_labels, seq_ratio, padding="zero", relation="intra", scores=None, *,
                        generator=None):
    """ObjMAE's selection, division and alignment (ObjMAE §3, Fig. 3).

    object_labels: integer [B, L], 0 = background, 1..254 = objects, 255 = ignore (never an object).
        Values must be in [0, 255] (checked on CPU tensors; on an accelerator the check would cost a sync).
    seq_ratio: in [0, 1), the paper's alpha: source and target both get n = max(1, round(seq_ratio * L))
        slots (§3.3; 0.34 on COCO, 0.25 or 0.17 in Tables 4 and 9). Python's round (halves to even).
    padding (§3.3, Table 8), for a set with fewer than n patches:
        "zero": the extra slots are invalid: "the added patches are filled with zero so that they contain
            no information" (§3.3); the model feeds them as zero-filled tokens, attended, not in the loss;
        "masked": the same invalid slots, also removed from attention (not the paper's: §3.3's variable-length
            sequences, at a fixed length);
        "replicate": the set's own patches repeated cyclically (valid);
        "random": patches from the whole image that are in neither the source nor the target set, in a
            random order; the source takes its padding first, the target the next ones, so the two sets
            stay disjoint. Only when 2n > L can the pool run dry: those last slots are invalid.
        "throwout": n = the smallest half in the batch, so no padding (one device sync to read it; seq_ratio
            is then unused).
        A set with more than n patches keeps a random n of them (the "throwing" of §1/§3.3).
    relation:
        "intra" (ObjMAE): one object chosen uniformly among the image's objects; its patches split at random
            into a source half of ceil(N/2) and a target half of floor(N/2);
        "inter" (§4.5, Fig. 6): two different objects chosen at random, all of one is the source region and
            all of the other the target region; the background counts as an object when the image has
            only one; with fewer than two regions the one region is split as in "intra";
        "image" (Table 9, "MAE" rows): source and target are random disjoint sets from the whole image.
        An object is a label in 1..254 with at least 2 patches: a 1-patch object cannot be divided into two
        non-empty halves, so it is never chosen. An image with no object uses the whole image (all L
        patches, ignore included) as its object.
    scores: optional float [B, L], e.g. CAM (§3.2, Appendix A). The highest-scoring patches of a region are
        used first (§4.3 "we select the patches with the most responsible value"): a region with more patches
        than its sets can hold keeps its best ones, and for "intra" those are then split at random. Ties
        are broken at random. Ignored for relation="image", which is MAE's random selection.
    Returns ObjectMasks(src_ids, tgt_ids, src_valid, tgt_valid), each [B, n]. Source and target never share
    a patch; valid slots within a set are distinct except with "replicate".
    """
    _check_labels(object_labels, "object_labels", min_patches=2)
    _check_ratio(seq_ratio, "seq_ratio")
    if padding not in _PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(_PADDINGS)}, got {padding!r}")
    if relation not in _RELATIONS:
        raise ValueError(f"relation must be one of {', '.join(_RELATIONS)}, got {relation!r}")
    if scores is not None:
        if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
            raise ValueError(f"scores must be a float tensor [B, L] or None, got "
                             f"{getattr(scores, 'dtype', type(scores).__name__)}")
        if scores.shape != object_labels.shape or scores.device != object_labels.device:
            raise ValueError(f"scores must have the shape and device of object_labels {tuple(object_labels.shape)} "
                             f"{object_labels.device}, got {tuple(scores.shape)} {scores.device}")
    _check_range_on_cpu(object_labels, 0, _NUM_LABELS - 1, "object_labels")
    labels = object_labels.long()                                         # [B, L]
    B, L = labels.shape
    device = labels.device
    pos = torch.arange(L, device=device)                                  # [L]

    # 1. Selection: the source and target regions of every image.
    src_in, tgt_in, split = _choose_regions(labels, relation, generator)  # [B, L], [B, L], [B, 1]

    # 2. Division: the sizes of the two halves. "We divide an object region equally" (§3.3).
    src_region = src_in.sum(1, keepdim=True)                              # [B, 1]
    src_half = torch.where(split, (src_region + 1) // 2, src_region)
    tgt_half = torch.where(split, src_region // 2, tgt_in.sum(1, keepdim=True))

    # 3. Alignment: n slots per set; larger halves keep n of their patches.
    if padding == "throwout":
        n = int(torch.minimum(src_half, tgt_half).min())                  # the documented sync
    else:
        n = max(1, round(seq_ratio * L))
    src_len = src_half.clamp(max=n)                                       # [B, 1] real patches per set
    tgt_len = tgt_half.clamp(max=n)

    # Order every row as [source region | target region | the rest], each part in a random order, or for
    # scores best first. For a split row the first src_len positions become the source and the next
    # tgt_len the target: in a random order that is a random split of the region into halves followed by
    # a random choice of n in each, i.e. §3.3's division and throwing in one sort.
    code = torch.where(src_in, 0, torch.where(tgt_in, 1, 2))              # [B, L]
    if scores is not None and relation != "image":
        order = _lexsort(code, torch.where(code < 2, -scores.double(), 0.0), device, generator)
        # Split rows: the best src_len + tgt_len patches of the region are now first; shuffle them (and
        # the rest, separately) so their division into source and target is random. Other rows stay.
        used = src_len + tgt_len
        shuffle = torch.where(split, (pos >= used).double() + _noise((B, L), device, generator), pos.double())
        order = order.gather(1, shuffle.argsort(1))
    else:
        order = (code + _noise((B, L), device, generator)).argsort(1)     # [B, L]
    src_start = torch.zeros_like(src_len)
    tgt_start = torch.where(split, src_len, src_region)                   # [B, 1] first target position

    slot = torch.arange(n, device=device)                                 # [n]
    if padding == "random":
        # The pool: every position not taken by the source or target set, in a random order.
        taken = (pos < src_len) | ((pos >= tgt_start) & (pos < tgt_start + tgt_len))   # [B, L]
        pool = torch.where(taken, 2.0, _noise((B, L), device, generator)).argsort(1)   # pool positions first
        pool_size = L - src_len - tgt_len                                 # [B, 1]

    def align(start, length, pool_offset):
        """Positions (in `order`) and validity of the n slots of one set of `length` real patches."""
        real = slot < length                                              # [B, n]
        if padding == "replicate":
            return start + slot % length, torch.ones_like(real)
        if padding == "random":
            k = pool_offset + slot - length                               # which pool entry a padding slot takes
            filled = real | (k < pool_size)
            padded = pool.gather(1, k.clamp(0, L - 1))
            return torch.where(real, start + slot, torch.where(filled, padded, start)), filled
        return torch.where(real, start + slot, start), real               # zero / masked / throwout

    src_pos, src_valid = align(src_start, src_len, 0)
    tgt_pos, tgt_valid = align(tgt_start, tgt_len, n - src_len)
    return ObjectMasks(order.gather(1, src_pos), order.gather(1, tgt_pos), src_valid, tgt_valid)


# ----------------------------------------------------------------------------- argument checks

def _check_ratio(value, name, high_inclusive=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        0.0 <= value <= 1.0 if high_inclusive else 0.0 <= value < 1.0)
    if not ok:
        interval = "[0, 1]" if high_inclusive else "[0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def _check_count(value, name, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_labels(labels, name, min_patches=1, dims="[B, L]"):
    """An integer tensor [B, L]. Floats and bools are refused: a float label map is almost always a
    score map passed in the wrong place."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {dims}, got {type(labels).__name__}")
    if labels.dim() != 2 or labels.shape[1] < min_patches:
        raise ValueError(f"{name} must have shape {dims} with {dims[-2]} >= {min_patches}, got {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must be an integer tensor (e.g. torch.long or torch.uint8), got {labels.dtype}")


def _check_range_on_cpu(values, low, high, name):
    """Range check that costs no device sync: done on CPU tensors only. On an accelerator an
    out-of-range value is the caller's bug (it would need a host round trip on every step to catch)."""
    if values.device.type == "cpu" and values.numel():
        lo, hi = (int(v) for v in torch.aminmax(values))
        if lo < low or hi > high:
            raise ValueError(f"{name} values must be in [{low}, {high}], got values in [{lo}, {hi}]")

