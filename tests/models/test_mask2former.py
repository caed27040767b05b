"""Mask2Former head, criterion and segmentor on tiny configs: matching, losses, inference semantics,
training signal, checkpointing, autocast and the strategy-2 hand-off (docs/reference.md §R2.2, §R2.4, §R2.5)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import models
from micro_params import tiny_model
from models.checkpoint import CheckpointError, load_stage_checkpoint
from models.heads.mask2former import (
    HungarianMatcher,
    semantic_inference,
    semantic_targets,
    sine_positional_encoding,
)
from models.heads.mask2former.criterion import dice_loss
from models.heads.mask2former.points import point_sample, uncertain_point_coords

NAME = "mask2former_beit_adapter_base_480_40k_pascal_context_59"
NUM_CLASSES = 5
SIZE = 64
# the tiny preset with 8 queries, 2 encoder and 3 decoder layers (every level attended once; the full 9
# where the stage count matters), no drop path
TINY = {
    "decode_head.num_queries": 8,
    "decode_head.num_encoder_layers": 2,
    "decode_head.num_decoder_layers": 3,
    "drop_path_rate": 0.0,
}
STAGE_TERMS = ("loss_cls", "loss_mask", "loss_dice")


def _tiny(name: str = NAME, **overrides):
    """The tiny model of ``name`` with ``NUM_CLASSES`` classes (a model test: no dataset involved)."""
    return tiny_model(name, {**TINY, **overrides}, num_classes=NUM_CLASSES)


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its (possibly zero) initial value so every path carries gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def _batch(batch: int = 2, size: int = SIZE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and label maps of a few class rectangles, with ignored pixels."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.zeros(batch, size, size, dtype=torch.int64)
    for b in range(batch):
        labels[b, : size // 2] = (b + 1) % NUM_CLASSES
        labels[b, size // 2 :, : size // 3] = (b + 2) % NUM_CLASSES
        labels[b, size // 2 :, size // 3 :] = (b + 3) % NUM_CLASSES
        labels[b, :3] = 255
        img[b] += labels[b].clamp(max=NUM_CLASSES).float()[None] * 0.5  # a learnable signal
    return img, labels


# ---------------------------------------------------------------- targets, points, encoding


def test_semantic_targets_one_mask_per_present_class_ignore_excluded() -> None:
    labels = torch.tensor([[[0, 0, 3], [255, 3, 3]], [[255, 255, 255], [255, 255, 255]]])
    (classes, masks), (empty_classes, empty_masks) = semantic_targets(labels, num_classes=4)
    assert classes.tolist() == [0, 3]
    assert masks.tolist() == [
        [[True, True, False], [False, False, False]],
        [[False, False, True], [False, True, True]],
    ]
    assert empty_classes.numel() == 0 and empty_masks.shape == (0, 2, 3)
    with pytest.raises(ValueError, match=r"label values \[7\] are outside \[0, 4\)"):
        semantic_targets(torch.tensor([[[7, 0]]]), num_classes=4)


def test_point_sample_reads_pixel_centres_exactly() -> None:
    maps = torch.arange(12.0).view(1, 1, 3, 4)
    points = torch.tensor([[[(2 + 0.5) / 4, (1 + 0.5) / 3], [0.5 / 4, 0.5 / 3]]])  # (x, y)
    torch.testing.assert_close(point_sample(maps, points), torch.tensor([[[6.0, 0.0]]]), atol=1e-6, rtol=0)


def test_uncertain_points_prefer_the_mask_border() -> None:
    torch.manual_seed(0)
    logits = torch.full((1, 1, 64, 64), 10.0)
    logits[..., 16:48] = 0.0  # uncertain band x in [1/4, 3/4): about half of the 300 candidates
    points = uncertain_point_coords(
        logits, num_points=100, oversample_ratio=3.0, importance_sample_ratio=0.75
    )
    assert points.shape == (1, 100, 2)
    in_band = (points[0, :, 0] > 15 / 64) & (points[0, :, 0] < 49 / 64)
    assert in_band[:75].all()  # the 75 most uncertain candidates
    assert not in_band[75:].all()  # the 25 uniform ones land anywhere


def test_sine_encoding_is_y_first_and_interleaved() -> None:
    pos = sine_positional_encoding(3, 5, num_feats=4)
    assert pos.shape == (1, 8, 3, 5)
    y = torch.arange(1, 4.0) / (3 + 1e-6) * 2 * math.pi
    x = torch.arange(1, 6.0) / (5 + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (torch.tensor([0.0, 0.0, 2.0, 2.0]) / 4)
    torch.testing.assert_close(pos[0, 0, :, 0], (y / dim_t[0]).sin())
    torch.testing.assert_close(pos[0, 1, :, 0], (y / dim_t[1]).cos())
    torch.testing.assert_close(pos[0, 2, :, 0], (y / dim_t[2]).sin())
    torch.testing.assert_close(pos[0, 4, 0, :], (x / dim_t[0]).sin())
    torch.testing.assert_close(pos[0, 5, 0, :], (x / dim_t[1]).cos())
    torch.testing.assert_close(pos[0, 4, 2, :], pos[0, 4, 0, :])  # x part constant along y


# ---------------------------------------------------------------- matcher


def _hand_made_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 targets (left half, top-right, bottom-right) and 5 queries, 3 of them good matches."""
    gt = torch.zeros(3, 16, 16, dtype=torch.bool)
    gt[0, :, :8] = True
    gt[1, :8, 8:] = True
    gt[2, 8:, 8:] = True
    gt_labels = torch.tensor([1, 2, 0])
    mask_logits = torch.full((5, 16, 16), -4.0)
    mask_logits[3][gt[0]] = 4.0  # query 3 <-> target 0
    mask_logits[4][gt[1]] = 4.0  # query 4 <-> target 1
    mask_logits[0][gt[2]] = 4.0  # query 0 <-> target 2
    mask_logits[1][:, :] = 0.0  # undecided
    mask_logits[2][gt[1] | gt[2]] = 4.0  # the union of two targets
    cls_logits = torch.zeros(5, 4)
    cls_logits[3, 1] = cls_logits[4, 2] = cls_logits[0, 0] = 3.0
    return cls_logits, mask_logits, gt_labels, gt


