"""Every extension point is one registry that takes a new entry from outside the package: each test here
registers one (removed again afterwards) and drives it through the real command on the tiny fixtures: rank
metrics, dataset sources, inference engines, index kinds."""
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from clip_foundation.data import sources
from clip_foundation.data.records import Record, Source
from clip_foundation.engines import registry as engine_registry
from clip_foundation.evaluate.command import main as evaluate_main


# ---- metrics


def test_a_registered_metric_reaches_metrics_json_the_table_and_the_card(tiny_run, tmp_path, monkeypatch, capsys):
    from clip_foundation.evaluate import command as evaluate
    from clip_foundation.evaluate import metrics
    from clip_foundation.evaluate.modelcard import write_model_card
    mrr = metrics.RankMetric("mrr", lambda rank: 100 * (1 / rank.float()).mean().item(), "MRR", title="mean reciprocal rank")
    monkeypatch.setitem(metrics.METRICS, "mrr", mrr)
    data, run_dir, _ = tiny_run
    out = tmp_path / "eval.json"
    result = evaluate.main(["--checkpoint", str(run_dir), "--data", str(data), "--split", "test", "--out", str(out),
                            "--engine=torch"])
    printed = capsys.readouterr().out
    # the figure is what it says: from the same ranks as recall@1, MRR >= R@1 and <= 100
    for direction in ("text_to_image", "image_to_text"):
        assert result[f"{direction}_R@1"] <= result[f"{direction}_mrr"] <= 100
    assert json.loads(out.read_text())["text_to_image_mrr"] == result["text_to_image_mrr"]
    assert "MRR" in printed.splitlines()[0] and f"{result['text_to_image_mrr']:.1f}" in printed
    card_run = tmp_path / "run"
    card_run.mkdir()
    for name in ("config.json", "log.jsonl"):
        (card_run / name).write_bytes((run_dir / name).read_bytes())
    (card_run / "metrics.json").write_text(json.dumps({**result, "split": "test"}))
    card = write_model_card(card_run).read_text()
    assert "mean reciprocal rank" in card and f"{result['image_to_text_mrr']:.1f}" in card


def test_rank_metrics_are_pure_functions_of_the_ranks():
    from clip_foundation.evaluate.metrics import retrieval_metrics
    features = torch.nn.functional.normalize(torch.eye(4), dim=1)
    m = retrieval_metrics(features, features, torch.arange(4))  # every query finds its own first
    assert m["text_to_image_mean_rank"] == m["image_to_text_median_rank"] == 1.0


# ---- index kinds

class FakeIndex:
    """An index kind the package has never heard of: a few rows in memory, searched exactly, that
    notes what the command asked of it."""

    def __init__(self, rows: torch.Tensor, paths: list[str], checkpoint):
        self.rows, self.paths, self.captions = rows.float(), paths, None
        self.meta = {"checkpoint": str(checkpoint)}
        self.calls = []

    def __len__(self):
        return len(self.paths)

    def search(self, queries, k, backend="auto"):
        self.calls.append(("search", k, backend))
        top = (queries.float() @ self.rows.T).topk(min(k, len(self)), dim=1)
        return top.values, top.indices

    def prepare(self, backend="auto", folder=None, device=None):
        self.calls.append(("prepare", backend, str(folder)))

    def mark_missing(self, folder, missing):
        self.calls.append(("mark_missing", str(folder), sorted(missing)))


def test_a_new_index_kind_is_opened_and_searched_by_the_search_command(tiny_run, tmp_path, monkeypatch, capsys):
    from clip_foundation.search import command as search
    from clip_foundation.search import kinds
    from clip_foundation.search.gallery import build_index, find_matches, gallery_records
    from clipModel import CLIPModel
    _, run, _ = tiny_run
    model = CLIPModel.from_pretrained(run)
    real = build_index(model, gallery_records(run, None, "test")[:6], progress=False)  # the run's own embeddings
    gone = str(tmp_path / "gone.png")  # one row whose image was deleted since: the kind is told
    paths = real.paths[:-1] + [gone]
    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "fake-index.json").write_text(json.dumps({"rows": len(paths)}))
    opened = []

    def open_fake(where, kind, checkpoint):
        assert (Path(where), kind, Path(checkpoint)) == (folder, "images", Path(run))
        opened.append(FakeIndex(real.embeddings, paths, checkpoint))
        return opened[-1]

    monkeypatch.setitem(kinds.INDEX_KINDS, "fake",
                        kinds.IndexKind(lambda where: (Path(where) / "fake-index.json").is_file(), open_fake))
    results = search.main(["a red circle", f"--index={folder}", f"--checkpoint={run}", "--json", f"-n={len(paths)}"])
    out = json.loads(capsys.readouterr().out)
    [fake] = opened
    expected = find_matches(model, FakeIndex(real.embeddings, paths, run), "a red circle", len(paths))
    assert [m["path"] for m in out["matches"]] == [m.path for m in results] == [m.path for m in expected]
    assert sorted(m.path for m in results) == sorted(paths)
    assert [m["score"] for m in out["matches"]] == pytest.approx([m.score for m in expected], abs=1e-5)
    assert out["missing"] == [gone]
    assert fake.calls == [("prepare", "auto", str(folder)), ("search", len(paths), "auto"),
                          ("mark_missing", str(folder), [gone])]
    monkeypatch.undo()
    assert "fake" not in kinds.INDEX_KINDS  # registered from outside, and gone again


