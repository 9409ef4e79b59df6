"""``cxr-node train | evaluate | classify`` — added to the node's CLI by :func:`register`.

Also runnable on its own (``python -m classifier.cli ...``) so the classifier works without the node.
Never imports ``dicom_node``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ParamSpec

from classifier.architectures import (
    DEFAULT_ARCHITECTURE,
    MAX_SEED,
    MIN_INPUT_SIZE,
    architecture_names,
    get_architecture,
)
from classifier.errors import ClassifierError, OptionError
from classifier.types import identity_problem

LOGGER = logging.getLogger(__name__)
_P = ParamSpec("_P")  # the arguments of a main that saying_errors wraps

DATA_HELP = (
    "folder of class sub-folders (PNG/JPEG/BMP/TIFF, or DICOM with or without .dcm, e.g. a PACS export), or "
    "a manifest CSV (file,label[,group]); a folder holding a manifest.csv is read by that manifest alone, "
    "not by its sub-folders"
)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the classifier's subcommands to an argparse CLI."""
    train = subparsers.add_parser(
        "train", help="train a model on labelled images and write an artifact folder"
    )
    train.add_argument("data", type=Path, help=DATA_HELP)
    train.add_argument(
        "output", type=Path, help="artifact folder to write (its model files are replaced, other files kept)"
    )
    train.add_argument(
        "--architecture",
        "-a",
        type=_architectures,
        default=[DEFAULT_ARCHITECTURE],
        help=f"one of {', '.join(architecture_names())}; several, comma-separated, train one member each "
        "on the same split and merge them into one model",
    )
    held_out = train.add_mutually_exclusive_group()  # a fold holds out 1/K: a fraction beside it was ignored
    held_out.add_argument(
        "--validation-fraction", type=_fraction,
        help="held out by patient group (default: the recipe's: 0.1 for sugandi-cnn and 0.15 for "
        "resnet152-transfer, as their papers; 0.2 for the others)",
    )
    train.add_argument("--seed", type=random_seed, default=42, help="weights, shuffling and augmentation")
    train.add_argument(
        "--split-seed", type=random_seed,
        help="seed of the group-aware train/validation split (default: --seed)",
    )
    held_out.add_argument(
        "--fold", type=_fold, metavar="I/K",
        help="validate on fold I (0-based) of a group K-fold split instead of --validation-fraction",
    )
    train.add_argument("--epochs", type=at_least(1), help="override the recipe's epochs (every stage)")
    train.add_argument("--batch-size", type=at_least(1), help="override the recipe's batch size")
    train.add_argument(
        "--learning-rate", type=_positive, help="override the recipe's learning rate (every stage)"
    )
    train.add_argument(
        "--augmentation",
        type=_augmentation,
        help="override the recipe's augmentation (none, sugandi-table2, robust, robust-fov, robust-strong, "
        "robust-reframe, robust-strong-reframe)",
    )
    train.add_argument(
        "--weights", help="backbone weights file (transfer models; default: ImageNet from Keras' cache)"
    )
    train.add_argument(
        "--centre-crop", type=_number("[0.3, 1]", lambda value: 0.3 <= value <= 1.0),
        help="keep this central fraction of every image (train and inference)"
    )
    train.add_argument(
        "--input-size", type=at_least(MIN_INPUT_SIZE),
        help=f"square input side in pixels, at least {MIN_INPUT_SIZE} (default: the architecture's)",
    )
    train.add_argument(
        "--mixup", type=_non_negative, metavar="ALPHA",
        help="mix training images and labels with weights drawn from Beta(ALPHA, ALPHA); 0 = off (the recipe's)",
    )
    train.add_argument(
        "--average-last", type=at_least(1), metavar="N",
        help="the model is the mean of the weights of the last N epochs (stochastic weight averaging), "
        "not the best validation epoch's",
    )
    lung_source = train.add_mutually_exclusive_group()
    lung_source.add_argument(
        "--lung-model", type=Path, metavar="FOLDER",
        help="a lung U-Net from 'train-lungs': crop every image to its lung fields (shipped inside the model)",
    )
    lung_source.add_argument(
        "--lung-masks", type=existing_folder, metavar="FOLDER",
        help="train that lung U-Net first (as 'train-lungs' on the training split), then crop with it",
    )
    train.add_argument(
        "--lung-epochs", type=at_least(1), help="epochs of the lung U-Net (--lung-masks; default 120)"
    )
    members = train.add_mutually_exclusive_group()  # with both, --members was ignored
    members.add_argument(
        "--members", type=at_least(1),
        help="train this many seeds (--seed, --seed+1, ...) on one split and merge them (default: the recipe's)",
    )
    members.add_argument(
        "--seeds", type=_seed_list,
        help="comma-separated member seeds (instead of --members); the split is --split-seed or the first",
    )
    _relabel_option(train, "train on")
    train.add_argument("--version", type=model_identity,
                       help="artifact version string (default: architecture and date)")
    train.add_argument(
        "--steps-per-epoch", type=at_least(1),
        help="batches per epoch instead of one pass over the training images (smoke runs)",
    )  # fmt: skip
    train.add_argument(
        "--no-progress", action="store_true",
        help="no progress bar (none either when standard error is not a terminal: a log has a line an epoch)",
    )
    _novelty_switch(train)
    train.set_defaults(func=_train)

    lungs = subparsers.add_parser(
        "train-lungs", help="train the lung-field U-Net that --lung-model crops with",
        description="Train the lung U-Net on the images of DATA (a collection with manifest.csv) that have a "
        "mask in MASKS (matched by the stem of the manifest's source column), e.g. the V7 Labs lung masks in "
        "torchxrayvision/data/semantic_masks_v7labs_lungs.zip.",
    )
    lungs.add_argument("data", type=Path, help="collection folder with manifest.csv")
    lungs.add_argument("masks", type=existing_folder, help="folder of lung mask images (white lungs)")
    lungs.add_argument("output", type=Path, help="folder to write lungs.keras + lungs.json")
    lungs_held_out = lungs.add_mutually_exclusive_group()
    lungs_held_out.add_argument(
        "--fold", type=_fold, metavar="I/K",
        help="train only on the images outside fold I of the classifier's K-fold split; report Dice on fold I",
    )
    lungs.add_argument(
        "--split-seed", type=random_seed, default=42, help="the classifier split's seed (with --fold)"
    )
    lungs_held_out.add_argument(
        "--validation-fraction", type=_fraction, default=0.2, help="held out for the Dice figure"
    )
    lungs.add_argument("--epochs", type=at_least(1), default=120, help="epochs of the U-Net (default 120)")
    lungs.add_argument("--batch-size", type=at_least(1), default=8)
    lungs.add_argument("--seed", type=random_seed, default=42)
    lungs.add_argument("--version", help="version string (default: lungs-unet-DATE)")
    lungs.set_defaults(func=_train_lungs)

    ensemble = subparsers.add_parser(
        "ensemble", help="merge trained artifacts of one split (one or several architectures) into one model"
    )
    ensemble.add_argument("output", type=Path, help="artifact folder to write")
    ensemble.add_argument("members", type=Path, nargs="+", help="member artifact folders")
    ensemble.add_argument(
        "--data", type=Path, required=True, help=f"the members' training data (their validation): {DATA_HELP}"
    )
    ensemble.add_argument("--version", type=model_identity,
                          help="artifact version string (default: the members' names and the date)")
    _novelty_switch(ensemble)
    ensemble.set_defaults(func=_ensemble)

    novelty = subparsers.add_parser(
        "novelty",
        help="fit an artifact's check of images unlike its training images (train and ensemble run it)",
        description="Fit the feature density of classifier.novelty on the training split recorded in MODEL's "
        "model.json, set its threshold on the validation split, fit the probe of how an image is presented "
        "(turned, inverted) on the same images turned and inverted, and write novelty.npz, "
        "presentation_probe.npz and model.json.",
    )
    novelty.add_argument("model", type=Path, help="artifact folder (model.keras + model.json)")
    novelty.add_argument("data", type=Path, help=f"the data the model was trained on: {DATA_HELP}")
    novelty.add_argument("--rank", type=at_least(1), default=64, help="eigenvectors of the covariance kept")
    novelty.add_argument(
        "--shrinkage", type=_number("(0, 1]", lambda value: 0.0 < value <= 1.0), default=0.5,
        help="weight of the identity in the covariance",
    )
    novelty.add_argument(
        "--quantile", type=_number("[0.5, 1)", lambda value: 0.5 <= value < 1.0), default=0.99,
        help="threshold: this quantile of the validation images' scores (1 - q of them are called unfamiliar)",
    )
    novelty.set_defaults(func=_novelty)

    evaluate = subparsers.add_parser(
        "evaluate", help="score a model artifact on labelled images (JSON + PNG)"
    )
    evaluate.add_argument("model", type=Path, help="artifact folder (model.keras + model.json)")
    evaluate.add_argument("data", type=Path, help=DATA_HELP)
    evaluate.add_argument("--output", "-o", type=Path, help="folder for metrics.json and the PNG figures")
    evaluate.add_argument(
        "--degrade", type=degradation, default="none",
        help="re-encode/degrade images first (see classifier.evaluation)"
    )
    evaluate.add_argument(
        "--split",
        choices=("all", "validation", "train"),
        default="all",
        help="score only one side of the group split recorded in the model's model.json",
    )
    _relabel_option(evaluate, "score against")
    evaluate.set_defaults(func=_evaluate)

    classify = subparsers.add_parser(
        "classify", help="classify DICOM or PNG/JPEG files with a model artifact"
    )
    classify.add_argument("files", type=Path, nargs="+")
    classify.add_argument("--model", type=Path, help="artifact folder (default: the shipped model)")
    classify.add_argument(
        "--threshold", type=_probability, default=0.5, help="indeterminate below this top probability"
    )
    classify.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    classify.set_defaults(func=_classify)


