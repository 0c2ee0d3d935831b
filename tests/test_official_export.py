"""to_official: the model's weights packed as the authors' release files."""

from __future__ import annotations

import pytest

from models import build_model, to_official
from models.official import official_args

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


@pytest.mark.parametrize(
    ("embed", "depths", "heads", "window", "swin_type"),
    [(96, [2, 2, 6, 2], [3, 6, 12, 24], 7, "tiny"), (128, [2, 2, 18, 2], [4, 8, 16, 32], 12, "base"),
     (128, [2, 2, 6, 2], [4, 8, 16, 32], 12, None)],
)  # fmt: skip
def test_official_args_name_the_swin_and_window(embed, depths, heads, window, swin_type):
    """The official --swin_type is read from the backbone's shape (written out here from the official builder's
    table), --window12 from its window; a shape the official code cannot build gets no swin_type."""
    cfg = tiny_cfg(MODEL__SWIN__EMBED_DIM=embed, MODEL__SWIN__DEPTHS=depths, MODEL__SWIN__NUM_HEADS=heads,
                   MODEL__SWIN__WINDOW_SIZE=window, MODEL__FUSION__NUM_HEADS=[1, 1, 1, 1])  # fmt: skip
    model = build_model(cfg)
    got = official_args(model, "lavt", img_size=480)
    assert got.get("swin_type") == swin_type and got["window12"] == (window == 12)
    assert got["model"] == "lavt" and got["mha"] == "" and got["img_size"] == 480
