import pytest
import torch

from utils.amp import NativeScaler, autocast


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_float32_scaler_is_a_plain_step():
    m1, o1 = _setup()
    m2, o2 = _setup()
    x = torch.randn(3, 4)
    m1(x).pow(2).sum().backward()
    ref_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in m1.parameters()]))
    o1.step()
    norm = NativeScaler("")(m2(x).pow(2).sum(), o2, m2.parameters())
    assert norm.item() == pytest.approx(ref_norm.item(), rel=1e-6)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_clipping_limits_the_step():
    model, opt = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    norm = NativeScaler("")(model(torch.randn(3, 4)).sum() * 1000, opt, model.parameters(), clip_grad=1.0)
    assert norm.item() > 1.0  # the norm before clipping is returned
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert torch.linalg.vector_norm(step).item() == pytest.approx(0.1, rel=1e-4)  # lr * clipped norm 1


def test_step_without_the_norm_steps_the_same():
    """norm=False: no norm returned, the same update; clipping computes it anyway (it needs it)."""
    m1, o1 = _setup()
    m2, o2 = _setup()
    x = torch.randn(3, 4)
    for m in (m1, m2):
        m(x).pow(2).sum().backward()
    assert NativeScaler("").step(o1, list(m1.parameters())) is not None
    assert NativeScaler("").step(o2, list(m2.parameters()), norm=False) is None
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    m2(x).sum().mul(1000).backward()
    ref = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in m2.parameters()]))
    clipped = NativeScaler("").step(o2, list(m2.parameters()), clip_grad=1.0, norm=False)
    assert clipped.item() == pytest.approx(ref.item(), rel=1e-6)


def test_fp16_scaler_state_round_trip():
    model, opt = _setup()
    s = NativeScaler("fp16", "cpu")
    with autocast("fp16", "cpu"):
        loss = model(torch.randn(3, 4)).float().sum()
    s(loss, opt, model.parameters())
    state = s.state_dict()
    assert state["amp"] == "fp16" and "scale" in state
    s2 = NativeScaler("fp16", "cpu")
    s2.load_state_dict(state)
    assert s2.state_dict() == state
    with pytest.raises(ValueError, match="TRAIN.AMP='fp16', this run uses TRAIN.AMP='bf16'"):
        NativeScaler("bf16").load_state_dict(state)


def test_a_scaler_state_without_its_precision_is_float32s():
    """A state without the ``amp`` key (what a disabled torch GradScaler saves: ``{}``) is a float32 run's: it loads
    into one, and an fp16 run refuses it."""
    assert torch.amp.GradScaler("cpu", enabled=False).state_dict() == {}
    float32 = NativeScaler("")
    float32.load_state_dict({})
    assert float32.state_dict() == {"amp": ""}
    with pytest.raises(ValueError, match="^scaler state is for TRAIN.AMP='', this run uses TRAIN.AMP='fp16'$"):
        NativeScaler("fp16", "cpu").load_state_dict({})


def test_bf16_autocast_on_cpu():
    model, _ = _setup()
    with autocast("bf16", "cpu"):
        y = model(torch.randn(3, 4))
    assert y.dtype == torch.bfloat16
    with autocast("", "cpu"):
        assert model(torch.randn(3, 4)).dtype == torch.float32
    with autocast("fp16", "cpu"):  # (torch's CPU autocast alone would pick bf16)
        assert model(torch.randn(3, 4)).dtype == torch.float16
    with pytest.raises(ValueError, match="TRAIN.AMP must be one of"):
        NativeScaler("fp8")


def test_amp_dtype_names_the_products_precision():
    from utils.amp import amp_dtype

    assert [amp_dtype(a) for a in ("", "bf16", "fp16")] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="TRAIN.AMP must be one of"):
        amp_dtype("auto")  # resolved first (resolve_amp): it depends on the device


def test_resolve_auto_amp(monkeypatch):
    from utils.amp import resolve_amp

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_amp("auto", "cpu") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_amp("auto", "cpu") == ""  # emulated bf16 would be slower than float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_amp("auto", "cpu") == "bf16"  # AMX alone (a Xeon whose torch reports no AVX-512 bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_amp("", "cpu") == ""
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    with pytest.raises(ValueError) as slow:
        resolve_amp("fp16", "cpu")
    assert str(slow.value) == (
        "fp16 needs a GPU or a CPU with AMX-FP16: this CPU emulates fp16 products, many times slower than bf16 or "
        "float32 (TRAIN.AMP, --amp: use bf16 or auto)"
    )
    assert resolve_amp("fp16", "cuda") == "fp16"  # (resolving asks nothing of the GPU)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: True)
    assert resolve_amp("fp16", "cpu") == "fp16"
    with pytest.raises(ValueError, match="TRAIN.AMP must be one of .* or 'auto', got 'fp8'"):
        resolve_amp("fp8", "cpu")


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_a_gpu_asks_the_gpu(monkeypatch, supported):
    """TRAIN.AMP auto on CUDA is bf16 where the GPU computes it (CUDA stubbed), whatever the CPU can."""
    from utils.amp import resolve_amp

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: not supported)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: not supported)
    assert resolve_amp("auto", "cuda") == ("bf16" if supported else "")
    assert resolve_amp("auto", torch.device("cuda", 0)) == ("bf16" if supported else "")
