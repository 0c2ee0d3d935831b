"""engine.text_cache.TextFeatureCache: a frozen text encoder's features kept per expression, outside the model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.text_cache import TextFeatureCache
from models import build_model, build_param_groups

from .helpers_model import assert_close, save_tiny_bert, tiny_cfg
from .helpers_train import free_port


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture()
def model(tiny_bert):
    """A model whose text encoder is frozen (MODEL.TEXT.TRAIN_LAYERS 0), in training mode: BERT stays in eval mode
    ('lavt' packaging), as the cache requires."""
    torch.manual_seed(12)
    model = build_model(tiny_cfg(MODEL__TEXT__ENCODER=str(tiny_bert)))
    build_param_groups(model, 0.01, text_train_layers=0)
    return model.train()


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """Three expressions of 4, 6 and 3 tokens padded to 10: [3, 10] ids and attention mask."""
    ids = torch.zeros(3, 10, dtype=torch.long)
    ids[0, :4], ids[1, :6], ids[2, :3] = torch.tensor([2, 10, 11, 3]), torch.tensor([2, 20, 21, 22, 23, 3]), \
        torch.tensor([2, 30, 3])
    return ids, (ids > 0).long()


def _count_runs(encoder: torch.nn.Module) -> list:
    calls = []
    encoder.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].tolist()),
                                  with_kwargs=True)
    return calls


def test_cached_features_equal_the_encoder(model):
    """features() gives encode_text's layout and values; the logits through forward(text=...) equal the uncached
    model's; each distinct expression is encoded once, and hits run no encoder."""
    cache, ids, att = TextFeatureCache(), *_tokens()
    calls = _count_runs(model.text_encoder)
    cache.prime(model.text_encoder, ids[:2], att[:2])
    assert len(cache) == 2 and len(calls) == 1
    with torch.no_grad():
        feats, mask = cache.features(model.text_encoder, ids, att)  # two hits, one miss
        assert len(calls) == 2 and len(cache) == 3 and calls[-1] == [[2, 30, 3]]
        ref_feats, ref_mask = model.encode_text(ids, att)
        assert feats.shape == ref_feats.shape == (3, 32, 6) and torch.equal(mask, ref_mask)
        assert_close(feats * mask.transpose(1, 2), ref_feats * ref_mask.transpose(1, 2))
        assert not feats[2, :, 3:].any()  # padding positions are zeros
        model.eval()
        img = torch.randn(3, 3, 40, 40)
        runs = len(calls)
        cached = model(img, text=cache.features(model.text_encoder, ids, att))
        assert len(calls) == runs  # all hits
        assert_close(cached, model(img, ids, att))
        one = cache.features(model.text_encoder, ids[2:], att[2:])  # alone: trimmed to its own 3 tokens
        assert one[0].shape == (1, 32, 3) and len(calls) == runs + 1
    model.train()  # grads on: the frozen encoder, in eval mode, is accepted
    model(img, text=cache.features(model.text_encoder, ids, att)).sum().backward()


def test_entries_are_keyed_by_autocast_and_device_dtype(model):
    """Priming under bf16 autocast makes entries of their own; bf16 lookups then run no encoder, float32 ones do
    not take them. A model moved to float64 gets new entries, not the float32 ones."""
    cache, ids, att = TextFeatureCache(), *_tokens()
    calls = _count_runs(model.text_encoder)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache.prime(model.text_encoder, ids, att)
        assert len(cache) == 3 and len(calls) == 1
        cache.features(model.text_encoder, ids, att)
    assert len(calls) == 1
    cache.features(model.text_encoder, ids, att)  # float32: computed apart
    assert len(calls) == 2 and len(cache) == 6
    model.to(torch.float64)
    feats, mask = cache.features(model.text_encoder, ids, att)
    assert feats.dtype == mask.dtype == torch.float64 and len(cache) == 9
    cache.clear()
    assert len(cache) == 0
    cache.features(model.text_encoder, ids, att)
    assert len(calls) == 4 and len(cache) == 3


def test_prime_encodes_in_a_fixed_order(model):
    """Whatever order the dataset gives, prime encodes the same batches in the same order (a resumed run primes
    the same features), and skips the expressions already cached."""
    ids, att = _tokens()
    seen = []
    for order in ([0, 1, 2], [2, 0, 1]):
        cache = TextFeatureCache()
        calls = _count_runs(model.text_encoder)
        cache.prime(model.text_encoder, torch.cat([ids[order], ids[:1]]), torch.cat([att[order], att[:1]]),
                    batch_size=2)
        seen.append(list(calls))
    assert seen[0] == seen[1] and len(seen[0]) == 2  # 3 distinct expressions in batches of 2
    assert seen[0][0] == [[2, 30, 3, 0], [2, 10, 11, 3]]  # shortest first
    cache.prime(model.text_encoder, ids, att)
    assert len(calls) == 2


