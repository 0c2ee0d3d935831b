"""MODEL.REFINE: the edge refinement of the upsampled logits (models/refine.py), against a hand computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import build_model, build_param_groups, infer_architecture
from models.refine import EdgeRefine

from .helpers_model import tiny_cfg


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                positive = "running_var" in name
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if positive else torch.randn(t.shape, generator=g))


def _by_hand(logits: torch.Tensor, images: torch.Tensor, sd: dict, bn) -> torch.Tensor:
    """logits + 1x1(relu(bn(3x3(relu(bn(3x3([logits, image]))))))) from the state dict ``sd``, on contiguous
    tensors, the 1x1 as an einsum; ``bn(x, prefix)`` is the BatchNorm."""
    x = torch.cat([logits, images], 1).contiguous()
    x = bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1").clamp_min(0)
    x = bn(F.conv2d(x, sd["conv2.weight"], padding=1), "bn2").clamp_min(0)
    return logits + torch.einsum("bchw,oc->bohw", x, sd["proj.weight"][:, :, 0, 0]) + sd["proj.bias"][:, None, None]


def test_starts_as_the_identity():
    refine = EdgeRefine(4)
    logits, images = torch.randn(2, 2, 12, 10), torch.randn(2, 3, 12, 10)
    assert torch.equal(refine(logits, images), logits)
    with torch.no_grad():
        refine.train()(logits, images)  # BatchNorm statistics move, the output still does not
    assert torch.equal(refine.eval()(logits, images), logits)


def test_against_a_hand_computation():
    """Eval mode, random weights and statistics: logits + 1x1(relu(bn(3x3(relu(bn(3x3([logits, image])))))))."""
    refine = EdgeRefine(5)
    _randomise(refine)
    refine.eval()
    logits, images = torch.randn(2, 2, 9, 11), torch.randn(2, 3, 9, 11)
    sd = refine.state_dict()

    def bn(x, p):
        scale = sd[f"{p}.weight"] / torch.sqrt(sd[f"{p}.running_var"] + 1e-5)
        return (x - sd[f"{p}.running_mean"][:, None, None]) * scale[:, None, None] + sd[f"{p}.bias"][:, None, None]

    expected = _by_hand(logits, images, sd, bn)
    with torch.no_grad():
        torch.testing.assert_close(refine(logits, images), expected, atol=1e-5, rtol=1e-5)


def test_convolutions_run_channels_last_on_cpu():
    """On CPU the full-resolution convolutions get channels-last inputs (oneDNN's faster layout for few channels), in
    training and in evaluation, and give what the layers give on contiguous inputs (forward and gradients)."""
    torch.manual_seed(0)
    refine = EdgeRefine(4)
    _randomise(refine)
    seen = []
    for conv in (refine.conv1, refine.conv2, refine.proj):
        conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    logits, images = torch.randn(2, 2, 9, 11, requires_grad=True), torch.randn(2, 3, 9, 11)
    out = refine.train()(logits, images)
    with torch.no_grad():
        refine.eval()(logits, images)
    assert seen == [True] * 6
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)  # a loss whose gradient differs at every position
    (out * weights).sum().backward()

    # the same layers, by hand on contiguous tensors, BatchNorm in training mode (batch statistics)
    ref_logits = logits.detach().clone().requires_grad_()
    sd = {k: v.detach().clone().requires_grad_(v.is_floating_point() and "running" not in k)
          for k, v in refine.state_dict().items()}  # fmt: skip

    def bn(x, p):
        return F.batch_norm(x, None, None, sd[f"{p}.weight"], sd[f"{p}.bias"], training=True, eps=1e-5)

    expected = _by_hand(ref_logits, images, sd, bn)
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # gradients: sums over the batch and the map, float32 round-off of the two layouts' summation orders
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-4, rtol=1e-4)
    for name, param in refine.named_parameters():
        torch.testing.assert_close(param.grad, sd[name].grad, atol=1e-4, rtol=1e-4)


def test_lavt_refines_its_upsampled_logits():
    """The same backbone and decoder with and without MODEL.REFINE: the refined network's output is the refinement
    of the plain one's, given the image; the plain network's state dict has no refinement keys (official layout)."""
    torch.manual_seed(0)
    plain = build_model(tiny_cfg()).eval()
    refined = build_model(tiny_cfg(MODEL__REFINE=6)).eval()
    assert not any(k.startswith("refine.") for k in plain.state_dict())
    _randomise(refined.refine, seed=1)
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("refine.") for k in missing)
    images, feats, mask = torch.randn(2, 3, 40, 36), torch.randn(2, 12, 5), torch.ones(2, 5, 1)
    with torch.no_grad():
        base = plain.segment(images, feats, mask)
        torch.testing.assert_close(refined.segment(images, feats, mask), refined.refine(base, images))
        assert not torch.allclose(refined.segment(images, feats, mask), base)


def test_trained_read_back_and_refused_when_negative():
    model = build_model(tiny_cfg(MODEL__REFINE=6))
    groups = build_param_groups(model, 0.01)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert {id(p) for p in model.refine.parameters()} <= in_groups  # the optimiser trains it (with weight decay)
    assert len(in_groups) == sum(p.requires_grad for p in model.parameters())
    assert infer_architecture({"model": model.state_dict()}).facts["MODEL.REFINE"] == 6
    assert infer_architecture({"model": build_model(tiny_cfg()).state_dict()}).facts["MODEL.REFINE"] == 0
    with pytest.raises(ValueError, match="refinement's width must be positive, got -1"):
        EdgeRefine(-1)


def test_gradients_reach_the_refinement():
    """Its last layer starts at zero, so the first step trains that layer only; once it is not zero, every layer
    gets a gradient."""
    refine = EdgeRefine(4).train()
    logits, images = torch.randn(2, 2, 8, 8, requires_grad=True), torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 2, (2, 8, 8))
    F.cross_entropy(refine(logits, images), target).backward()
    assert refine.proj.weight.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0
    with torch.no_grad():
        refine.proj.weight.fill_(0.1)
    refine.zero_grad()
    F.cross_entropy(refine(logits, images), target).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in refine.parameters())