def _novelty_switch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-novelty", action="store_true",
        help="do not fit the check of unfamiliar images afterwards (run 'cxr-node novelty' later)",
    )


def _relabel_option(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--relabel", action="append", default=[], metavar="NEW=OLD[,OLD...]",
        help=f"{verb} merged classes, e.g. non-covid=normal,pneumonia for a COVID-19 / non-COVID model "
        "(Nie et al.); repeatable. Training splits by the original labels first.",
    )


def _fit_novelty(folder: Path, data: Path, **options: Any) -> None:
    from classifier.novelty import fit_novelty

    record = fit_novelty(folder, data, **options)
    check = record["validation"]
    _say(
        f"novelty check: threshold {record['threshold']:.4g} ({record['quantile']:g} quantile of "
        f"{check['images']} validation images; {check['unfamiliar']} of them above it)"
    )
    probe = record["presentation_probe"]["validation"]
    _say(
        f"turn and negative checks: the presentation named right for {probe['named_right']:.1%} of the "
        f"validation images at their four turns, as they are and inverted; "
        f"{probe['as_trained_called_otherwise']} upright positives called turned or inverted"
    )


def _novelty(args: argparse.Namespace) -> int:
    _fit_novelty(args.model, args.data, rank=args.rank, shrinkage=args.shrinkage, quantile=args.quantile)
    return 0


