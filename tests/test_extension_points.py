"""Every extension point takes a new entry from outside the package: each test registers one here
(removed again afterwards) and drives it through the real command on the tiny fixtures."""
import json
from pathlib import Path

import pytest
import torch


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
