"""FT (factor transfer): the loss formula, the two stages' gradients, validation, end to end."""

import math

import pytest
import torch

from kdlab.engine.module import DistillationModule
from kdlab.models import CNN
from kdlab.strategies import Batch, Outputs
from kdlab.strategies.paraphrase import FT, factor_transfer_loss
from kdlab.util.errors import KdlabError


def _ft(student_shape, teacher_shape, **kwargs) -> FT:
    """An FT whose single student / teacher layer are keyed ``s`` / ``t``, set up from shapes."""
    torch.manual_seed(0)
    ft = FT(**kwargs)
    ft.student_paths, ft.teacher_paths = ["s"], ["t"]
    ft.setup(Outputs(torch.zeros(2, 3), {"s": torch.zeros(student_shape)}),
             Outputs(torch.zeros(2, 3), {"t": torch.zeros(teacher_shape)}), 10)
    return ft


def _io(s, t):
    batch = Batch(torch.zeros(len(s), 1), torch.zeros(len(s), dtype=torch.long),
                  torch.arange(len(s)))
    return Outputs(torch.zeros(2, 3), {"s": s}), Outputs(torch.zeros(2, 3), {"t": t}), batch


def _unit(values):
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def test_factor_loss_is_the_mean_abs_difference_of_l2_normalised_factors():
    s = torch.tensor([[[[1.0, 2.0]], [[0.0, -2.0]]], [[[3.0, 0.0]], [[4.0, 0.0]]]])  # [2,2,1,2]
    t = torch.tensor([[[[2.0, 0.0]], [[1.0, 2.0]]], [[[0.0, 1.0]], [[1.0, 1.0]]]])
    expected_p1, expected_p2 = 0.0, 0.0
    for n in range(2):
        us, ut = _unit(s[n].flatten().tolist()), _unit(t[n].flatten().tolist())
        expected_p1 += sum(abs(a - b) for a, b in zip(us, ut)) / 4 / 2
        expected_p2 += sum((a - b) ** 2 for a, b in zip(us, ut)) / 4 / 2
    assert factor_transfer_loss(s, t, 1).item() == pytest.approx(expected_p1, rel=1e-6)
    assert factor_transfer_loss(s, t, 2).item() == pytest.approx(expected_p2, rel=1e-6)
    assert factor_transfer_loss(t, t, 1).item() == pytest.approx(0.0, abs=1e-7)


def _normalised_difference(s, t, factor):
    """Per sample, the difference of the L2-normalised φ(t) and φ(s) as Python lists: φ is the
    flattened factor (``full``) or ``mean_c F_c²`` per position (``channel_mean_sq``)."""
    out = []
    for n in range(len(s)):
        if factor == "full":
            fs, ft = s[n].flatten().tolist(), t[n].flatten().tolist()
        else:
            fs, ft = ([sum(float(x[n, c, i, j]) ** 2 for c in range(x.shape[1])) / x.shape[1]
                       for i in range(x.shape[2]) for j in range(x.shape[3])] for x in (s, t))
        out.append([a - b for a, b in zip(_unit(ft), _unit(fs))])
    return out


@pytest.mark.parametrize("factor", ["full", "channel_mean_sq"])
@pytest.mark.parametrize("distance", ["mean", "norm"])
@pytest.mark.parametrize("p", [1, 2])
def test_factor_loss_variants_match_their_formulas(factor, distance, p):
    g = torch.Generator().manual_seed(11)
    s = torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64)
    t = torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64)
    per_sample = []
    for diff in _normalised_difference(s, t, factor):
        if distance == "mean":  # (1/d) Σ |Δ|^p
            per_sample.append(sum(abs(x) ** p for x in diff) / len(diff))
        else:  # ‖Δ‖_p, the paper's norm
            per_sample.append(sum(abs(x) ** p for x in diff) ** (1 / p))
    expected = sum(per_sample) / len(per_sample)
    loss = factor_transfer_loss(s, t, p, factor, distance).item()
    assert loss == pytest.approx(expected, rel=1e-10)


def test_factor_loss_norm_with_p1_is_d_times_the_mean():
    g = torch.Generator().manual_seed(12)
    s = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    ratio = factor_transfer_loss(s, t, 1, distance="norm") / factor_transfer_loss(s, t, 1)
    assert ratio.item() == pytest.approx(3 * 2 * 2, rel=1e-12)  # d = C·H·W of the factor


def test_ft_keys_reach_the_main_stage_loss():
    ft = _ft((2, 4, 3, 3), (2, 6, 3, 3), beta=2.0, p=2, distance="norm",
             factor="channel_mean_sq")
    torch.manual_seed(3)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    with torch.no_grad():
        fs, ft_ = ft.translator(s), ft.paraphraser.encoder(t)
    expected = 2.0 * factor_transfer_loss(fs, ft_, 2, "channel_mean_sq", "norm")
    assert ft(*_io(s, t))["ft"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_factor_loss_pools_the_larger_map_to_the_smaller():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 4, 4)
    t_pooled = t.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))  # 2×2 blocks averaged
    expected = 0.0
    for n in range(2):
        us, ut = _unit(s[n].flatten().tolist()), _unit(t_pooled[n].flatten().tolist())
        expected += sum(abs(a - b) for a, b in zip(us, ut)) / 12 / 2
    assert factor_transfer_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert factor_transfer_loss(t, s).item() == pytest.approx(expected, rel=1e-5)


