"""Which patches a masked autoencoder sees and which it rebuilds: MAE, SemMAE and ObjMAE masking.

Read it top to bottom, it follows the papers:
  1. MAE's random masking, the baseline both papers start from, and its rounding (`masked_count`).
  2. SemMAE (SemMAE §3.2, Algorithm 1): a per-part budget that moves from "mask a portion of every
     part" (alpha = 0) to "mask whole parts" (alpha = 1) as training goes (alpha = progress **
     gamma), then a uniform random subset inside each part. Plus the 8x8-patch trick of §4.2: keep
     only the most foreground-like patches. `source_target_ids` is a whole step: keep, mask, ids.
  3. ObjMAE (ObjMAE §3): one object per image, its patches split into a source half (encoder input)
     and a target half (what the decoder rebuilds), both aligned to a fixed length n; everything
     else in the image is dropped.

Conventions. Patches are numbered 0..L-1 in row-major order. A boolean mask is True where a patch
is masked (MAE's convention). Every function is batched over the first dimension with no Python
loop over samples or patches, runs on its inputs' device, never synchronises with the device unless
its docstring says so, and is deterministic for a given `torch.Generator` (which must live on that
device). Ties are always broken at random, never by patch or part order: we sort keys made of an
integer part plus uniform float64 noise in [0, 1), or shuffle first and then sort stably. The public
functions check their arguments once, on entry (the checks are at the end of the file); the private
ones (`_name`) trust theirs.

Imports only torch: copy this file into another project as it is. What a training step needs:
  random or SemMAE: src_ids, tgt_ids = source_target_ids(part_labels, 0.75, alpha, num_parts=K,
                        ignore_label=255, scores=scores, keep_ratio=0.25)
  ObjMAE:  src_ids, tgt_ids, src_valid, tgt_valid = object_wise_masking(object_labels, 0.25)
then the model's encoder takes the src_ids patches and its decoder rebuilds the tgt_ids patches.

References (cited in the comments as "SemMAE §3.2, Alg. 1", "ObjMAE Table 8", "MAE Table 1f"):
  SemMAE  Li et al., SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders.
          NeurIPS 2022, arXiv:2206.10207
  ObjMAE  Wu & Mo, Object-wise Masked Autoencoders for Fast Pre-training. 2022, arXiv:2205.14338
  MAE     He et al., Masked Autoencoders Are Scalable Vision Learners. CVPR 2022, arXiv:2111.06377
"""
from typing import NamedTuple

import torch

_IGNORE = 255       # region label of cells that belong to nothing (regions file convention)
_NUM_LABELS = 256   # object labels are uint8 values: 0 = background, 1..254 = objects, 255 = ignore
_PADDINGS = ("zero", "masked", "replicate", "random", "throwout")
_RELATIONS = ("intra", "inter", "image")


# ----------------------------------------------------------------------------- 1. MAE

def masked_count(num_patches, mask_ratio):
    """MAE's rounding (MAE's `random_masking`: len_keep = int(L * (1 - mask_ratio))): of L patches
    keep int(L * (1 - mask_ratio)) and mask the rest, M = L - int(L * (1 - mask_ratio)). Every mask
    in this file has exactly M masked patches per row (196 patches at 0.75: M = 147; SemMAE §3.2
    keeps MAE's 75%). Plain Python ints and floats in, an int out: no tensor, no device sync."""
    _check_numbers(num_patches=num_patches, mask_ratio=mask_ratio)
    return _masked_count(num_patches, mask_ratio)


def _masked_count(num_patches, mask_ratio):
    return num_patches - int(num_patches * (1 - mask_ratio))


def random_masking(batch_size, num_patches, mask_ratio, *, device=None, generator=None):
    """MAE's uniform random masking (the baseline of both papers; SemMAE Table 3 "Random masking").

    Returns a bool mask [B, L], True = masked, with exactly M = L - int(L * (1 - mask_ratio)) masked
    patches in every row. Each row is an independent uniformly random M-subset.
    """
    _check_numbers(batch_size=batch_size, num_patches=num_patches, mask_ratio=mask_ratio)
    return _random_masking(batch_size, num_patches, mask_ratio, device, generator)


