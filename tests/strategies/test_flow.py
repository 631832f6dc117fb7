"""FSP and KDSVD: losses against their formulas computed independently (plain Python, einsum,
NumPy), gradient paths, the SVD backward, hyper-parameter checks and a short run of each
config that learns."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.strategies.flow import FSP, KDSVD, left_singular, top_singular
from kdlab.util.errors import KdlabError
from tests.strategies.harness import connect as _connect


def _maps(seed, *shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


# -- FSP -----------------------------------------------------------------------------------------
def _fsp_python(first, second):
    """Yim et al.: G[a][b] = Σ_{h,w} F1[a,h,w]·F2[b,h,w] / (h·w), one sample, F1 pooled by an
    integer factor to F2's size."""
    h, w = len(second[0]), len(second[0][0])
    fh, fw = len(first[0]) // h, len(first[0][0]) // w
    pooled = [[[sum(ch[i * fh + a][j * fw + b] for a in range(fh) for b in range(fw)) / (fh * fw)
                for j in range(w)] for i in range(h)] for ch in first]
    return [[sum(pooled[a][i][j] * second[b][i][j] for i in range(h) for j in range(w)) / (h * w)
             for b in range(len(second))] for a in range(len(first))]


def test_fsp_matches_the_formula_in_both_stages():
    student = _maps(0, (2, 2, 4, 4), (2, 3, 2, 2), (2, 2, 1, 1))
    teacher = _maps(1, (2, 2, 2, 2), (2, 3, 1, 1), (2, 2, 1, 1))  # equal widths: no connector
    fsp = FSP(beta=7.0, init_epochs=2)
    s_out, t_out, batch = _connect(fsp, student, teacher)
    assert all(isinstance(c, nn.Identity) for c in fsp.connectors)
    expected = 0.0
    for i in range(2):  # consecutive pairs (0, 1) and (1, 2)
        squares, count = 0.0, 0
        for n in range(2):
            g_s = _fsp_python(student[i][n].tolist(), student[i + 1][n].tolist())
            g_t = _fsp_python(teacher[i][n].tolist(), teacher[i + 1][n].tolist())
            for row_s, row_t in zip(g_s, g_t):
                squares += sum((a - b) ** 2 for a, b in zip(row_s, row_t))
                count += len(row_s)
        expected += squares / count
    init = fsp.init_loss(s_out, t_out, batch)
    assert set(init) == {"fsp_init"} and init["fsp_init"].item() == pytest.approx(expected, 1e-5)
    terms = fsp(s_out, t_out, batch)
    assert set(terms) == {"fsp"} and terms["fsp"].item() == pytest.approx(7 * expected, 1e-5)
    assert fsp.init_epochs == 2


def _max_pool_python(channels, h, w):
    """Each channel of ``channels`` (lists of rows) max-pooled by an integer factor to h×w."""
    fh, fw = len(channels[0]) // h, len(channels[0][0]) // w
    return [[[max(ch[i * fh + a][j * fw + b] for a in range(fh) for b in range(fw))
              for j in range(w)] for i in range(h)] for ch in channels]


def _avg_pool_python(channels, h, w):
    """Each channel average-pooled by an integer factor to h×w."""
    fh, fw = len(channels[0]) // h, len(channels[0][0]) // w
    return [[[sum(ch[i * fh + a][j * fw + b] for a in range(fh) for b in range(fw)) / (fh * fw)
              for j in range(w)] for i in range(h)] for ch in channels]


def _pooled_gram(first, second, pool):
    """The FSP matrix of one sample, ``first`` pooled (avg or max) to ``second``'s size."""
    h, w = len(second[0]), len(second[0][0])
    pooled = (_max_pool_python if pool == "max" else _avg_pool_python)(first, h, w)
    return _gram_python(pooled, second)


def _gram_python(first, second):
    """G[a][b] = Σ_{h,w} F1[a,h,w]·F2[b,h,w] / (h·w) of two equally sized maps (one sample)."""
    h, w = len(first[0]), len(first[0][0])
    return [[sum(fa[i][j] * fb[i][j] for i in range(h) for j in range(w)) / (h * w)
             for fb in second] for fa in first]


