"""models/layers.py against timm's layers (the official LAVT code's), seed for seed, and against the formulas."""

from __future__ import annotations

import pytest
import timm.layers
import torch
import torch.nn.functional as F

from models.layers import DropPath, Mlp, trunc_normal_


@pytest.mark.parametrize(("shape", "std", "a", "b"), [((7, 9), 0.02, -2.0, 2.0), ((4000,), 1.0, -0.5, 1.5)])
def test_trunc_normal_draws_timms_numbers(shape: tuple[int, ...], std: float, a: float, b: float) -> None:
    torch.manual_seed(3)
    ours = trunc_normal_(torch.empty(shape), std=std, a=a, b=b)
    torch.manual_seed(3)
    theirs = timm.layers.trunc_normal_(torch.empty(shape), std=std, a=a, b=b)
    assert torch.equal(ours, theirs)
    assert ours.min() >= a and ours.max() <= b


def test_trunc_normal_bounds_are_absolute_and_the_spread_is_std() -> None:
    torch.manual_seed(0)
    x = trunc_normal_(torch.empty(200_000), std=1.0, a=-0.5, b=0.5)
    assert x.min() >= -0.5 and x.max() <= 0.5 and x.min() < -0.49 and x.max() > 0.49
    y = trunc_normal_(torch.empty(200_000), std=0.02)  # bounds +-2 are 100 std away: a plain normal
    assert abs(y.std().item() - 0.02) < 2e-4 and abs(y.mean().item()) < 2e-4


def test_drop_path_matches_timm_and_keeps_whole_samples() -> None:
    x = torch.randn(64, 5, 3)
    layer = DropPath(0.25).train()
    torch.manual_seed(1)
    ours = layer(x)
    torch.manual_seed(1)
    theirs = timm.layers.DropPath(0.25).train()(x)
    assert torch.equal(ours, theirs)
    kept = (ours != 0).flatten(1).all(1)
    assert torch.equal(kept, (ours != 0).flatten(1).any(1))  # each sample dropped or kept whole
    assert 0 < kept.sum() < 64
    assert torch.allclose(ours[kept], x[kept] / 0.75)


def test_drop_path_is_the_identity_in_eval_and_refuses_p_1() -> None:
    x = torch.randn(4, 3)
    assert DropPath(0.5).eval()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DropPath(1.0)


def test_mlp_is_fc2_gelu_fc1_with_the_official_keys() -> None:
    torch.manual_seed(0)
    mlp = Mlp(6, 10)
    assert list(mlp.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    x = torch.randn(2, 3, 6)
    w1, b1, w2, b2 = (p.detach() for p in mlp.parameters())
    hidden = x @ w1.T + b1
    expected = (0.5 * hidden * (1 + torch.erf(hidden / 2**0.5))) @ w2.T + b2  # exact GELU, by hand
    assert torch.allclose(mlp(x), expected, atol=1e-6)
    theirs = timm.layers.Mlp(6, 10)
    theirs.load_state_dict(mlp.state_dict())
    assert torch.equal(mlp(x), theirs(x))
    assert not torch.allclose(mlp(x), F.linear(F.relu(F.linear(x, w1, b1)), w2, b2))
