"""to_official: the model's weights packed as the authors' release files."""

from __future__ import annotations

import pytest

from models import build_model, to_official

from .helpers_model import tiny_cfg


def test_a_model_without_text_encoder_packs_no_bert_model():
    """The official 'lavt' file holds 'bert_model' only when there is a text encoder; 'lavt' is the default."""
    model = build_model(tiny_cfg())
    packed = to_official(model)
    # the model's own keys plus the official persistent buffer relative_position_index of each Swin block
    assert sorted(packed) == ["args", "model"] and set(model.state_dict()) < set(packed["model"])
    extra = {k for k in packed["model"] if k not in model.state_dict()}
    assert extra and all(k.endswith(".attn.relative_position_index") for k in extra)
    assert to_official(model, "lavt").keys() == packed.keys()
    with pytest.raises(ValueError, match="packaging"):
        to_official(model, "LAVT")
