"""The exact-view teacher cache: stored augmented views, their rendering, their schedule, and a
student that trains on exactly the view whose cached teacher outputs it reads."""

from __future__ import annotations

import logging

import pytest
import torch

from kdlab.data.augment import shift_flip
from kdlab.data.loader import BatchLoader
from kdlab.data.views import ViewBank, view_schedule
from kdlab.engine import cache as cache_module
from kdlab.engine.cache import prepare_cache
from kdlab.engine.module import DistillationModule
from kdlab.engine.taps import Taps
from kdlab.models import CNN
from kdlab.modes.build import cache_options
from kdlab.train import run
from kdlab.util.errors import KdlabError


def test_a_stored_shift_and_flip_moves_a_pixel_where_the_parameters_say():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 5] = 1.0
    bank = ViewBank.draw(1, 1, 8, 8, shift=2, flip=True)
    bank.flipped[0, 0], bank.dy[0, 0], bank.dx[0, 0] = True, 0, 3
    out = bank.render(x, torch.tensor([0]), torch.tensor([0]), fill=-1.0)
    # flip: column 5 -> 2; crop at offset (0, 3) of the 2-pixel padding: row +2, column -1
    assert out[0, 0, 4, 1] == 1.0 and out.eq(1.0).sum() == 1
    assert out[0, 0, :2].eq(-1.0).all()  # the rows shifted in are the fill value
    # offsets (pad, pad) and no flip: the image itself
    bank.flipped[0, 0], bank.dy[0, 0], bank.dx[0, 0] = False, 2, 2
    assert torch.equal(bank.render(x, torch.tensor([0]), torch.tensor([0]), -1.0), x)


def test_mixup_and_cutmix_views_mix_with_the_stored_partner():
    x = torch.randn(4, 2, 6, 6)
    fill = 0.0
    mixup = ViewBank.draw(4, 3, 6, 6, shift=1, flip=True, mix="mixup", seed=3)
    index, view = torch.tensor([0, 2, 3]), torch.tensor([2, 0, 1])
    partner = mixup.partner[index, view].long()
    lam = mixup.lam[index, view][:, None, None, None]
    own = shift_flip(x[index], 1, fill, mixup.flipped[index, view], mixup.dy[index, view],
                     mixup.dx[index, view])
    other = shift_flip(x[partner], 1, fill, mixup.flipped[partner, view],
                       mixup.dy[partner, view], mixup.dx[partner, view])
    torch.testing.assert_close(mixup.render(x, index, view, fill), lam * own + (1 - lam) * other)
    assert ((mixup.lam > 0) & (mixup.lam < 1)).all()

    cut = ViewBank.draw(4, 3, 6, 6, shift=0, flip=False, mix="cutmix", seed=3)
    out = cut.render(x, index, view, fill)
    for i, (j, v) in enumerate(zip(index.tolist(), view.tolist())):
        top, bottom, left, right = cut.box[j, v].tolist()
        p = int(cut.partner[j, v])
        expected = x[j].clone()
        expected[:, top:bottom, left:right] = x[p][:, top:bottom, left:right]
        assert torch.equal(out[i], expected)


def test_a_bank_is_a_function_of_its_seed_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = ViewBank.draw(50, 4, 28, 28, 2, True, "mixup", 0.4, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = ViewBank.draw(50, 4, 28, 28, 2, True, "mixup", 0.4, seed=7)
    c = ViewBank.draw(50, 4, 28, 28, 2, True, "mixup", 0.4, seed=8)
    assert a.digest() == b.digest() != c.digest()
    assert int(a.dy.min()) == 0 and int(a.dy.max()) == 4  # offsets cover 0..2*shift


def test_every_view_of_a_sample_is_shown_once_per_views_appearances():
    n, views = 30, 4
    indices = torch.arange(n).repeat(3)[:80]  # samples 0..19 three times an epoch, others twice
    shown: dict[int, list[int]] = {j: [] for j in range(n)}
    for epoch in range(4):
        order = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(
            epoch))]
        for j, v in zip(order.tolist(), view_schedule(order, epoch, views, n, seed=1).tolist()):
            shown[j].append(v)
    for j, seen in shown.items():
        for start in range(0, len(seen) - views + 1, views):  # each block of 4: all 4 views
            assert sorted(seen[start:start + views]) == list(range(views)), (j, seen)