def test_connectors_are_built_from_the_shapes():
    ft = _ft((2, 16, 3, 3), (2, 64, 7, 7), rate=0.5)
    factor = ft.paraphraser.encoder(torch.zeros(2, 64, 7, 7))
    assert factor.shape == (2, 32, 7, 7)
    assert ft.paraphraser(torch.zeros(2, 64, 7, 7)).shape == (2, 64, 7, 7)
    assert ft.translator(torch.zeros(2, 16, 3, 3)).shape == (2, 32, 3, 3)
    assert _ft((2, 4, 3, 3), (2, 3, 5, 5), rate=0.1).translator[-2].out_channels == 1
    with pytest.raises(KdlabError, match=r"distill.teacher_layers: FT needs a feature map"):
        _ft((2, 4, 3, 3), (2, 8), rate=0.5)


def test_main_stage_loss_is_beta_times_ft_of_translator_and_paraphraser_factors():
    ft = _ft((2, 4, 3, 3), (2, 6, 5, 5), beta=7.0)
    torch.manual_seed(2)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 5, 5).abs()
    terms = ft(*_io(s, t))
    assert set(terms) == {"ft"}
    with torch.no_grad():
        fs = ft.translator(s)  # [2, 3, 3, 3]
        ft_ = torch.nn.functional.adaptive_avg_pool2d(ft.paraphraser.encoder(t), 3)
    expected = 0.0
    for n in range(2):
        us, ut = _unit(fs[n].flatten().tolist()), _unit(ft_[n].flatten().tolist())
        expected += 7.0 * sum(abs(a - b) for a, b in zip(us, ut)) / 27 / 2
    assert terms["ft"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("reconstruction", ["l1", "mse"])
def test_pre_stage_is_the_reconstruction_loss_and_trains_only_the_paraphraser(reconstruction):
    ft = _ft((2, 4, 3, 3), (2, 6, 5, 5), reconstruction=reconstruction)
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 6, 5, 5, requires_grad=True)
    terms = ft.init_loss(*_io(s, t))
    assert set(terms) == {"ft_rec"}
    with torch.no_grad():
        rec = ft.paraphraser.decoder(ft.paraphraser.encoder(t))
    power = 1 if reconstruction == "l1" else 2  # l1: the authors' nn.L1Loss (the default)
    expected = sum(abs(a - b) ** power
                   for a, b in zip(rec.flatten().tolist(), t.flatten().tolist()))
    assert terms["ft_rec"].item() == pytest.approx(expected / t.numel(), rel=1e-5)
    terms["ft_rec"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ft.paraphraser.parameters())
    assert all(p.grad is None for p in ft.translator.parameters())
    assert s.grad is None and t.grad is None


def test_main_stage_trains_student_and_translator_not_paraphraser_nor_teacher():
    ft = _ft((2, 4, 3, 3), (2, 6, 5, 5))
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 6, 5, 5, requires_grad=True)
    ft(*_io(s, t))["ft"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ft.translator.parameters())
    assert all(p.grad is None for p in ft.paraphraser.parameters())
    assert t.grad is None


def test_two_stages_in_the_training_step_with_differing_stages():
    torch.manual_seed(0)
    student = CNN([1, 28, 28], 10, channels=[8, 16, 16], hidden=16)
    teacher = CNN([1, 28, 28], 10)
    ft = FT(init_epochs=1)
    module = DistillationModule(student, 10, torch.optim.SGD, teacher=teacher, strategy=ft,
                                example_input=torch.zeros(2, 1, 28, 28))
    assert ft.translator[0].in_channels == 16 and ft.translator[-2].out_channels == 32
    batch = (torch.randn(4, 1, 28, 28), torch.tensor([1, -1, 2, 3]), torch.arange(4))
    loss, terms = module.batch_loss(batch)  # epoch 0: the pre-stage
    loss.backward()
    assert {"ft_rec"} == set(terms)
    assert all(p.grad is not None for p in ft.paraphraser.parameters())
    assert all(p.grad is None for p in [*ft.translator.parameters(), *student.parameters()])
    module.zero_grad(set_to_none=True)
    type(module).current_epoch = property(lambda self: 1)
    try:
        loss, terms = module.batch_loss(batch)
        loss.backward()
    finally:
        del type(module).current_epoch
    assert {"ce", "ft"} == set(terms)
    assert all(p.grad is None for p in ft.paraphraser.parameters())
    assert all(p.grad is not None for p in ft.translator.parameters())
    assert student.stages[-1][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("kwargs, key", [
    ({"beta": -1.0}, "distill.beta=-1.0"),
    ({"rate": 0.0}, "distill.rate=0.0"),
    ({"p": 3}, "distill.p=3"),
    ({"init_epochs": -1}, "distill.init_epochs=-1"),
    ({"init_epochs": 1.5}, "distill.init_epochs=1.5"),
    ({"distance": "max"}, "distill.distance=max"),
    ({"factor": "attention"}, "distill.factor=attention"),
    ({"reconstruction": "l2"}, "distill.reconstruction=l2"),
])
def test_bad_hyper_parameters_name_the_key(kwargs, key):
    with pytest.raises(KdlabError, match=key):
        FT(**kwargs)


def test_a_short_run_learns(tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short("ft", tmp_path, "trainer.max_epochs=2")  # paraphraser, then FT
    assert_learned(results)
