"""``dssm demo``: the default recipe's command sequence on a tiny quora-dev-style directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dssm.data import holdout_filter
from dssm.demo import main
from dssm.errors import ConfigError, InputError

_SUBJECTS = ["python", "guitar", "french", "chess", "piano", "cooking", "swimming", "drawing", "calculus",
             "chemistry", "poetry", "running", "painting", "yoga", "knitting", "photography", "gardening",
             "spanish", "physics", "history", "economics", "welding", "sailing", "baking"]


def _quora_like(root: Path) -> Path:
    """Each subject: a question (also a query and a document) and its duplicate (the judged document)."""
    root.mkdir()
    pairs = ["id\ttext1\ttext2\tis_duplicate\tsplit\tquora_pair_id"]
    corpus, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for i, subject in enumerate(_SUBJECTS):
        question, duplicate = f"How do I learn {subject} quickly ?", f"What is the fastest way to learn {subject} ?"
        pairs.append(f"p{i}\t{question}\t{duplicate}\t1\tdev\t{i}")
        pairs.append(f"n{i}\t{question}\tWhy is {_SUBJECTS[i - 1]} hard ?\t0\tdev\t{100 + i}")
        corpus += [{"_id": f"q{i}", "title": "", "text": question}, {"_id": f"d{i}", "title": "", "text": duplicate},
                   {"_id": f"h{i}", "title": "", "text": f"Why is {subject} hard ?"}]
        queries.append({"_id": f"q{i}", "text": question})
        qrels.append(f"q{i}\td{i}\t1")
    (root / "pairs.tsv").write_text("\n".join(pairs) + "\n")
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels.tsv").write_text("\n".join(qrels) + "\n")
    return root


def test_demo_refuses_incomplete_data_and_bad_epochs(tmp_path: Path) -> None:
    data = _quora_like(tmp_path / "data")
    with pytest.raises(InputError, match="--epochs and --pretrain-epochs must be >= 1, got 0"):
        main(["--data", str(data), "--workdir", str(tmp_path / "w"), "--epochs", "0"])
    with pytest.raises(InputError, match="--teacher minilm is distilled in the pre-training, which --no-pretrain"):
        main(["--data", str(data), "--workdir", str(tmp_path / "w"), "--teacher", "minilm", "--no-pretrain"])
    with pytest.raises(ConfigError, match="unknown teacher 'bert'"):
        main(["--data", str(data), "--workdir", str(tmp_path / "w"), "--teacher", "bert"])
    (data / "qrels.tsv").unlink()
    with pytest.raises(InputError, match="lacks qrels.tsv"):
        main(["--data", str(data), "--workdir", str(tmp_path / "w")])


@pytest.mark.slow
def test_demo_pretrains_on_neighbour_pairs_then_fine_tunes(tmp_path: Path, capsys: Any) -> None:
    data = _quora_like(tmp_path / "data")
    work = tmp_path / "work"
    assert main(["--data", str(data), "--workdir", str(work), "--epochs", "1", "--pretrain-epochs", "1",
                 "--validation-fraction", "0.3", "--no-minilm"]) == 0
    shown = capsys.readouterr().out
    # The user's commands, in the recipe's order.
    commands = [line.split()[2] + (" neighbours" if "--format neighbours" in line else "")
                for line in shown.splitlines() if line.startswith("$ dssm ")]
    assert commands[:7] == ["pairs neighbours", "train", "pairs", "pairs", "train", "index", "eval"]
    # Fine-tuning and the hybrid weight get only the rows whose query is outside the evaluated split.
    held_out = holdout_filter(work / "pairs")
    user_rows = (work / "train_pairs.tsv").read_text().splitlines()[1:]
    assert user_rows and not any(held_out(row.split("\t")[1]) for row in user_rows)
    assert len(user_rows) == json.loads((work / "pairs" / "stats.json").read_text())["train"]
    neighbour_stats = json.loads((work / "neighbour_pairs" / "stats.json").read_text())
    assert neighbour_stats["paired_documents"] == neighbour_stats["read"] == 3 * len(_SUBJECTS)
    fine_tuned = json.loads((work / "model" / "config.json").read_text())["train"]
    assert fine_tuned["init_from"] == str(work / "pretrained")
    assert f"$ dssm train --pairs {work / 'train_pairs'} --output {work / 'model'}" in shown
    assert (fine_tuned["epochs"], fine_tuned["early_stopping_patience"], fine_tuned["keep_best"]) == (1, 0, False)
    # The recipe with labelled pairs trains the wide tower in both steps (docs/quality.md).
    for trained in ("pretrained", "model"):
        shape = json.loads((work / trained / "config.json").read_text())["model"]
        assert (shape["embedding_dim"], shape["hidden_dims"]) == (512, [512, 256])
    results = json.loads((work / "eval.json").read_text())
    summary = next(line for line in shown.splitlines() if line.startswith("nDCG@10 on "))
    assert f"DSSM {results['dssm']['ndcg@10']:.4f}" in summary and f"BM25 {results['bm25']['ndcg@10']:.4f}" in summary
    # The default search (hybrid with the weight the index job tuned on the tenth) on every held-out query.
    weight = results["hybrid_tuning"]["weight"]
    assert f"hybrid {results['hybrid']['ndcg@10']:.4f}" in summary
    assert f"weight {weight:.2f} on DSSM, tuned on a tenth of the training pairs" in summary
    tuning = json.loads(next((work / "index" / "versions").glob("*/manifest.json")).read_text())["hybrid_tuning"]
    assert tuning["method"] == "labelled pairs held out from training" and tuning["pairs"] > 0
    assert results["queries"] > 0 and results["hybrid_tuning"]["tuning_queries"] == 0
    assert "MiniLM" not in summary


def test_demo_trains_the_wide_tower_unless_asked_or_taught(tmp_path: Path) -> None:
    """Both training steps get the wide tower's flags; ``--default-tower`` or ``--teacher`` (a tie on
    quora-dev's split with the teacher) give none."""
    from dssm.demo import WIDE_TOWER, _parser, tower_flags

    base = ["--data", str(tmp_path)]
    assert tower_flags(_parser().parse_args(base)) == list(WIDE_TOWER)
    assert tower_flags(_parser().parse_args([*base, "--default-tower"])) == []
    assert tower_flags(_parser().parse_args([*base, "--teacher", "minilm"])) == []


@pytest.mark.slow
def test_demo_default_tower_trains_the_trainers_default_shape(tmp_path: Path, capsys: Any) -> None:
    """``--default-tower`` gives the fine-tuning no shape flags: the trainer's default towers (to compare)."""
    from dssm.model import ModelConfig

    work = tmp_path / "work"
    assert main(["--data", str(_quora_like(tmp_path / "data")), "--workdir", str(work), "--epochs", "1",
                 "--no-pretrain", "--default-tower", "--validation-fraction", "0.3", "--no-minilm"]) == 0
    train = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("$ dssm train "))
    assert "--embedding-dim" not in train and "--hidden-dims" not in train
    shape = json.loads((work / "model" / "config.json").read_text())["model"]
    assert (shape["embedding_dim"], tuple(shape["hidden_dims"])) == (ModelConfig().embedding_dim,
                                                                     ModelConfig().hidden_dims)
