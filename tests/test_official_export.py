"""to_official: the model's weights packed as the authors' release files."""

from __future__ import annotations

import pytest

from models import build_model, to_official

from .helpers_model import tiny_cfg


def test_a_model_without_text_encoder_packs_no_bert_model():
    """The official 'lavt' file holds 'bert_model' only when there is a text encoder; 'lavt' is the default."""
    model = build_model(tiny_cfg())
    packed = to_official(model)
    assert list(packed) == ["model"] and packed["model"].keys() == model.state_dict().keys()
    assert to_official(model, "lavt").keys() == packed.keys()
    with pytest.raises(ValueError, match="packaging"):
        to_official(model, "LAVT")
