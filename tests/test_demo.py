"""tools.demo on a tiny checkpoint: inputs as the dataset's, masks as the model's own prediction, the PNGs."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from configs import get_config
from data import ReferDataset, load_refer
from engine.run_folder import eval_lock_name
from tests.helpers_model import NOT_CPU
from tools import demo
from tools import visualize as vis

SIZE, MAX_TOKENS = 64, 12


def make_tiny_run(folder: Path) -> dict[str, Any]:
    """A synthetic dataset (22 images) and an untrained tiny LAVT saved as ``<folder>/runs/tiny/best.pth``.

    The classifier bias is shifted so that about half of a dataset image is predicted as object: masks then
    have both classes, so comparing them means something. Shared with tests/test_notebooks.py.
    """
    from data.synthetic import ensure_synthetic
    from models import build_model
    from models.text import load_tokenizer
    from tests.helpers_train import make_tiny_text_encoder
    from utils.checkpoint import save_checkpoint

    encoder = make_tiny_text_encoder(folder / "bert")
    opts = {
        "MODEL.SWIN.EMBED_DIM": 8, "MODEL.SWIN.DEPTHS": [1, 1, 1, 1], "MODEL.SWIN.NUM_HEADS": [1, 1, 1, 1],
        "MODEL.SWIN.WINDOW_SIZE": 4, "MODEL.SWIN.DROP_PATH_RATE": 0.0, "MODEL.TEXT.ENCODER": str(encoder),
        "MODEL.TEXT.MAX_TOKENS": MAX_TOKENS, "DATA.DATASET": "synthetic", "DATA.ROOT": str(folder / "data"),
        "DATA.SIZE": SIZE, "DATA.WORKERS": 0, "DATA.SYNTHETIC_IMAGES": 22, "EVAL.SPLITS": ["val"],
        "OUTPUT": str(folder / "runs"), "MODEL_ID": "tiny",
    }  # fmt: skip
    cfg = get_config(None, [x for kv in opts.items() for x in kv])
    ensure_synthetic(cfg.DATA.ROOT, num_images=cfg.DATA.SYNTHETIC_IMAGES)
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    predictor = demo.Predictor(model, cfg, load_tokenizer(cfg.MODEL.TEXT.ENCODER), "cpu")
    image = first_image(cfg)
    with torch.no_grad():
        ids, mask = predictor.tokenize(["the red circle"])
        logits = model(predictor.prepare(image), ids, mask)
        model.classifier.conv1_1.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    run_dir = folder / "runs" / "tiny"
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model": model.state_dict(), "epoch": 0, "config": cfg.dump()}, run_dir / "best.pth")
    return {"checkpoint": run_dir / "best.pth", "cfg": cfg, "folder": folder}


def first_image(cfg: Any) -> np.ndarray:
    from data import load_rgb

    folder = Path(cfg.DATA.ROOT) / "images" / "mscoco" / "images" / "train2014"
    return load_rgb(sorted(folder.glob("*.jpg"))[0])


def reference_margins(
    model: torch.nn.Module, tokenizer: Any, image: np.ndarray, texts: list[str], amp: torch.dtype | None = None
) -> np.ndarray:
    """The model's own answer, one expression at a time: official tokenisation (encode, slice, zero-pad), the
    official image path written out (PIL bilinear, torchvision to_tensor and normalize), logits resized bilinearly
    to the image; ``amp``: the forward under ``torch.autocast`` to that dtype. Returns [E, H, W] logit margins."""
    import torchvision.transforms.functional as TF

    resized = Image.fromarray(image).resize((SIZE, SIZE), Image.BILINEAR)
    x = TF.normalize(TF.to_tensor(resized), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).unsqueeze(0)
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer.encode(text, add_special_tokens=True)[:MAX_TOKENS]
            input_ids = torch.zeros(1, MAX_TOKENS, dtype=torch.long)
            input_ids[0, : len(ids)] = torch.tensor(ids)
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                logits = model(x, input_ids, (input_ids != 0).long()).float()
            up = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
            out.append((up[0, 1] - up[0, 0]).numpy())
    return np.stack(out)


def assert_masks_match(masks: np.ndarray, margins: np.ndarray) -> None:
    """Equal wherever the model is not on the fence (float round-off may flip pixels with |margin| ~ 0)."""
    sure = np.abs(margins) > 1e-4
    assert masks.shape == margins.shape and masks.dtype == bool
    assert sure.mean() > 0.99
    assert np.array_equal(masks[sure], margins[sure] > 0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, OpenMP threads waiting on each other cost 100x on tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("vis_run"))


@pytest.fixture(scope="module")
def predictor(run):
    return demo.Predictor.from_checkpoint(run["checkpoint"], device="cpu")


def test_inputs_match_the_dataset(run, predictor):
    from data import ReferDataset, load_rgb

    cfg = run["cfg"]
    ds = ReferDataset(cfg.DATA.ROOT, "synthetic", "unc", "val", predictor.tokenizer, image_size=SIZE,
                      max_tokens=MAX_TOKENS, eval_mode=True)  # fmt: skip
    item = ds[0]
    image = load_rgb(Path(ds.refer.IMAGE_DIR) / item["file_name"])
    assert torch.equal(predictor.prepare(image)[0], item["image"])
    ids, mask = predictor.tokenize(item["sentences"])
    assert torch.equal(ids, item["input_ids"]) and torch.equal(mask, item["attention_mask"])
    long = "the small purple heart to the left of the big green star near the top of the picture"
    ids, mask = predictor.tokenize([long])
    assert ids[0].tolist() == predictor.tokenizer.encode(long, add_special_tokens=True)[:MAX_TOKENS]
    assert ids[0, 0] == 101 and ids[0, -1] != 102 and mask.sum() == MAX_TOKENS  # cut by slicing: [SEP] lost


def test_predict_is_the_models_prediction(run, predictor):
    image = first_image(run["cfg"])[:, :-7]  # not square: the resize back must use the image's own size
    texts = ["the red circle", "the big star on the left", "Little green heart"]
    masks = predictor.predict(image, texts)
    assert masks.shape == (3, *image.shape[:2])
    assert_masks_match(masks, reference_margins(predictor.model, predictor.tokenizer, image, texts))
    assert 0.05 < masks[0].mean() < 0.95, "calibrated tiny model: both classes present"


def test_many_expressions_are_predicted_in_batches(run, predictor, monkeypatch):
    """More expressions than ``batch_size``: forwards of at most that many, and each mask is its own expression's
    (as predicted one at a time), in the order given."""
    image = first_image(run["cfg"])[:, :-5]
    texts = ["the red circle", "the big star on the left", "Little green heart", "the blue square", "a star"]
    small = demo.Predictor(predictor.model, run["cfg"], predictor.tokenizer, "cpu", batch_size=2)
    sizes, segment = [], small.model.segment
    monkeypatch.setattr(small.model, "segment", lambda x, *text: sizes.append(len(x)) or segment(x, *text))
    masks = small.predict(image, texts)
    assert sizes == [2, 2, 1]
    assert_masks_match(masks, reference_margins(predictor.model, predictor.tokenizer, image, texts))
    assert len({m.tobytes() for m in masks}) == len(texts), "the expressions' masks differ: a mix-up would show"
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        demo.Predictor(predictor.model, run["cfg"], predictor.tokenizer, "cpu", batch_size=0)
    assert demo.Predictor.from_checkpoint(run["checkpoint"], device="cpu", batch_size=3).batch_size == 3
    with pytest.raises(ValueError, match="got 0"):  # before the checkpoint is read: this one is not there
        demo.Predictor.from_checkpoint(run["folder"] / "none.pth", device="cpu", batch_size=0)


def linear_output_dtypes(model: torch.nn.Module) -> tuple[dict[str, set[torch.dtype]], list[Any]]:
    """Forward hooks on every nn.Linear: the dtypes its outputs came in, per top-level part of the model (image
    side, text encoder, ...); and the hooks' handles."""
    seen: dict[str, set[torch.dtype]] = {}

    def record(part: str):
        return lambda module, inputs, out: seen.setdefault(part, set()).add(out.dtype)

    handles = [
        module.register_forward_hook(record(name.split(".")[0]))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    return seen, handles


@pytest.mark.parametrize("amp, dtype", [("", torch.float32), ("bf16", torch.bfloat16)])
def test_predict_runs_in_the_precision_asked_for(run, predictor, amp, dtype):
    """``amp``: the text encoder and the image side both compute in that precision, and the masks are the model's
    own answer computed so (where its margin is clear of the precision's round-off)."""
    other = demo.Predictor.from_checkpoint(run["checkpoint"], device="cpu", amp=amp)
    assert other.amp == amp
    seen, handles = linear_output_dtypes(other.model)
    image, texts = first_image(run["cfg"])[:, :-5], ["the red circle", "the big star on the left"]
    try:
        masks = other.predict(image, texts)
    finally:
        for handle in handles:
            handle.remove()
    assert {"text_encoder", "backbone"} <= set(seen) and all(dtypes == {dtype} for dtypes in seen.values()), seen
    margins = reference_margins(other.model, other.tokenizer, image, texts, amp=dtype if amp else None)
    # the untrained model's margins are ~1e-2; bf16 moves them by up to ~4e-3, and batched against one by one rounds
    # differently in bf16
    sure = np.abs(margins) > (2e-3 if amp else 1e-4)
    assert sure.mean() > 0.8
    assert masks.shape == margins.shape and np.array_equal(masks[sure], margins[sure] > 0)


def test_predict_precision_auto_and_bad(run, tmp_path):
    from utils.amp import native_bf16

    tiny = demo.Predictor.from_checkpoint(run["checkpoint"], device="cpu", amp="auto")
    assert tiny.amp == ("bf16" if native_bf16("cpu") else "")
    with pytest.raises(ValueError, match="must be one of .* got 'float16'"):
        demo.Predictor(tiny.model, tiny.cfg, tiny.tokenizer, "cpu", amp="float16")
    with pytest.raises(ValueError, match="must be one of .* got 'float16'"):  # before the checkpoint is looked for
        demo.Predictor.from_checkpoint(tmp_path / "nothing.pth", device="cpu", amp="float16")


def test_cli_writes_overlay_and_masks(run, predictor, tmp_path, caplog):
    rgb = np.asarray(Image.fromarray(first_image(run["cfg"])).resize((90, 70)))
    image_file = tmp_path / "photo.png"
    Image.fromarray(rgb).convert("RGBA").save(image_file)  # any image file: here RGBA, not from the dataset
    texts = ["the red circle", "big star"]
    out, mask_out = tmp_path / "out" / "overlay.png", tmp_path / "out" / "mask.png"
    argv = ["--checkpoint", str(run["checkpoint"]), "--image", str(image_file), "--text", texts[0], "--text", texts[1]]
    with caplog.at_level("INFO", logger="tools.demo"):
        written = demo.main(argv + ["--out", str(out), "--mask_out", str(mask_out), "--device", "cpu"])
    assert written["mask_out"] == [tmp_path / "out" / "mask_0.png", tmp_path / "out" / "mask_1.png"]
    masks_line = f"overlay: {out}; masks: {tmp_path}/out/mask_0.png, {tmp_path}/out/mask_1.png"
    assert caplog.records[-1].getMessage() == masks_line  # where the files went, said last
    masks = np.stack([np.asarray(Image.open(p)) for p in written["mask_out"]])
    assert masks.shape == (2, 70, 90) and set(np.unique(masks)) <= {0, 255}
    assert_masks_match(masks > 0, reference_margins(predictor.model, predictor.tokenizer, rgb, texts))
    overlay = np.asarray(Image.open(out))
    band = overlay.shape[0] - 70
    assert overlay.shape[1:] == (2 * 90 + 4, 3) and band > 0
    for e in range(2):
        panel = overlay[band:, e * 94 : e * 94 + 90]
        assert np.array_equal(panel, vis.overlay_mask(rgb, masks[e] > 0, vis.PALETTE[e]))


def test_cli_example_uses_a_dataset_image_and_its_expressions(run, predictor, tmp_path):
    from data import load_rgb

    argv = ["--checkpoint", str(run["checkpoint"]), "--example", "0", "--out", str(tmp_path / "o.png"), "--device"]
    written = demo.main(argv + ["cpu"])
    example = demo.dataset_example(load_refer(run["cfg"]), "val", 0)
    assert written["image"] == example["image"] and written["texts"] == example["expressions"]
    rgb = load_rgb(example["image"])
    assert_masks_match(written["masks"], reference_margins(predictor.model, predictor.tokenizer, rgb, written["texts"]))
    n = len(written["texts"])
    assert Image.open(tmp_path / "o.png").size[0] == n * rgb.shape[1] + (n - 1) * 4


def test_cli_writes_overlay_png_by_default(run, tmp_path, monkeypatch):
    """Without --out the overlay is overlay.png in the current folder, and no mask file is written."""
    monkeypatch.chdir(tmp_path)
    demo.main(["--checkpoint", str(run["checkpoint"]), "--example", "0", "--device", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.png"] and Image.open("overlay.png").format == "PNG"


def test_without_checkpoint_the_demo_run_is_used_or_named(run, tmp_path, monkeypatch, capsys):
    """No --checkpoint: the built-in demo run's best.pth; before it was trained, one line that says so and how."""
    from tools.cli import run_cli

    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "checkpoint" / "demo" / "best.pth"
    monkeypatch.setattr(demo, "default_checkpoint", lambda: missing)
    argv = ["--example", "0", "--device", "cpu"]
    assert run_cli("python -m tools.demo", demo.main, argv) == 2
    assert capsys.readouterr().err == (
        f"python -m tools.demo: error: FileNotFoundError: no checkpoint given, and the built-in demo's {missing} "
        "is not there: train the demo with `python main.py`, or give a checkpoint\n"
    )
    monkeypatch.setattr(demo, "default_checkpoint", lambda: run["checkpoint"])
    assert run_cli("python -m tools.demo", demo.main, argv) == 0 and Path("overlay.png").is_file()


def test_cli_amp_reaches_the_predictor(run, tmp_path, caplog):
    argv = ["--checkpoint", str(run["checkpoint"]), "--example", "0", "--out", str(tmp_path / "o.png"), "--device"]
    with caplog.at_level(logging.INFO, logger="tools.demo"):
        demo.main(argv + ["cpu", "--amp", "bf16"])
        demo.main(argv + ["cpu"])
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model of ")]
    assert loaded == [f"model of {run['checkpoint']} on cpu, input {SIZE}x{SIZE}, {amp}" for amp in ("bf16", "float32")]
    for amp in ("bf16", "fp16", "auto"):
        assert demo.get_parser().parse_args(["--image", "x.png", "--amp", amp]).amp == amp


def test_the_device_asked_for_reaches_the_predictor(run, tmp_path, monkeypatch):
    """--device and ``run_demo``'s device open the checkpoint there (asked for a GPU, opened on the CPU here)."""
    real, devices = demo.Predictor.from_checkpoint, []

    def on_cpu(checkpoint, device, *rest):
        devices.append(device)
        return real(checkpoint, "cpu", *rest)

    monkeypatch.setattr(demo.Predictor, "from_checkpoint", on_cpu)
    demo.main(["--checkpoint", str(run["checkpoint"]), "--example", "0", "--out", str(tmp_path / "o.png"), "--device",
               "cuda:1"])
    example = demo.dataset_example(load_refer(run["cfg"]), "val", 0)
    demo.run_demo(run["checkpoint"], example["image"], ["x"], tmp_path / "p.png", device="cuda:0")
    assert devices == ["cuda:1", "cuda:0"]


def test_checkpoint_without_text_encoder_cannot_predict(run, tmp_path):
    from models import build_model
    from utils.checkpoint import save_checkpoint

    cfg = run["cfg"].clone()
    cfg.defrost()
    cfg.MODEL.TEXT.ENCODER, cfg.MODEL.TEXT.DIM = "", 16  # a model trained on given text features
    state = build_model(cfg, pretrained=False).state_dict()
    save_checkpoint({"model": state, "config": cfg.dump()}, tmp_path / "f.pth")
    with pytest.raises(ValueError, match=r"f.pth: MODEL.TEXT.ENCODER is empty, but predicting from text needs the "
                       r"text encoder \(set it with --opts MODEL.TEXT.ENCODER <folder or minilm-l6>\)$"):
        demo.Predictor.from_checkpoint(tmp_path / "f.pth", device="cpu")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image", "x.png"], "--image needs at least one --text"),
        (["--image", "x.png", "--example", "0", "--text", "a"], "not allowed with argument"),
        (["--text", "a"], "one of the arguments --image --example is required"),
        (["--image", "x.png", "--text", "a", "--amp", "fp32"], "argument --amp: invalid choice: 'fp32'"),
        (["--example", "-1"], "--example must be >= 0, got -1"),
        (["--image", "x.png", "--text", "a", "--text", " \t"], "--text number 2 is blank: each --text is one"),
        (["--example", "0", "--text", ""], "--text number 1 is blank"),
    ],
)
def test_cli_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        demo.main(argv)
    assert message in capsys.readouterr().err


def test_one_expression_writes_the_given_mask_path(run, predictor, tmp_path, caplog):
    image_file = tmp_path / "img.jpg"
    Image.fromarray(first_image(run["cfg"])).convert("L").save(image_file)  # greyscale JPEG
    with caplog.at_level(logging.INFO, logger=demo.logger.name):
        written = demo.run_demo(run["checkpoint"], image_file, ["the red circle"], tmp_path / "o.png",
                                tmp_path / "m.png", predictor=predictor)  # fmt: skip
    share = 100 * float(np.mean(np.asarray(Image.open(tmp_path / "m.png")) > 0))
    assert f"'the red circle': {share:.1f}% of the image" in caplog.messages  # what the mask covers, by expression
    assert written["mask_out"] == [tmp_path / "m.png"]
    grey = np.asarray(Image.open(image_file).convert("RGB"))
    assert Image.open(tmp_path / "m.png").size == (grey.shape[1], grey.shape[0])
    assert np.array_equal(written["masks"][0], np.asarray(Image.open(tmp_path / "m.png")) > 0)


def test_checkpoint_without_config_needs_a_config_file(run, predictor, tmp_path):
    from models import read_checkpoint

    bare = tmp_path / "bare.pth"
    torch.save({"model": read_checkpoint(run["checkpoint"])["model"]}, bare)
    with pytest.raises(ValueError, match=r"bare.pth stores no config and MODEL.FUSION.NUM_HEADS is ambiguous"):
        demo.Predictor.from_checkpoint(bare, device="cpu")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(run["cfg"].dump())
    other = demo.Predictor.from_checkpoint(bare, device="cpu", cfg_file=cfg_file)
    image = first_image(run["cfg"])
    assert np.array_equal(other.predict(image, ["big star"]), predictor.predict(image, ["big star"]))


def test_config_overrides_and_errors(run, tmp_path):
    from configs.validate import ConfigError
    from models import CheckpointError, read_checkpoint
    from tools.open_checkpoint import checkpoint_cfg

    ckpt = read_checkpoint(run["checkpoint"])
    cfg = checkpoint_cfg(ckpt, run["checkpoint"], overrides=["DATA.ROOT", "/elsewhere", "EVAL.BATCH_SIZE", 3])
    assert cfg.DATA.ROOT == "/elsewhere" and cfg.EVAL.BATCH_SIZE == 3 and cfg.MODEL.SWIN.EMBED_DIM == 8
    with pytest.raises(ConfigError, match=r"^unknown config key MODEL.NOPE in the overrides \(MODEL has "):
        checkpoint_cfg(ckpt, run["checkpoint"], overrides=["MODEL.NOPE", "1"])
    with pytest.raises(ConfigError, match=r"^unknown config key MODEL.NOPE in the config stored in checkpoint x.pth"):
        checkpoint_cfg({"config": "MODEL:\n  NOPE: 1\n"}, "x.pth")
    (tmp_path / "bad.yaml").write_text("MODEL: [\n")
    with pytest.raises(ConfigError, match=r"^config file .*bad.yaml is not valid YAML at line 2, column 1: "):
        checkpoint_cfg(ckpt, run["checkpoint"], cfg_file=tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        checkpoint_cfg(ckpt, run["checkpoint"], overrides=["DATA.ROOT"])
    with pytest.raises(FileNotFoundError, match="config file not found: .*missing.yaml"):
        checkpoint_cfg(ckpt, run["checkpoint"], cfg_file=tmp_path / "missing.yaml")
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nothing.pth"):
        demo.Predictor.from_checkpoint(tmp_path / "nothing.pth", device="cpu")


def test_predict_bad_inputs(run, predictor, tmp_path):
    image = first_image(run["cfg"])
    for texts in ([], "the red circle", ["ok", "  "]):
        with pytest.raises(ValueError, match="list of non-empty expressions"):
            predictor.predict(image, texts)
    with pytest.raises(ValueError, match=r"RGB uint8 image \[H, W, 3\], got float32"):
        predictor.predict(image.astype(np.float32), ["a"])
    with pytest.raises(FileNotFoundError, match="image not found: .*nope.jpg"):
        predictor.predict(tmp_path / "nope.jpg", ["a"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_cuda_requested_without_cuda(run):
    with pytest.raises(ValueError, match="CUDA is not available"):
        demo.Predictor.from_checkpoint(run["checkpoint"], device="cuda")


def test_a_device_torch_does_not_know_is_one_line(run):
    with pytest.raises(ValueError, match=r"^device 'tpu' is not a device \(cpu, cuda or cuda:<index>\)$"):
        demo.Predictor.from_checkpoint(run["checkpoint"], device="tpu")


def test_the_model_moves_to_the_predictors_device(run):
    """The model goes to the device asked for (a model built for the test: ``NOT_CPU`` keeps no values)."""
    from models import build_model

    elsewhere = demo.Predictor(build_model(run["cfg"], pretrained=False), run["cfg"], None, NOT_CPU)
    assert elsewhere.device == NOT_CPU and {p.device for p in elsewhere.model.parameters()} == {NOT_CPU}


def test_outputs_never_overwrite_the_image_or_each_other(run, predictor, tmp_path, monkeypatch):
    """An overlay or mask named as the input image, or as another output (``--out`` = a mask's name), is refused
    before anything is written: the photo and the files already there stay as they were."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(first_image(run["cfg"])).save("photo.png")
    Path("m_0.png").write_bytes(b"kept")
    photo = Path("photo.png").read_bytes()
    cases = [
        ("photo.png", None, "photo.png is the input image"),
        ("o.png", "../" + tmp_path.name + "/photo.png", f"../{tmp_path.name}/photo.png is the input image"),
        ("m_0.png", "m.png", "m_0.png is another output"),  # two expressions: m_0.png and m_1.png
        ("./m.png", "m.png", "m.png is another output"),  # (one expression here, below)
    ]
    for out, mask_out, message in cases:
        texts = ["the red circle", "the big star"] if out == "m_0.png" else ["the red circle"]
        with pytest.raises(ValueError, match=f"^{re.escape(message)}: it would be overwritten \\(give --out and "):
            demo.run_demo(None, "photo.png", texts, out, mask_out, predictor=predictor)
    assert Path("photo.png").read_bytes() == photo and Path("m_0.png").read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_0.png", "photo.png"]


def test_mask_paths():
    assert demo.mask_paths("a/m.png", 1) == [Path("a/m.png")]
    assert demo.mask_paths("a/m.png", 2) == [Path("a/m_0.png"), Path("a/m_1.png")]
    assert demo.mask_paths("m", 2) == [Path("m_0.png"), Path("m_1.png")]


def test_dataset_example(run):
    refer = load_refer(run["cfg"])
    ex = demo.dataset_example(refer, "val")
    image = np.asarray(Image.open(ex["image"]))
    assert 2 <= len(ex["expressions"]) == len(ex["gts"]) == len(ex["ref_ids"]) <= 3
    for ref_id, text, gt in zip(ex["ref_ids"], ex["expressions"], ex["gts"]):
        ref = refer.Refs[ref_id]
        assert ref["split"] == "val" and text == ref["sentences"][0]["raw"]
        assert gt.shape == image.shape[:2] and np.array_equal(gt, refer.getMask(ref)["mask"])
    assert not np.array_equal(ex["gts"][0], ex["gts"][1])
    refs = SimpleNamespace(DATA_DIR="d", Refs={1: {"image_id": 7}, 2: {"image_id": 7}, 3: {"image_id": 8}},
                           getRefIds=lambda split: [1, 2, 3])  # fmt: skip
    with pytest.raises(ValueError, match="has 1 images with two or more referred objects; asked for number 1$"):
        demo.dataset_example(refs, "val", index=1)  # image 7, with exactly two, counts; image 8 does not


def test_worst_cases(run, predictor):
    refer = load_refer(run["cfg"])
    refs = [refer.Refs[i] for i in refer.getRefIds(split="val")][:3]
    records = [{"ref_id": r["ref_id"], "sent_id": r["sentences"][0]["sent_id"], "sentence": r["sentences"][0]["raw"],
                "IoU": iou} for r, iou in zip(refs, [0.7, 0.1, 0.4])]  # fmt: skip
    cases = demo.worst_cases(predictor, records, refer, k=2)
    assert [c["sentence"] for c in cases] == [records[1]["sentence"], records[2]["sentence"]]
    for case, record in zip(cases, [records[1], records[2]]):
        assert np.array_equal(case["pred"], predictor.predict(case["image"], [record["sentence"]])[0])
        assert np.array_equal(case["gt"], refer.getMask(refer.Refs[record["ref_id"]])["mask"])
        assert case["iou"] == vis.mask_iou(case["pred"], case["gt"])
        assert case["title"] == f"ref {record['ref_id']}, evaluation IoU {record['IoU']:.3f}"


def test_ensure_results_reads_existing_file_or_evaluates(run, tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "copy"
    run_dir.mkdir(parents=True)
    shutil.copy(run["checkpoint"], run_dir / "best.pth")
    predictor = demo.Predictor.from_checkpoint(run_dir / "best.pth", "cpu")
    path = run_dir / "per_expression_synthetic_unc_testA_each_network64.jsonl"
    path.write_text(json.dumps({"ref_id": 0, "sentence": "x", "IoU": 0.0, "I": 0, "U": 1}) + "\n")
    assert demo.ensure_results(predictor, run_dir / "best.pth", "testA") == path
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pth", path.name], "no evaluation must have run"
    held, real = [], demo.run_evaluation

    def looking(*args, **kwargs):  # the evaluation's lock in the folder while it scores, as main.py --eval holds it
        held.extend(p.name for p in run_dir.iterdir() if p.suffix == ".lock")
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "run_evaluation", looking)
    val = demo.ensure_results(predictor, run_dir / "best.pth", "val")  # missing: evaluated with the model
    assert held == [eval_lock_name()] and not list(run_dir.glob("*.lock"))
    records = [json.loads(line) for line in val.read_text().splitlines()]
    dataset = ReferDataset(run["cfg"].DATA.ROOT, "synthetic", "unc", "val", predictor.tokenizer, eval_mode=True)
    assert len(records) == sum(len(item["sentences"]) for item in dataset)


def test_default_checkpoint_follows_the_demo_config():
    from configs import DEMO_CONFIG

    cfg = get_config(DEMO_CONFIG)
    assert demo.default_checkpoint() == Path(cfg.OUTPUT) / cfg.MODEL_ID / "best.pth"


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_user_images_follow_their_exif_orientation(run, predictor, tmp_path, suffix):
    """A photo stored sideways with orientation 6 ("turn 90 degrees clockwise to show") is predicted upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"sideways{suffix}"
    Image.fromarray(first_image(run["cfg"])).resize((90, 70)).save(path, exif=exif)
    with Image.open(path) as im:
        stored = np.asarray(im.convert("RGB"))  # the pixels as stored, 70 rows of 90
    upright = np.ascontiguousarray(np.rot90(stored, k=-1))  # 90 rows of 70
    texts = ["the red circle", "big star"]
    masks = predictor.predict(path, texts)
    assert masks.shape == (2, 90, 70) and np.array_equal(masks, predictor.predict(upright, texts))
    written = demo.run_demo(None, path, texts, tmp_path / "o.png", tmp_path / "m.png", predictor=predictor)
    assert np.array_equal(written["masks"], masks) and Image.open(written["mask_out"][0]).size == (70, 90)
    as_stored = demo.run_demo(None, path, texts[:1], tmp_path / "o.png", predictor=predictor, exif=False)
    assert np.array_equal(as_stored["masks"], predictor.predict(stored, texts[:1]))  # dataset images: as stored


def test_cli_on_an_official_file(run, predictor, tmp_path):
    """The demo on the model saved in the authors' layout (no config): the same masks as from its own checkpoint."""
    from models import to_official

    official = tmp_path / "lavt.pth"
    torch.save(to_official(predictor.model, "lavt", img_size=SIZE, dataset="synthetic", splitBy="unc"), official)
    cfg = run["cfg"]
    opts = ["MODEL.TEXT.ENCODER", cfg.MODEL.TEXT.ENCODER, "DATA.ROOT", cfg.DATA.ROOT, "MODEL.TEXT.MAX_TOKENS", "12"]
    argv = ["--checkpoint", str(official), "--example", "0", "--out", str(tmp_path / "o.png"), "--device", "cpu"]
    written = demo.main([*argv, "--opts", *opts])
    own = demo.main(["--checkpoint", str(run["checkpoint"]), *argv[2:]])
    assert written["texts"] == own["texts"] and np.array_equal(written["masks"], own["masks"])


def test_expressions_are_checked_as_the_web_page_checks_them(run, predictor, tmp_path, caplog):
    """An expression the tokenizer reads nothing of is refused before anything is written; one longer than the
    model reads is predicted with a WARNING that names it by its number and says what the model reads of it."""
    Image.fromarray(first_image(run["cfg"])).save(tmp_path / "photo.png")
    out = tmp_path / "o.png"
    with pytest.raises(ValueError, match=r"^the expression '😀 🎉' holds no word the tokenizer knows"):
        demo.run_demo(None, tmp_path / "photo.png", ["the red circle", "😀 🎉"], out, predictor=predictor)
    assert not out.exists()
    long = "the small red circle to the left of the big blue star near the top"
    pieces = predictor.tokenizer.tokenize(long)  # [CLS] and the first MAX_TOKENS - 1 word pieces are read
    assert len(pieces) + 2 > MAX_TOKENS
    kept = predictor.tokenizer.convert_tokens_to_string(pieces[: MAX_TOKENS - 1])
    with caplog.at_level(logging.WARNING, logger="tools.demo"):
        demo.run_demo(None, tmp_path / "photo.png", ["the red circle", long], out, predictor=predictor)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"expression 2: the expression has {len(pieces) + 2} tokens, more than the {MAX_TOKENS} the "
                        f"model reads: it reads only {kept!r}"]  # fmt: skip
    assert out.is_file()