def _random_masking(B, L, mask_ratio, device, generator):
    num_keep = L - _masked_count(L, mask_ratio)
    order = _noise((B, L), device, generator).argsort(dim=1)   # [B, L] a random permutation
    mask = torch.zeros(B, L, dtype=torch.bool, device=order.device)
    return mask.scatter_(1, order[:, num_keep:], True)


def _noise(shape, device, generator):
    """Uniform float64 noise in [0, 1): 53 random bits, so ties between draws practically never
    happen."""
    return torch.rand(shape, dtype=torch.float64, device=device, generator=generator)


# ----------------------------------------------------------------------------- 2. SemMAE

def alpha_schedule(progress, gamma, reverse=False):
    """SemMAE's interpolation weight (SemMAE Algorithm 1 line 7, Fig. 3, Table 3).

    alpha = progress ** gamma, progress = fraction of training done in [0, 1] (the paper uses
    epoch / total_epochs; we update it every iteration). gamma = 2 is the paper's choice; alpha = 0
    is "mask 75% patches" of every part, alpha = 1 "mask 75% parts". reverse=True gives
    1 - progress ** gamma, the "1 -> 0" row of Table 3. Note 0 ** 0 = 1: gamma = 0 is a constant
    alpha = 1.
    """
    _check_numbers(progress=progress, gamma=gamma)
    alpha = float(progress) ** gamma
    return 1.0 - alpha if reverse else alpha


def part_mask_counts(part_sizes, mask_ratio, alpha, *, generator=None):
    """How many patches to mask in each part: SemMAE §3.2, Algorithm 1.

    part_sizes: integer [B, K], patches per part (parts may be empty); row b sums to L_b.
    Returns long [B, K]: row b sums to exactly M_b = L_b - int(L_b * (1 - mask_ratio)), every count
    is within 1 of its real-valued quota (below) and never above the part's size.

    The quota is Algorithm 1's interpolation
        num_mask1 = mask_ratio * size                             (line 1: a portion of every part)
        num_mask2 = whole parts in a uniformly random order until the budget L * mask_ratio, the
                    last one partly                                (lines 2-6)
        quota     = (1 - alpha) * num_mask1 + alpha * num_mask2    (line 8)
    Randomness: the part order is the argsort of the generator's first draw, torch.rand((B, K),
    float64); a second draw breaks rounding ties (tests replay the first to check against a
    reference).
    """
    _check_tensor(part_sizes, "part_sizes", "int", dims="[B, K]", high=torch.iinfo(torch.int64).max)
    _check_numbers(mask_ratio=mask_ratio, alpha=alpha)
    return _part_mask_counts(part_sizes.long(), mask_ratio, alpha, generator)


def _part_mask_counts(sizes, mask_ratio, alpha, generator):
    B, K = sizes.shape                                                    # [B, K] long
    total = sizes.sum(1, keepdim=True).double()                           # [B, 1] L per sample
    # M in float64 is the same IEEE arithmetic as Python's int(L * (1 - r)): masked_count's M.
    budget = (total - torch.floor(total * (1.0 - mask_ratio))).long()    # [B, 1] M per sample

    # Line 1: the same share of every part.
    mask1 = mask_ratio * sizes.double()                                   # [B, K]
    # Lines 2-6: shuffle the parts, walk them in that order filling the budget L * r with whole
    # parts; `marks` is the budget left when a part is reached, so a part gets min(size, what is
    # left).
    order = _noise((B, K), sizes.device, generator).argsort(1)            # [B, K] random part order
    shuffled = sizes.gather(1, order).double()
    marks = total * mask_ratio - shuffled.cumsum(1) + shuffled
    mask2 = torch.minimum(marks.clamp(min=0), shuffled)
    mask2 = torch.empty_like(mask2).scatter_(1, order, mask2)             # unshuffle the parts
    # Line 8: interpolate.
    quota = (1.0 - alpha) * mask1 + alpha * mask2                         # [B, K] sums to L * r

    # Rounding. Algorithm 1 is silent on it and returns real counts; an encoder batch needs exactly
    # M patches per sample. We use the largest-remainder method: floor every quota, then give one
    # more patch to the M - sum(floors) parts with the largest fractional parts (ties at random),
    # only to parts that are not full. Since sum(quota) = L * r and M - L * r is in [0, 1), at most
    # one extra patch per part with a fractional quota is needed, so every count is floor or ceil of
    # its quota.
    base = torch.minimum(quota.floor(), sizes.double())
    # Fractions quantised to 1e-9 so float noise (0.2499999.. vs 0.25) is a tie, not an order.
    frac = torch.round((quota - base) * 1e9)
    noise = _noise((B, K), sizes.device, generator)
    key = torch.where(base < sizes, frac, -2.0) + noise                   # integer + [0, 1)
    ranked = key.argsort(1, descending=True)                              # most deserving first
    places = torch.arange(K, device=sizes.device).expand(B, K)
    rank = torch.empty_like(ranked).scatter_(1, ranked, places)           # [B, K] each part's place
    extra = budget - base.sum(1, keepdim=True).long()                     # [B, 1] still to place
    return base.long() + (rank < extra).long()


