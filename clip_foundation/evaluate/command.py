"""Evaluate a saved CLIP: recall@K both ways on a dataset split (every image counted once with
all its captions), or zero-shot classification accuracy on labelled images.

    python evaluate.py --checkpoint=runs/NAME                         # the run's test split
    python evaluate.py --checkpoint=runs/NAME --data=DIR --split=all  # every image of any folder
    python evaluate.py --checkpoint=runs/NAME --zeroshot=DIR|cifar10:ROOT
    python evaluate.py --checkpoint=runs/NAME --format=clip_benchmark     # CLIP_benchmark's JSON
    python evaluate.py --help                                         # every option
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from clip_foundation.evaluate import benchmark_format
from clip_foundation.common import cli
from clip_foundation.evaluate import querybank
from clip_foundation.evaluate import zeroshot
from clip_foundation.data.splits import SPLITS, load_split, run_data_config
from clip_foundation.engines.options import ModelOptions, checked_device
from clip_foundation.engines.lazy import load_model
from clip_foundation.engines.registry import use_engine
from clip_foundation.common.files import atomic_write
from clip_foundation.data.records import DataError, SkippableError
from clip_foundation.evaluate.modelcard import published_name
from clip_foundation.evaluate.metrics import NonFiniteFeatures, embed_records, format_metrics
from clipModel import CLIPModel, check, model_folder

FORMATS = ("clip_foundation", "clip_benchmark")  # the JSON evaluate writes; the project's own first (the default)


@dataclass
class EvalConfig(ModelOptions):  # --checkpoint, --device, --engine
    data: str = ""  # dataset folder to score; empty = the one the run trained on
    split: str = "test"  # train | val | test as the run split the data, or all (every record, any folder)
    layout: str = "auto"  # dataset layout; auto = detect
    zeroshot: str = ""  # instead of recall: zero-shot accuracy on class folders DIR/<class>/*.jpg or cifar10:ROOT
    templates: str = ""  # zero-shot prompt templates file, one per line with {} for the class; empty = built-in
    batch_size: int = 256  # images embedded at once (at most 32 on a CPU, where larger batches are slower)
    skip_bad: bool = False  # leave out bad rows, captions and images (reported) instead of stopping
    format: str = "clip_foundation"  # JSON written: clip_foundation (%, ranks, querybank) | clip_benchmark (CLIP_benchmark's keys, fractions)
    out: str = ""  # JSON path; empty = CHECKPOINT/eval_SPLIT.json (or zeroshot_NAME.json + a confusion PNG), *_clip_benchmark.json in that format

    def validate(self) -> None:
        """Raise ConfigError (one line: the option, its value, the allowed range) for a value out of range."""
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check(self.split in (*SPLITS, "all"), "split", self.split, "train | val | test | all")
        check(self.format in FORMATS, "format", self.format, " | ".join(FORMATS))
        super().validate()


USAGE = "usage: python evaluate.py --checkpoint=RUN [--data=DIR] [--split=test|val|train|all] [--zeroshot=DIR]"


def main(argv=None) -> dict:
    args = cli.parse(EvalConfig(), argv, USAGE)
    if not args.checkpoint:
        cli.usage_error("--checkpoint is required", USAGE)
    device = checked_device(args, USAGE)
    try:
        folder = model_folder(args.checkpoint)  # a Hub id's snapshot in the Hub cache: results go beside it
        model = load_model(folder, device)  # a tower is read when first used: not at all where a checked graph serves it
        use_engine(model, args.engine, folder)
        if args.zeroshot:
            return _zeroshot_main(model, args, folder)
        bank = querybank.load_bank(folder, model.config.projection_dim)  # train.py --querybank=N
        data = run_data_config(folder, args.data, args.layout, args.skip_bad)
        records = load_split(data, args.split)
        if not records:
            raise DataError(f"the {args.split} split of {args.data} is empty")
        embedded = embed_records(model, records, batch_size=args.batch_size, skip_bad=args.skip_bad)
        metrics = querybank.recall_with_bank(*embedded, bank)
    except NonFiniteFeatures as e:
        sys.exit(f"error: {args.checkpoint}: {e}")
    except DataError as e:
        hint = " (--skip_bad leaves such input out)" if isinstance(e, SkippableError) and not args.skip_bad else ""
        sys.exit(f"error: {e}{hint}")
    except (FileNotFoundError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    metrics.update(checkpoint=str(args.checkpoint), data=str(args.data), split=args.split)
    print(format_metrics(metrics))  # first: a folder we cannot write to must not cost the result
    if args.format == "clip_benchmark":  # the plain recall: CLIP_benchmark has no querybank
        return _save_clip_benchmark(model, args, folder, benchmark_format.RETRIEVAL, Path(data.path).name,
                                    benchmark_format.retrieval_metrics(metrics), f"eval_{args.split}")
    save_json(metrics, Path(args.out or folder / f"eval_{args.split}.json"))
    return metrics


def _save_clip_benchmark(model: CLIPModel, args, folder: Path, task: str, dataset: str, metrics: dict,
                         stem: str) -> dict:
    """Write CLIP_benchmark's JSON (to --out or FOLDER/STEM_clip_benchmark.json); return it. The
    towers are named by their public names, never by a folder of this machine."""
    image, text = (replace(c, name=published_name(asdict(c), t)) for c, t in ((model.config.image, "image"),
                                                                           (model.config.text, "text")))
    architecture = (f"clip_foundation: image {model.image_encoder.describe(image)}, "
                    f"text {model.text_encoder.describe(text)}")
    result = benchmark_format.result(task, metrics, dataset, architecture, str(args.checkpoint))
    save_json(result, Path(args.out or folder / f"{stem}_clip_benchmark.json"))
    return result


def save_json(obj: dict, out: Path, also: str = "") -> bool:
    """Write `obj` to `out` and say so; on failure (read-only folder, disk full) say why and go on."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))
    except OSError as e:
        print(f"warning: could not write {out} ({e.strerror or e}); pass --out PATH to save it elsewhere",
              file=sys.stderr)
        return False
    print(f"wrote {out}{also}")
    return True


def _zeroshot_main(model: CLIPModel, args, folder: Path) -> dict:
    from clip_foundation.evaluate import plots
    templates = zeroshot.read_templates(args.templates) if args.templates else zeroshot.TEMPLATES
    data = zeroshot.load_labelled(args.zeroshot, model.config.image.image_size)
    metrics = zeroshot.zeroshot_evaluate(model, data, templates, args.batch_size)
    metrics.update(checkpoint=str(args.checkpoint), data=str(args.zeroshot))
    print(zeroshot.format_zeroshot(metrics))
    if args.format == "clip_benchmark":
        return _save_clip_benchmark(model, args, folder, benchmark_format.CLASSIFICATION, data.name,
                                    benchmark_format.classification_metrics(metrics), f"zeroshot_{data.name}")
    out = Path(args.out or folder / f"zeroshot_{data.name}.json")
    if save_json(metrics, out, also=f" and {out.with_suffix('.png')}"):
        plots.confusion_matrix(metrics["confusion"], data.class_names, path=out.with_suffix(".png"),
                               title=f"zero-shot {data.name}: top-1 {metrics['top1']:.1f}%")
    return metrics


if __name__ == "__main__":
    from clip_foundation.commands import run
    raise SystemExit(run("evaluate", main))  # this module's main, not a second copy of it