def test_a_loaders_epoch_with_views_does_not_depend_on_what_ran_before():
    x, y = torch.randn(40, 1, 4, 4), torch.arange(40)

    def loader():
        return BatchLoader(x, y, torch.arange(40), 16, shuffle=True, seed=2,
                           views=lambda order, epoch: view_schedule(order, epoch, 3, 40, 2))

    a = loader()
    for epoch in range(3):
        a.set_epoch(epoch)
        first = list(a)
    fresh = loader()
    fresh.set_epoch(2)  # a resumed run starts at its epoch
    again = list(fresh)
    assert all(len(b) == 4 for b in first)
    for b1, b2 in zip(first, again):
        assert all(torch.equal(t1, t2) for t1, t2 in zip(b1, b2))


KD = ["distill=kd", "baseline=false", "trainer.max_epochs=2", "steps_per_call=4",
      "trainer.limit_train_batches=8", "data.augment=true", "teacher_cache.views=2",
      "teacher_cache.dtype=float16"]


def test_the_student_trains_on_exactly_the_view_whose_cached_outputs_it_reads(
        fast_cfg, monkeypatch, caplog):
    """The exactness test: in a whole run with augmentation, every training batch is the
    bank's rendering of its (sample, view) pairs, and the cached teacher outputs looked up for
    it equal the live teacher's outputs on that very batch (to float16 rounding)."""
    checked = []
    terms = DistillationModule._terms

    def spy(self, x, y, index, view=None):
        if self.teacher_cache is not None:
            data = self.trainer.datamodule
            data = getattr(data, "data", data)  # the chunked wrapper's datamodule
            assert view is not None
            rendered = data.render_views(self.teacher_cache.bank, index, view)
            assert torch.equal(x, self._input(rendered))
            with torch.no_grad():
                live = self.teacher(x)
            cached = self.teacher_cache.lookup(index, view).logits
            torch.testing.assert_close(cached, live, rtol=2e-3, atol=2e-3)
            raw = data.x_train[index]
            checked.append(not torch.equal(rendered, raw))
        return terms(self, x, y, index, view)

    monkeypatch.setattr(DistillationModule, "_terms", spy)
    with caplog.at_level(logging.INFO, logger="kdlab"):
        results = run(fast_cfg(*KD))
    assert len(checked) == 16 and all(checked)  # 2 epochs x 8 batches, all augmented
    assert "× 2 augmented views" in caplog.text
    assert "augmented views from a bank of 2 per sample" in caplog.text
    assert results["student"]["metrics"]["test/acc"] > 0.3  # learns (10 classes)