def semantic_guided_masking(part_labels, mask_ratio, alpha, *, num_parts=None, ignore_label=None,
                            generator=None):
    """SemMAE's semantic-guided masking (SemMAE §3.2): Algorithm 1's count per part, then a
    uniformly random subset of that many patches inside each part.

    part_labels: integer [B, L], the part of every patch in 0..num_parts-1 (argmax of the part
        maps), or ignore_label.
    mask_ratio: in [0, 1) (0.75 in the paper). alpha: in [0, 1], e.g. alpha_schedule(progress, 2).
    num_parts: K. Pass it on the training path; when None it is read from the labels (max + 1 over
        the labels that are not ignore_label), which costs one device sync.
    ignore_label: None, or the label of patches that belong to no part (255 in a regions file: cells
        no method could label). Those patches form one extra part K, masked by Algorithm 1 like the
        real parts (given a real part's id instead, they would be masked as if they belonged to
        that part).
    Returns a bool mask [B, L], True = masked, exactly M = L - int(L * (1 - mask_ratio)) per row.
    """
    _check_tensor(part_labels, "part_labels", "int")
    _check_numbers(mask_ratio=mask_ratio, alpha=alpha)
    num_parts = _check_parts(part_labels, num_parts, ignore_label)
    return _semantic_guided_masking(part_labels, mask_ratio, alpha, num_parts, ignore_label,
                                    generator)


def _semantic_guided_masking(part_labels, mask_ratio, alpha, num_parts, ignore_label, generator):
    labels = part_labels.long()                                           # [B, L]
    if ignore_label is not None:                                          # ignored: one more part
        labels = torch.where(labels == ignore_label, num_parts, labels)
        num_parts += 1
    B, L = labels.shape
    sizes = torch.zeros(B, num_parts, dtype=torch.long, device=labels.device)
    sizes.scatter_add_(1, labels, torch.ones_like(labels))                # [B, K] patches per part
    counts = _part_mask_counts(sizes, mask_ratio, alpha, generator)       # [B, K] Algorithm 1

    # Sort the patches by (part, random): each part becomes a run of positions in a random order,
    # and masking the first counts[k] positions of part k's run masks a uniformly random subset.
    order = (labels.double() + _noise((B, L), labels.device, generator)).argsort(1)   # [B, L]
    part = labels.gather(1, order)                                        # part of each position
    start = sizes.cumsum(1) - sizes                                       # [B, K] where runs begin
    rank = torch.arange(L, device=labels.device) - start.gather(1, part)  # position in its own part
    hit = rank < counts.gather(1, part)
    return torch.zeros(B, L, dtype=torch.bool, device=labels.device).scatter_(1, order, hit)


def keep_foreground(scores, keep_ratio, *, generator=None):
    """SemMAE with 8x8 patches (SemMAE §4.2): "we leverage the learned attention maps to remove 3/4
    patches that are most likely to be the background", so a patch-8 model costs what a patch-16
    one does.

    scores: float [B, L], foreground likelihood per patch. keep_ratio: in (0, 1] (1/4 in the paper).
    Returns long [B, L_keep], L_keep = max(1, int(L * keep_ratio)): the indices of the
    highest-scoring patches, ascending. Equal scores are broken at random. Mask inside the kept set
    (its labels gathered with these indices), then map back with keep.gather(1, ids).
    """
    _check_tensor(scores, "scores", "float")
    _check_numbers(keep_ratio=keep_ratio)
    return _keep_foreground(scores, keep_ratio, generator)


