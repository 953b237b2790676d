"""Reading labelled texts and label files for tagging: every format, every bad record named (issue 16)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dssm.errors import InputError
from dssm.tag_data import TaggedText, label_matrix, read_labels, read_tagged


def test_jsonl_csv_tsv_and_parquet_read_alike(tmp_path):
    rows = [{"_id": "p1", "text": "a chess game", "labels": ["game::board", "uitoolkit::gtk"]},
            {"_id": "p2", "text": "an editor", "labels": []}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "t.tsv").write_text("_id\ttext\tlabels\n"
                                    "p1\ta chess game\tgame::board, uitoolkit::gtk\np2\tan editor\t\n")
    (tmp_path / "t.csv").write_text('_id,text,labels\np1,a chess game,"[""game::board"", ""uitoolkit::gtk""]"\n'
                                    "p2,an editor,[]\n")
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    expected = [("p1", "a chess game", ("game::board", "uitoolkit::gtk")), ("p2", "an editor", ())]
    for name in ("t.jsonl", "t.tsv", "t.csv", "t.parquet"):
        assert [tuple(t) for t in read_tagged(tmp_path / name)] == expected, name
    texts = read_tagged(tmp_path / "t.jsonl", known_labels=["uitoolkit::gtk", "game::board", "x"])
    matrix = label_matrix(texts, ["uitoolkit::gtk", "game::board", "x"])
    np.testing.assert_array_equal(matrix, [[True, True, False], [False, False, False]])


def test_separator_and_title(tmp_path):
    (tmp_path / "t.tsv").write_text("id\ttitle\ttext\ttags\n7\tChess\ta board game\ta|b|a\n")
    [item] = read_tagged(tmp_path / "t.tsv", labels_column="tags", separator="|")
    assert item == ("7", "Chess a board game", ("a", "b"))


@pytest.mark.parametrize(("line", "reason"), [
    ('{"_id": "x", "text": "t", "labels": ["nope"]}', r"t.jsonl:1: label\(s\) \['nope'\] are not in the label file"),
    ('{"_id": "x", "text": "  ", "labels": []}', "t.jsonl:1: text is empty"),
    ('{"_id": "x", "text": "t", "labels": 5}', "t.jsonl:1: labels must be a list or a string, got int 5"),
    ('{"_id": "x", "text": "t", "labels": [""]}', "t.jsonl:1: empty label"),
    ('{"_id": "x", "text": "t", "labels": "[1"}', "t.jsonl:1: labels cell '\\[1' starts with"),
    ('{"_id": "x", "text": "t"', "t.jsonl:1: not valid JSON"),
])
def test_bad_records_are_named(tmp_path, line, reason):
    (tmp_path / "t.jsonl").write_text(line + "\n")
    with pytest.raises(InputError, match=reason):
        read_tagged(tmp_path / "t.jsonl", known_labels=["a"])


def test_repeated_id_missing_column_and_empty_file(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"_id": "x", "text": "t", "labels": []}\n' * 2)
    with pytest.raises(InputError, match="t.jsonl:2: id 'x' is empty or repeated"):
        read_tagged(tmp_path / "t.jsonl")
    with pytest.raises(InputError, match=r"lack column\(s\) \['tags'\]"):
        read_tagged(tmp_path / "t.jsonl", labels_column="tags")
    (tmp_path / "e.tsv").write_text("text\tlabels\n")
    with pytest.raises(InputError, match="hold no record"):
        read_tagged(tmp_path / "e.tsv")
    with pytest.raises(InputError, match="'q' is not among the 1 labels"):
        label_matrix([TaggedText("y", "t", ("q",))], ["a"])


def test_debtags_label_file_reads():
    labels = read_labels("../shared/datasets/debtags/labels.tsv")
    assert len(labels) == 148 and labels[0].id == "accessibility::input" and labels[0].text == "accessibility: input"


def test_unlabelled_texts_read_without_a_labels_column(tmp_path):
    (tmp_path / "u.jsonl").write_text('{"_id": "a", "text": "one"}\n{"_id": "b", "text": "two", "labels": ["z"]}\n')
    texts = read_tagged(tmp_path / "u.jsonl", known_labels=["x"], labels_column=None)
    # labels_column=None ignores a labels cell too (even an unknown label): a teacher gives the targets
    assert texts == [TaggedText("a", "one", ()), TaggedText("b", "two", ())]