@pytest.mark.parametrize("reduction", ["mean", "sum", "column_norm"])
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_fsp_reductions_and_pools_match_their_formulas(reduction, pool):
    g = torch.Generator().manual_seed(21)
    shapes = [(3, 2, 4, 4), (3, 3, 2, 2), (3, 2, 1, 1)]
    student = [torch.randn(*sh, generator=g, dtype=torch.float64) for sh in shapes]
    teacher = [torch.randn(*sh, generator=g, dtype=torch.float64) for sh in shapes]
    fsp = FSP(beta=2.0, reduction=reduction, pool=pool)
    loss = fsp(*_connect(fsp, student, teacher))["fsp"].item()
    expected = 0.0
    for i in range(2):
        per_sample = []
        for n in range(3):
            g_s = _pooled_gram(student[i][n].tolist(), student[i + 1][n].tolist(), pool)
            g_t = _pooled_gram(teacher[i][n].tolist(), teacher[i + 1][n].tolist(), pool)
            rows, cols = len(g_s), len(g_s[0])
            if reduction == "column_norm":
                per_sample.append(sum(math.sqrt(sum((g_s[a][b] - g_t[a][b]) ** 2
                                                    for a in range(rows)))
                                      for b in range(cols)))
            else:
                squares = sum((g_s[a][b] - g_t[a][b]) ** 2 for a in range(rows)
                              for b in range(cols))
                per_sample.append(squares if reduction == "sum" else squares / (rows * cols))
        expected += sum(per_sample) / len(per_sample)
    assert loss == pytest.approx(2.0 * expected, rel=1e-10)


def test_fsp_paper_sum_is_the_mean_times_each_pairs_channel_product():
    student, teacher = _maps(22, (2, 2, 4, 4), (2, 3, 2, 2)), _maps(23, (2, 2, 4, 4), (2, 3, 2, 2))
    mean, total = FSP(reduction="mean"), FSP(reduction="sum")
    ratio = (total(*_connect(total, student, teacher))["fsp"]
             / mean(*_connect(mean, student, teacher))["fsp"]).item()
    assert ratio == pytest.approx(2 * 3, rel=1e-6)  # one pair: C_0 · C_1


def test_fsp_connectors_project_unequal_student_widths_and_train():
    student = [f.requires_grad_() for f in _maps(2, (2, 3, 8, 8), (2, 4, 4, 4), (2, 6, 2, 2))]
    teacher = [f.requires_grad_() for f in _maps(3, (2, 5, 4, 4), (2, 6, 2, 2))]
    fsp = FSP(beta=1.0)
    s_out, t_out, batch = _connect(fsp, student, teacher)  # pairs: (s1, t0), (s2, t1)
    first, second = fsp.connectors
    assert isinstance(first, nn.Conv2d) and first.weight.shape == (5, 4, 1, 1)
    assert first.bias is None and isinstance(second, nn.Identity)
    loss = fsp(s_out, t_out, batch)["fsp"]
    # independently: project with an einsum, pool with avg_pool2d, Gram with an einsum
    projected = torch.einsum("oc,nchw->nohw", first.weight[:, :, 0, 0], student[1])
    g_s = torch.einsum("nahw,nbhw->nab", F.avg_pool2d(projected, 2), student[2]) / 4
    g_t = torch.einsum("nahw,nbhw->nab", F.avg_pool2d(teacher[0], 2), teacher[1]) / 4
    assert loss.item() == pytest.approx(((g_s - g_t) ** 2).mean().item(), rel=1e-5)
    loss.backward()
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    assert student[1].grad.abs().sum() > 0 and student[2].grad.abs().sum() > 0
    assert student[0].grad is None  # not paired
    assert all(f.grad is None for f in teacher)


def test_fsp_builds_connectors_from_the_probed_cnn_pair_and_runs_its_pre_stage():
    from kdlab.engine.module import DistillationModule
    from kdlab.models import CNN

    torch.manual_seed(0)
    student = CNN([1, 28, 28], 10, channels=[8, 16, 16], hidden=16)
    teacher = CNN([1, 28, 28], 10)
    fsp = FSP(init_epochs=1)
    module = DistillationModule(student, 10, torch.optim.SGD, teacher=teacher, strategy=fsp,
                                example_input=torch.zeros(2, 1, 28, 28))
    assert [c.weight.shape[:2] for c in fsp.connectors] == [(32, 16), (64, 16)]
    params = {id(p) for p in module.trainable_parameters()}
    assert {id(p) for p in fsp.connectors.parameters()} <= params
    batch = (torch.randn(4, 1, 28, 28), torch.tensor([1, -1, 2, 3]), torch.arange(4))
    loss, terms = module.batch_loss(batch)  # epoch 0: the FSP-only pre-stage
    loss.backward()
    assert set(terms) == {"fsp_init"}
    assert fsp.connectors[0].weight.grad.abs().sum() > 0