def test_matcher_finds_the_known_optimal_assignment() -> None:
    torch.manual_seed(0)
    cls_logits, mask_logits, gt_labels, gt = _hand_made_case()
    matcher = HungarianMatcher(cls_weight=2.0, mask_weight=5.0, dice_weight=5.0, num_points=1024)
    queries, targets = matcher(cls_logits, mask_logits, gt_labels, gt)
    assert queries.tolist() == [0, 3, 4]
    assert targets.tolist() == [2, 0, 1]


def test_matcher_breaks_mask_ties_by_class() -> None:
    torch.manual_seed(0)
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[0, :4] = True
    gt[1, 4:] = True
    mask_logits = torch.stack([torch.where(gt[0], 4.0, -4.0)] * 2 + [torch.where(gt[1], 4.0, -4.0)])
    cls_logits = torch.zeros(3, 3)
    cls_logits[0, 1] = 5.0  # query 0: class 1
    cls_logits[1, 0] = 5.0  # query 1: class 0, same mask as query 0
    matcher = HungarianMatcher(cls_weight=2.0, mask_weight=5.0, dice_weight=5.0, num_points=512)
    queries, targets = matcher(cls_logits, mask_logits, torch.tensor([0, 1]), gt)
    assert dict(zip(targets.tolist(), queries.tolist(), strict=True)) == {0: 1, 1: 2}


def test_matcher_is_optimal_for_its_costs_and_the_costs_follow_the_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    cls_logits = torch.randn(5, 4, generator=gen)
    mask_logits = torch.randn(5, 4, 4, generator=gen)
    gt = torch.rand(3, 4, 4, generator=gen) > 0.5
    gt_labels = torch.tensor([2, 0, 2])
    # pixel centres: bilinear sampling reads the pixels exactly
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    points = torch.stack([(xs.flatten() + 0.5) / 4, (ys.flatten() + 0.5) / 4], dim=-1)
    matcher = HungarianMatcher(cls_weight=2.0, mask_weight=5.0, dice_weight=5.0, num_points=16)
    cost = matcher.cost_matrix(cls_logits, mask_logits, gt_labels, gt, points)

    pred, target = mask_logits.flatten(1), gt.flatten(1).float()
    for q, g in itertools.product(range(5), range(3)):
        cls_cost = -cls_logits[q].softmax(-1)[gt_labels[g]]
        bce = F.binary_cross_entropy_with_logits(pred[q], target[g])
        p = pred[q].sigmoid()
        dice = 1 - (2 * (p * target[g]).sum() + 1) / (p.sum() + target[g].sum() + 1)
        torch.testing.assert_close(cost[q, g], 2 * cls_cost + 5 * bce + 5 * dice)

    queries, targets = matcher(cls_logits, mask_logits, gt_labels, gt, points)
    best = min(
        sum(cost[q, g].item() for g, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3)
    )
    assert cost[queries, targets].sum().item() == pytest.approx(best)
    assert queries.tolist() == sorted(queries.tolist())


