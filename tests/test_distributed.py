"""Several processes (torchrun, DDP over gloo on the CPU): the sharding and the loss scaling
exactly, in this process; then whole CLI runs of 2 processes against 1, a killed rank, a resume
at another world size, two "nodes" on loopback and the launch errors."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarlab.data.augment import AugmentConfig
from cifarlab.data.dataset import ImageSet
from cifarlab.data.loader import BatchLoader
from cifarlab.rundir import RunDir
from cifarlab.training.step import train_step

from .conftest import make_folder

PRE = {"input_size": 8, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
CLI = [sys.executable, "-m", "cifarlab"]


def image_set(n: int, size: int = 8) -> ImageSet:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ImageSet(images, rng.integers(0, 3, n), ["a", "b", "c"])


@pytest.mark.parametrize("world", [2, 3])
def test_each_process_takes_its_rows_of_the_same_augmented_global_batch(world):
    """Whatever the world size, the processes' rows joined are the 1-process batch, bit for
    bit: the same order and the same augmentation (mixup pairs included), no image twice."""
    data = image_set(41)
    aug = AugmentConfig(flip="alternate", translate=2, cutout=3, mixup=0.4)
    kw = dict(aug=aug, shuffle=True, drop_last=True, seed=3)
    one = list(BatchLoader(data, 12, torch.device("cpu"), PRE, **kw).epoch(5, index=1))
    parts = [
        list(
            BatchLoader(data, 12, torch.device("cpu"), PRE, rank=r, world_size=world, **kw).epoch(
                5, 1
            )
        )
        for r in range(world)
    ]
    assert [len(p) for p in parts] == [len(one)] * world == [3] * world  # the same steps
    for i, (x, y) in enumerate(one):
        joined_x, joined_y = torch.empty_like(x), torch.empty_like(y)
        for r in range(world):
            joined_x[r::world], joined_y[r::world] = parts[r][i]
        assert torch.equal(joined_x, x) and torch.equal(joined_y, y)


def test_scaled_shares_average_to_the_global_batch_gradient():
    """A batch of 7 on 2 processes (4 + 3 rows): each process's loss scaled by world x share,
    then averaged as DDP does, gives the 1-process gradient of the batch's mean loss."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    x, y = torch.randn(7, 3, 8, 8), torch.randint(0, 3, (7,))

    def grads(xs, ys, scale):
        train_step(net, torch.optim.SGD(net.parameters(), lr=0.0), xs, ys, False, scale=scale)
        return [p.grad.clone() for p in net.parameters()]

    shares = [
        BatchLoader(image_set(7), 7, torch.device("cpu"), PRE, rank=r, world_size=2).share(0)
        for r in (0, 1)
    ]
    assert shares == [4 / 7, 3 / 7]
    per_process = [grads(x[r::2], y[r::2], 2 * shares[r]) for r in (0, 1)]
    averaged = [(a + b) / 2 for a, b in zip(*per_process, strict=True)]
    for got, want in zip(averaged, grads(x, y, 1.0), strict=True):
        torch.testing.assert_close(got, want)


