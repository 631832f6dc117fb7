"""CRD: the NCE loss against an independent computation, the memory banks, gradients, config."""

import math

import pytest
import torch
from torch import nn

from kdlab.engine.module import DistillationModule
from kdlab.models import CNN
from kdlab.strategies import Batch, Outputs
from kdlab.strategies.contrastive import CRD
from kdlab.util.errors import KdlabError


def _crd(num_samples: int, dim: int = 3, **kwargs) -> CRD:
    """A CRD reading features "s" and "t" of width ``dim`` with identity heads (no bias), so the
    projections are the normalised inputs."""
    crd = CRD(feat_dim=dim, **kwargs)
    crd.student_paths, crd.teacher_paths = ["s"], ["t"]
    probe = Outputs(torch.zeros(2, 1), {"s": torch.zeros(2, dim), "t": torch.zeros(2, dim)})
    crd.setup(probe, probe, num_samples)
    for head in (crd.student_head, crd.teacher_head):
        with torch.no_grad():
            head.weight.copy_(torch.eye(dim))
            head.bias.zero_()
    return crd


def _unit(*rows):
    return [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in rows]


def _reference_loss(anchors, positives, bank, negatives, tau, log_z=None):
    """CRD's NCE loss with plain Python floats: Z = M · mean exp(score/τ) over the negatives of
    the batch (when not given), h = P / (P + K/M), loss = -log h+ - Σ log(1 - h-)."""
    m, k = len(bank), len(negatives[0])
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    neg_scores = [[dot(a, bank[j]) / tau for j in row] for a, row in zip(anchors, negatives,
                                                                          strict=True)]
    if log_z is None:
        flat = [math.exp(s) for row in neg_scores for s in row]
        log_z = math.log(m * sum(flat) / len(flat))
    h = lambda score: math.exp(score - log_z) / (math.exp(score - log_z) + k / m)  # noqa: E731
    total = 0.0
    for a, p, row in zip(anchors, positives, neg_scores, strict=True):
        total -= math.log(h(dot(a, p) / tau)) + sum(math.log(1 - h(s)) for s in row)
    return total / len(anchors), log_z


@pytest.mark.parametrize("positive", ["bank", "live"])
def test_nce_loss_on_a_hand_made_bank_matches_an_independent_computation(monkeypatch, positive):
    torch.manual_seed(0)
    crd = _crd(4, beta=0.5, nce_t=0.5, nce_mom=0.0, positive=positive)
    s = _unit([1.0, 0.0, 0.0], [0.0, 2.0, 1.0])
    t = _unit([1.0, 1.0, 0.0], [0.0, 1.0, 0.0])
    bank_s = _unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0])
    bank_t = _unit([0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 2.0, 3.0], [-1.0, 0.0, 0.0])
    crd.student_bank.copy_(torch.tensor(bank_s))
    crd.teacher_bank.copy_(torch.tensor(bank_t))
    index, negatives = [0, 2], [[1, 3, 3], [0, 1, 3]]
    monkeypatch.setattr(crd, "sample_negatives", lambda *args: torch.tensor(negatives))
    student = Outputs(torch.zeros(2, 1), {"s": torch.tensor(s) * 3})  # heads normalise
    teacher = Outputs(torch.zeros(2, 1), {"t": torch.tensor(t)})
    batch = Batch(torch.zeros(2, 1), torch.tensor([0, -1]), torch.tensor(index))

    def positives(bank, live):
        # bank: the other side's stored row of the same sample (the authors' code); live: the
        # other network's current embedding
        return [bank[i] for i in index] if positive == "bank" else live

    terms = crd(student, teacher, batch)
    loss_s, z_s = _reference_loss(s, positives(bank_t, t), bank_t, negatives, 0.5)
    loss_t, z_t = _reference_loss(t, positives(bank_s, s), bank_s, negatives, 0.5)
    assert set(terms) == {"crd"}
    assert terms["crd"].item() == pytest.approx(0.5 * (loss_s + loss_t), rel=1e-5)
    assert crd.log_z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)

    # Z stays as estimated on the first batch; the banks now hold the batch (momentum 0)
    terms = crd(student, teacher, batch)
    bank_s[0], bank_s[2], bank_t[0], bank_t[2] = s[0], s[1], t[0], t[1]
    loss_s, _ = _reference_loss(s, positives(bank_t, t), bank_t, negatives, 0.5, log_z=z_s)
    loss_t, _ = _reference_loss(t, positives(bank_s, s), bank_s, negatives, 0.5, log_z=z_t)
    assert terms["crd"].item() == pytest.approx(0.5 * (loss_s + loss_t), rel=1e-5)
    assert crd.log_z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)