def _keep_foreground(scores, keep_ratio, generator):
    B, L = scores.shape
    num_keep = max(1, int(L * keep_ratio))
    shuffle = _noise((B, L), scores.device, generator).argsort(1)         # random order, then a
    by_score = scores.gather(1, shuffle).argsort(dim=1, descending=True, stable=True)  # stable sort
    return shuffle.gather(1, by_score[:, :num_keep]).sort(1).values      # [B, L_keep] ascending


def mask_to_ids(mask, *, num_masked=None):
    """A mask [B, L] (True = masked, the same count M in every row) -> (ids_keep [B, L-M],
    ids_masked [B, M]), each in ascending patch order: the encoder's source set and the decoder's
    target set (ObjMAE §3.4: MAE is the case target = every masked patch).

    num_masked: M. Pass it on the training path; when None it is read from the mask, which costs one
    device sync (and checks that every row has the same count).
    """
    _check_tensor(mask, "mask", "bool")
    if num_masked is None:
        lo, hi = (int(v) for v in torch.aminmax(mask.sum(1)))            # the documented sync
        _check(lo == hi, "mask", "the same number of masked patches in every row", f"{lo} to {hi}")
        num_masked = lo
    _check_numbers({"num_masked": (int, f"[0, {mask.shape[1]}]")}, num_masked=num_masked)
    return _mask_to_ids(mask, num_masked)


def _mask_to_ids(mask, num_masked):
    L = mask.shape[1]
    order = mask.to(torch.uint8).argsort(dim=1, stable=True)              # kept, then masked
    return order[:, :L - num_masked], order[:, L - num_masked:]


def source_target_ids(part_labels, mask_ratio, alpha=None, *, num_parts=None, ignore_label=None,
                      scores=None, keep_ratio=1.0, generator=None):
    """The index sets an MAE step takes under random or SemMAE masking, with SemMAE's foreground
    keep (SemMAE §4.2) when keep_ratio < 1: keep_foreground -> mask inside the kept set ->
    mask_to_ids -> map the ids back to the full patch grid.

    part_labels: integer [B, L], as for semantic_guided_masking (with num_parts and ignore_label
        passed on).
    alpha: in [0, 1] for SemMAE (§3.2, e.g. alpha_schedule(progress, 2)); None for MAE's random
        masking (SemMAE Table 3 "Random masking"), where part_labels only give B, L and the device.
    scores: float [B, L], foreground likelihood per patch; needed when keep_ratio < 1, unused
        otherwise.
    keep_ratio: in (0, 1]. The kept set has L_k = max(1, int(L * keep_ratio)) patches (L_k = L for
        1); the others are in neither set, the model never sees them.
    Returns (src_ids [B, L_k - M], tgt_ids [B, M]), M = masked_count(L_k, mask_ratio): patch ids in
    [0, L), ascending, disjoint, together the kept set. Draws from the generator in this order:
    keep_foreground, then the masking. No device sync when num_parts is given (or alpha is None).
    """
    _check_tensor(part_labels, "part_labels", "int")
    _check_numbers(mask_ratio=mask_ratio, keep_ratio=keep_ratio)
    labels, keep = part_labels, None
    if keep_ratio < 1:
        _check_tensor(scores, "scores", "float", like=part_labels)
        keep = _keep_foreground(scores, keep_ratio, generator)            # [B, L_k] ascending ids
        labels = labels.gather(1, keep)                                   # [B, L_k] their parts
    B, L = labels.shape
    if alpha is None:
        mask = _random_masking(B, L, mask_ratio, labels.device, generator)
    else:
        _check_numbers(alpha=alpha)
        num_parts = _check_parts(labels, num_parts, ignore_label)
        mask = _semantic_guided_masking(labels, mask_ratio, alpha, num_parts, ignore_label,
                                        generator)
    src_ids, tgt_ids = _mask_to_ids(mask, _masked_count(L, mask_ratio))   # ids in the kept set
    if keep is not None:                                                  # back to full-grid ids
        src_ids, tgt_ids = keep.gather(1, src_ids), keep.gather(1, tgt_ids)
    return src_ids, tgt_ids