def test_micro_batches_give_the_whole_batch_gradient():
    """`accumulate: 3` (7 rows as 3 + 2 + 2): the same gradient and loss as one pass."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    x, y = torch.randn(7, 3, 8, 8), torch.randint(0, 3, (7,))
    results = []
    for accumulate in (1, 3):
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        loss, logits = train_step(net, opt, x, y, False, accumulate=accumulate)
        results.append((loss, logits, [p.grad.clone() for p in net.parameters()]))
    (loss1, logits1, grads1), (loss3, logits3, grads3) = results
    torch.testing.assert_close(loss3, loss1)
    torch.testing.assert_close(logits3, logits1)
    for a, b in zip(grads3, grads1, strict=True):
        torch.testing.assert_close(a, b)


def watchdogs() -> list[threading.Timer]:
    return [
        t
        for t in threading.enumerate()
        if isinstance(t, threading.Timer) and t.function is os._exit
    ]


def test_under_torchrun_the_agents_repeated_stop_neither_cuts_a_step_nor_the_teardown(
    monkeypatch,
):
    """Ctrl-C reaches each process twice under torchrun (the terminal's, then the agent's):
    alone, a second Ctrl-C raises at once; under torchrun the first stop is held to the step's
    end and every later one is ignored, during the step and while the process leaves."""
    from cifarlab.training.interrupt import STOP_WITHIN_S, STOPS, CtrlC

    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    c, steps = CtrlC(), []
    previous = {s: signal.getsignal(s) for s in STOPS}
    try:
        with pytest.raises(KeyboardInterrupt):
            with c.installed(), c.deferred():
                c.handler(signal.SIGINT, None)  # held
                assert signal.getsignal(signal.SIGINT) == c.handler  # nothing ignored
                with pytest.raises(KeyboardInterrupt):
                    c.handler(signal.SIGINT, None)  # a user's second press: at once
        assert {s: signal.getsignal(s) for s in STOPS} == previous  # restored
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(KeyboardInterrupt):
            with c.installed(), c.deferred():
                c.handler(signal.SIGINT, None)  # the terminal's: held
                assert all(signal.getsignal(s) is signal.SIG_IGN for s in STOPS)  # the agent's
                steps.append("finished")
        assert steps == ["finished"]
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in STOPS)  # and while it leaves
        (watchdog,) = watchdogs()
        assert watchdog.daemon and watchdog.interval == STOP_WITHIN_S  # a stuck one still ends
    finally:
        for t in watchdogs():  # this test process is not to exit
            t.cancel()
        for s, handler in previous.items():
            signal.signal(s, handler)


def share_out(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: rank 0's array to both, and rows gathered from shares of
    which rank 1's is empty (one row between two processes)."""
    from cifarlab.core import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_RANK=str(rank))  # fmt: skip
    distributed.init(torch.device("cpu"))
    table = np.arange(12, dtype=np.float32).reshape(3, 2, 2) + 100 if rank == 0 else None
    got = distributed.from_main(table)
    part = np.full((len(distributed.world().shard(1)), 2), rank + 1.0, np.float32)
    rows = distributed.gather_rows(part, 1)
    np.savez(f"{out}/rank{rank}.npz", got=got, rows=rows)
    distributed.close()


def test_rank_0s_array_and_gathered_rows_reach_every_process(tmp_path):
    torch.multiprocessing.spawn(share_out, args=(free_port(), str(tmp_path)), nprocs=2)
    expected = np.arange(12, dtype=np.float32).reshape(3, 2, 2) + 100
    for rank in (0, 1):
        saved = np.load(tmp_path / f"rank{rank}.npz")
        np.testing.assert_array_equal(saved["got"], expected)
        assert saved["got"].dtype == np.float32
        np.testing.assert_array_equal(saved["rows"], [[1.0, 1.0]])  # rank 0's row; 1 had none


