import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifarlab.data import ImageSet
from cifarlab.data.loader import BatchLoader
from cifarlab.eval.predict import predict_probs, tta_views


class PixelReader(torch.nn.Module):
    """Logits from a few fixed pixels: any flip or shift changes its answer."""

    def forward(self, x):
        return torch.stack([x[:, 0, 0, 0], x[:, 0, 1, 3], x[:, 0, 3, 2]], 1) * 5


@pytest.mark.parametrize("level, views", [(0, 1), (1, 2), (2, 6), (True, 2), (False, 1)])
def test_tta_views_and_weights(level, views):
    out = tta_views(torch.rand(2, 3, 4, 4), int(level))
    assert len(out) == views
    assert sum(w for w, _ in out) == pytest.approx(1.0)


def test_tta_level_2_averages_mirrors_and_one_pixel_shifts():
    rng = np.random.default_rng(0)
    data = ImageSet(
        rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8), np.arange(6) % 3, list("abc")
    )
    pre = {"input_size": 4, "mean": [0, 0, 0], "std": [1, 1, 1]}
    loader = BatchLoader(data, 4, torch.device("cpu"), pre)
    model = PixelReader()
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255

    def p(v):
        return F.softmax(model(v), 1)

    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., :4, :4], padded[..., 2:, 2:]
    expected = 0.25 * (p(x) + p(x.flip(3))) + 0.125 * sum(
        p(v) + p(v.flip(3)) for v in (up_left, down_right)
    )
    got = predict_probs(model, loader, tta=2)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    assert not np.allclose(got, predict_probs(model, loader, tta=1), atol=1e-3)
    np.testing.assert_allclose(predict_probs(model, loader, tta=0), p(x).numpy(), atol=1e-6)