def test_the_bank_is_reused_by_a_later_run_and_keyed_by_its_views(fast_cfg, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdlab.engine.cache")
    run(fast_cfg(*KD))
    files = sorted((tmp_path / "teachers" / "cache").glob("*.pt"))
    assert len(files) == 1 and not list(files[0].parent.glob("*.partial*"))
    caplog.clear()
    run(fast_cfg(*KD, "seed=1"))  # another student seed: same teacher, data and views
    assert f"reusing {files[0]}" in caplog.text and "× 2 views" in caplog.text
    run(fast_cfg(*KD, "teacher_cache.view_seed=1"))  # other views: another entry
    assert len(list((tmp_path / "teachers" / "cache").glob("*.pt"))) == 2


class _Data:
    """An augmented in-memory datamodule, reduced to what the cache reads."""

    def __init__(self, n: int = 60) -> None:
        self.x_train = torch.randn(n, 1, 28, 28)
        self.augmented, self.mix, self.black = True, "none", 0.0

    def draw_views(self, views: int, seed: int) -> ViewBank:
        return ViewBank.draw(len(self.x_train), views, 28, 28, 2, True, seed=seed)

    def render_views(self, bank, index, view, images=None):
        return bank.render(self.x_train, index, view, self.black, images)


def test_an_interrupted_build_continues_where_it_stopped(fast_cfg, monkeypatch, caplog):
    torch.manual_seed(0)
    teacher = CNN([1, 28, 28], 10, channels=[4, 8], hidden=16).eval()
    data = _Data()
    options = cache_options(fast_cfg("teacher_cache.views=4", "teacher_cache.dtype=float32"))
    reference = prepare_cache(cache_options(fast_cfg("teacher_cache.views=4",
                                                     "teacher_cache.disk=false",
                                                     "teacher_cache.dtype=float32")),
                              teacher, Taps(teacher, []), data, False)
    monkeypatch.setattr(cache_module, "PARTIAL_EVERY_S", 0.0)
    calls = [0]
    compute = cache_module.compute_outputs

    def dies_in_the_third_view(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:  # the size probe, views 1 and 2, then view 3
            raise KeyboardInterrupt  # killed while computing view 3 of 4
        return compute(*args, **kwargs)

    monkeypatch.setattr(cache_module, "compute_outputs", dies_in_the_third_view)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(options, teacher, Taps(teacher, []), data, False)
    partial = list(options.folder.glob("*.partial.pt"))
    assert len(partial) == 1
    monkeypatch.setattr(cache_module, "compute_outputs", compute)
    with caplog.at_level(logging.INFO, logger="kdlab.engine.cache"):
        resumed = prepare_cache(options, teacher, Taps(teacher, []), data, False)
    assert "continuing an interrupted build at view 3 of 4" in caplog.text
    torch.testing.assert_close(resumed.logits, reference.logits)
    assert not list(options.folder.glob("*.partial*"))  # removed once the entry is saved
    # rows are (sample, view) pairs: a lookup reads view v of sample j
    index, view = torch.tensor([5, 0, 59]), torch.tensor([3, 1, 0])
    x = data.render_views(resumed.bank, index, view)
    with torch.no_grad():
        torch.testing.assert_close(resumed.lookup(index, view).logits, teacher(x))
    with pytest.raises(KdlabError, match="did not say which views"):
        resumed.lookup(index)


def test_views_too_large_for_the_budget_run_live_and_bad_values_name_the_key(fast_cfg, caplog):
    teacher = CNN([1, 28, 28], 10, channels=[4, 8], hidden=16).eval()
    budget = 60 * 10 * 2 * 4 / 2**20  # room for 4 views of float16 logits, not 8
    options = cache_options(fast_cfg(f"teacher_cache.max_mb={budget * 1.01}",
                                     "teacher_cache.views=8"))
    with caplog.at_level(logging.INFO, logger="kdlab.engine.cache"):
        assert prepare_cache(options, teacher, None, _Data(), False) is None
    assert "logits for 8 views per sample would take" in caplog.text
    for bad in ("teacher_cache.views=-1", "teacher_cache.views=2.5",
                "teacher_cache.view_seed=abc"):
        with pytest.raises(KdlabError, match=bad.split("=")[0]):
            cache_options(fast_cfg(bad))


def test_mutual_learning_whose_teachers_change_keeps_fresh_random_views(fast_cfg, caplog):
    with caplog.at_level(logging.INFO, logger="kdlab"):
        results = run(fast_cfg("mode=mutual", "data.augment=true", "baseline=false",
                               "trainer.max_epochs=1", "trainer.limit_train_batches=4",
                               "steps_per_call=1"))
    assert "Teacher cache" not in caplog.text and "from a bank" not in caplog.text
    assert [s["stage"] for s in results["stages"]] == ["member0", "member1"]


def test_a_stopped_run_on_stored_views_resumes_to_the_uninterrupted_weights(fast_cfg, tmp_path,
                                                                           monkeypatch, caplog):
    """Which view a sample shows depends only on the epoch and its order, so a run stopped
    inside its second epoch and continued from its last checkpoint ends with the weights of a
    run that was never stopped."""
    args = [*KD, "steps_per_call=1", "trainer.deterministic=true", "scheduler=none"]
    done = run(fast_cfg(*args, tmp=tmp_path / "a"))
    seen = [0]
    terms = DistillationModule._terms

    def stops(self, x, y, index, view=None):
        if self.teacher is not None and self.current_epoch == 1:
            seen[0] += 1
            if seen[0] == 3:
                raise KeyboardInterrupt  # Ctrl-C inside the student's second epoch
        return terms(self, x, y, index, view)

    monkeypatch.setattr(DistillationModule, "_terms", stops)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run(fast_cfg(*args, tmp=tmp_path / "b"))
    monkeypatch.setattr(DistillationModule, "_terms", terms)
    with caplog.at_level(logging.INFO, logger="kdlab"):
        resumed = run(fast_cfg(*args, tmp=tmp_path / "b"))  # the same command again
    assert "run/checkpoints/last.ckpt" in caplog.text  # the student continued, not redone
    a = torch.load(done["student"]["last_ckpt"], weights_only=True)["state_dict"]
    b = torch.load(resumed["student"]["last_ckpt"], weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tapped_features_of_every_view_are_cached_when_they_fit(fast_cfg):
    torch.manual_seed(0)
    teacher = CNN([1, 28, 28], 10, channels=[4, 8], hidden=16).eval()
    data, taps = _Data(20), Taps(teacher, ["stages.0"])
    cache = prepare_cache(cache_options(fast_cfg("teacher_cache.views=3",
                                                 "teacher_cache.dtype=float32")),
                          teacher, taps, data, False)
    assert cache.features["stages.0"].shape[0] == 20 * 3
    index, view = torch.tensor([19, 4, 4]), torch.tensor([0, 2, 1])
    with torch.no_grad():
        teacher(data.render_views(cache.bank, index, view))
    live = taps.pop()["stages.0"]
    torch.testing.assert_close(cache.lookup(index, view).features["stages.0"], live)
