"""Duplicate thresholds: the sweep and AP by hand, pair reading, and `dssm thresholds` end to end on a
tiny adi index, including --save (a new index version that Searcher.similarity and the backend read)."""

from __future__ import annotations

import json
import math

import pytest

from dssm import index as ix
from dssm.artifacts import read_manifest, verify_manifest
from dssm.data import document_text, read_beir
from dssm.errors import ConfigError, InputError
from dssm.index import publish_index_files
from dssm.thresholds import (
    THRESHOLDS_FILE,
    average_precision,
    best_point,
    classification_at,
    main,
    read_labelled_pairs,
    threshold_sweep,
)

# ------------------------------------------------------------------------------------ a hand example
#
# sorted: 0.9 (dup), 0.8 (not), 0.8 (dup), 0.4 (dup), 0.2 (not); 3 duplicates, 2 not.
#   t=inf: tp0 fp0 -> acc 2/5, P 1 (no prediction), R 0,   F1 0
#   t=0.9: tp1 fp0 -> acc 3/5, P 1,   R 1/3, F1 2/4
#   t=0.8: tp2 fp1 -> acc 3/5, P 2/3, R 2/3, F1 4/6   (the tied 0.8s cross together)
#   t=0.4: tp3 fp1 -> acc 4/5, P 3/4, R 1,   F1 6/7
#   t=0.2: tp3 fp2 -> acc 3/5, P 3/5, R 1,   F1 6/8
# AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/4 = 29/36.

SCORES = [0.8, 0.9, 0.2, 0.4, 0.8]
LABELS = [0, 1, 0, 1, 1]


def test_threshold_sweep_hand_example():
    sweep = threshold_sweep(SCORES, LABELS)
    assert [p.threshold for p in sweep] == [math.inf, 0.9, 0.8, 0.4, 0.2]
    assert [p.accuracy for p in sweep] == pytest.approx([2 / 5, 3 / 5, 3 / 5, 4 / 5, 3 / 5])
    assert [p.precision for p in sweep] == pytest.approx([1, 1, 2 / 3, 3 / 4, 3 / 5])
    assert [p.recall for p in sweep] == pytest.approx([0, 1 / 3, 2 / 3, 1, 1])
    assert [p.f1 for p in sweep] == pytest.approx([0, 1 / 2, 2 / 3, 6 / 7, 3 / 4])
    assert best_point(sweep, "accuracy").threshold == 0.4
    assert best_point(sweep, "f1").threshold == 0.4
    assert average_precision(SCORES, LABELS) == pytest.approx(29 / 36)
    # The sweep's figures are those of classifying at that threshold directly.
    for point in sweep[1:]:
        assert classification_at(SCORES, LABELS, point.threshold) == point


def test_best_point_ties_prefer_the_higher_threshold_and_checks_input():
    sweep = threshold_sweep([0.9, 0.5, 0.1], [1, 0, 1])  # accuracy 2/3 at 0.9 and at 0.1
    assert best_point(sweep, "accuracy").threshold == 0.9
    with pytest.raises(ConfigError, match="'auc'"):
        best_point(sweep, "auc")
    with pytest.raises(InputError, match="0 or 1"):
        threshold_sweep([0.1, 0.2], [0, 2])
    with pytest.raises(InputError, match="equally long"):
        threshold_sweep([0.1], [0, 1])
    assert average_precision([0.3, 0.2], [1, 1]) == pytest.approx(1.0)


def test_read_labelled_pairs_formats_and_errors(tmp_path):
    good = tmp_path / "pairs.tsv"
    good.write_text("id\tquestion1\tquestion2\tis_duplicate\n1\ta b\tc d\t1\n2\te\tf\t0\n")
    assert [p[:3] for p in read_labelled_pairs(good)] == [("a b", "c d", 1), ("e", "f", 0)]
    bad_label = tmp_path / "bad.tsv"
    bad_label.write_text("text1\ttext2\tis_duplicate\nx\ty\tyes\n")
    with pytest.raises(InputError, match=r"bad.tsv:2: is_duplicate must be 0 or 1, got 'yes'"):
        read_labelled_pairs(bad_label)
    empty = tmp_path / "empty.tsv"
    empty.write_text("text1\ttext2\tis_duplicate\nx\t \t1\n")
    with pytest.raises(InputError, match="empty.tsv:2: empty text"):
        read_labelled_pairs(empty)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="lacks column"):
        read_labelled_pairs(wrong)


# ------------------------------------------------------------------------------ end to end, tiny index