# -- whole runs ---------------------------------------------------------------------------------
def recipe(tmp_path: Path, epochs: int = 3, batchnorm: bool = False, name: str = "ddp") -> Path:
    """No BatchNorm and no dropout: then a run's result does not depend on how its batches are
    split between processes, only on float summation order."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nprecision: fp32\nmemory_format: contiguous\n"
        f"model: {{name: seed_cnn, widths: [8, 16], convs_per_block: 1, dense: 16, dropout: 0.0,"
        f" batchnorm: {str(batchnorm).lower()}}}\n"
        "data: {val_fraction: 0.25}\n"
        "augment: {flip: true, translate: 2}\n"
        f"train: {{epochs: {epochs}, batch_size: 9, optimizer: sgd, lr: 0.05, momentum: 0.9}}\n"
    )
    return path


def train(*args, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "train", "--no-progress", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def mlflow_runs(uri: str) -> list:
    import mlflow

    return mlflow.MlflowClient(uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()]
    )


def test_two_processes_make_one_run_equal_to_one_process(tmp_path, tiny_folder):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    r = recipe(tmp_path)
    common = ["--recipe", r, "--data", tiny_folder, "--tracking-uri", uri]
    one = train(*common, "--out", tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = train(*common, "--nproc-per-node", 2, cwd=tmp_path)  # its name from rank 0's clock
    assert two.returncode == 0, two.stderr
    made = [p for p in (tmp_path / "runs").iterdir()]
    assert len(made) == 1 and (made[0] / "metrics.json").is_file()  # one run directory
    assert two.stdout.count("run: ") == 1 and two.stderr.count("device: ") == 1  # rank 0 speaks
    assert len(mlflow_runs(uri)) == 2  # one MLflow run per command, not per process
    a, b = RunDir(tmp_path / "one").read_history(), RunDir(made[0]).read_history()
    assert len(a) == len(b) == 3
    # same images, same augmentation, same steps: only the order of float sums differs (the
    # all-reduce adds two halves of each gradient), ~1e-7 relative per step
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose([h[key] for h in b], [h[key] for h in a], rtol=1e-4, err_msg=key)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "one", made[0]))
    assert mb["val"]["accuracy"] == ma["val"]["accuracy"]
    assert mb["val"]["loss"] == pytest.approx(ma["val"]["loss"], rel=1e-4)
    # each process's rows as 2 micro-batches (DDP syncs the gradients once, at the last)
    acc = train(*common, "--nproc-per-node", 2, "--set", "train.accumulate=2", "--out",
                tmp_path / "acc", cwd=tmp_path)  # fmt: skip
    assert acc.returncode == 0, acc.stderr
    c = RunDir(tmp_path / "acc").read_history()
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose([h[key] for h in c], [h[key] for h in a], rtol=1e-4, err_msg=key)


def worker_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the torchrun workers that `cifarlab train --nproc-per-node` started (its
    children: the launcher runs torchrun's agent in its own process)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
            env = dict(
                e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e
            )
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and b"RANK" in env:
            found[int(env[b"RANK"])] = int(proc.name)
    return found


def wait_for_epochs(out: Path, epochs_done: int, proc: subprocess.Popen) -> RunDir:
    """Wait (at most 3 minutes) until `out`'s last.pt holds `epochs_done` finished epochs,
    while `proc` still runs."""
    run, deadline = RunDir(out), time.time() + 180
    while not (run.last.is_file() and run.finished_epochs() >= epochs_done):
        assert proc.poll() is None and time.time() < deadline, "the run ended first"
        time.sleep(0.2)
    return run


def kill_rank_1_after(out: Path, epochs_done: int, proc: subprocess.Popen) -> float:
    """Once `out` holds `epochs_done` finished epochs, kill -9 rank 1; return when."""
    wait_for_epochs(out, epochs_done, proc)
    pids = worker_pids(proc.pid)
    os.kill(pids[1], signal.SIGKILL)
    return time.time()


def test_a_killed_rank_stops_the_run_and_it_resumes_at_any_world_size(tmp_path):
    data = make_folder(tmp_path / "data", per_class=60)
    r = recipe(tmp_path, epochs=25, batchnorm=True)
    out = tmp_path / "run"
    cmd = [*CLI, "train", "--no-progress", "--no-track", "--nproc-per-node", "2"]
    proc = subprocess.Popen(
        [*cmd, "--recipe", str(r), "--data", str(data), "--out", str(out)],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    killed = kill_rank_1_after(out, 2, proc)
    err = proc.communicate(timeout=90)[1]
    assert time.time() - killed < 60  # rank 0 did not hang
    assert proc.returncode == 1, err
    assert "training process rank 1 was killed by SIGKILL" in err
    assert f"continues with `cifarlab train --resume {out} --nproc-per-node 2`" in err
    assert err.count("Traceback") == 0, err
    done = RunDir(out).finished_epochs()
    assert done >= 2 and torch.load(RunDir(out).last, weights_only=True)["state"]  # intact

    # the same world size again, killed again; then one process finishes the run
    proc = subprocess.Popen(
        [*cmd, "--resume", str(out)], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    kill_rank_1_after(out, done + 1, proc)
    err = proc.communicate(timeout=90)[1]
    assert proc.returncode == 1, err
    finish = train("--no-track", "--resume", out, cwd=tmp_path)
    assert finish.returncode == 0, finish.stderr
    history = RunDir(out).read_history()
    assert [h["epoch"] for h in history] == list(range(1, 26))  # each epoch once, in order
    assert (out / "metrics.json").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(rank: int, port: int, r: Path, data: Path, out: Path) -> subprocess.Popen:
    """One "machine" of two: a plain torchrun launcher with one process, meeting at 127.0.0.1."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t",
        "--rdzv-conf", f"is_host={str(rank == 0).lower()}",
        "-m", "cifarlab", "train", "--no-progress", "--no-track",
        "--recipe", str(r), "--data", str(data), "--out", str(out),
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow  # ~13 s; the lost-machine test also meets on loopback
def test_two_nodes_on_loopback_with_plain_torchrun(tmp_path, tiny_folder):
    """Two torchrun launchers, one process each, meeting at 127.0.0.1 as two machines would."""
    port, r = free_port(), recipe(tmp_path, epochs=2)
    nodes = [node(rank, port, r, tiny_folder, tmp_path / "run") for rank in (0, 1)]
    outs = [n.communicate(timeout=240) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    history = RunDir(tmp_path / "run").read_history()
    assert len(history) == 2 and (tmp_path / "run" / "metrics.json").is_file()
    assert sum("run: " in out for out, _ in outs) == 1  # the global rank 0 alone reports


def test_a_lost_machine_stops_the_other_with_one_line(tmp_path):
    """Two "machines": the second one's process is killed; the first one's process finds its
    peer gone at its next collective and stops with one line, its last.pt intact."""
    data = make_folder(tmp_path / "data", per_class=60)
    port, r, out = free_port(), recipe(tmp_path, epochs=40, batchnorm=True), tmp_path / "run"
    nodes = [node(rank, port, r, data, out) for rank in (0, 1)]
    run = wait_for_epochs(out, 2, nodes[0])
    (worker,) = worker_pids(nodes[1].pid).values()
    os.kill(worker, signal.SIGKILL)
    killed = time.time()
    err = nodes[0].communicate(timeout=90)[1]
    nodes[1].communicate(timeout=90)
    assert time.time() - killed < 60 and nodes[0].returncode != 0
    assert "rank 0: another process of this run stopped" in err, err
    assert f"continue with `cifarlab train --resume {out}`" in err
    assert run.finished_epochs() >= 2  # last.pt loads


def test_launch_errors_are_one_line_and_exit_2(tmp_path, tiny_folder):
    base = ["--no-track", "--recipe", recipe(tmp_path), "--data", tiny_folder]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cases = {
            "in use by another program": [
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--node-rank",
                "0",
            ],
            "does not resolve": [
                "--rdzv-endpoint",
                "no-such-host.invalid:29400",
                "--node-rank",
                "1",
            ],
            "needs --node-rank": ["--rdzv-endpoint", f"127.0.0.1:{port}"],
            "is not an address of this machine": [
                "--rdzv-endpoint",
                "192.0.2.1:29400",
                "--node-rank",
                "0",
            ],
        }
        for expected, flags in cases.items():
            r = train(*base, "--nnodes", 2, "--nproc-per-node", 1, *flags, cwd=tmp_path, timeout=60)
            assert r.returncode == 2, (expected, r.stderr)
            assert expected in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sync-bn"], "--sync-bn (sync_bn: true) needs CUDA"),
        (["--set", "train.lrr=1"], "train.lrr"),
        (["--resume", "nowhere"], "has no last.pt/config.yaml to resume from"),
    ],
)
def test_what_every_process_would_refuse_is_refused_before_they_start(
    tmp_path, tiny_folder, monkeypatch, capsys, flags, message
):
    from cifarlab.cli import main
    from cifarlab.training import launch

    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("processes started"))
    argv = ["train", "--no-track", "--recipe", str(recipe(tmp_path)), "--data", str(tiny_folder),
            "--nproc-per-node", "2", "--out", str(tmp_path / "run"), *flags]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_budget_lookahead_ema_and_tta_under_two_processes(tmp_path, tiny_folder, tiny_fast_recipe):
    """The budget is planned once (rank 0) and followed by both; lookahead, EMA and TTA level
    2 run as in one process; one run directory records it."""
    out = tmp_path / "run"
    r = train(
        "--no-track", "--recipe", tiny_fast_recipe, "--data", tiny_folder, "--set", "train.ema=0.9",
        "--budget", "12s", "--nproc-per-node", 2, "--out", out, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("budget: first training step") == 1  # planned once
    planned = RunDir(out).recipe()["train"]["epochs"]
    history = RunDir(out).read_history()
    assert len(history) == math.ceil(history[-1]["planned_epochs"]) and planned > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] > 0.5  # colours separate the classes
    assert len(np.load(out / "val_probs.npy")) == 15  # every validation image, gathered


