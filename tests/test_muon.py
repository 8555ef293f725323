import pytest
import torch

import cifarlab
from cifarlab import config
from cifarlab.core.errors import UserError
from cifarlab.models.fastnet import FastNet
from cifarlab.training.optim import Muon, make_optimizer, orthogonalise

from .conftest import crash_then_resume
from .test_train import history_without_timings


def muon_phase(**train):
    recipe = config.load_recipe("fast")
    recipe["train"].update({"optimizer": "muon", **train})
    return config.phases(recipe)[0]


def test_orthogonalise_pushes_every_singular_value_near_one():
    torch.manual_seed(0)
    for shape in [(256, 2304), (64, 216), (300, 40)]:  # wide, wide, tall
        g = torch.randn(shape)
        s = torch.linalg.svdvals(orthogonalise(g))
        assert orthogonalise(g).shape == shape
        assert 0.6 < s.min() and s.max() < 1.25, (shape, s.min(), s.max())
        u, _, v = torch.linalg.svd(g, full_matrices=False)  # singular values 0.1 ... 10
        skewed = u @ torch.diag(torch.logspace(-1, 1, min(shape))) @ v
        s = torch.linalg.svdvals(orthogonalise(skewed))
        assert s.max() < 1.25 and s.max() / s.min() < 20, shape  # a 100:1 spread shrinks 5x+


def test_parameters_other_than_conv_filters_step_exactly_as_torch_sgd():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    twin.load_state_dict(net.state_dict())
    phase = muon_phase(lr=0.1, momentum=0.85, weight_decay=0.01)
    opt = make_optimizer(net.parameters(), phase)
    sgd = torch.optim.SGD(
        twin.parameters(), lr=0.1, momentum=0.85, nesterov=True, weight_decay=0.01
    )
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for model, o in [(net, opt), (twin, sgd)]:
        for _ in range(5):
            o.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            o.step()
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_conv_filters_get_orthogonalised_steps_of_a_fixed_share_of_their_norm():
    torch.manual_seed(0)
    net = FastNet(10, widths=(8, 16, 16))
    phase = muon_phase(lr=0.1, momentum=0.85, weight_decay=0.01, muon_lr=0.2)
    opt = make_optimizer(net.param_groups(phase), phase)
    assert isinstance(opt, Muon)
    filters = [g for g in opt.param_groups if g["orthogonal"]]
    assert len(filters) == 1 and len(filters[0]["params"]) == 6  # the frozen whitening is out
    assert filters[0]["lr"] == 0.2 and filters[0]["weight_decay"] == 0.0
    bn_lr = {g["lr"] for g in opt.param_groups if not g["orthogonal"]}
    assert bn_lr == {0.1, 0.1 * net.bias_lr_scale}  # FastNet's own groups kept for the rest
    conv = torch.nn.Conv2d(3, 4, 3)
    halved = make_optimizer([{"params": [conv.weight, conv.bias], "lr": 0.05}], phase)
    assert [g["lr"] for g in halved.param_groups] == [0.05, 0.1]  # a group at half the LR:
    # its filters at half of muon_lr (layer decay keeps its meaning)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        before = {n: p.detach().clone() for n, p in net.named_parameters() if p.ndim == 4}
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    for name, p in net.named_parameters():
        if p.ndim == 4 and p.requires_grad:
            rescaled = before[name] * len(p) ** 0.5 / before[name].norm()
            update = (rescaled - p.detach()).reshape(len(p), -1) / 0.2
            s = torch.linalg.svdvals(update)
            assert 0.3 < s.min() and s.max() < 1.25, name  # orthogonalised: all directions move


def test_muon_keys_are_checked():
    with pytest.raises(UserError, match="muon_lr"):
        config.load_recipe("fast", {"train.optimizer": "muon", "train.muon_lr": 0})


def test_a_muon_run_learns_and_resumes_exactly(
    tiny_folder, tiny_fast_recipe, tmp_path, monkeypatch
):
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text(
        tiny_fast_recipe.read_text()
        .replace("precision: auto", "precision: fp32\nmemory_format: contiguous")
        .replace("optimizer: sgd", "optimizer: muon")
    )
    clean = cifarlab.train(pinned, tiny_folder, tmp_path / "clean", progress=False)
    assert clean["val"]["accuracy"] > 0.9  # three colour classes: learnt in three epochs
    resumed = crash_then_resume(
        pinned, tiny_folder, tmp_path, monkeypatch, at_step=12, optimizer=Muon
    )
    assert resumed["val"]["loss"] == clean["val"]["loss"]
    assert history_without_timings(tmp_path / "killed/history.csv") == history_without_timings(
        tmp_path / "clean/history.csv"
    )