def test_matcher_with_no_targets_and_more_targets_than_queries() -> None:
    matcher = HungarianMatcher(cls_weight=2.0, mask_weight=5.0, dice_weight=5.0, num_points=64)
    empty = matcher(
        torch.randn(4, 3), torch.randn(4, 8, 8), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 8, 8)
    )
    assert empty[0].numel() == 0 and empty[1].numel() == 0
    queries, targets = matcher(
        torch.randn(2, 6), torch.randn(2, 8, 8), torch.arange(5), torch.rand(5, 8, 8) > 0.5
    )
    assert len(queries) == len(targets) == 2


def test_batch_matching_equals_image_by_image_matching() -> None:
    """``match_batch`` (what the criterion calls) against ``__call__`` image by image after the same seed: the
    same points, the same assignments, and costs equal to the sums' rounding.

    Both compute every element the same way; only the sums over the P points (two BCE products, the dice
    product, ``sum(p)``; all of non-negative terms) may add in another order. A float32 sum of P non-negative
    terms lies within gamma_P = P u / (1 - P u) (u = 2^-24) of its exact value relative to itself, so two orders
    differ by at most 2 gamma_P of it: the BCE cost by 2 gamma_P times itself, the dice cost
    1 - (2n + 1) / (d + 1) by 2 gamma_P (2n + 1) / (d + 1) for each of n and d (2 gamma_P (1 - dice) each, so
    4 gamma_P (1 - dice) in all), and the weighted sum adds 2 u of each magnitude.
    """
    gen = torch.Generator().manual_seed(4)
    batch, queries, classes, points = 4, 6, 5, 200
    cls_logits = torch.randn(batch, queries, classes + 1, generator=gen)
    mask_logits = 3 * torch.randn(batch, queries, 8, 8, generator=gen)
    labels = torch.randint(0, 3, (batch, 16, 16), generator=gen)
    labels[1] = 255  # nothing but ignore: no targets, no points drawn
    labels[2, :, :4] = 4
    targets = [(c, m.float()) for c, m in semantic_targets(labels, num_classes=classes)]
    matcher = HungarianMatcher(cls_weight=2.0, mask_weight=5.0, dice_weight=5.0, num_points=points)

    torch.manual_seed(7)
    batched = matcher.match_batch(cls_logits, mask_logits, targets)
    after_batched = torch.rand(3)
    torch.manual_seed(7)
    single = [matcher(cls_logits[b], mask_logits[b], *targets[b]) for b in range(batch)]
    assert torch.equal(after_batched, torch.rand(3))  # the same draws: none for the image without targets
    for (q_batch, g_batch), (q_single, g_single) in zip(batched, single, strict=True):
        assert q_batch.tolist() == q_single.tolist() and g_batch.tolist() == g_single.tolist()
    assert batched[1][0].numel() == 0

    torch.manual_seed(7)
    with_targets = [b for b in range(batch) if targets[b][0].numel()]
    drawn = torch.rand(len(with_targets), points, 2)
    costs = matcher.batch_cost_matrices(
        cls_logits[with_targets], mask_logits[with_targets], [targets[b] for b in with_targets], drawn
    )
    u = 2.0**-24
    gamma = points * u / (1 - points * u)
    for n, b in enumerate(with_targets):
        count = targets[b][0].numel()
        one = matcher.cost_matrix(cls_logits[b], mask_logits[b], *targets[b], drawn[n])
        pred = point_sample(mask_logits[b][None], drawn[n][None])[0]
        gt = point_sample(targets[b][1][None], drawn[n][None])[0]
        bce = mask_bce_reference(pred, gt)
        dice_complement = 1 - dice_reference(pred, gt)
        bound = 5.0 * 2 * gamma * bce + 5.0 * 4 * gamma * dice_complement + 2 * u * (2.0 + 5.0 * bce + 5.0)
        assert ((costs[n, :, :count] - one).abs() <= bound).all()


