"""Segmentation pieces: the per-pixel head on timm backbones, CE + Dice, mIoU / F-score by hand, map voting."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from distrain.tasks.segmentation import IGNORE_INDEX, CEDiceLoss, SegLossWeights, SegNet
from distrain.tasks.semantic import confusion, k_of_n_pixels, mean_of_maps, segmentation_scores


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext"])
def test_the_head_gives_class_logits_at_input_size(name):
    net = SegNet(timm.create_model(name, features_only=True), num_classes=3, inner=32).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 32)).shape == (2, 3, 64, 32)


def test_ce_dice_by_hand_and_ignored_pixels_do_not_count():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]]])  # [1, 2 classes, 1, 2]: predicts class 0 then 1
    masks = torch.tensor([[[0, 1]]])
    probs = logits.softmax(1)
    ce = F.cross_entropy(logits, masks)
    p_right = probs[0, 0, 0, 0].item()  # both pixels get the same confidence in their class
    dice = 2 * p_right / (p_right + (1 - p_right) + 1)  # per class: 2 |P G| / (|P| + |G|), equal for both
    loss = CEDiceLoss(SegLossWeights(1.0, 1.5))(logits, masks)
    assert loss.item() == pytest.approx(ce.item() + 1.5 * (1 - dice), rel=1e-5)
    ignored = torch.tensor([[[0, IGNORE_INDEX]]])
    only_first = CEDiceLoss()(logits[..., :1], masks[..., :1])
    assert CEDiceLoss()(logits, ignored).item() == pytest.approx(only_first.item(), rel=1e-5)


def test_miou_and_fscore_of_a_hand_counted_case():
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, IGNORE_INDEX]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 0, 2]])
    m = confusion(truth, pred, 3)
    assert m.tolist() == [[3, 1, 0], [1, 2, 0], [0, 0, 0]]  # the ignored pixel's prediction (2) is not counted
    s = segmentation_scores(m + confusion(truth, pred, 3))  # sums over images: the same ratios
    assert s["iou"][:2] == pytest.approx([3 / 5, 2 / 4]) and s["miou"] == pytest.approx((0.6 + 0.5) / 2)
    assert s["fscore"] == pytest.approx((6 / 8 + 4 / 6) / 2) and s["pixel_accuracy"] == pytest.approx(5 / 7)


def test_map_mean_and_k_of_n_pixels():
    probs = np.zeros((3, 2, 1, 3))  # 3 models, 2 classes, pixels: all say 1 / two say 1 / one says 1
    probs[:, 0], probs[:, 1] = 0.8, 0.2
    probs[:, :, 0, 0] = [0.1, 0.9]
    probs[:2, :, 0, 1] = [0.4, 0.6]
    probs[0, :, 0, 2] = [0.05, 0.95]
    assert k_of_n_pixels(probs, 2).tolist() == [[1, 1, 0]]
    assert k_of_n_pixels(probs, 3).tolist() == [[1, 0, 0]]
    assert mean_of_maps(probs).tolist() == [[1, 0, 0]]  # pixel 2: mean p(1) = (0.95 + 0.2 + 0.2) / 3 < 0.5
    with pytest.raises(ValueError, match="k=4 of n=3"):
        k_of_n_pixels(probs, 4)
