import torch

from cifarlab.training.callbacks.lookahead import Lookahead


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def nudge(m, by):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(by)
        m[1].running_mean.add_(by)


def test_lookahead_pulls_the_model_back_toward_its_slow_weights():
    m = model()
    start = {k: v.clone() for k, v in m.state_dict().items()}
    la = Lookahead(m, decay=0.9, every=5)
    nudge(m, 1.0)
    la.step(5, total=10)  # decay 0.9**5 * (5/10)**3 = 0.0738: mostly the new weights
    w = m[0].weight
    expected = start["0.weight"] + 1.0 * (1 - 0.9**5 * 0.5**3)
    assert torch.allclose(w, expected)
    assert torch.allclose(m[1].running_mean, start["1.running_mean"] + 1 - 0.9**5 * 0.5**3)
    assert m[1].num_batches_tracked == start["1.num_batches_tracked"]  # counters untouched


def test_between_syncs_nothing_changes_and_the_last_step_takes_the_slow_weights():
    m = model()
    la = Lookahead(m, decay=0.9, every=5)
    nudge(m, 1.0)
    before = m[0].weight.clone()
    la.step(3, total=10)
    assert torch.equal(m[0].weight, before)
    nudge(m, 1.0)
    la.step(10, total=10)  # the end of training: the model becomes the slow weights
    assert torch.equal(m[0].weight, la.state_dict()["0.weight"])


def test_state_round_trips():
    m = model()
    la = Lookahead(m, decay=0.9)
    nudge(m, 2.0)
    la.sync(0.5)
    other = Lookahead(model(), decay=0.9)
    other.load_state_dict(la.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(other.slow.values(), la.slow.values(), strict=True)
    )
