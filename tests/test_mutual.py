"""mode=mutual: Deep Mutual Learning's loss, gradient separation, whole runs, config errors."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from kdlab.modes.build import build_datamodule, build_model
from kdlab.modes.cohort import CohortModule
from kdlab.modes.mutual import MEMBER_SEED_STRIDE, member_configs
from kdlab.train import run
from kdlab.util.errors import KdlabError

#: a whole run in a few seconds: one epoch of 4 batches, tiny evaluation and latency
QUICK = ["trainer.max_epochs=1", "steps_per_call=2", "trainer.limit_train_batches=2",
         "latency.repeats=1", "data.val_size=500", "data.num_labels=null"]


class Fixed(nn.Module):
    """A 'network' whose logits are its parameter, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def cohort(logits, temperature=1.0, kl_weight=1.0) -> CohortModule:
    module = CohortModule([Fixed(z) for z in logits], num_classes=logits[0].shape[-1],
                          temperature=temperature, kl_weight=kl_weight,
                          optimizer=torch.optim.AdamW)
    module.has_unlabelled = True
    return module


def test_loss_equals_the_formula_on_hand_made_logits():
    torch.manual_seed(0)
    logits = [torch.randn(6, 4) * 3 for _ in range(3)]
    y = torch.tensor([0, 3, -1, 2, -1, 1])  # two unlabelled samples: KL only
    T, w = 2.0, 0.7
    terms = cohort(logits, T, w)._terms(torch.zeros(6, 1), y, torch.arange(6))
    assert list(terms) == ["ce_m0", "kl_m0", "ce_m1", "kl_m1", "ce_m2", "kl_m2"]
    labelled = y >= 0
    for i, z in enumerate(logits):
        ce = -z.log_softmax(-1)[labelled, y[labelled]].mean()
        kl = 0.0
        for j, other in enumerate(logits):
            if j != i:
                p = (other / T).softmax(-1)
                kl = kl + (p * (p.log() - (z / T).log_softmax(-1))).sum(-1).mean()
        assert terms[f"ce_m{i}"].item() == pytest.approx(ce.item(), rel=1e-5)
        assert terms[f"kl_m{i}"].item() == pytest.approx((w * T**2 * kl / 2).item(), rel=1e-5)


def test_each_member_gets_gradients_only_from_its_own_terms():
    torch.manual_seed(1)
    module = cohort([torch.randn(5, 3) for _ in range(3)], temperature=1.5)
    y = torch.tensor([0, 1, 2, -1, 1])
    terms = module._terms(torch.zeros(5, 1), y, torch.arange(5))
    params = [m.logits for m in module.members]
    for name, term in terms.items():
        owner = int(name.rsplit("_m", 1)[1])
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        for i, g in enumerate(grads):
            if i == owner:
                assert g is not None and g.abs().sum() > 0, name
            else:
                assert g is None or not g.any(), f"{name} reaches member {i}"
    # the summed loss gives each member exactly the gradient of its own two terms
    total = sum(terms.values())
    grads = torch.autograd.grad(total, params, retain_graph=True)
    for i, g in enumerate(grads):
        own = torch.autograd.grad(terms[f"ce_m{i}"] + terms[f"kl_m{i}"], params[i],
                                  retain_graph=True)[0]
        torch.testing.assert_close(g, own)


def test_one_optimizer_over_the_cohort_equals_one_per_member():
    torch.manual_seed(2)
    start = [torch.randn(8, 4) for _ in range(2)]
    y = torch.randint(0, 4, (8,))
    joint = cohort(start, temperature=2.0)
    separate = cohort(start, temperature=2.0)
    opt = torch.optim.AdamW(joint.parameters(), lr=0.1)
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1) for m in separate.members]
    for _ in range(5):
        opt.zero_grad()
        sum(joint._terms(torch.zeros(8, 1), y, None).values()).backward()
        opt.step()
        # member by member: each minimises its own terms, the others' outputs as targets
        terms = separate._terms(torch.zeros(8, 1), y, None)
        for o in opts:
            o.zero_grad()
        for i in range(len(opts)):
            (terms[f"ce_m{i}"] + terms[f"kl_m{i}"]).backward(retain_graph=True)
        for o in opts:
            o.step()
    for a, b in zip(joint.members, separate.members):
        torch.testing.assert_close(a.logits, b.logits)


