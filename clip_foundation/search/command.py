"""Search a gallery from the shell: the images that best match a text, or the captions that
best describe an image (the library side, `Gallery` and friends: clip_foundation/search/gallery.py).

    python search.py "a red circle" --checkpoint=runs/NAME -n 9             # the run's test images: paths + scores
    python search.py "a red circle" --checkpoint=runs/NAME --grid           # and a grid PNG of them (or --out=PATH)
    python search.py --image=photo.png --checkpoint=runs/NAME -n 5
    python search.py --build_index --checkpoint=runs/NAME --data=PHOTOS --out=PHOTOS_INDEX
    python search.py "a dog on a beach" --index=PHOTOS_INDEX
    python search.py --build_index --embeddings=EMB --index=BIG --max_index_memory=2G   # millions of images
    python search.py "a dog on a beach" --index=BIG
    python search.py --help                                                 # every option

A gallery is a dataset split (as the model's training run split it; `--split=all` is every
image) or any plain folder of images. Its embeddings are cached in CHECKPOINT/index/ (or the
user's cache folder when that is not writable) and rebuilt when the model or a gallery file
changes; `--build_index --out=DIR` saves the same files in DIR to search later. Results are printed; a
figure of them is drawn only when asked (`--grid`, or `--out=PATH`). A query reads only what it needs:
the text tower for a text, the image tower for an image (`engines.lazy`), or neither where an engine
graph already checked against the weights serves it. A gallery of
millions, already embedded into an embedding folder (img_emb/*.npy + metadata/*.parquet +
embed.json), is indexed with `--embeddings=EMB --index=DIR` into a compressed FAISS index that
fits `--max_index_memory` (clip_foundation/search/mmap_index.py); `--index=DIR` searches either kind.
"""
from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from clip_foundation.common import cli
from clip_foundation.common.files import digests_held
from clip_foundation.search.gallery import (GRID_CELLS, check_n, find_captions, find_matches, gallery_records,
                                     load_or_build_caption_index, load_or_build_index)
from clip_foundation.search.cached import RecordsMemo
from clip_foundation.search.quick import clean_query, is_link, show_results
from clip_foundation.data.splits import SPLITS, run_data_config
from clip_foundation.engines.options import ModelOptions, checked_device
from clip_foundation.engines.registry import use_engine
from clip_foundation.search.mmap_index import BigIndex, build_big_index
from clip_foundation.search.budget import parse_size
from clip_foundation.search.kinds import open_index
from clip_foundation.data.records import DataError
from clip_foundation.engines.lazy import load_model
from clipModel import check, model_folder


@dataclass
class SearchConfig(ModelOptions):  # --checkpoint, --device, --engine
    query: str | None = None  # text to search for (the first bare argument), e.g. "a red circle"
    image: str = ""  # instead: an image file; prints the gallery captions that best describe it
    build_index: bool = False  # instead: embed the gallery and save its index in --out (default CHECKPOINT/index/)
    index: str = ""  # search a folder written by --build_index (the checkpoint defaults to its own); with --embeddings, the folder to write
    embeddings: str = ""  # with --build_index: an embedding folder (img_emb/, metadata/, embed.json) to index within --max_index_memory
    max_index_memory: str = "auto"  # with --embeddings: the index's size limit, e.g. 2G or 500M (K/M/G/T); auto = half this machine's memory
    data: str = ""  # dataset folder or plain folder of images; empty = the one the run trained on
    split: str = "test"  # train | val | test as the run split the data, or all
    layout: str = "auto"  # dataset layout; images = a plain image folder
    n: int = 0  # number of results, at most 1000 (the grid draws the best 100); 0 = 9 images or 5 captions
    backend: str = "auto"  # auto (FAISS for large galleries when installed) | exact | faiss
    json: bool = False  # print JSON instead of lines (never draws)
    grid: bool = False  # also draw the results as a PNG: CHECKPOINT/search_QUERY.png (captions_IMAGE.png for --image)
    out: str = ""  # draw the figure here (implies --grid); with --build_index the index folder
    batch_size: int = 256  # images embedded at once (at most 32 on a CPU, where larger batches are slower)
    skip_bad: bool = False  # leave out bad rows, captions and images (reported) instead of stopping

    def validate(self) -> None:
        """Raise ConfigError (one line: the option, its value, the allowed range) for a value out of range."""
        check_n(self.n, zero_means="the default (9 images or 5 captions)")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check(self.split in (*SPLITS, "all"), "split", self.split, "train | val | test | all")
        check(self.backend in ("auto", "exact", "faiss"), "backend", self.backend, "auto | exact | faiss")
        parse_size(self.max_index_memory)
        super().validate()