# -- KDSVD ---------------------------------------------------------------------------------------
def _rbf_loss(front_s, back_s, front_t, back_t):
    """Σ_{i,j,q} (exp(−(s_f[i,q] − s_b[j,q])²/8) − exp(−(t_f[i,q] − t_b[j,q])²/8))²."""
    total = 0.0
    for q in range(front_s.shape[1]):
        for i in range(front_s.shape[0]):
            for j in range(back_s.shape[0]):
                g_s = math.exp(-(front_s[i, q] - back_s[j, q]) ** 2 / 8)
                g_t = math.exp(-(front_t[i, q] - back_t[j, q]) ** 2 / 8)
                total += (g_s - g_t) ** 2
    return total


def _dfv(student_matrix, teacher_matrix, k):
    """The paper's distilled feature vectors of one sample, with NumPy: top-k left singular
    vectors, the teacher's summing to >= 0, the student's aligned to the teacher's, both
    weighted by the teacher's L2-normalised top-k singular values."""
    u_s, _, _ = np.linalg.svd(np.asarray(student_matrix, dtype=np.float64))
    u_t, sigma_t, _ = np.linalg.svd(np.asarray(teacher_matrix, dtype=np.float64))
    u_s, u_t, sigma_t = u_s[:, :k], u_t[:, :k], sigma_t[:k]
    u_t = u_t * np.where(u_t.sum(0) >= 0, 1.0, -1.0)
    u_s = u_s * np.where((u_s * u_t).sum(0) >= 0, 1.0, -1.0)
    weight = sigma_t / np.linalg.norm(sigma_t)
    return u_s * weight, u_t * weight


def test_kdsvd_spatial_matches_the_formula():
    # per pair spatial sizes are matched (student 4×4 pooled to 2×2 with numpy below);
    # channel counts differ; the student's first layer is not paired
    student = _maps(4, (2, 3, 8, 8), (2, 3, 4, 4), (2, 2, 3, 1))
    teacher = _maps(5, (2, 5, 2, 2), (2, 4, 3, 1))
    kdsvd = KDSVD(beta=3.0, space="spatial", extra=0)
    terms = kdsvd(*_connect(kdsvd, student, teacher))
    assert set(terms) == {"kdsvd"}
    expected = 0.0
    for n in range(2):
        s0 = student[1][n].numpy().reshape(3, 2, 2, 2, 2).mean(axis=(2, 4))  # 4×4 → 2×2
        layers = [(s0.reshape(3, -1).T, teacher[0][n].numpy().reshape(5, -1).T),
                  (student[2][n].numpy().reshape(2, -1).T, teacher[1][n].numpy().reshape(4, -1).T)]
        (fs, ft), (bs, bt) = (_dfv(s, t, 1) for s, t in layers)
        expected += _rbf_loss(fs, bs, ft, bt) / 2
    assert terms["kdsvd"].item() == pytest.approx(3.0 * expected, rel=1e-4)


def test_kdsvd_channel_space_with_two_vectors_matches_the_formula():
    # the paper's variant: right singular vectors (per channel), spatial sizes may differ
    student = _maps(6, (2, 3, 4, 4), (2, 4, 2, 2))
    teacher = _maps(7, (2, 3, 2, 2), (2, 4, 1, 1))
    teacher[1] = teacher[1].repeat(1, 1, 3, 2) + 0.1 * _maps(8, (2, 4, 3, 2))[0]  # rank >= 2
    kdsvd = KDSVD(k=2, space="channel", extra=0)
    terms = kdsvd(*_connect(kdsvd, student, teacher))
    expected = 0.0
    for n in range(2):
        layers = [(s[n].numpy().reshape(s.shape[1], -1), t[n].numpy().reshape(t.shape[1], -1))
                  for s, t in zip(student, teacher)]
        (fs, ft), (bs, bt) = (_dfv(s, t, 2) for s, t in layers)
        expected += _rbf_loss(fs, bs, ft, bt) / 2
    assert terms["kdsvd"].item() == pytest.approx(expected, rel=1e-4)