def test_mutual_run_trains_every_member_and_reports_each(fast_cfg, tmp_path):
    cfg = fast_cfg("mode=mutual", "mode.temperature=2", *QUICK)
    results = run(cfg)
    assert results["mode"] == "mutual"
    assert [s["stage"] for s in results["stages"]] == ["member0", "member1", "baseline"]
    assert results["student"]["stage"] == "member0"
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [s["stage"] for s in saved["stages"]] == ["member0", "member1", "baseline"]
    assert saved["baseline"]["model"] == "CNN" and saved["config"]["mode"]["name"] == "mutual"
    for entry in saved["stages"]:
        assert 0 < entry["metrics"]["test/acc"] <= 1 and "val/acc" in entry["metrics"]
    header = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert {"train/ce_m0_epoch", "train/kl_m1_epoch", "val/acc_m1", "val/acc"} <= set(
        header.split(","))

    # every member moved away from its own initialisation (member 0's is the baseline's)
    data = build_datamodule(cfg, transfer=False)
    data.setup()
    inits = []
    for i in range(2):
        L.seed_everything(cfg.seed + MEMBER_SEED_STRIDE * i, verbose=False)
        init = build_model(cfg.student.model, data, "student.model").state_dict()
        inits.append(init)
        ckpt = torch.load(saved["stages"][i]["best_ckpt"], weights_only=True)["state_dict"]
        trained = {k[len(f"student.{i}."):]: v for k, v in ckpt.items()
                   if k.startswith(f"student.{i}.")}
        assert trained.keys() == init.keys()
        assert any(not torch.equal(trained[k], init[k]) for k in init), f"member {i}"
    assert any(not torch.equal(inits[0][k], inits[1][k]) for k in inits[0])  # own seeds


def test_members_of_different_models_have_their_own_metrics(fast_cfg):
    # the whole test split, which kdlab-eval reads below (a run's limits apply to its own
    # measurements only)
    cfg = fast_cfg("mode=mutual", "mode.models=[cnn,mlp]", "baseline=false", *QUICK,
                   "trainer.limit_test_batches=null")
    results = run(cfg)
    stages = results["stages"]
    assert [(s["stage"], s["model"]) for s in stages] == [("member0", "CNN"),
                                                          ("member1", "MLP")]
    assert "baseline" not in results
    assert stages[0]["params"] != stages[1]["params"]
    assert stages[0]["metrics"]["test/acc"] != stages[1]["metrics"]["test/acc"]
    assert stages[0]["metrics"]["test/loss"] != stages[1]["metrics"]["test/loss"]

    # kdlab-eval and kdlab-export read any member of the cohort's checkpoint
    from kdlab.evaluate import evaluate
    from kdlab.modes.checkpoints import checkpoint_student, load_run_config
    from kdlab.util.errors import KdlabError
    from tests.conftest import make_cfg

    ckpt = stages[1]["best_ckpt"]
    out = Path(cfg.paths.output_dir).parent / "eval"
    evaluated = evaluate(make_cfg(out, [f"ckpt_path={ckpt}", "member=1", "latency.repeats=1"],
                                  config_name="eval"))
    assert evaluated["student"]["model"] == "MLP"
    assert evaluated["student"]["metrics"]["test/acc"] == pytest.approx(
        stages[1]["metrics"]["test/acc"])
    assert "mutual" in evaluated["teacher_skipped"]
    run_cfg = load_run_config(ckpt)
    with pytest.raises(KdlabError, match=r"member=2: the cohort of .* has members 0\.\.1"):
        checkpoint_student(run_cfg, ckpt, build_datamodule(run_cfg, transfer=False), 2)


@pytest.mark.parametrize("override,key", [
    ("mode.members=1", "mode.members=1"),
    ("mode.temperature=0", "mode.temperature=0"),
    ("mode.kl_weight=-1", "mode.kl_weight=-1"),
    ("mode.models=[cnn]", "mode.models has 1 entry"),
    ("mode.models=[resnet,mlp]", r"mode.models\[0\]=resnet is not a conf/student option"),
])
def test_bad_cohort_config_names_the_key(fast_cfg, override, key):
    with pytest.raises(KdlabError, match=key):
        member_configs(fast_cfg("mode=mutual", override))


def test_bad_config_fails_the_run_in_one_line(fast_cfg, capsys):
    with pytest.raises(SystemExit):
        run(fast_cfg("mode=mutual", "mode.members=1"))
    assert "kdlab: error: mode.members=1 must be >= 2" in capsys.readouterr().err
