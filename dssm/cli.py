"""The one command-line tool, ``dssm``, with subcommands.

Each subcommand is a function ``main(argv: list[str] | None) -> int`` (``"module"`` names a module's
``main``, ``"module:function"`` another function); its module is imported only when called, so
``dssm --help`` stays fast. Beam jobs parse their own flags with ``parse_known_args`` and pass the rest to
Beam. A :class:`~dssm.errors.DSSMError` prints as one ``error:`` line (exit 2).
"""

from __future__ import annotations

import importlib
import sys

from dssm import __version__
from dssm.errors import DSSMError

__all__ = ["COMMANDS", "main"]

# name -> ("module" or "module:function", summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "pairs": ("pipelines.make_pairs", "Beam job: raw pairs (Quora/CSV/TSV/JSONL/Parquet/BEIR) → TFRecord shards."),
    "train": ("dssm.train", "Train the two-tower model on pair shards and export a SavedModel."),
    "lsa": ("dssm.lsa", "Fit towers to a corpus without training (LSA of its hashed bags; small corpora)."),
    "ensemble": ("dssm.ensemble", "Join trained towers and a `dssm lsa` fit into one tower (their cosines added)."),
    "select": ("dssm.select", "Pick, among models, the one that retrieves a pairs directory's validation split best."),
    "index": ("pipelines.encode_corpus", "Beam job: encode a corpus with the document tower and build a ScaNN index."),
    "mine": ("pipelines.mine_negatives", "Beam job: hard negatives for training pairs, retrieved from an index."),
    "search": ("serving.search_cli", "Search an index from the command line."),
    "upsert": ("dssm.index.commands:upsert_main",
               "Add or replace documents of an index without a rebuild (a new version)."),
    "delete": ("dssm.index.commands:delete_main",
               "Delete documents of an index by id without a rebuild (a new version)."),
    "compact": ("dssm.index.commands:compact_main",
                "Fold an index's recent writes (delta segments, deleted rows) into its base (a new version)."),
    "train-reranker": ("dssm.rerank_train", "Train the interaction re-ranker on an index's own candidates for pairs."),
    "attach-reranker": ("dssm.index.reranker:attach_main",
                        "Put a trained re-ranker into an index (a new version; searches may then re-rank)."),
    "serve": ("serving.app", "HTTP search service (FastAPI) over an index; hot-swaps new versions."),
    "eval": ("dssm.evaluate", "Recall/MRR/nDCG of an index on a BEIR directory, with BM25 beside it."),
    "thresholds": ("dssm.thresholds", "Duplicate-detection threshold from labelled pairs (accuracy, F1, AP); --save."),
    "tag": ("dssm.tagging", "Tag a text: rank the labels of a tags index (zero-shot, few-shot or trained)."),
    "train-tags": ("dssm.tagging:train_main",
                   "Train the towers to tag (multi-label loss) and publish a tags index with its threshold."),
    "eval-tags": ("dssm.tag_eval", "Micro/macro F1, precision/recall@k, mAP of tags indexes on labelled texts."),
    "demo": ("dssm.demo", "The default recipe on quora-dev: neighbour pairs → pre-train → pairs → fine-tune → "
                          "index → eval → searches."),
}


def _usage() -> str:
    lines = ["usage: dssm COMMAND [options]   (dssm COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<11} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``dssm COMMAND ...`` to ``COMMANDS[COMMAND]``'s ``main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, function = COMMANDS[name][0].partition(":")
    command = getattr(importlib.import_module(module_name), function or "main")
    try:
        return int(command(rest) or 0)
    except DSSMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