def _dfv_matched(student_matrix, teacher_matrix, k, extra):
    """The authors' matching, with NumPy: each of the teacher's top-k left singular vectors
    (signs fixed to sum >= 0) takes the student vector of largest |cos| among the student's
    top k + extra, sign-aligned; both weighted by the teacher's normalised singular values."""
    u_s, _, _ = np.linalg.svd(np.asarray(student_matrix, dtype=np.float64))
    u_t, sigma_t, _ = np.linalg.svd(np.asarray(teacher_matrix, dtype=np.float64))
    u_t, sigma_t = u_t[:, :k], sigma_t[:k]
    u_t = u_t * np.where(u_t.sum(0) >= 0, 1.0, -1.0)
    candidates = u_s[:, :min(k + extra, *np.shape(student_matrix))]
    columns = []
    for q in range(k):
        cos = candidates.T @ u_t[:, q]
        j = int(np.argmax(np.abs(cos)))
        columns.append(candidates[:, j] * (1.0 if cos[j] >= 0 else -1.0))
    weight = sigma_t / np.linalg.norm(sigma_t)
    return np.stack(columns, 1) * weight, u_t * weight


def test_kdsvd_default_is_the_papers_channel_variant_with_the_authors_matching():
    # equal widths per pair (as in the paper), spatial sizes differ; k = 2 of the student's
    # top 3 (extra = 1); the student's first maps are built so its vectors come out of order
    g = torch.Generator().manual_seed(30)
    student = [torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64),
               torch.randn(3, 5, 2, 2, generator=g, dtype=torch.float64)]
    teacher = [torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64),
               torch.randn(3, 5, 3, 1, generator=g, dtype=torch.float64)]
    kdsvd = KDSVD(k=2)
    assert (kdsvd.space, kdsvd.extra) == ("channel", 1)
    terms = kdsvd(*_connect(kdsvd, student, teacher))
    assert all(isinstance(c, nn.Identity) for c in kdsvd.connectors)
    expected = 0.0
    for n in range(3):
        layers = [(s[n].numpy().reshape(s.shape[1], -1), t[n].numpy().reshape(t.shape[1], -1))
                  for s, t in zip(student, teacher)]
        (fs, ft), (bs, bt) = (_dfv_matched(s, t, 2, 1) for s, t in layers)
        expected += _rbf_loss(fs, bs, ft, bt) / 3
    assert terms["kdsvd"].item() == pytest.approx(expected, rel=1e-4)
    # RepDistiller's extra = 3 is the same formula with more candidates
    wide = KDSVD(k=1, extra=3)
    wide_loss = wide(*_connect(wide, student, teacher))["kdsvd"].item()
    expected = 0.0
    for n in range(3):
        layers = [(s[n].numpy().reshape(s.shape[1], -1), t[n].numpy().reshape(t.shape[1], -1))
                  for s, t in zip(student, teacher)]
        (fs, ft), (bs, bt) = (_dfv_matched(s, t, 1, 3) for s, t in layers)
        expected += _rbf_loss(fs, bs, ft, bt) / 3
    assert wide_loss == pytest.approx(expected, rel=1e-4)


def test_kdsvd_matching_picks_a_lower_student_vector_when_it_fits_better():
    # the student's second singular direction is the teacher's first: matched with extra >= 1
    base = torch.zeros(1, 3, 4, 1, dtype=torch.float64)
    base[0, 0, 0, 0], base[0, 1, 1, 0], base[0, 2, 2, 0] = 3.0, 2.0, 1.0  # σ 3, 2, 1
    teacher_first = torch.zeros(1, 3, 4, 1, dtype=torch.float64)
    teacher_first[0, 1, 0, 0], teacher_first[0, 0, 1, 0] = 3.0, 0.5  # top: channel 1
    student = [base, base[:, :, :2]]
    teacher = [teacher_first, base[:, :, :2]]
    in_order, matched = KDSVD(extra=0), KDSVD(extra=1)
    loss_order = in_order(*_connect(in_order, student, teacher))["kdsvd"].item()
    loss_matched = matched(*_connect(matched, student, teacher))["kdsvd"].item()
    assert loss_matched == pytest.approx(0.0, abs=1e-10) and loss_order > 1e-3