def test_defaults_are_the_authors_bank_positive_and_other_class_negatives():
    crd = CRD()
    assert (crd.positive, crd.negative_sampling) == ("bank", "other_classes")


def test_other_classes_negatives_avoid_the_anchors_known_label():
    torch.manual_seed(3)
    crd = _crd(40, num_negatives=30)
    labels = torch.arange(40) % 4  # four classes of ten rows
    crd.labels.copy_(labels)
    index = torch.tensor([0, 5, 10, 39])
    drawn = crd.sample_negatives(index, labels[index])
    assert drawn.shape == (4, 30)
    assert not (labels[drawn] == labels[index][:, None]).any()
    assert not (drawn == index[:, None]).any()
    # an unlabelled anchor (-1) and rows not seen yet (-1) are never rejected
    unlabelled = crd.sample_negatives(torch.tensor([7] * 200), torch.full((200,), -1))
    assert (labels[unlabelled] == labels[7]).any()
    uniform = _crd(40, num_negatives=30, negatives="uniform")
    uniform.labels.copy_(labels)
    same = uniform.sample_negatives(index, labels[index])
    assert (labels[same] == labels[index][:, None]).any()  # uniform: any other sample


def test_other_classes_negatives_are_uniform_over_the_allowed_rows():
    # the clash-only redraw keeps each entry's distribution: uniform over the rows of other
    # classes (here 30 of 40), whatever the round an entry was settled in
    torch.manual_seed(4)
    crd = _crd(40, num_negatives=600)
    labels = torch.arange(40) % 4
    crd.labels.copy_(labels)
    drawn = crd.sample_negatives(torch.zeros(20, dtype=torch.long), torch.zeros(20).long())
    counts = torch.bincount(drawn.flatten(), minlength=40)
    allowed = labels != 0
    assert counts[~allowed].sum() == 0
    expected = drawn.numel() / 30  # 400; a Binomial's std is about 20
    assert counts[allowed].min() > expected - 100 and counts[allowed].max() < expected + 100


def test_other_classes_sampling_stops_after_its_rounds_when_no_row_is_allowed():
    # every other row shares the anchor's label: the redraws give up after REDRAW_ROUNDS
    crd = _crd(6, num_negatives=5)
    crd.labels.fill_(1)
    drawn = crd.sample_negatives(torch.tensor([0, 3]), torch.tensor([1, 1]))
    assert drawn.shape == (2, 5) and not (drawn == torch.tensor([[0], [3]])).any()


def test_the_forward_pass_learns_the_labels_of_the_rows_it_sees():
    crd = _crd(6)
    outputs = Outputs(torch.zeros(3, 1), {"s": torch.randn(3, 3), "t": torch.randn(3, 3)})
    batch = Batch(torch.zeros(3, 1), torch.tensor([2, -1, 0]), torch.tensor([5, 1, 3]))
    crd(outputs, outputs, batch)
    assert crd.labels.tolist() == [-1, -1, -1, 0, -1, 2]
    assert "labels" not in crd.state_dict()  # relearnt in an epoch; checkpoints unchanged


def test_bank_rows_of_the_batch_get_a_momentum_update_and_stay_unit_vectors():
    torch.manual_seed(0)
    crd = _crd(10, dim=4, nce_mom=0.5)
    for bank in (crd.student_bank, crd.teacher_bank):  # random unit vectors to start with
        assert torch.allclose(bank.norm(dim=1), torch.ones(10))
    before_s, before_t = crd.student_bank.clone(), crd.teacher_bank.clone()
    index = torch.tensor([7, 2, 5])
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    batch = Batch(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), index)
    crd(Outputs(torch.zeros(3, 1), {"s": s}), Outputs(torch.zeros(3, 1), {"t": t}), batch)

    for bank, before, new in ((crd.student_bank, before_s, s), (crd.teacher_bank, before_t, t)):
        mixed = 0.5 * before[index] + 0.5 * nn.functional.normalize(new, dim=1)
        assert torch.allclose(bank[index], nn.functional.normalize(mixed, dim=1), atol=1e-6)
        others = torch.tensor([i for i in range(10) if i not in index.tolist()])
        assert torch.equal(bank[others], before[others])
        assert torch.allclose(bank.norm(dim=1), torch.ones(10))


