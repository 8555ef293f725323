import pytest
import torch

from cifarlab import config
from cifarlab.bench import flops_per_image, steady_curve, time_to_accuracy
from cifarlab.models import build_model
from cifarlab.models.fastnet import FastNet


def test_whitening_layer_decorrelates_patches():
    torch.manual_seed(0)
    base = torch.randn(64, 3, 16, 16)
    images = base + 0.8 * base[:, :1]  # strongly correlated channels
    net = FastNet(10, widths=(8, 8, 8))
    net.init_from_data(images)
    out = torch.nn.functional.conv2d(images, net.whiten.weight[:12])
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(flat)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert torch.equal(net.whiten.weight[12:], -net.whiten.weight[:12])
    assert not net.whiten.weight.requires_grad


def test_forward_shape():
    assert FastNet(7, widths=(8, 16, 16))(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_depth_sets_the_convolutions_per_block_from_the_recipe():
    def convs(net):
        return [sum(isinstance(m, torch.nn.Conv2d) for m in block) for block in net.blocks]

    deep, _ = build_model({"name": "fastnet", "widths": [8, 16, 32], "depth": 3}, 10, 32)
    assert convs(deep) == [3, 3, 3]
    assert deep(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    plain = FastNet(10, widths=(8, 16, 32))
    assert convs(plain) == [2, 2, 2]  # checkpoints of the default depth keep their names
    assert "blocks.2.4.weight" in plain.state_dict()


def test_flop_count_of_a_linear_model():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10, bias=False))
    assert flops_per_image(model, 4, train=False) == 2 * 48 * 10
    # backward of the only layer: the weight gradient (no gradient is needed for the input)
    assert flops_per_image(model, 4, train=True) == 2 * 2 * 48 * 10


def test_time_to_accuracy_accumulates_seconds(tmp_path):
    (tmp_path / "history.csv").write_text(
        "phase,epoch,seconds,val_accuracy\ntrain,1,10.0,0.5\ntrain,2,12.5,0.7\n"
    )
    points = time_to_accuracy(tmp_path)
    assert [p["seconds"] for p in points] == [10.0, 22.5]
    assert [p["val_accuracy"] for p in points] == [0.5, 0.7]


def test_bench_curve_cli_writes_json_and_plot(tmp_path, capsys):
    from cifarlab.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "history.csv").write_text("phase,epoch,seconds,val_accuracy\ntrain,1,60.0,0.5\n")
    assert main(["bench", "curve", str(run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out/time_to_accuracy.png").stat().st_size > 1000
    assert '"val_accuracy": 0.5' in (tmp_path / "out/bench-curve.json").read_text()
    assert main(["bench", "curve", "--out", str(tmp_path / "out")]) == 2
    assert "needs run directories" in capsys.readouterr().err


def test_only_batchnorm_biases_get_the_larger_learning_rate():
    net = FastNet(10, widths=(8, 8, 8), bias_lr_scale=64.0)
    (phase,) = config.phases(config.resolve({"train": {"lr": 0.1, "weight_decay": 0.01}}))
    normal, biases = net.param_groups(phase)
    assert biases["lr"] == 0.1 * 64 and biases["weight_decay"] == 0.01 / 64
    bn = [m.bias for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(p) for p in biases["params"]} == {id(p) for p in bn}
    assert any(p is net.whiten.bias for p in normal["params"])
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for g in (normal, biases) for p in g["params"]} == trainable


def test_speed_bench_reports_every_budget_size(tiny_fast_recipe):
    from cifarlab.bench import model_speeds

    rows = model_speeds(str(tiny_fast_recipe))
    assert [r["budget_size"] for r in rows] == [
        {},
        {"model.widths": [16, 24, 24], "augment.cutout": 4},
    ]
    assert rows[1]["train_gflops_per_image"] > rows[0]["train_gflops_per_image"]
    for r in rows:
        assert r["train_images_per_s"] > 0 and r["baseline_train_images_per_s"] > 0
        assert r["train_fraction_of_peak"] == pytest.approx(
            r["train_gflop_per_s"] / r["matmul_peak_gflop_per_s"]
        )


def test_conv_costs_account_for_every_convolution_pass(tiny_fast_recipe, capsys):
    from cifarlab.bench import conv_costs

    result = conv_costs(str(tiny_fast_recipe), batch=4, repeats=1)
    rows = result["convolutions"]
    assert len(rows) == 7  # whitening + two per block
    # the frozen whitening layer sees the images: no input or weight gradient to compute
    assert list(rows[0]["ms"]) == ["forward"]
    assert all(list(r["ms"]) == ["forward", "input_grad", "weight_grad"] for r in rows[1:])
    assert rows[1]["input"] == [4, 24, 31, 31] and rows[1]["weight"] == [8, 24, 3, 3]
    # the same FLOPs PyTorch's counter finds in a training step, less the tiny classifier
    model, _ = build_model({"name": "fastnet", "widths": [8, 16, 16]}, 10, 32, pretrained=False)
    classifier = 3 * 2 * 16 * 10
    counted = flops_per_image(model, 32, train=True) - classifier
    assert result["conv_gflop_per_step"] * 1e9 / 4 == pytest.approx(counted, rel=1e-6)
    # the fractions say what their names say (their order is a timing, not asserted: a busy
    # machine, or another test beside this one, can make the convolutions alone look slower)
    conv_ms = sum(sum(r["ms"].values()) for r in rows)
    assert result["conv_ms_per_step"] == pytest.approx(conv_ms) and conv_ms > 0
    flop_per_s = result["conv_gflop_per_step"] * 1e9 / (result["train_step_ms"] / 1e3)
    peak = result["matmul_peak_gflop_per_s"] * 1e9
    assert result["step_fraction_of_peak"] == pytest.approx(flop_per_s / peak)
    bound = result["conv_gflop_per_step"] * 1e9 / (conv_ms / 1e3) / peak
    assert result["conv_only_bound_fraction_of_peak"] == pytest.approx(bound)
    assert result["conv_share_of_step"] == pytest.approx(conv_ms / result["train_step_ms"])


def test_steady_curve_takes_the_compile_out_of_the_first_epoch_only():
    curve = [
        {"seconds": s, "val_accuracy": 0.1 * i} for i, s in enumerate([15.0, 16.0, 17.0, 18.0])
    ]
    assert [p["seconds"] for p in steady_curve(curve)] == [1.0, 2.0, 3.0, 4.0]
    even = [{"seconds": s, "val_accuracy": 0.5} for s in (1.0, 2.0, 3.0)]
    assert steady_curve(even) == even  # nothing to take out