def test_kdsvd_authors_normalisation_is_n_sqrt_k_over_two_times_ours():
    g = torch.Generator().manual_seed(31)
    student = [torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(2)]
    teacher = [torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(2)]
    kdsvd = KDSVD(k=2)
    ours = kdsvd(*_connect(kdsvd, student, teacher))["kdsvd"].item()
    # the authors' tf.nn.l2_loss(G_s − G_t)·√k: half the squared sum over the whole batch
    authors = 0.0
    for n in range(4):
        layers = [(s[n].numpy().reshape(3, -1), t[n].numpy().reshape(3, -1))
                  for s, t in zip(student, teacher)]
        (fs, ft), (bs, bt) = (_dfv_matched(s, t, 2, 1) for s, t in layers)
        authors += _rbf_loss(fs, bs, ft, bt) / 2 * math.sqrt(2)
    assert authors == pytest.approx(4 * math.sqrt(2) / 2 * ours, rel=1e-4)


def test_kdsvd_channel_connectors_project_unequal_student_widths_and_train():
    g = torch.Generator().manual_seed(32)
    student = [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64).requires_grad_(),
               torch.randn(2, 4, 2, 2, generator=g, dtype=torch.float64)]
    teacher = [torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64),
               torch.randn(2, 4, 2, 2, generator=g, dtype=torch.float64)]
    kdsvd = KDSVD(extra=0)
    s_out, t_out, batch = _connect(kdsvd, student, teacher)
    first, second = kdsvd.connectors
    assert first.weight.shape == (5, 3, 1, 1) and first.bias is None
    assert isinstance(second, nn.Identity)
    first.double()
    loss = kdsvd(s_out, t_out, batch)["kdsvd"]
    projected = torch.einsum("oc,nchw->nohw", first.weight[:, :, 0, 0], student[0]).detach()
    expected = 0.0
    for n in range(2):
        layers = [(projected[n].numpy().reshape(5, -1), teacher[0][n].numpy().reshape(5, -1)),
                  (student[1][n].numpy().reshape(4, -1), teacher[1][n].numpy().reshape(4, -1))]
        (fs, ft), (bs, bt) = (_dfv(s, t, 1) for s, t in layers)
        expected += _rbf_loss(fs, bs, ft, bt) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    assert first.weight.grad.abs().sum() > 0 and student[0].grad.abs().sum() > 0


def test_kdsvd_is_zero_when_the_student_has_the_teachers_maps():
    teacher = _maps(9, (2, 4, 4, 4), (2, 8, 2, 2))
    kdsvd = KDSVD()
    student = [-t for t in teacher]  # opposite signs: removed by the alignment
    assert kdsvd(*_connect(kdsvd, student, teacher))["kdsvd"].item() == pytest.approx(0, abs=1e-7)


def test_kdsvd_gradients_reach_the_student_only():
    student = [f.relu().requires_grad_() for f in _maps(10, (2, 4, 8, 8), (2, 8, 4, 4))]
    teacher = [f.relu().requires_grad_() for f in _maps(11, (2, 6, 4, 4), (2, 12, 2, 2))]
    kdsvd = KDSVD()
    kdsvd(*_connect(kdsvd, student, teacher))["kdsvd"].backward()
    for f in student:
        assert f.grad is not None and f.grad.isfinite().all() and f.grad.abs().sum() > 0
    assert all(f.grad is None for f in teacher)


@pytest.mark.parametrize("shape", [(3, 9, 5), (3, 5, 9)])
@pytest.mark.parametrize("k", [1, 2])
def test_top_singular_backward_equals_autograd_through_full_svd(shape, k):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(shape[0], shape[1], k, dtype=torch.float64)
    u_ref = torch.linalg.svd(x, full_matrices=False)[0][..., :k]
    u = top_singular(x, k)[0]
    flip = torch.sign((u * u_ref).sum(dim=1, keepdim=True)).detach()  # signs are arbitrary
    (u * flip * probe).sum().backward()
    ours, x.grad = x.grad, None
    (u_ref * probe).sum().backward()
    assert torch.allclose(ours, x.grad, atol=1e-10)


