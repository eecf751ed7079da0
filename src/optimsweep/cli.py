"""The command line: parse, call, print. The work lives in the modules it calls."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from optimsweep.spec import SpecError
from optimsweep.train import ConfigError, DivergedError, EpochStats, TrainConfig


def _config_flags(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                            metavar=f.name.upper(), help=f"default: {f.default}")


def load_config_file(path: Path) -> dict:
    with open(path) as fh:
        values = yaml.safe_load(fh) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of training parameters")
    return values


def _print_epoch(config: TrainConfig, stats: EpochStats) -> None:
    acc = "" if stats.val_accuracy is None else f"  val accuracy: {100 * stats.val_accuracy:.1f}%"
    print(f"Epoch {stats.epoch}/{config.epochs}  train loss: {stats.train_loss:.6f}  "
          f"val loss: {stats.val_loss:.6f}{acc}  lr: {stats.lr:.3g}  ({stats.seconds:.1f}s)",
          flush=True)


def cmd_train(args) -> int:
    from optimsweep.train import fit, load_data

    values = load_config_file(args.config) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                   if getattr(args, f.name) is not None})
    config = TrainConfig.from_dict(values)
    data = load_data(config)
    print(f"training {config.model} on {config.task} ({len(data.train_y)} train / "
          f"{len(data.val_y)} validation / {len(data.test_y)} test) on {data.device}")
    result = fit(config, data, on_epoch=lambda s: _print_epoch(config, s))
    acc = "" if result.test_accuracy is None else f"Accuracy: {100 * result.test_accuracy:.1f}%, "
    print(f"Test Error:\n {acc}Avg loss: {result.test_loss:.6f}")
    if args.save:
        from optimsweep.artifacts import save_state_dict

        save_state_dict(result.model, args.save)
        print(f"state_dict saved to {args.save}")
    return 0


def cmd_data(args) -> int:
    from optimsweep.data import prepare_fashion_mnist

    raw = prepare_fashion_mnist(args.root)
    print(f"FashionMNIST ready in {raw}")
    return 0


def _print_table(table) -> None:
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 200,
                           "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))


def cmd_sweep(args) -> int:
    from optimsweep.spec import load_spec
    from optimsweep.study import counted_trials, run_sweep, state_counts, trials_table

    spec = load_spec(args.file)
    study = run_sweep(spec, n_trials=args.n_trials, timeout=args.timeout, workers=args.workers,
                      progress=not args.no_progress)
    states = state_counts(study)
    print(f"\nstudy {spec.name!r}: {len(counted_trials(study))} trials "
          f"({states['complete']} complete, {states['pruned']} pruned, {states['fail']} failed)")
    print(f"top trials by {spec.metric} (validation; test accuracy is reported, never used to "
          "choose):")
    _print_table(trials_table(study, spec.metric, top=args.top))
    print(f"\nnext: make ui  (compare runs in MLflow)  |  make export SWEEP={spec.path}")
    return 0


def _print_confirmation(study) -> None:
    confirmed = study.user_attrs.get("confirmed")
    if not confirmed:
        return
    print(f"\nconfirmed over seeds {confirmed['seeds']} (mean ± std, best first):")
    for trial, mean, std in confirmed["ranking"]:
        print(f"  trial {trial:4d}: {mean:.4f} ± {std:.4f}")


def cmd_best(args) -> int:
    from optimsweep.export import open_existing
    from optimsweep.study import trials_table

    opened = open_existing(args.target)
    print(f"study {opened.spec.name!r}, {opened.spec.direction} {opened.spec.metric}:")
    _print_table(trials_table(opened.study, opened.spec.metric, top=args.top))
    _print_confirmation(opened.study)
    return 0


def cmd_confirm(args) -> int:
    from optimsweep.export import confirm as run_confirm
    from optimsweep.export import open_existing

    opened = open_existing(args.target)
    results = run_confirm(opened, top_k=args.top_k, seeds=args.seeds)
    metric = opened.spec.metric
    print(f"\n{'rank':>4} {'trial':>5}  mean {metric} ± std      test accuracy (mean)  params")
    for rank, c in enumerate(results, 1):
        test = (f"{sum(c.test_accuracies) / len(c.test_accuracies):.4f}"
                if c.test_accuracies else "-")
        print(f"{rank:>4} {c.trial:>5}  {c.mean:.4f} ± {c.std:.4f}   {test:>20}  {c.params}")
    print(f"\nconfirmed winner: trial {results[0].trial}; `optimsweep export {args.target}` "
          "exports it")
    return 0


def cmd_export(args) -> int:
    from optimsweep.export import export_best, open_existing

    done = export_best(open_existing(args.target), args.out)
    print(f"exported trial {done.trial.number} ({done.reason}) to {done.folder}/:")
    print("  config.yaml    every training parameter, ready to run")
    print("  state_dict.pt  its final weights (torch.load(..., weights_only=True))")
    print("  metrics.json   its metrics and provenance")
    print(f"reproduce: optimsweep train --config {done.folder / 'config.yaml'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimsweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one configuration (flags or --config FILE)")
    p.add_argument("--config", type=Path, help="YAML file of training parameters")
    p.add_argument("--save", type=Path, help="write the final state_dict here")
    _config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="run or resume the study a sweep file declares")
    p.add_argument("file", type=Path, help="sweeps/NAME.yaml")
    p.add_argument("--n-trials", type=int, help="total trials for the study (default: budget)")
    p.add_argument("--timeout", type=float, help="seconds for this invocation")
    p.add_argument("--workers", type=int, default=1, help="local worker processes")
    p.add_argument("--top", type=int, default=10, help="rows in the closing table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("best", help="the top trials of a study, best first")
    p.add_argument("target", help="sweep file or study name")
    p.add_argument("--top", type=int, default=10)
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("confirm", help="re-train the top-k configs with fresh seeds")
    p.add_argument("target", help="sweep file or study name")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    p.set_defaults(func=cmd_confirm)

    p = sub.add_parser("export", help="write the best (or confirmed) trial as a runnable config")
    p.add_argument("target", help="sweep file or study name")
    p.add_argument("--out", type=Path, help="folder (default: exports/STUDY)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="find, install or download FashionMNIST")
    p.add_argument("--root", type=Path, default=None, help="default: $OPTIMSWEEP_DATA or data/")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DivergedError, SpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the unfinished trial is marked failed and does not count; "
              "run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