USAGE = ('usage: python search.py "QUERY" --checkpoint=RUN [-n 9]  |  --image=FILE --checkpoint=RUN  |  '
         "--build_index --checkpoint=RUN --data=DIR --out=DIR  |  --build_index --embeddings=EMB --index=DIR "
         "--max_index_memory=2G  |  \"QUERY\" --index=DIR")


# ---------------------------------------------------------------- command line

def _build_cli(args, model, records) -> dict:
    out = Path(args.out) if args.out else None
    built = {"images": load_or_build_index(model, args.checkpoint, records, args.batch_size,
                                           backend=args.backend, skip_bad=args.skip_bad,
                                           stem=out and out / "images")}
    if any(r.captions for r in records):  # so --image works on this index too
        built["captions"] = load_or_build_caption_index(model, args.checkpoint, records,
                                                        backend=args.backend, stem=out and out / "captions")
    where = out or Path(args.checkpoint) / "index"
    for kind, index in built.items():
        faiss = index.meta.get("faiss")
        line = f"{kind}: {len(index)} rows x {index.embeddings.shape[1]} (float16)"
        if faiss:
            line += f", faiss {faiss['type']}" + "".join(
                f", {k} {v}" for k, v in faiss.items() if k in ("nlist", "nprobe") or k.startswith("recall@"))
        print(line)
    print(f"index: {where}")
    return built


def _build_from_embeddings(args) -> BigIndex:
    if not (args.build_index and args.index) or args.query is not None or args.checkpoint or args.data:
        cli.usage_error("--embeddings=EMB builds an index: give --build_index and the folder to write as "
                        "--index=DIR (the model is the one embed.json names)", USAGE)
    try:
        index = build_big_index(args.embeddings, args.index, parse_size(args.max_index_memory), args.max_index_memory)
    except (ValueError, OSError) as e:  # a budget no index fits (ConfigError), a bad folder, a full disk
        sys.exit(f"error: {e}")
    faiss, budget = index.meta["faiss"], index.meta["budget"]
    print(f"images: {len(index):,} rows x {index.meta['dim']}, faiss {faiss['type']}, {faiss['search'] or 'exact'}, "
          f"recall@10 {faiss['recall@10']} on {faiss['recall_queries']} gallery rows; "
          f"{budget['file_size']:,} bytes (budget {budget['max_index_memory']:,})")
    print(f"index: {args.index}")
    return index


