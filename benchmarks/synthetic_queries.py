"""How often "a {colour} {shape}" queries return images that truly contain one.

    python benchmarks/synthetic_queries.py --checkpoint runs/NAME [--split test] [-n 9]

For every colour x shape pair it searches the split with `gallery.find_matches` and checks
each hit against the image's attribute columns in captions.csv. Prints the hits per query,
how many queries reach 7 of 9, and writes JSON beside the checkpoint.
"""
import argparse
import json
from pathlib import Path


from clipModel import CLIPModel  # noqa: E402
from clip_foundation.search.gallery import find_matches, gallery_records, load_or_build_index  # noqa: E402
from clip_foundation.data.synthetic import COLORS, SHAPES, contains  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, help="synthetic folder (default: the training one)")
    p.add_argument("--split", default="test")
    p.add_argument("-n", type=int, default=9)
    args = p.parse_args(argv)
    model = CLIPModel.from_pretrained(args.checkpoint)
    records = gallery_records(args.checkpoint, args.data, args.split)
    by_path = {str(r.image): r.extra for r in records}
    index = load_or_build_index(model, args.checkpoint, records)
    rows = []
    for color in COLORS:
        for shape in SHAPES:
            query = f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"
            matches = find_matches(model, index, query, args.n)
            hits = sum(contains(by_path[m.path], color, shape) for m in matches)
            present = sum(contains(a, color, shape) for a in by_path.values())
            rows.append({"query": query, "hits": hits, "n": args.n, "in_gallery": present})
            print(f"{query:22} {hits}/{args.n}  ({present} such images in the {args.split} split)")
    fair = [r for r in rows if r["in_gallery"] >= args.n]  # queries with enough true images to fill n
    good = sum(r["hits"] >= 7 * args.n / 9 for r in fair)
    summary = {"queries": len(fair), "at_least_7_of_9": good,
               "mean_hits": sum(r["hits"] for r in fair) / max(1, len(fair)), "rows": rows}
    print(f"{good}/{len(fair)} queries have >= 7 of 9 correct; mean {summary['mean_hits']:.2f} of {args.n}")
    out = Path(args.checkpoint) / f"queries_{args.split}.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
