import math

import pytest
import torch

from utils.losses import build_criterion, dice_loss, weighted_cross_entropy

from .helpers_model import NOT_CPU


def test_weighted_ce_hand_computed():
    # two pixels: logits (0, ln 3) -> p(object) = 3/4; target object, then background
    logits = torch.tensor([0.0, math.log(3)]).view(1, 2, 1, 1).expand(1, 2, 1, 2).contiguous()
    target = torch.tensor([[[1, 0]]])
    expected = (1.1 * -math.log(3 / 4) + 0.9 * -math.log(1 / 4)) / (1.1 + 0.9)  # weighted mean, as F.cross_entropy
    assert build_criterion("ce")(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # called alone, the class weights follow the logits' precision (torch refuses float32 weights beside float64 logits)
    exact = torch.tensor([0.0, math.log(3)], dtype=torch.float64).view(1, 2, 1, 1).expand(1, 2, 1, 2)
    weight = torch.tensor([0.9, 1.1])  # float32, as build_criterion makes them
    w0, w1 = weight.tolist()  # their float32 values, exactly
    exact_expected = (w1 * -math.log(3 / 4) + w0 * -math.log(1 / 4)) / (w1 + w0)
    assert weighted_cross_entropy(exact, target, weight).item() == pytest.approx(exact_expected, rel=1e-12)
    assert build_criterion("ce")(logits.bfloat16(), target).item() == pytest.approx(expected, rel=2e-2)


def test_the_class_weights_follow_the_logits_device():
    """The criterion's class weights are made on the CPU; logits on another device get a loss on their device."""
    logits = torch.empty(2, 2, 4, 4, device=NOT_CPU)
    target = torch.empty(2, 4, 4, dtype=torch.int64, device=NOT_CPU)
    loss = weighted_cross_entropy(logits, target, torch.tensor([0.9, 1.1]))
    assert loss.device == NOT_CPU and loss.shape == ()


def test_dice_hand_computed():
    logits = torch.zeros(1, 2, 1, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[1, 0]]])
    # (2 * 0.5 + 1) / (1 + 1 + 1) = 2/3
    assert dice_loss(logits, target).item() == pytest.approx(1 / 3)
    assert build_criterion("ce+dice")(logits, target).item() == pytest.approx(math.log(2) + 1 / 3, rel=1e-6)
    # a perfect confident prediction has (almost) zero Dice loss
    perfect = torch.tensor([[[[-20.0, 20.0]], [[20.0, -20.0]]]])  # [1, 2, 1, 2]: object, then background
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_is_the_mean_of_per_image_losses():
    """Dice is computed per image, then averaged (an image with a small object counts as much as one with a large
    one): two images by hand, p = 0.5 everywhere. Image 0: target 1 of 4 pixels, (2 * 0.5 + 1) / (2 + 1 + 1) = 1/2;
    image 1: all 4, (2 * 2 + 1) / (2 + 4 + 1) = 5/7; loss 1 - (1/2 + 5/7) / 2."""
    target = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [1, 1]]])
    assert dice_loss(torch.zeros(2, 2, 2, 2), target).item() == pytest.approx(1 - (1 / 2 + 5 / 7) / 2)


def test_criterion_errors():
    with pytest.raises(ValueError, match="TRAIN.LOSS must be one of"):
        build_criterion("focal")
    with pytest.raises(ValueError, match="2 class weights"):
        build_criterion("ce", [1.0])
    with pytest.raises(ValueError, match=r"logits must be \[B, 2, H, W\]"):
        build_criterion("ce")(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


def test_loss_has_gradient():
    logits = torch.randn(2, 2, 5, 5, requires_grad=True)
    build_criterion("ce+dice")(logits, torch.randint(0, 2, (2, 5, 5))).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