# ---- sources

def read_pairs(folder, *, report, **options) -> list[Record]:
    """A layout the package does not know: pairs.tsv of `image<TAB>caption` lines beside the images."""
    records: dict[Path, Record] = {}
    for line, row in enumerate((Path(folder) / "pairs.tsv").read_text().splitlines(), start=1):
        name, caption = row.split("\t")
        image = (Path(folder) / name).resolve()
        records.setdefault(image, Record(image, [], None, line)).captions.append(caption)
    return list(records.values())


PAIRS = Source("pairs", "pairs.tsv of image<TAB>caption lines, the images beside it",
               lambda path: (Path(path) / "pairs.tsv").is_file(), read_pairs)


@pytest.fixture
def pairs_layout(monkeypatch):
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))  # the package's own registry comes back after
    sources.register_source(PAIRS, before="classes")
    return PAIRS


def pairs_folder(data: Path, folder: Path, n: int = 8) -> list[Record]:
    """The first `n` test images of the tiny run's set, with their captions, copied into the pairs layout."""
    chosen = [r for r in sources.load_records(data) if r.split == "test"][:n]
    folder.mkdir()
    for r in chosen:
        shutil.copy(r.image, folder / r.image.name)
    (folder / "pairs.tsv").write_text("".join(f"{r.image.name}\t{c}\n" for r in chosen for c in r.captions))
    return chosen


def test_a_registered_layout_is_detected_and_scored_by_evaluate(tiny_run, pairs_layout, tmp_path):
    data, run_dir, _ = tiny_run
    chosen = pairs_folder(Path(data), tmp_path / "pairs")
    assert list(sources.SOURCES).index("pairs") == list(sources.SOURCES).index("classes") - 1
    assert sources.detect_layout(tmp_path / "pairs") == "pairs"
    metrics = evaluate_main(["--checkpoint", str(run_dir), "--data", str(tmp_path / "pairs"), "--split=all",
                             "--out", str(tmp_path / "pairs.json")])
    assert metrics["images"] == len(chosen) and metrics["captions"] == sum(len(r.captions) for r in chosen)
    # the same images through a layout the package ships score the same: the new reader read them all, alike
    same = shutil.copytree(tmp_path / "pairs", tmp_path / "csv", ignore=shutil.ignore_patterns("pairs.tsv"))
    with open(same / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption")] + [(r.image.name, c) for r in chosen for c in r.captions])
    reference = evaluate_main(["--checkpoint", str(run_dir), "--data", str(same), "--split=all",
                               "--out", str(tmp_path / "csv.json")])
    assert {k: v for k, v in metrics.items() if k != "data"} == {k: v for k, v in reference.items() if k != "data"}


def test_an_undetected_folder_lists_the_registered_layout(tiny_run, pairs_layout, tmp_path):
    _, run_dir, _ = tiny_run
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--checkpoint", str(run_dir), "--data", str(tmp_path / "notes"), "--split=all"])
    assert "no known dataset layout" in str(e.value.code)
    assert f"  pairs: {PAIRS.description}" in str(e.value.code)


# ---- engines



class CountingEncoder(engine_registry.Encoder):
    """An engine the package has never heard of: torch's encodings, each tower's calls counted."""
    name = "counting"
    made: list = []  # every instance, so the test sees the one the command used

    def __init__(self, model, part="embed", folder=None):
        super().__init__(model, part, folder)
        self.calls = {"image": 0, "text": 0}
        type(self).made.append(self)

    def _run(self, tower, inputs):
        self.calls[tower] += 1
        return super()._run(tower, inputs)


@pytest.fixture
def counting_engine(monkeypatch):
    """CountingEncoder registered as --engine=counting for one test (into a copy of the registry)."""
    monkeypatch.setattr(engine_registry, "ENCODERS", dict(engine_registry.ENCODERS))
    monkeypatch.setattr(CountingEncoder, "made", [])
    return engine_registry.register_engine(CountingEncoder)


def test_a_registered_engine_encodes_for_the_evaluate_command(tiny_run, counting_engine, tmp_path, capsys):
    data, run_dir, _ = tiny_run
    args = ["--checkpoint", str(run_dir), "--data", str(data), "--split", "test"]
    with_torch = evaluate_main([*args, "--engine=torch", "--out", str(tmp_path / "torch.json")])
    assert counting_engine.made == []
    result = evaluate_main([*args, "--engine=counting", "--out", str(tmp_path / "counting.json")])
    (encoder,) = counting_engine.made
    assert encoder.calls["image"] > 0 and encoder.calls["text"] > 0  # every embedding went through it
    for key in ("text_to_image_R@1", "text_to_image_R@5", "image_to_text_R@1", "text_to_image_median_rank"):
        assert result[key] == pytest.approx(with_torch[key], abs=1e-6)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        evaluate_main(["--help"])
    assert "| torch | openvino | onnxruntime | counting" in capsys.readouterr().out  # its help lists it too


def test_an_unknown_engine_is_refused_naming_the_registered_ones(counting_engine, capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate_main(["--checkpoint=runs/x", "--engine=nope"])
    assert exit.value.code == 2
    assert "--engine='nope': must be auto | torch | openvino | onnxruntime | counting" in capsys.readouterr().err