# ----------------------------------------------------------------------------- 3. ObjMAE

class ObjectMasks(NamedTuple):
    """ObjMAE's index sets, each [B, n]. ids are patch indices in [0, L); a slot with valid = False
    is padding that carries no patch ("zero" and "masked" padding): the model gives it no content
    and no loss, and for "zero" feeds it as a zero-filled token that is attended (ObjMAE §3.3), for
    "masked" removes it from attention as well. Its id repeats the set's first patch, so gathers
    stay in range and source and target never share a patch, padding included. The order of the
    slots carries no meaning."""
    src_ids: torch.Tensor    # [B, n] long: the encoder's input patches (source, ObjMAE §3.1)
    tgt_ids: torch.Tensor    # [B, n] long: the patches the decoder rebuilds (target)
    src_valid: torch.Tensor  # [B, n] bool
    tgt_valid: torch.Tensor  # [B, n] bool


def object_wise_masking(object_labels, seq_ratio, padding="zero", relation="intra", scores=None,
                        *, generator=None):
    """ObjMAE's selection, division and alignment (ObjMAE §3, Fig. 3).

    object_labels: integer [B, L], 0 = background, 1..254 = objects, 255 = ignore (never an object).
        Values must be in [0, 255] (checked on CPU tensors; on an accelerator the check would cost
        a sync).
    seq_ratio: in [0, 1), the paper's alpha: source and target both get n = max(1, round(seq_ratio
        * L)) slots (§3.3; 0.34 on COCO, 0.25 or 0.17 in Tables 4 and 9). Python's round (halves to
        even).
    padding (§3.3, Table 8), for a set with fewer than n patches:
        "zero": the extra slots are invalid: "the added patches are filled with zero so that they
            contain no information" (§3.3); the model feeds them as zero-filled tokens, attended,
            not in the loss;
        "masked": the same invalid slots, also removed from attention (not the paper's: §3.3's
            variable-length sequences, at a fixed length);
        "replicate": the set's own patches repeated cyclically (valid);
        "random": patches from the whole image that are in neither the source nor the target set,
            in a random order; the source takes its padding first, the target the next ones, so the
            two sets stay disjoint. Only when 2n > L can the pool run dry: those last slots are
            invalid.
        "throwout": n = the smallest half in the batch, so no padding (one device sync to read it;
            seq_ratio is then unused).
        A set with more than n patches keeps a random n of them (the "throwing" of §1/§3.3).
    relation:
        "intra" (ObjMAE): one object chosen uniformly among the image's objects; its patches split
            at random into a source half of ceil(N/2) and a target half of floor(N/2);
        "inter" (§4.5, Fig. 6): two different objects chosen at random, all of one is the source
            region and all of the other the target region; the background counts as an object when
            the image has only one; with fewer than two regions the one region is split as in
            "intra";
        "image" (Table 9, "MAE" rows): source and target are random disjoint sets from the whole
            image.
        An object is a label in 1..254 with at least 2 patches: a 1-patch object cannot be divided
        into two non-empty halves, so it is never chosen. An image with no object uses the whole
        image (all L patches, ignore included) as its object.
    scores: optional float [B, L], e.g. CAM (§3.2, Appendix A). The highest-scoring patches of a
        region are used first (§4.3 "we select the patches with the most responsible value"): a
        region with more patches than its sets can hold keeps its best ones, and for "intra" those
        are then split at random. Ties are broken at random. Ignored for relation="image", which is
        MAE's random selection.
    Returns ObjectMasks(src_ids, tgt_ids, src_valid, tgt_valid), each [B, n]. Source and target
    never share a patch; valid slots within a set are distinct except with "replicate".
    """
    _check_tensor(object_labels, "object_labels", "int", min_patches=2, high=_NUM_LABELS - 1)
    _check_numbers(seq_ratio=seq_ratio)
    _check(padding in _PADDINGS, "padding", f"one of {', '.join(_PADDINGS)}", repr(padding))
    _check(relation in _RELATIONS, "relation", f"one of {', '.join(_RELATIONS)}", repr(relation))
    if scores is not None:
        _check_tensor(scores, "scores", "float", like=object_labels)
    labels = object_labels.long()                                         # [B, L]
    L = labels.shape[1]

    # 1. Selection: the source and target regions of every image (§3.2).
    src_in, tgt_in, split = _select(labels, relation, generator)          # [B, L], [B, L], [B, 1]

    # 2. Division: "we divide an object region equally" (§3.3): the sizes of the two halves.
    src_half, tgt_half = _halves(src_in, tgt_in, split)                   # [B, 1], [B, 1]

    # 3. Alignment: n slots per set; a larger half keeps n of its patches, a smaller one is padded.
    if padding == "throwout":
        n = int(torch.minimum(src_half, tgt_half).min())                  # the documented sync
    else:
        n = max(1, round(seq_ratio * L))
    src_len, tgt_len = src_half.clamp(max=n), tgt_half.clamp(max=n)       # [B, 1] real patches
    # Which patches: one order per row lists the source set's patches, then the target set's (a
    # random division and throwing in one sort); each set then fills its n slots from it.
    if relation == "image":
        scores = None                                                     # MAE: random selection
    order = _order(src_in, tgt_in, split, src_len + tgt_len, scores, generator)   # [B, L]
    tgt_start = torch.where(split, src_len, src_half)                     # [B, 1] in `order`
    return _align(order, src_len, tgt_start, tgt_len, n, padding, generator)