@digests_held()  # the weights file is hashed once per command, for its engines' folder and for its index
def main(argv=None):
    args = cli.parse(SearchConfig(), argv, USAGE, positional=("query",))
    if (args.query is not None) + bool(args.image) + args.build_index != 1:
        cli.usage_error("give exactly one of: a text query, --image=PATH, --build_index", USAGE)
    device = checked_device(args, USAGE)
    if args.embeddings:
        return _build_from_embeddings(args)
    if not (args.checkpoint or args.index):
        cli.usage_error("--checkpoint=DIR is required (searching a prebuilt --index=DIR may omit it)", USAGE)
    if args.build_index and args.index:
        cli.usage_error("--build_index writes an index: give --checkpoint, and the folder as --out=DIR "
                        "(not --index; or --embeddings=EMB --index=DIR for an embedding folder)", USAGE)
    kind = "captions" if args.image else "images"
    try:
        if args.query is not None:
            args.query = clean_query(args.query)  # before the model loads: the readers' caption rule
        if args.checkpoint:  # a Hub id: its snapshot in the Hub cache, where the index and figures go too
            args.checkpoint = str(model_folder(args.checkpoint))
        if args.index:
            index = open_index(args.index, kind, args.checkpoint)
            args.checkpoint = args.checkpoint or index.meta["checkpoint"]
            index.prepare(args.backend, args.index, device)  # before the model: a FAISS problem is said first
        model = load_model(args.checkpoint, device)  # each tower is read when a query first needs it
        use_engine(model, args.engine, args.checkpoint)
        if not args.index:
            # a text query over the run's own data: what it read is kept for the next (cached.RecordsMemo, quick.py)
            memo = None if args.data or args.skip_bad or args.image or args.build_index else \
                RecordsMemo.before_reading(args.checkpoint, args.split, run_data_config(args.checkpoint).path)
            with cli.shown_warnings() as shown:
                records = gallery_records(args.checkpoint, args.data, args.split, args.layout, args.skip_bad)
            if not records:
                raise DataError(f"the {args.split} split is empty")
            if args.build_index:
                return _build_cli(args, model, records)
            index = (load_or_build_caption_index(model, args.checkpoint, records, backend=args.backend)
                     if args.image else load_or_build_index(model, args.checkpoint, records,
                                                            args.batch_size, backend=args.backend,
                                                            skip_bad=args.skip_bad))
            if memo is not None:
                memo.save([str(r.image) for r in records], shown)
            index.prepare(args.backend, None, device)  # on a GPU, exact search runs there
        if args.image:
            results = find_captions(model, index, args.image, args.n or 5, args.backend)
        else:
            results = find_matches(model, index, args.query, args.n or 9, args.backend)
    except (FileNotFoundError, DataError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    return _report(args, results, index)


def _report(args, results, index=None):
    """Print the results first, then, when asked (--grid or --out; never for --json, whose reader wants
    the answer alone), draw the best GRID_CELLS of them: a missing image or an unwritable folder must not
    cost the answer. Images gone since a prebuilt index was built are named, and the index is marked stale."""
    if args.image:
        slug, what = Path(args.image).stem, {"image": args.image}
        out = Path(args.out or Path(args.checkpoint) / f"captions_{slug}.png")
        lines, missing = [f"{m.score:.4f}  {m.caption}" for m in results], []
    else:
        slug = re.sub(r"[^a-z0-9]+", "_", args.query.lower()).strip("_")[:40] or "query"
        what = {"query": args.query}
        out = Path(args.out or Path(args.checkpoint) / f"search_{slug}.png")
        lines = [f"{m.score:.4f}  {m.path}" for m in results]
        missing = [m.path for m in results if not is_link(m.path) and not Path(m.path).is_file()]
    figure = "figure" if args.image else "grid"
    show_results(what, [asdict(m) for m in results], lines, missing, args.json)  # as a query from the shell (quick)
    if missing:
        if args.index and index is not None:  # a prebuilt index: its kind records it (or not)
            index.mark_missing(args.index, missing)
    if args.json or not (args.grid or args.out):  # a figure only when asked for (drawing it took 1.7 s)
        return results
    from clip_foundation.evaluate import plots  # matplotlib, only to draw
    shown = results if args.image else [m for m in results if m.path not in missing and not is_link(m.path)]
    try:
        if args.image:
            plots.captions_figure(args.image, shown[:GRID_CELLS], path=out)
        elif shown:  # links: not fetched
            plots.image_grid(shown[:GRID_CELLS], title=args.query, path=out)
        else:
            return results
    except (OSError, DataError) as e:
        print(f"warning: could not write the {figure} {out} ({getattr(e, 'strerror', None) or e}); "
              "pass --out PATH to write it elsewhere", file=sys.stderr)
    else:
        print(f"{figure}: {out}" + (f" (the best {GRID_CELLS} of {len(shown)})" if len(shown) > GRID_CELLS else ""))
    return results


if __name__ == "__main__":
    from clip_foundation.commands import run
    raise SystemExit(run("search", main))  # this module's main, not a second copy of it
