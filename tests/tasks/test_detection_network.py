"""The DB network on timm `features_only` backbones and the DB loss."""

import numpy as np
import pytest
import timm
import torch

from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.loss import DBLoss, DBLossWeights, balanced_bce, dice_loss, masked_l1
from distrain.tasks.detection.network import DBNet
from distrain.tasks.detection.targets import db_targets


def backbone(name: str, **kwargs):
    return timm.create_model(name, features_only=True, pretrained=False, **kwargs)


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_efficientnet", "hrnet_w18_small"])
def test_one_path_for_every_backbone_gives_full_size_maps(name):
    torch.manual_seed(0)
    net = DBNet(backbone(name), inner=32).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 3, 64, 96) and out.min() >= 0 and out.max() <= 1
    prob, thresh, binary = out.unbind(1)
    torch.testing.assert_close(binary, torch.sigmoid(50 * (prob - thresh)))


def test_bad_sizes_and_backbones_are_refused():
    net = DBNet(backbone("test_resnet"), inner=32)
    with pytest.raises(ValueError, match="multiples of 32, got \\(64, 70\\)"):
        net(torch.randn(1, 3, 64, 70))
    with pytest.raises(ValueError, match="strides \\(4, 8, 16, 32\\); it has \\[2, 4, 8\\]"):
        DBNet(backbone("test_resnet", out_indices=(0, 1, 2)))
    with pytest.raises(ValueError, match="divisible by 4"):
        DBNet(backbone("test_resnet"), inner=30)


def test_loss_terms_by_hand():
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])
    prob = torch.tensor([[0.5, 0.9, 0.2, 0.1, 0.3]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last pixel masked out
    # 1 positive, 3 hardest negatives of the 3 unmasked: all of them
    expected = -(np.log(0.5) + np.log(0.1) + np.log(0.8) + np.log(0.9)) / 4
    assert balanced_bce(prob, target, mask, 3.0).item() == pytest.approx(expected, rel=1e-5)
    expected_one = -(np.log(0.5) + np.log(0.1)) / 2  # ratio 1: only the hardest negative (p = 0.9)
    assert balanced_bce(prob, target, mask, 1.0).item() == pytest.approx(expected_one, rel=1e-5)
    assert masked_l1(prob, target, mask).item() == pytest.approx((0.5 + 0.9 + 0.2 + 0.1) / 4, rel=1e-5)
    assert dice_loss(target, target, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert dice_loss(prob, target, mask).item() == pytest.approx(1 - 2 * 0.5 / (1.7 + 1), rel=1e-5)


def test_a_few_steps_on_a_word_lower_the_db_loss():
    torch.manual_seed(0)
    regions = TextRegions([np.array([[8, 20], [56, 20], [56, 44], [8, 44]], float)])
    targets = torch.from_numpy(db_targets(regions, 64, 64).stacked())[None]
    images = torch.zeros(1, 3, 64, 64)
    images[:, :, 20:44, 8:56] = 1.0  # a bright block where the word is
    net = DBNet(backbone("test_resnet"), inner=32)
    loss_fn = DBLoss(DBLossWeights())
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = loss_fn(net(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert set(loss_fn.parts(net(images), targets)) == {"probability", "threshold", "binary"}