@pytest.mark.parametrize("shape", [(4, 32, 196), (4, 64, 49), (4, 8, 8)])
def test_left_singular_equals_float64_svd_up_to_sign(shape):
    x = torch.randn(*shape).relu()
    u, s = left_singular(x)
    u_ref, s_ref, _ = torch.linalg.svd(x.double(), full_matrices=False)
    assert u.dtype == s.dtype == torch.float32 and u.shape == u_ref.shape
    assert torch.allclose(s.double(), s_ref, rtol=1e-6, atol=1e-5)
    top = 4  # well separated: the vectors are defined up to sign
    flip = torch.sign((u[..., :top].double() * u_ref[..., :top]).sum(dim=1, keepdim=True))
    assert torch.allclose(u[..., :top].double() * flip, u_ref[..., :top], atol=1e-5)
    assert torch.allclose(u.transpose(1, 2) @ u, torch.eye(shape[-1] if shape[1] > shape[2]
                                                           else shape[1]).expand(shape[0], -1, -1),
                          atol=1e-5)


def test_left_singular_of_a_rank_deficient_tall_matrix_gives_zero_columns():
    x = torch.zeros(2, 12, 5, dtype=torch.float64)
    x[..., :2] = torch.randn(2, 12, 2, dtype=torch.float64)  # rank 2 of 5
    u, s = left_singular(x)
    u_ref, s_ref, _ = torch.linalg.svd(x, full_matrices=False)
    assert torch.allclose(s, s_ref, atol=1e-12)
    assert torch.allclose(u[..., :2].abs(), u_ref[..., :2].abs(), atol=1e-10)
    assert (u[..., 2:] == 0).all()  # the SVD's completion is arbitrary; ours is zero
    probe = torch.randn(2, 12, 2, dtype=torch.float64)

    def probed(x: torch.Tensor) -> torch.Tensor:  # signs fixed: a smooth function of x
        u = top_singular(x, 2)[0]
        return (u * torch.sign(u.sum(dim=1, keepdim=True)).detach() * probe).sum()

    assert torch.autograd.gradcheck(probed, (x.requires_grad_(),), eps=1e-7, atol=1e-6)


def test_top_singular_backward_stays_finite_with_repeated_discarded_singular_values():
    x = torch.zeros(1, 9, 16)
    x[0, :3] = torch.randn(3, 16)  # rank 3: six zero singular values
    x.requires_grad_()
    torch.linalg.svd(x, full_matrices=False)[0][..., 0].sum().backward()
    assert not x.grad.isfinite().all()  # what the stock backward gives
    x.grad = None
    top_singular(x, 1)[0].sum().backward()
    assert x.grad.isfinite().all() and x.grad.abs().sum() > 0


# -- both ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "kwargs", "key"), [
    (FSP, {"beta": -1.0}, "distill.beta=-1.0"),
    (FSP, {"init_epochs": -1}, "distill.init_epochs=-1"),
    (FSP, {"init_epochs": 1.5}, "distill.init_epochs=1.5"),
    (KDSVD, {"beta": -2.0}, "distill.beta=-2.0"),
    (KDSVD, {"k": 0}, "distill.k=0"),
    (KDSVD, {"k": 1.5}, "distill.k=1.5"),
    (KDSVD, {"space": "pixel"}, "distill.space=pixel"),
    (KDSVD, {"extra": -1}, "distill.extra=-1"),
    (FSP, {"reduction": "median"}, "distill.reduction=median"),
    (FSP, {"pool": "min"}, "distill.pool=min"),
])
def test_bad_hyper_parameters_name_the_key(cls, kwargs, key):
    with pytest.raises(KdlabError, match=key):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [FSP, KDSVD])
def test_a_single_layer_pair_is_refused(cls):
    with pytest.raises(KdlabError, match=r"distill.student_layers=.*at least 2 paired layers"):
        _connect(cls(), [torch.zeros(2, 4, 2, 2)], [torch.zeros(2, 4, 2, 2)] * 2)


def test_kdsvd_checks_k_against_the_layers():
    student, teacher = _maps(12, (2, 4, 2, 2), (2, 4, 1, 1)), _maps(13, (2, 4, 2, 2), (2, 6, 1, 1))
    with pytest.raises(KdlabError, match=r"distill.k=2 must be <= 1"):
        _connect(KDSVD(k=2), student, teacher)
    with pytest.raises(KdlabError, match=r"distill.k=5 must be <= 4"):
        _connect(KDSVD(k=5, space="spatial"), *(_maps(14, (2, 4, 2, 2), (2, 5, 2, 2)),) * 2)


@pytest.mark.parametrize("distill", ["fsp", "kdsvd"])
def test_a_short_run_learns(distill, tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short(distill, tmp_path)
    assert_learned(results)