def _fold(text: str) -> tuple[int, int]:
    """``I/K`` → (I, K): fold I (0-based) of K."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected I/K, e.g. 0/5") from None
    if count < 2 or not 0 <= index < count:
        raise argparse.ArgumentTypeError("I must be 0..K-1 and K at least 2")
    return index, count


def _architectures(text: str) -> list[str]:
    """``a[,b...]`` → architecture names, each known and none twice."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in architecture_names():
            raise argparse.ArgumentTypeError(
                f"unknown architecture {name!r}; choose from {', '.join(architecture_names())}"
            )
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError("name each architecture once")
    return names


def random_seed(text: str) -> int:
    """argparse type: a random seed, 0 to 2^32 - 1 as Keras and NumPy take it (a negative one was a raw
    ValueError from Keras after the output folder was made)."""
    value = at_least(0)(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is more than {MAX_SEED}")
    return value


def _seed_list(text: str) -> list[int]:
    return [random_seed(part.strip()) for part in text.split(",")]


def existing_folder(text: str) -> Path:
    """argparse type: a folder that is there (a missing mask folder was a FileNotFoundError traceback
    after the output folder had been made)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {text}")
    return path


def model_identity(text: str) -> str:
    """argparse type: a model version the reports can carry (:func:`classifier.types.identity_problem`),
    checked before the training rather than when its artifact is written."""
    if problem := identity_problem(text):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} {problem}")
    return text


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: a whole number of at least ``minimum`` (0 epochs wrote an untrained model)."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return whole


def _number(span: str, inside: Callable[[float], bool]) -> Callable[[str], float]:
    """argparse type: a number ``inside`` the range that ``span`` names."""

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan  # inside no range
        if math.isnan(value) or not inside(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number in {span}")
        return value

    return number


_fraction = _number("(0, 1)", lambda value: 0.0 < value < 1.0)
_non_negative = _number("[0, ∞)", lambda value: 0.0 <= value < math.inf)
_positive = _number("(0, ∞)", lambda value: 0.0 < value < math.inf)  # a learning rate of 0 trains nothing


def _augmentation(text: str) -> str:
    """argparse type: the name of an augmentation of :mod:`classifier.augmentation`."""
    from classifier.augmentation import AUGMENTATIONS

    if text not in AUGMENTATIONS:
        known = ", ".join(AUGMENTATIONS)
        raise argparse.ArgumentTypeError(f"unknown augmentation {text!r}; choose one of {known}")
    return text


def _probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability in [0, 1]")
    return value


def degradation(text: str) -> str:
    """argparse type: a degradation spelling that :func:`classifier.evaluation.parse_degradation` reads."""
    from classifier.evaluation import parse_degradation

    try:
        parse_degradation(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _say(text: str) -> None:
    """Command output (not logging): the user asked for it."""
    sys.stdout.write(text + "\n")


def _command_line(args: argparse.Namespace) -> list[str] | None:
    """The command model.json records: the arguments :func:`main` was given (a script or notebook calling
    ``main([...])`` recorded its own interpreter's ``sys.argv``, not the training it ran), else the
    process's own (the node's CLI, which calls the subcommand itself)."""
    given = getattr(args, "command_line", None)
    if given is not None:
        return ["cxr-node", *given]
    return ["cxr-node", *sys.argv[1:]] if sys.argv else None


def _train(args: argparse.Namespace) -> int:
    from classifier.dataset import parse_relabel
    from classifier.lungs import LUNG_EPOCHS
    from classifier.training import TrainingConfig, train

    architectures = args.architecture
    if args.lung_epochs is not None and args.lung_masks is None:
        raise OptionError(
            "--lung-epochs sets the epochs of the lung U-Net that --lung-masks trains; give both"
        )
    config = TrainingConfig(
        architecture=architectures[0],
        data=args.data,
        output=args.output,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        split_seed=args.split_seed,
        fold=args.fold[0] if args.fold else None,
        folds=args.fold[1] if args.fold else 5,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        augmentation=args.augmentation,
        centre_crop=args.centre_crop,
        input_size=args.input_size,
        mixup=args.mixup,
        average_last=args.average_last,
        lung_model=args.lung_model,
        lung_masks=args.lung_masks,
        lung_epochs=args.lung_epochs or LUNG_EPOCHS,
        weights=args.weights,
        relabel=parse_relabel(args.relabel),
        version=args.version,
        steps_per_epoch=args.steps_per_epoch,
        # a bar's carriage returns broke the epoch lines of a log file, where no one watches it (review)
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    argv = _command_line(args)
    if len(architectures) > 1 and (args.members or args.seeds or args.weights):
        raise OptionError(
            "several architectures train one member each, from their own weights; drop "
            "--members/--seeds/--weights"
        )
    members = args.members or get_architecture(architectures[0]).recipe.members
    seeds = args.seeds or [args.seed + offset for offset in range(members)]
    if args.seeds:  # the first listed seed is the run's seed, and its split's unless --split-seed says
        split = args.split_seed if args.split_seed is not None else seeds[0]
        config = replace(config, seed=seeds[0], split_seed=split)
    if len(seeds) > 1 or len(architectures) > 1:
        from classifier.ensemble import train_ensemble

        metadata = train_ensemble(
            config, seeds, argv=argv, architectures=architectures if len(architectures) > 1 else None
        )
        _say(
            f"wrote {args.output}: {len(metadata.training['ensemble']['members'])} members merged, "
            f"validation accuracy {metadata.validation['accuracy']:.3f}, "
            f"macro-F1 {metadata.validation['macro_f1']:.3f}"
        )
        if not args.no_novelty:
            _fit_novelty(args.output, args.data)
        return 0
    result = train(config, argv=argv)
    validation = result.metadata.validation
    _say(
        f"wrote {result.folder}: validation accuracy {validation['accuracy']:.3f}, "
        f"macro-F1 {validation['macro_f1']:.3f}, {result.seconds_per_epoch:.1f} s/epoch"
    )
    if not args.no_novelty:
        _fit_novelty(result.folder, args.data)
    return 0


def _train_lungs(args: argparse.Namespace) -> int:
    from classifier.dataset import load_collection, split_by_fold, split_by_group, writable_output
    from classifier.lungs import train_lung_model_on_split

    writable_output(args.output, args.data)
    items = load_collection(args.data)
    if args.fold:
        train_items, held_out = split_by_fold(items, args.fold[0], args.fold[1], args.split_seed)
    else:
        train_items, held_out = split_by_group(items, args.validation_fraction, args.split_seed)
    metadata, trained, held = train_lung_model_on_split(
        args.data, args.masks, train_items, held_out, args.output,
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, version=args.version,
    )  # fmt: skip
    validation = metadata["validation"] or {}
    _say(
        f"wrote {args.output}: trained on {trained} masked images; held-out Dice "
        f"{validation.get('dice_mean', float('nan')):.3f} on {held}, "
        f"{validation.get('whole_image_fallbacks', 0)} whole-image fallbacks"
    )
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from classifier.ensemble import build_ensemble

    metadata = build_ensemble(args.members, args.output, args.data, version=args.version,
                              argv=_command_line(args))
    _say(
        f"wrote {args.output}: {len(metadata.training['ensemble']['members'])} members merged, validation accuracy "
        f"{metadata.validation['accuracy']:.3f}, macro-F1 {metadata.validation['macro_f1']:.3f}"
    )
    if not args.no_novelty:
        _fit_novelty(args.output, args.data)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from classifier.artifact import read_metadata
    from classifier.dataset import load_collection, parse_relabel, split_from_record, writable_output
    from classifier.evaluation import evaluate

    if args.output is not None:
        writable_output(args.output, args.data)  # before the data are read and scored
    items = None
    if args.split != "all":
        split = read_metadata(args.model).data.get("split", {})
        model = f"model {args.model}"
        train_items, val_items = split_from_record(load_collection(args.data), split, model=model)
        items = val_items if args.split == "validation" else train_items
    report = evaluate(args.model, args.data, output=args.output, degrade=args.degrade, items=items,
                      relabel=parse_relabel(args.relabel), split=args.split)
    # all but the reliability diagram's bins (in metrics.json with --output)
    _say(json.dumps({k: v for k, v in report.items() if k != "reliability"}, indent=2))
    return 0


def _format_prediction(path: Path, prediction: Any) -> str:
    probabilities = " ".join(f"{name}={value:.3f}" for name, value in prediction.probabilities.items())
    line = f"{path.name}\t{prediction.label}\t{probabilities}"
    if prediction.novelty is not None:
        line += f"\tnovelty={prediction.novelty:.2f}" + ("\tunfamiliar" if prediction.unfamiliar else "")
    if prediction.looks_turned:
        line += f"\twrong-way-up(better turned {prediction.better_turn} quarter turn(s) anticlockwise)"
    if prediction.negative:
        line += "\tnegative(looks inverted: check Photometric Interpretation)"
    return line


def _classify(args: argparse.Namespace) -> int:
    from classifier.errors import ClassifierError
    from classifier.inference import Classifier, default_model_path

    classifier = Classifier.load(args.model or default_model_path(), indeterminate_threshold=args.threshold)
    status = 0
    for path in args.files:
        try:
            prediction = classifier.predict_file(path)
        except (ClassifierError, OSError) as exc:
            sys.stderr.write(f"{path.name}\terror\t{exc}\n")
            status = 1
            continue
        if args.json:
            _say(
                json.dumps(
                    {
                        "file": str(path),
                        "label": prediction.label,
                        "top_class": prediction.top_class,
                        "probabilities": dict(prediction.probabilities),
                        "model": prediction.model.version,
                        "novelty": prediction.novelty,
                        "unfamiliar": prediction.unfamiliar,
                        "better_turn": prediction.better_turn,
                        "negative": prediction.negative,
                        "doubt": prediction.doubt,
                    }
                )
            )
        else:
            _say(_format_prediction(path, prediction))
    return status


def saying_errors(main: Callable[_P, int]) -> Callable[_P, int]:
    """A benchmark's ``main`` that answers a model, data set or image it cannot use as this CLI does: one
    line (``error: ...``) and exit status 2, not a traceback ending in the same words."""

    @functools.wraps(main)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except ClassifierError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 2

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cxr-classifier", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    args.command_line = list(argv) if argv is not None else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ClassifierError as exc:  # a model, data set or image the command cannot use: say which
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:  # Ctrl-C in a training: a line, not a traceback (an artifact is written last)
        sys.stderr.write(f"{INTERRUPTED}\n")
        return 130


INTERRUPTED = "interrupted: a model or report is written only at the end of its command"


if __name__ == "__main__":
    sys.exit(main())