def test_gradients_reach_student_and_heads_not_teacher_and_banks_are_checkpointed():
    torch.manual_seed(0)
    student = CNN([1, 28, 28], 10, channels=[8, 16, 16], hidden=16)
    teacher = CNN([1, 28, 28], 10, channels=[32, 64], hidden=128)
    crd = CRD(num_negatives=50)
    module = DistillationModule(student, 10, torch.optim.SGD, teacher=teacher, strategy=crd,
                                example_input=torch.zeros(2, 1, 28, 28), num_train_samples=200)
    assert crd.student_head.in_features == 16 and crd.teacher_head.in_features == 128
    assert crd.student_bank.shape == crd.teacher_bank.shape == (200, 128)
    params = {id(p) for p in module.trainable_parameters()}
    assert {id(p) for p in (*crd.student_head.parameters(), *crd.teacher_head.parameters())} \
        <= params
    state = module.state_dict()
    assert {"strategy.student_bank", "strategy.teacher_bank", "strategy.log_z"} <= set(state)

    module.train()
    batch = (torch.randn(4, 1, 28, 28), torch.tensor([1, -1, 2, -1]), torch.tensor([3, 9, 0, 199]))
    module.batch_loss(batch)[0].backward()
    for p in (*student.parameters(), *crd.student_head.parameters(),
              *crd.teacher_head.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not torch.isnan(crd.log_z).any()

    # a resumed run gets the banks and Z back (strict loading)
    restored = DistillationModule(CNN([1, 28, 28], 10, channels=[8, 16, 16], hidden=16), 10,
                                  torch.optim.SGD, teacher=teacher, strategy=CRD(),
                                  example_input=torch.zeros(2, 1, 28, 28), num_train_samples=200)
    restored.load_state_dict(module.state_dict())
    for name in ("student_bank", "teacher_bank", "log_z"):
        assert torch.equal(getattr(restored.strategy, name), getattr(crd, name))


def test_num_negatives_larger_than_the_bank_is_clamped_and_never_the_sample_itself():
    crd = _crd(5, num_negatives=100)
    assert crd.negatives == 4
    torch.manual_seed(0)
    index = torch.tensor([0, 4, 2, 2])
    drawn = crd.sample_negatives(index)
    assert drawn.shape == (4, 4)
    assert ((drawn >= 0) & (drawn < 5)).all() and not (drawn == index[:, None]).any()
    many = crd.sample_negatives(torch.full((2000,), 2))
    assert set(many.flatten().tolist()) == {0, 1, 3, 4}  # every other row can be drawn
    batch = Batch(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), torch.tensor([1, 3]))
    outputs = Outputs(torch.zeros(2, 1), {"s": torch.randn(2, 3), "t": torch.randn(2, 3)})
    assert torch.isfinite(crd(outputs, outputs, batch)["crd"])


@pytest.mark.parametrize(("key", "value"), [
    ("beta", -0.1), ("feat_dim", 0), ("feat_dim", 1.5), ("num_negatives", 0),
    ("nce_t", 0.0), ("nce_mom", 1.0), ("nce_mom", -0.5), ("positive", "teacher"),
    ("negatives", "hard"),
])
def test_bad_hyper_parameters_name_the_key(key, value):
    with pytest.raises(KdlabError, match=rf"distill\.{key}={value} must"):
        CRD(**{key: value})


def test_setup_needs_one_layer_per_side_and_the_training_split_size():
    probe = Outputs(torch.zeros(2, 1), {"s": torch.zeros(2, 3), "t": torch.zeros(2, 3)})
    crd = CRD()
    crd.student_paths, crd.teacher_paths = ["s"], ["t"]
    with pytest.raises(KdlabError, match="num_train_samples=0"):
        crd.setup(probe, probe, 0)
    crd.student_paths = ["s", "t"]
    with pytest.raises(KdlabError, match="distill.student_layers=embedding must name one layer"):
        crd.setup(probe, probe, 10)


def test_crd_yaml_learns_in_a_short_run(tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short("crd", tmp_path)
    assert results["strategy"] == "crd"
    assert results["config"]["distill"]["crd"]["_target_"] == "kdlab.strategies.contrastive.CRD"
    assert_learned(results)
