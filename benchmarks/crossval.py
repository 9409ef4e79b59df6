"""Group k-fold cross-validation of a training recipe: how much one validation split's figure can be trusted.

Trains the recipe K times with ``cxr-node train --fold I/K`` (every image validated exactly once, no
patient/source group on both sides of any fold) and prints each fold's validation figures, their mean and
standard deviation, and the pooled accuracy over all images. ``--jobs 2`` runs two folds at once, each
pinned to one CPU with one TensorFlow thread (faster in total than one fold on all CPUs).

    PYTHONPATH=. python benchmarks/crossval.py /work/shared/data/cxr3 /tmp/cv --folds 5 --jobs 2 [-- TRAIN ARGS]

``{fold}`` in a train argument becomes the fold's number, for inputs made per fold, such as a lung
model trained without the fold's images (``-- --lung-model /tmp/lungs{fold}``).

Prints a table and, as the last line, a JSON object. Fold artifacts are kept in OUTPUT for inspection.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import table
from classifier.cli import at_least, random_seed


def _fold_command(data: Path, output: Path, fold: int, folds: int, seed: int, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "classifier.cli", "train", str(data), str(output),
        "--fold", f"{fold}/{folds}", "--split-seed", str(seed), "--no-progress",
        "--version", f"crossval-{fold}-of-{folds}", *(arg.replace("{fold}", str(fold)) for arg in extra),
    ]  # fmt: skip


def _run_folds(args: argparse.Namespace, extra: list[str]) -> dict[int, float]:
    running: dict[int, tuple[subprocess.Popen[bytes], float, int]] = {}
    try:
        return _train_folds(args, extra, running)
    except BaseException:  # a fold failed, or Ctrl-C: the others would train on, pinned, for nobody
        _stop([process for process, _, _ in running.values()])
        raise


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """Terminate the folds still training and reap them (killed if they do not end within 30 s)."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _train_folds(
    args: argparse.Namespace, extra: list[str], running: dict[int, tuple[subprocess.Popen[bytes], float, int]]
) -> dict[int, float]:
    cpus = sorted(os.sched_getaffinity(0))
    pending = list(args.only)
    seconds: dict[int, float] = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            fold = pending.pop(0)
            folder = args.output / f"fold{fold}"
            busy = {cpu for _, _, cpu in running.values()}
            cpu = next(c for c in cpus if c not in busy) if args.jobs > 1 else -1
            env = dict(os.environ)
            if cpu >= 0:
                env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1")
            log = (args.output / f"fold{fold}.log").open("wb")
            command = _fold_command(args.data, folder, fold, args.folds, args.seed, extra)
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            if cpu >= 0:
                os.sched_setaffinity(process.pid, {cpu})
            running[fold] = (process, time.monotonic(), cpu)
            print(f"fold {fold}/{args.folds} started" + (f" on CPU {cpu}" if cpu >= 0 else ""), file=sys.stderr)
        pid, status = os.wait()  # the folds are this process's only children: block until one ends
        ended = next((f for f, (process, _, _) in running.items() if process.pid == pid), None)
        if ended is None:
            continue
        process, started, _ = running.pop(ended)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen cannot see it
        if process.returncode != 0:
            log = args.output / f"fold{ended}.log"
            sys.exit(f"fold {ended} failed (exit {process.returncode}); see {log}")
        seconds[ended] = time.monotonic() - started
        print(f"fold {ended}/{args.folds} done in {seconds[ended] / 60:.1f} min", file=sys.stderr)
    return seconds


def _epoch_accuracies(history: dict[str, list[float]]) -> tuple[float | None, float | None]:
    """Validation accuracy of the last epoch and of the best validation-loss epoch, from a run's history."""
    losses, accuracies = history.get("val_loss") or [], history.get("val_accuracy") or []
    if not losses or len(losses) != len(accuracies):
        return None, None
    # as BestWeights skips NaN; model.json records a NaN epoch as null
    finite = [index for index, loss in enumerate(losses) if loss is not None and math.isfinite(loss)]
    best = min(finite, key=losses.__getitem__) if finite else len(losses) - 1
    last, kept = accuracies[-1], accuracies[best]
    return (None if last is None else float(last)), (None if kept is None else float(kept))