def _select(labels, relation, generator):
    """Selection (ObjMAE §3.2 "we uniformly sample an object on an image", §4.5 inter-object).

    Returns (src_in, tgt_in, split): bool [B, L] membership of the source region and the target
    region, and bool [B, 1] `split` = this row's one region (in src_in) is divided into two halves,
    as in intra-object masking, instead of giving the whole source and target regions.
    An object is a label in 1..254 with at least 2 patches (a 1-patch object cannot be divided into
    two non-empty halves, so it is never chosen). An image with no such object uses the whole image.
    """
    B, L = labels.shape
    device = labels.device
    if relation == "image":                                               # MAE with alpha (Table 9)
        return (torch.ones(B, L, dtype=torch.bool, device=device),
                torch.zeros(B, L, dtype=torch.bool, device=device),
                torch.ones(B, 1, dtype=torch.bool, device=device))
    counts = torch.zeros(B, _NUM_LABELS, dtype=torch.long, device=device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))               # [B, 256] per label
    value = torch.arange(_NUM_LABELS, device=device)
    candidate = (value > 0) & (value != _IGNORE) & (counts >= 2)          # [B, 256] choosable
    if relation == "inter":
        # "Sometimes, there is only one object in the image, so we regard the background as one
        # object" (ObjMAE Fig. 6): background (label 0) joins only then, and only with >= 2 patches.
        alone = candidate.sum(1, keepdim=True) == 1
        candidate = candidate | ((value == 0) & (counts >= 2) & alone)
    # Draw the rank r of the chosen candidate uniformly in [0, count); the candidate of rank r is
    # the first label whose running count of candidates exceeds r. For "inter" a second rank,
    # uniform among the other count - 1, gives a uniformly random ordered pair (source object,
    # target object).
    num_candidates = candidate.sum(1, keepdim=True)                       # [B, 1]
    running = candidate.cumsum(1)                                         # [B, 256]
    noise = _noise((B, 2), device, generator)
    first_rank = (noise[:, :1] * num_candidates).long()                   # [B, 1] in [0, count)
    first = (running > first_rank).to(torch.uint8).argmax(1, keepdim=True)   # argmax: first True
    if relation == "intra":
        src_in = (labels == first) | (num_candidates == 0)                # no object: whole image
        return src_in, torch.zeros_like(src_in), torch.ones(B, 1, dtype=torch.bool, device=device)
    second_rank = (noise[:, 1:] * (num_candidates - 1).clamp(min=0)).long()
    second_rank = second_rank + (second_rank >= first_rank).long()        # skip the first choice
    second = (running > second_rank).to(torch.uint8).argmax(1, keepdim=True)
    pair = num_candidates >= 2
    # Fewer than two regions: fall back to splitting the one region there is (one object covering
    # all non-ignored patches), or the whole image (no object at all), as intra-object masking
    # would.
    src_in = (labels == first) | (num_candidates == 0)
    tgt_in = (labels == second) & pair
    return src_in, tgt_in, ~pair


