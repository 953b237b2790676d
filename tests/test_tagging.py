"""`dssm tag`: build a tags index from label descriptions, rank labels for a text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dssm.errors import InputError
from dssm.tagging import main, read_labels

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "tags.tsv"


def test_tag_builds_and_ranks_every_label(tiny_model_dir, tmp_path, capsys):
    index = tmp_path / "tags"
    labels = [doc.id for doc in read_labels(EXAMPLE)]
    assert main(["--index", str(index), "--labels", str(EXAMPLE), "--model", str(tiny_model_dir)]) == 0
    assert main(["--index", str(index), "--json", "how", "to", "learn", "python", "programming"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == "how to learn python programming"
    assert sorted(x["label"] for x in out["labels"]) == sorted(labels)
    scores = [x["score"] for x in out["labels"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores)
    # A label's own description, as the text, ranks that label first (shared towers: cosine 1).
    assert main(["--index", str(index), "-k", "2", "jobs careers interviews companies and getting hired"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].split()[2] == "careers" and len(table) == 4


def test_tag_input_errors(tiny_model_dir, tmp_path):
    with pytest.raises(InputError, match="needs --model"):
        main(["--index", str(tmp_path / "t"), "--labels", str(EXAMPLE)])
    with pytest.raises(InputError, match="give a text"):
        main(["--index", str(tmp_path / "t")])
    twice = tmp_path / "twice.tsv"
    twice.write_text("label\tdescription\na\tone thing\na\tanother\n")
    with pytest.raises(InputError, match="label 'a' appears twice"):
        read_labels(twice)
    blank = tmp_path / "blank.tsv"
    blank.write_text("label\tdescription\nb\t  \n")
    with pytest.raises(InputError, match="'b' has an empty description"):
        read_labels(blank)