@pytest.fixture(scope="module")
def adi_index(tiny_model_dir, adi_dir, tmp_path_factory):
    from dssm.export import load_encoder

    adi = read_beir(adi_dir)
    docs = list(adi.corpus.values())
    embeddings = load_encoder(tiny_model_dir).embed_documents([document_text(d.title, d.text) for d in docs])
    index_dir = tmp_path_factory.mktemp("thresholds") / "index"
    ix.build_index(index_dir, embeddings=embeddings, ids=[d.id for d in docs], texts=[d.text for d in docs],
                   titles=[d.title for d in docs], model_dir=tiny_model_dir)
    return index_dir


@pytest.fixture(scope="module")
def pairs_file(adi_dir, tmp_path_factory):
    """Duplicates = a document's text with itself re-cased; non-duplicates = two different documents."""
    texts = [d.text for d in read_beir(adi_dir).corpus.values() if d.text.strip()]
    path = tmp_path_factory.mktemp("pairs") / "pairs.tsv"
    rows = ["text1\ttext2\tis_duplicate"]
    for i, text in enumerate(texts):
        rows.append(f"{text}\t{text.upper()}\t1")
        rows.append(f"{text}\t{texts[(i + 7) % len(texts)]}\t0")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_cli_figures_plot_and_json(adi_index, pairs_file, tmp_path, capsys):
    out, plot = tmp_path / "t.json", tmp_path / "hist.png"
    assert main(["--index", str(adi_index), "--pairs", str(pairs_file), "--json", str(out), "--plot", str(plot)]) == 0
    result = json.loads(out.read_text())
    tuning, test = result["tuning"], result["test"]
    rows = len(pairs_file.read_text().splitlines()) - 1
    assert tuning["pairs"] + test["pairs"] == rows and tuning["pairs"] > 20 and test["pairs"] > 20
    # Case folding makes a duplicate's two texts featurize identically: cosine 1, far above other pairs.
    chosen = test["at_best_accuracy_threshold"]
    assert chosen["accuracy"] >= 0.95 and test["average_precision"] >= 0.95
    assert result["threshold"] == chosen["threshold"] < 1.0 + 1e-6
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(plot).shape[2] in (3, 4)
    assert "best accuracy" in capsys.readouterr().out


def test_cli_save_publishes_a_version_read_by_searcher_and_backend(adi_index, pairs_file, tmp_path):
    import shutil

    from serving.backend import Backend
    from serving.searcher import Searcher

    index = tmp_path / "index"
    shutil.copytree(adi_index, index)
    before = ix.current_version_dir(index)
    assert Searcher.load(index).similarity("a b", "a b").is_duplicate is None  # no threshold yet
    assert main(["--index", str(index), "--pairs", str(pairs_file), "--save", "--objective", "f1"]) == 0
    after = ix.current_version_dir(index)
    assert after != before and ix.list_versions(index) == sorted([before.name, after.name])
    manifest = verify_manifest(after, kind="index")
    saved = json.loads((after / THRESHOLDS_FILE).read_text())
    assert manifest["duplicate_threshold"] == saved["duplicate_threshold"] and saved["objective"] == "f1"
    assert manifest["derived_from"] == before.name and manifest["counts"] == read_manifest(before)["counts"]
    assert "duplicate_threshold" not in verify_manifest(before, kind="index")  # the old version is untouched
    assert (after / "embeddings.npy").stat().st_ino == (before / "embeddings.npy").stat().st_ino  # hard link

    searcher = Searcher.load(index)
    text = "The use of computers in libraries"
    same = searcher.similarity(text, text.upper())
    assert same.cosine == pytest.approx(1.0, abs=1e-5) and same.is_duplicate is True
    assert same.threshold == pytest.approx(saved["duplicate_threshold"])
    other = searcher.similarity(text, "aerodynamic heating of supersonic wings")
    assert other.is_duplicate is (other.cosine >= same.threshold)

    backend = Backend(index, watch_interval=0)
    backend.reload()
    result = backend.similarity(text, text.upper())
    assert result.is_duplicate is True and result.threshold == pytest.approx(same.threshold)


def test_publish_index_files_refuses_bad_names(adi_index):
    with pytest.raises(ConfigError, match="manifest.json"):
        publish_index_files(adi_index, files={"manifest.json": {}}, manifest_updates={})
    with pytest.raises(ConfigError):
        publish_index_files(adi_index, files={"sub/x.json": {}}, manifest_updates={})


def test_cli_errors(adi_index, pairs_file, tmp_path):
    from dssm.cli import main as cli_main

    with pytest.raises(ConfigError, match="tune-fraction"):
        main(["--index", str(adi_index), "--pairs", str(pairs_file), "--tune-fraction", "1"])
    with pytest.raises(InputError, match="no pairs_config.json"):
        main(["--index", str(adi_index), "--pairs", str(pairs_file), "--holdout", str(tmp_path)])
    assert cli_main(["thresholds", "--index", str(tmp_path / "none"), "--pairs", str(pairs_file)]) == 2