def test_feature_cache_and_two_phases_under_two_processes(tmp_path, tiny_folder):
    """A frozen-backbone phase on cached features (each process extracts its share), then
    fine-tuning: both phases train, checkpoint and score under DDP."""
    path = tmp_path / "cached.yaml"
    path.write_text(
        "name: cached\n"
        "model: {name: timm, arch: resnet18, pretrained_source: none, input_size: 32, head: [16]}\n"
        "data: {val_fraction: 0.25}\naugment: {flip: true}\n"
        "train: {epochs: 2, batch_size: 8, lr: 0.01, freeze: head, feature_views: 2, eval_tta: 1}\n"
        "phases:\n  - {name: head, epochs: 2}\n  - {name: tune, freeze: last-1, epochs: 1, lr: 0.001}\n"
    )
    out = tmp_path / "run"
    r = train("--no-track", "--recipe", path, "--data", tiny_folder, "--nproc-per-node", 2,
              "--out", out, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("feature cache: 2 view(s) of 45 train + 15 val images") == 1
    assert [h["phase"] for h in RunDir(out).read_history()] == ["head", "head", "tune"]
    assert (out / "phase1.pt").is_file() and (out / "phase2.pt").is_file()
    assert json.loads((out / "metrics.json").read_text())["val"]["accuracy"] > 0.6


def test_two_processes_share_out_the_teachers_logits_and_rank_0_keeps_them(
    tmp_path, tiny_folder, monkeypatch
):
    """distill.cache under DDP: each process computes the teacher's logits of its share of the
    images and every one gets the whole table, the same as one process computes; rank 0 alone
    writes it, and alone reads it in the next run (another machine's home need not hold it)."""
    import cifarlab

    teacher, student = tmp_path / "teacher", recipe(tmp_path, epochs=1)
    cifarlab.train(recipe(tmp_path, name="teacher"), tiny_folder, teacher, progress=False)
    monkeypatch.setenv("CIFARLAB_HOME", str(tmp_path / "h1"))  # one process: this one
    taught = {"distill.teacher": str(teacher), "distill.cache": True}
    cifarlab.train(student, tiny_folder, tmp_path / "one", overrides=taught, progress=False)
    base = ["--no-track", "--recipe", student, "--data", tiny_folder,
            "--teacher", teacher, "--set", "distill.cache=true"]  # fmt: skip
    runs = {}
    for name, home, nproc in (("two", "h2", 2), ("again", "h2", 2)):
        env = {**os.environ, "CIFARLAB_HOME": str(tmp_path / home)}
        runs[name] = subprocess.run(
            [*CLI, "train", "--no-progress", *map(str, base), "--nproc-per-node", str(nproc),
             "--out", str(tmp_path / name)],
            cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env,
        )  # fmt: skip
        assert runs[name].returncode == 0, runs[name].stderr
    assert runs["two"].stderr.count("x 2 (plain, mirrored) computed by 2 processes") == 1
    one, two = (
        np.load(next((tmp_path / h / "teacher-logits").glob("*.npy"))) for h in ("h1", "h2")
    )
    assert one.shape == (45, 2, 3)
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5)
    assert runs["again"].stderr.count("read from") == 1
    cache = json.loads((tmp_path / "again" / "metrics.json").read_text())["teacher_cache"]
    assert cache["logits"] == "read"