def _row(fold: int, folder: Path) -> dict[str, Any]:
    if not (folder / "model.json").is_file():  # --report-only before a fold has ended, or after it failed
        sys.exit(f"fold {fold} has no model.json in {folder}: train it (without --report-only) or leave it "
                 "out with --only")
    metadata = json.loads((folder / "model.json").read_text())
    validation = metadata["validation"]
    last, best = _epoch_accuracies(metadata.get("training", {}).get("history", {}))
    covid = validation["per_class"].get("covid", {})
    matrix = validation["confusion_matrix"]
    return {
        "fold": fold,
        "images": int(validation["images"]),
        "correct": int(sum(matrix[i][i] for i in range(len(matrix)))),
        "accuracy": float(validation["accuracy"]),
        "macro_f1": float(validation["macro_f1"]),
        "covid_auc": None if covid.get("roc_auc") is None else float(covid["roc_auc"]),  # null: no COVID
        "last_epoch_accuracy": last,
        "best_epoch_accuracy": best,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="folder of class sub-folders or manifest CSV (with groups)")
    parser.add_argument("output", type=Path, help="folder for the fold artifacts and logs")
    parser.add_argument("--folds", type=at_least(2), default=5)
    parser.add_argument("--seed", type=random_seed, default=42, help="seed of the fold assignment")
    parser.add_argument("--jobs", type=at_least(1), default=1, help="folds trained at once (each on one CPU)")
    parser.add_argument("--report-only", action="store_true", help="tabulate folds already trained in OUTPUT")
    parser.add_argument(
        "--only", type=lambda text: sorted({int(part) for part in text.split(",")}), metavar="I,J",
        help="train and tabulate only these folds (0-based), e.g. a first look at a recipe",
    )
    args = parser.parse_args(argv)
    cpus = len(os.sched_getaffinity(0))
    if args.jobs > cpus:  # each fold is pinned to a CPU of its own
        parser.error(f"--jobs: at most {cpus}, the CPUs this process may use")
    if args.only is None:
        args.only = list(range(args.folds))
    elif not all(0 <= fold < args.folds for fold in args.only):
        parser.error(f"--only: folds are 0 to {args.folds - 1}")
    args.output.mkdir(parents=True, exist_ok=True)

    seconds = {} if args.report_only else _run_folds(args, extra)
    rows = [_row(fold, args.output / f"fold{fold}") for fold in args.only]

    columns = [("fold", ""), ("images", ""), ("accuracy", ".3f"), ("macro-F1", ".3f"), ("COVID AUC", ".3f"),
               ("last epoch", ".3f"), ("best epoch", ".3f"), ("minutes", ".1f")]
    print(table.render(columns, [
        [row["fold"], row["images"], row["accuracy"], row["macro_f1"], row["covid_auc"],
         row["last_epoch_accuracy"], row["best_epoch_accuracy"],
         seconds[row["fold"]] / 60 if row["fold"] in seconds else None]
        for row in rows
    ]))
    summary: dict[str, Any] = {"folds": args.folds, "seed": args.seed, "train_args": extra, "per_fold": rows}
    for key in ("accuracy", "macro_f1", "covid_auc", "last_epoch_accuracy", "best_epoch_accuracy"):
        values = [row[key] for row in rows if row[key] is not None]
        if len(values) >= 2:
            mean, sd = statistics.mean(values), statistics.stdev(values)
            summary[key] = {"mean": round(mean, 4), "sd": round(sd, 4)}
    summary["pooled_accuracy"] = round(sum(r["correct"] for r in rows) / sum(r["images"] for r in rows), 4)
    spread = [
        f"{name} {summary[key]['mean']:.3f} ± {summary[key]['sd']:.3f}"
        for key, name in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("covid_auc", "COVID AUC"))
        if key in summary  # a COVID AUC in fewer than two folds (or no COVID class) has no spread
    ]
    if spread:
        print(
            f"mean ± sd: {', '.join(spread)}; "
            f"pooled accuracy {summary['pooled_accuracy']:.3f} over {sum(r['images'] for r in rows)} images"
        )
    print(table.json_line(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
