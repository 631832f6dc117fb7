"""The same seed gives identical metrics and weights on CPU, for every stage of a run."""

from __future__ import annotations

import torch

from kdlab.train import run


def test_same_seed_same_run(fast_cfg, tmp_path):
    results = [run(fast_cfg("student.model.dropout=0.2", tmp=tmp_path / name))
               for name in ("a", "b")]
    a, b = results
    for role in ("teacher", "student", "baseline"):
        assert a[role]["metrics"] == b[role]["metrics"], role
    for role in ("student", "baseline"):
        wa = torch.load(a[role]["last_ckpt"], weights_only=True)["state_dict"]
        wb = torch.load(b[role]["last_ckpt"], weights_only=True)["state_dict"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), role
    c = run(fast_cfg("student.model.dropout=0.2", "seed=1", tmp=tmp_path / "c"))
    assert c["student"]["metrics"] != a["student"]["metrics"]  # the seed does matter
