"""``dssm delete``: delete documents from a live index by id without a rebuild (a new version)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dssm.errors import InputError
from serving.upsert import add_update_arguments, print_update

__all__ = ["read_ids", "main"]


def read_ids(path: Path) -> list[str]:
    """Ids from a file, one per line (surrounding whitespace and blank lines ignored).

    Raises:
        InputError: the file is missing or holds no ids.
    """
    if not path.is_file():
        raise InputError(f"ids file not found: {path}")
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise InputError(f"ids file {path} holds no ids")
    return ids


def main(argv: list[str] | None = None) -> int:
    """``dssm delete --index INDEX_DIR --ids FILE [--rebalance]``."""
    from serving.index import delete_documents

    parser = argparse.ArgumentParser(prog="dssm delete", description=__doc__.splitlines()[0])
    add_update_arguments(parser)
    parser.add_argument("--ids", required=True, type=Path, help="file with one document id per line")
    args = parser.parse_args(argv)
    result = delete_documents(args.index, read_ids(args.ids), rebalance=args.rebalance,
                              rebalance_fraction=args.rebalance_fraction)
    print_update(result, as_json=args.json)
    return 0