def test_refuses_a_trainable_or_training_encoder(model, tiny_bert):
    cache, ids, att = TextFeatureCache(), *_tokens()
    build_param_groups(model, 0.01, text_train_layers=1)
    with pytest.raises(RuntimeError) as refused:
        cache.features(model.text_encoder, ids, att)
    assert str(refused.value) == (
        "the text feature cache (MODEL.TEXT.CACHE) needs a frozen text encoder, but some of its parameters require "
        "gradients: freeze them (MODEL.TEXT.TRAIN_LAYERS 0), or train without the cache"
    )
    with pytest.raises(RuntimeError, match="needs a frozen text encoder"):
        cache.prime(model.text_encoder, ids, att)
    with torch.no_grad():  # an evaluation: nothing learns, so the entries cannot go stale
        cache.prime(model.text_encoder, ids, att)
        assert len(cache) == 3 and cache.features(model.text_encoder, ids, att)[0].shape[0] == len(ids)
    one = build_model(tiny_cfg(MODEL__NAME="lavt_one", MODEL__TEXT__ENCODER=str(tiny_bert)))
    build_param_groups(one, 0.01, text_train_layers=0)
    one.train()  # lavt_one: BERT's dropout on while training
    cache.prime(one.text_encoder, ids, att)  # priming computes eval-mode features whatever the mode
    assert one.text_encoder.training
    advice = r"\(MODEL\.TEXT\.DROPOUT disabled, or MODEL\.NAME lavt\), or train without the cache$"  # the config's keys
    with pytest.raises(RuntimeError, match="in training mode, so its dropout is on.*" + advice):
        cache.features(one.text_encoder, ids, att)


def _many_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """Nine distinct expressions of 2 to 9 tokens (three of 2), each given twice: [18, 12] ids and attention mask."""
    rows = [[2, 5 + i, *range(20 + i, 20 + i + n), 3] for i, n in enumerate([0, 0, 0, 1, 2, 3, 4, 5, 7])]
    ids = torch.zeros(2 * len(rows), 12, dtype=torch.long)
    for r, row in enumerate(rows + rows[::-1]):
        ids[r, : len(row)] = torch.tensor(row)
    return ids, (ids > 0).long()


def _prime_shard(rank: int, world: int, port: int, bert: str, out: str) -> None:
    """One process of a Gloo group: prime a cache with _many_tokens() in batches of 2, then a second one with rank 1
    holding one expression more; write the first's entries and the batches its encoder ran, and each one's error,
    to ``out``/rank<r>.pt. (Both in one launch: starting the processes is most of the test's time.)"""
    from transformers import BertModel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    encoder = BertModel.from_pretrained(bert).requires_grad_(False)
    calls = _count_runs(encoder)
    results = []
    for extra in (False, True):
        ids, att = _many_tokens()
        if extra and rank == 1:
            ids, att = torch.cat([ids, torch.full((1, 12), 7)]), torch.cat([att, torch.ones(1, 12, dtype=torch.long)])
        cache, error = TextFeatureCache(), None
        try:
            cache.prime(encoder, ids, att, batch_size=2)
        except RuntimeError as e:
            error = str(e)
        results.append({"store": {k[1:]: v for k, v in cache._store.items()}, "calls": list(calls), "error": error})
    dist.destroy_process_group()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_processes_share_the_priming(tiny_bert, tmp_path):
    """Under torch.distributed (2 Gloo processes) each process encodes every other batch of the single-process
    order and ends with all the features, equal to one process's; processes that would prime different
    expressions stop with one line, every one of them."""
    from transformers import BertModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the two processes: the same kernels, so the same bits
    try:
        encoder = BertModel.from_pretrained(tiny_bert).requires_grad_(False)
        calls = _count_runs(encoder)
        single = TextFeatureCache()
        single.prime(encoder, *_many_tokens(), batch_size=2)
    finally:
        torch.set_num_threads(threads)
    assert len(single) == 9 and len(calls) == 5  # batches of 2, the last one alone

    mp.spawn(_prime_shard, args=(2, free_port(), str(tiny_bert), str(tmp_path)), nprocs=2)
    shared, different = zip(*[torch.load(tmp_path / f"rank{r}.pt") for r in range(2)])
    assert [r["calls"] for r in shared] == [calls[0::2], calls[1::2]]  # batches 0, 2, 4 and 1, 3
    expected = {k[1:]: v for k, v in single._store.items()}
    for r in shared:
        assert r["error"] is None and r["store"].keys() == expected.keys()
        assert all(torch.equal(r["store"][k], v) for k, v in expected.items())

    errors = [r["error"] for r in different]
    assert errors[0] == errors[1] and "processes would prime different expressions (counts [9, 10])" in errors[0]
    assert "\n" not in errors[0]