@pytest.mark.slow  # ~21 s; tune and DDP are each tested on their own
def test_a_tune_study_trains_each_trial_in_two_processes(tmp_path, tiny_folder):
    """Trials one after another, each distributed: rank 0 owns the study and MLflow."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {type: float, low: 0.01, high: 0.1, log: true}\n")
    r = subprocess.run(
        [*CLI, "tune", "--recipe", str(recipe(tmp_path, epochs=2)), "--data", str(tiny_folder),
         "--trials", "2", "--space", str(space), "--storage", f"sqlite:///{tmp_path}/tune.db",
         "--out", str(tmp_path / "study"), "--tracking-uri", uri, "--no-progress",
         "--nproc-per-node", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("best: trial") == 1  # rank 0 alone reports
    rows = (tmp_path / "study" / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",COMPLETE," in row for row in rows[1:])
    for n in (0, 1):
        assert len(RunDir(tmp_path / "study" / f"trial-{n}").read_history()) == 2
    assert len(mlflow_runs(uri)) == 3  # the study's parent run and one child per trial


def test_ctrl_c_stops_every_process_with_rank_0s_line(tmp_path):
    """Ctrl-C reaches the launcher and its processes (one process group, as in a terminal);
    torchrun's agent then sends the same SIGINT on, which each process ignores."""
    data = make_folder(tmp_path / "data", per_class=60)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*CLI, "train", "--no-progress", "--no-track", "--nproc-per-node", "2", "--recipe",
         str(recipe(tmp_path, epochs=300)), "--data", str(data), "--out", str(out)],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    run = wait_for_epochs(out, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if not line.startswith(("train ", "run: "))]
    assert lines[-1].startswith(f"cifarlab: interrupted; {run.last} holds"), err
    assert "Traceback" not in err and "death signal" not in err
