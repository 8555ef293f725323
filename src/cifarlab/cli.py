"""`cifarlab` command line: a thin layer over the Python API (cifarlab.api)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cifarlab import __version__
from cifarlab.errors import UserError

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
    for flag, key in (
        ("image_size", "data.image_size"),
        ("limit", "data.limit"),
        ("seed", "seed"),
        ("device", "device"),
    ):
        if getattr(args, flag) is not None:
            out[key] = getattr(args, flag)
    return out


def cmd_train(args) -> None:
    from cifarlab import api

    if args.resume is None and args.data is None:
        raise UserError(
            "pass --data PATH (image folder, archive, CIFAR-10 folder or 'cifar10'), "
            "or --resume RUN_DIR"
        )
    result = api.train(
        args.recipe,
        args.data,
        args.out,
        args.test,
        overrides_from(args),
        args.resume,
        progress=not args.no_progress,
    )
    line = f"run: {result['run_dir']}  val_accuracy {result['val']['accuracy']:.4f}"
    if "test" in result:
        line += f"  test_accuracy {result['test']['accuracy']:.4f}"
    print(line + f"  train time {result['train_seconds']:.0f}s")


def cmd_evaluate(args) -> None:
    from cifarlab import api

    m = api.evaluate(args.model, args.data, tta=args.tta, device=args.device or "cpu")
    if args.json:
        print(json.dumps(m))
        return
    print(f"accuracy {m['accuracy']:.4f}   loss {m['loss']:.4f}   n {m['n']}")
    print(f"{'class':<16}{'precision':>10}{'recall':>10}{'accuracy':>10}{'n':>7}")
    for name, c in m["per_class"].items():
        print(
            f"{name:<16}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['accuracy']:>10.4f}{c['support']:>7}"
        )


def cmd_predict(args) -> None:
    from cifarlab import api

    for r in api.predict(args.model, args.inputs, args.top_k, device=args.device or "cpu"):
        if args.json:
            print(json.dumps(r))
        elif "error" in r:
            print(f"{r['path']}: skipped: {r['error']}", file=sys.stderr)
        else:
            print(
                f"{r['path']}\t"
                + "  ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"])
            )


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
    from cifarlab import config

    if args.show:
        text = (
            (config.RECIPES / "defaults.yaml").read_text()
            if args.show == "defaults"
            else config.dump(config.load_recipe(args.show))
        )
        print(text, end="")
        return
    for name in config.recipe_names():
        desc = " ".join(str(config.load_recipe(name)["description"]).split())
        print(f"{name:<18}{desc[:100]}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cifarlab", description=__doc__)
    p.add_argument("--version", action="version", version=f"cifarlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe on a dataset into a run directory")
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
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe key")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="score a model on labelled data")
    e.add_argument("model", help="run directory or checkpoint")
    e.add_argument("--data", help="labelled data (default: the run's own validation split)")
    e.add_argument("--tta", action="store_true", help="average with horizontally flipped images")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--device", choices=["cpu", "cuda"])
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="top-k classes for images")
    r.add_argument("model", help="run directory or checkpoint")
    r.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    r.add_argument("--top-k", type=int, default=3)
    r.add_argument("--json", action="store_true", help="one JSON object per line")
    r.add_argument("--device", choices=["cpu", "cuda"])
    r.set_defaults(func=cmd_predict)

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

    rc = sub.add_parser("recipes", help="list the shipped recipes")
    rc.add_argument("--show", metavar="NAME", help="print a resolved recipe (or 'defaults')")
    rc.set_defaults(func=cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"cifarlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "cifarlab: interrupted; a training run continues with `cifarlab train --resume RUN_DIR`",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