def mask_bce_reference(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(Q, P), (G, P) -> (Q, G) mean BCE over the points, pair by pair (the cost's definition)."""
    return torch.stack([torch.stack([F.binary_cross_entropy_with_logits(p, t) for t in gt]) for p in pred])


def dice_reference(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(Q, P), (G, P) -> (Q, G) naive dice loss (eps 1), pair by pair."""
    probs = pred.sigmoid()
    return torch.stack(
        [torch.stack([1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1) for t in gt]) for p in probs]
    )


# ---------------------------------------------------------------- criterion


def test_loss_values_and_normalisation_on_a_deterministic_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uniform targets, spatially constant logits and loss points at pixel centres make every point
    sample equal, so the losses have closed forms: weighted CE over all queries, BCE and dice divided
    by the matched-mask count (and BCE by the number of points)."""
    model = _tiny()
    criterion = model.criterion
    batch, queries, classes = 2, 8, NUM_CLASSES
    labels = torch.stack([torch.full((16, 16), 2), torch.full((16, 16), 4)])
    cls_pred = torch.randn(batch, queries, classes + 1)
    query_logit = torch.linspace(-2, 2, queries)
    mask_pred = query_logit.view(1, queries, 1, 1).expand(batch, queries, 4, 4).clone()
    mask_pred[1] = -mask_pred[1]
    # interior pixel centres of the 4x4 logits (no zero-padding blend), num_points of them
    centres = (torch.arange(4.0) + 0.5) / 4
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1).reshape(-1, 2)
    fixed = grid.repeat(criterion.num_points // len(grid), 1)

    def fixed_points(mask_logits, **_):
        return fixed.expand(mask_logits.shape[0], -1, -1)

    monkeypatch.setattr("models.heads.mask2former.criterion.uncertain_point_coords", fixed_points)
    torch.manual_seed(3)
    losses = criterion([cls_pred], [mask_pred], labels)
    assert set(losses) == set(STAGE_TERMS)

    # recompute with the same matches: the matcher draws the same random points after the same seed
    torch.manual_seed(3)
    targets = semantic_targets(labels, num_classes=classes)
    weights = torch.ones(classes + 1)
    weights[-1] = 0.1
    class_targets = torch.full((batch, queries), classes)
    bce, dice = [], []
    for b, (gt_labels, gt_masks) in enumerate(targets):
        q, g = criterion.matcher(cls_pred[b], mask_pred[b], gt_labels, gt_masks.float())
        class_targets[b, q] = gt_labels[g]
        logit = mask_pred[b, q, 0, 0]
        bce.append(F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit), reduction="sum"))
        p, n = logit.sigmoid(), criterion.num_points
        dice.append((1 - (2 * p * n + 1) / (p * n + n + 1)).sum())
    per_query = F.cross_entropy(cls_pred.flatten(0, 1), class_targets.flatten(), reduction="none")
    expected_cls = (per_query * weights[class_targets.flatten()]).sum() / weights[
        class_targets.flatten()
    ].sum()
    num_masks = 2.0  # one class per image
    torch.testing.assert_close(losses["loss_cls"], 2.0 * expected_cls)
    torch.testing.assert_close(losses["loss_mask"], 5.0 * sum(bce) / num_masks)
    torch.testing.assert_close(losses["loss_dice"], 5.0 * sum(dice) / num_masks)


def test_deep_supervision_names_all_ten_stages_as_the_reference() -> None:
    criterion = _tiny().criterion
    gen = torch.Generator().manual_seed(0)
    cls_preds = [torch.randn(2, 8, NUM_CLASSES + 1, generator=gen) for _ in range(10)]
    mask_preds = [torch.randn(2, 8, 8, 8, generator=gen) for _ in range(10)]
    losses = criterion(cls_preds, mask_preds, _batch()[1][:, ::2, ::2])
    stages = [f"d{i}." for i in range(9)] + [""]
    assert list(losses) == [f"{s}{t}" for s in stages for t in STAGE_TERMS]
    assert (
        len({round(v.item(), 6) for v in losses.values()}) == 30
    )  # each stage matched and scored on its own


def test_dice_loss_is_naive_with_eps_one() -> None:
    logits = torch.tensor([[0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(dice_loss(logits, targets), torch.tensor([1 - (2 * 0.5 + 1) / (1.0 + 1 + 1)]))


def test_loss_has_every_stage_and_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = _tiny()
    _perturb(model)
    img, labels = _batch()
    losses = model.loss(img, labels)
    stages = [f"d{i}." for i in range(3)] + [""]
    assert set(losses) == {f"decode.{s}{t}" for s in stages for t in STAGE_TERMS} | {"loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    terms = [v for k, v in losses.items() if k != "loss"]
    torch.testing.assert_close(losses["loss"], torch.stack(terms).sum())
    losses["loss"].backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"{pname} got a zero gradient"


def test_all_ignored_labels_give_zero_mask_terms() -> None:
    model = _tiny()
    img, _ = _batch(batch=1)
    losses = model.loss(img, torch.full((1, SIZE, SIZE), 255))
    assert losses["decode.loss_mask"].item() == 0.0 and losses["decode.loss_dice"].item() == 0.0
    assert losses["decode.loss_cls"] > 0  # every query is told "no object"
    losses["loss"].backward()


def test_labels_must_match_images() -> None:
    model = _tiny()
    img, labels = _batch()
    with pytest.raises(ValueError, match="do not match images"):
        model.loss(img, labels[:, :32])


def test_tiny_mask2former_overfits_one_batch() -> None:
    # one pixel-encoder layer and 3 decoder layers (4 supervised stages): a few seconds on a CPU
    torch.manual_seed(0)
    model = _tiny(**{"decode_head.num_encoder_layers": 1})
    img, labels = _batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model.loss(img, labels)["loss"]
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert min(history[-3:]) < 0.5 * history[0], history


# ---------------------------------------------------------------- inference


def test_semantic_inference_semantics() -> None:
    cls_pred = torch.full((1, 2, 4), -30.0)
    cls_pred[0, 0, 1] = 30.0  # query 0: class 1
    cls_pred[0, 1, 3] = 30.0  # query 1: no object
    mask_pred = torch.zeros(1, 2, 3, 3)
    mask_pred[0, 0] = 40.0
    scores = semantic_inference(cls_pred, mask_pred)
    assert scores.shape == (1, 3, 3, 3)
    torch.testing.assert_close(scores[0, 1], torch.ones(3, 3))
    torch.testing.assert_close(scores[0, [0, 2]], torch.zeros(2, 3, 3), atol=1e-6, rtol=0)
    gen = torch.Generator().manual_seed(0)
    cls_pred, mask_pred = torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, 6, 7, generator=gen)
    expected = torch.einsum("bqc,bqhw->bchw", cls_pred.softmax(-1)[..., :-1], mask_pred.sigmoid())
    torch.testing.assert_close(semantic_inference(cls_pred, mask_pred), expected)


def test_forward_and_predict_are_the_last_stage_scores() -> None:
    torch.manual_seed(0)
    model = _tiny(**{"decode_head.num_decoder_layers": 9}).eval()
    img, _ = _batch(batch=1)
    with torch.no_grad():
        cls_preds, mask_preds = model.forward_stages(img)
        scores = model(img)
        full = model.predict(img)
    assert len(cls_preds) == len(mask_preds) == 10
    assert cls_preds[0].shape == (1, 8, NUM_CLASSES + 1)
    assert mask_preds[0].shape == (1, 8, SIZE // 4, SIZE // 4)
    torch.testing.assert_close(scores, semantic_inference(cls_preds[-1], mask_preds[-1]))
    assert full.shape == (1, NUM_CLASSES, SIZE, SIZE)
    torch.testing.assert_close(
        full, F.interpolate(scores, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    )


def test_batched_forward_equals_one_image_at_a_time() -> None:
    """Batching changes only reduction splits: in float64 (where no masked-attention threshold can tie, as a
    float32 one can on some CPU) the outputs agree to float64 rounding; ``1e-12 + 1e-9 |x|`` bounds that with
    orders of magnitude to spare (u = 1.1e-16) and is far below what mixing images in a batch would give."""
    torch.manual_seed(0)
    model = _tiny().double()
    _perturb(model)
    model.eval()
    img, _ = _batch(batch=2)
    img = img.double()
    with torch.no_grad():
        cls_batched, mask_batched = model.forward_stages(img)
        for b in range(2):
            cls_single, mask_single = model.forward_stages(img[b : b + 1])
            for stage in range(4):
                torch.testing.assert_close(
                    cls_batched[stage][b : b + 1], cls_single[stage], atol=1e-12, rtol=1e-9
                )
                torch.testing.assert_close(
                    mask_batched[stage][b : b + 1], mask_single[stage], atol=1e-12, rtol=1e-9
                )


@pytest.mark.parametrize("name", models.list_configs(head="mask2former"))
def test_every_mask2former_entry_builds_and_runs_tiny(name: str) -> None:
    model = _tiny(name)
    img, labels = _batch(batch=1)
    losses = model.loss(img, labels)
    assert torch.isfinite(losses["loss"])
    with torch.no_grad():
        assert model.eval()(img).shape == (1, NUM_CLASSES, SIZE // 4, SIZE // 4)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    """As tests/models/test_segmentor.py's: float64, gradients equal to float64 rounding (1e-12 + 1e-9 |g|)."""
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = _tiny(**{"backbone.with_cp": with_cp, "decode_head.with_cp": with_cp}).double()
        assert model.decode_head.pixel_decoder.encoder.layers[0].ffns[0].with_cp is with_cp
        _perturb(model)
        img, labels = _batch()
        model.loss(img.double(), labels)["loss"].backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-12, rtol=1e-9, msg=key)


def test_bf16_autocast_runs() -> None:
    torch.manual_seed(0)
    model = _tiny()
    _perturb(model)
    img, labels = _batch(batch=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.loss(img, labels)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    model.eval()
    with torch.no_grad():
        reference = model(img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(img)
    assert torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max() + 0.05


# ---------------------------------------------------------------- strategy-2 hand-off

COCO = "mask2former_beit_adapter_large_896_80k_cocostuff164k"
ADE = "mask2former_beit_adapter_large_896_80k_ade20k"


def test_coco_stuff_to_ade20k_hand_off_reinitialises_only_the_class_layer() -> None:
    assert models.get_config(ADE).pretrained.init_from == COCO
    torch.manual_seed(0)
    coco = tiny_model(COCO, TINY)
    _perturb(coco, seed=1)
    ade = tiny_model(ADE, TINY)
    before = ade.decode_head.cls_embed.weight.clone()
    checkpoint = {"meta": {"iter": 80000}, "state_dict": coco.state_dict()}
    report = load_stage_checkpoint(ade, checkpoint, source="coco.pth")
    assert [k for k, _, _ in report.mismatched] == [
        "decode_head.cls_embed.weight",
        "decode_head.cls_embed.bias",
    ]
    assert report.mismatched[0][1:] == ((151, 32), (172, 32))
    coco_state = coco.state_dict()
    for key, value in ade.state_dict().items():
        if not key.startswith("decode_head.cls_embed."):
            assert torch.equal(value, coco_state[key]), key
    # PyTorch's default Linear init: fresh values within U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    weight, bias = ade.decode_head.cls_embed.weight, ade.decode_head.cls_embed.bias
    bound = 1 / math.sqrt(32)
    assert not torch.equal(weight, before)
    assert weight.abs().max() <= bound and bias.abs().max() <= bound
    assert weight.std() > 0.5 * bound / math.sqrt(3)


def test_hand_off_refuses_another_architecture() -> None:
    ade = tiny_model(ADE, TINY)
    state = dict(ade.state_dict())
    del state["decode_head.query_feat.weight"]
    with pytest.raises(
        CheckpointError,
        match=r"missing \(1\) by prefix: decode_head.query_feat \(1\); decode_head.query_feat.weight",
    ):
        load_stage_checkpoint(ade, state)
    upernet = tiny_model("upernet_beit_adapter_large_640_160k_ade20k")
    with pytest.raises(CheckpointError, match="not of the same architecture"):
        load_stage_checkpoint(ade, upernet.state_dict())


@pytest.mark.parametrize(
    ("coco", "ade"),
    [
        (COCO, ADE),
        (
            "mask2former_beitv2_adapter_large_896_80k_cocostuff164k",
            "mask2former_beitv2_adapter_large_896_80k_ade20k",
        ),
    ],
)
def test_hand_off_of_the_full_size_entries(coco: str, ade: str) -> None:
    with torch.device("meta"):
        source = models.create_segmentor(coco)
        target = models.create_segmentor(ade)
        report = load_stage_checkpoint(target, source.state_dict())
    assert [(k, a, b) for k, a, b in report.mismatched] == [
        ("decode_head.cls_embed.weight", (151, 1024), (172, 1024)),
        ("decode_head.cls_embed.bias", (151,), (172,)),
    ]
    assert len(report.loaded) == len(target.state_dict()) - 2
