"""Group commit (``serving.group_commit``): writes queued behind a running one share its successor's version,
with the outcome of applying them one after the other."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from serving.group_commit import GroupCommit


class _Index:
    """A fake index: documents by id, a version per commit, the first commit held until released."""

    def __init__(self, *, fail_on: str | None = None) -> None:
        self.docs: dict[str, str] = {"old": "an old document"}
        self.commits: list[tuple[str, list[Any]]] = []
        self.release = threading.Event()
        self.fail_on = fail_on

    def commit(self, method: str, items: list[Any]) -> str:
        if not self.commits:
            self.release.wait(10)
        if self.fail_on is not None and any((item[0] if method == "upsert" else item) == self.fail_on
                                            for item in items):
            raise ValueError(f"document {self.fail_on!r} is refused")
        self.commits.append((method, items))
        for item in items:
            if method == "upsert":
                self.docs[item[0]] = item[1]
            else:
                del self.docs[item]
        return f"v{len(self.commits)}"

    def present(self, ids: list[str]) -> Any:
        def check() -> None:
            missing = [i for i in ids if i not in self.docs]
            if missing:
                raise KeyError(f"not in the index: {missing}")
        return check


def _run(group: GroupCommit, index: _Index, writes: list[tuple[str, list[Any]]]) -> list[Any]:
    """The first write commits alone (held); the others queue behind it, in order; their answers or errors."""
    answers: list[Any] = [None] * len(writes)

    def send(i: int) -> None:
        method, items = writes[i]
        check = index.present(items) if method == "delete" else None
        try:
            answers[i] = group.write(method, items, check=check)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            answers[i] = exc

    threads = [threading.Thread(target=send, args=(0,))]
    threads[0].start()
    deadline = time.monotonic() + 10
    while not group._lock.locked() and time.monotonic() < deadline:
        time.sleep(0.001)
    for i in range(1, len(writes)):  # one at a time, so the queue keeps their order
        threads.append(threading.Thread(target=send, args=(i,)))
        threads[-1].start()
        while len(group._queue) < i and time.monotonic() < deadline:
            time.sleep(0.001)
    index.release.set()
    for thread in threads:
        thread.join(10)
    return answers


def _group(index: _Index, merged: list[int]) -> GroupCommit:
    return GroupCommit(index.commit, key=lambda method, item: item[0] if method == "upsert" else item,
                       merged=merged.append)


def test_queued_writes_share_a_version_with_the_sequential_outcome() -> None:
    index, merged = _Index(), []
    answers = _run(_group(index, merged), index, [
        ("upsert", [("a", "first a")]),
        ("upsert", [("b", "first b"), ("c", "c")]),
        ("upsert", [("b", "second b")]),           # a later document of b wins, as in sequence
        ("delete", ["a"]),
        ("delete", ["c"]),
        ("delete", ["c"]),                         # c is gone by then: refused, as it would be in sequence
        ("upsert", [("d", "d")]),
    ])
    assert answers[:5] == ["v1", "v2", "v2", "v3", "v3"] and answers[6] == "v4"
    assert isinstance(answers[5], KeyError) and "['c']" in str(answers[5])
    assert index.docs == {"old": "an old document", "b": "second b", "d": "d"}
    assert index.commits == [("upsert", [("a", "first a")]), ("upsert", [("b", "second b"), ("c", "c")]),
                             ("delete", ["a", "c"]), ("upsert", [("d", "d")])]
    assert merged == [2, 2]


def test_a_failed_merged_commit_fails_only_the_write_at_fault() -> None:
    index, merged = _Index(fail_on="bad"), []
    answers = _run(_group(index, merged), index, [
        ("upsert", [("first", "alone")]),
        ("upsert", [("x", "x")]),
        ("upsert", [("bad", "refused")]),
        ("upsert", [("y", "y")]),
    ])
    assert answers[0] == "v1" and answers[1] == "v2" and answers[3] == "v3"
    assert isinstance(answers[2], ValueError) and "'bad'" in str(answers[2])
    assert set(index.docs) == {"old", "first", "x", "y"} and merged == []


def test_one_writer_alone_commits_at_once() -> None:
    index, merged = _Index(), []
    index.release.set()
    group = _group(index, merged)
    assert group.write("upsert", [("a", "a")]) == "v1"
    with pytest.raises(KeyError, match="missing"):
        group.write("delete", ["missing"], check=index.present(["missing"]))
    assert group.write("delete", ["a"], check=index.present(["a"])) == "v2" and merged == []