def _halves(src_in, tgt_in, split):
    """Division (ObjMAE §3.3): the sizes [B, 1] of the source and target halves. A split row
    divides its one region into ceil(N/2) + floor(N/2); otherwise each region is a whole half."""
    src_region = src_in.sum(1, keepdim=True)                              # [B, 1]
    src_half = torch.where(split, (src_region + 1) // 2, src_region)
    tgt_half = torch.where(split, src_region // 2, tgt_in.sum(1, keepdim=True))
    return src_half, tgt_half


def _order(src_in, tgt_in, split, used, scores, generator):
    """A per-row order of the patch positions [B, L]: [source region | target region | the rest],
    each part in a random order, or with scores best first. For a split row the first src_len
    positions become the source and the next tgt_len the target (`used` = their sum [B, 1]): in a
    random order that is a random division of the region into halves followed by a random choice
    of n in each, i.e. §3.3's division and throwing in one sort."""
    B, L = src_in.shape
    device = src_in.device
    code = torch.where(src_in, 0, torch.where(tgt_in, 1, 2))              # [B, L]
    if scores is None:
        return (code + _noise((B, L), device, generator)).argsort(1)
    order = _lexsort(code, torch.where(code < 2, -scores.double(), 0.0), device, generator)
    # Split rows: the best `used` patches of the region are now first; shuffle them (and the rest,
    # separately) so their division into source and target is random. Other rows stay.
    pos = torch.arange(L, device=device)                                  # [L]
    shuffle = torch.where(split, (pos >= used).double() + _noise((B, L), device, generator),
                          pos.double())
    return order.gather(1, shuffle.argsort(1))


def _lexsort(primary, secondary, device, generator):
    """Permutation [B, L] sorting each row by (primary, secondary), remaining ties in a random
    order."""
    order = _noise(primary.shape, device, generator).argsort(1)
    order = order.gather(1, secondary.gather(1, order).argsort(dim=1, stable=True))
    return order.gather(1, primary.gather(1, order).argsort(dim=1, stable=True))


def _align(order, src_len, tgt_start, tgt_len, n, padding, generator):
    """Alignment (ObjMAE §3.3, Table 8): the n slots of the source set (positions 0..src_len-1 of
    `order`) and of the target set (tgt_start..tgt_start+tgt_len-1), padded as `padding` says."""
    B, L = order.shape
    pool = None
    if padding == "random":
        # The pool: every position not taken by the source or target set, in a random order.
        pos = torch.arange(L, device=order.device)                        # [L]
        taken = (pos < src_len) | ((pos >= tgt_start) & (pos < tgt_start + tgt_len))   # [B, L]
        pool = torch.where(taken, 2.0, _noise((B, L), order.device, generator)).argsort(1)
        pool = pool, L - src_len - tgt_len                                # pool first, its size
    slot = torch.arange(n, device=order.device)                           # [n]
    src_pos, src_valid = _slots(torch.zeros_like(src_len), src_len, slot, padding, pool, 0)
    tgt_pos, tgt_valid = _slots(tgt_start, tgt_len, slot, padding, pool, n - src_len)
    return ObjectMasks(order.gather(1, src_pos), order.gather(1, tgt_pos), src_valid, tgt_valid)


def _slots(start, length, slot, padding, pool, pool_offset):
    """Positions (in `order`) [B, n] and validity [B, n] of the slots of one set whose `length`
    real patches sit at start, start + 1, ...; the source's padding takes the pool's first entries,
    the target's (pool_offset = n - src_len) the next ones."""
    real = slot < length                                                  # [B, n]
    if padding == "replicate":                                            # its own, cyclically
        return start + slot % length, torch.ones_like(real)
    if padding == "random":
        pool, pool_size = pool
        k = pool_offset + slot - length                                   # pool entry of a slot
        filled = real | (k < pool_size)
        padded = pool.gather(1, k.clamp(0, pool.shape[1] - 1))
        return torch.where(real, start + slot, torch.where(filled, padded, start)), filled
    return torch.where(real, start + slot, start), real                   # zero, masked, throwout


# ----------------------------------------------------------------------------- argument checks
# One table of the number arguments, one helper per kind of argument; a broken rule is a
# ValueError naming the argument and what it must be.

# Each number's kind and interval: "[0, 1)" is closed at 0 and open at 1; a bool is not a number
# and NaN is in no interval.
_NUMBERS = {"batch_size": (int, "[1, inf)"), "num_patches": (int, "[1, inf)"),
            "num_parts": (int, "[1, inf)"), "ignore_label": (int, "[0, inf)"),
            "mask_ratio": (float, "[0, 1)"), "seq_ratio": (float, "[0, 1)"),
            "alpha": (float, "[0, 1]"), "progress": (float, "[0, 1]"),
            "gamma": (float, "[0, inf]"), "keep_ratio": (float, "(0, 1]")}
# Each tensor kind: what it is called, and the dtype test. A float label map is almost always a
# score map passed in the wrong place, so labels refuse floats (and bools).
_TENSORS = {"int": ("an integer tensor",
            lambda x: not (x.dtype == torch.bool or x.is_floating_point() or x.is_complex())),
            "float": ("a float tensor", lambda x: x.is_floating_point()),
            "bool": ("a bool tensor", lambda x: x.dtype == torch.bool)}


def _check(ok, name, must, got):
    if not ok:
        raise ValueError(f"{name} must be {must}, got {got}")


def _check_numbers(rules=_NUMBERS, **values):
    for name, value in values.items():
        kind, interval = rules[name]
        low, high = (float(x) for x in interval[1:-1].split(","))
        ok = isinstance(value, (int, kind)) and not isinstance(value, bool)
        ok = ok and (low < value if interval[0] == "(" else low <= value)
        ok = ok and (value < high if interval[-1] == ")" else value <= high)
        _check(ok, name, f"{'an int' if kind is int else 'a number'} in {interval}", repr(value))


def _check_tensor(x, name, kind, dims="[B, L]", min_patches=1, high=None, like=None):
    """A 2-d tensor of `kind` with at least min_patches columns; given `high`, values in [0, high];
    given `like` (the labels), of its shape and on its device."""
    what, is_kind = _TENSORS[kind]
    ok = isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] >= min_patches and is_kind(x)
    got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
    _check(ok, name, f"{what} {dims} with {dims[-2]} >= {min_patches}", got)
    if like is not None:
        _check(x.shape == like.shape and x.device == like.device, name, "of the labels' shape and "
               f"device {tuple(like.shape)} {like.device}", f"{got} {x.device}")
    if high is not None:
        _check_values(x, name, high)


def _check_values(labels, name, high):
    """Values in [0, high], read on CPU tensors only: on an accelerator the read would be a device
    sync every step, so there an out-of-range value is the caller's bug."""
    if labels.device.type == "cpu" and labels.numel():
        lo, hi = (int(v) for v in torch.aminmax(labels))
        _check(lo >= 0 and hi <= high, f"{name} values", f"in [0, {high}]",
               f"values in [{lo}, {hi}]")


def _check_parts(part_labels, num_parts, ignore_label):
    """SemMAE's labels against num_parts, ignore_label set aside. Returns num_parts, read from the
    labels when None (the documented sync)."""
    labels = part_labels.long()
    if ignore_label is not None:
        _check_numbers(ignore_label=ignore_label)
        labels = torch.where(labels == ignore_label, 0, labels)           # checked as a part id
    if num_parts is None:
        lo, hi = (int(v) for v in torch.aminmax(labels))
        _check(lo >= 0, "part_labels", ">= 0", f"a minimum of {lo}")
        return hi + 1
    _check_numbers(num_parts=num_parts)
    _check_values(labels, "part_labels", num_parts - 1)
    return num_parts
