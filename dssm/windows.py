"""Windows of a document (issue 11): a document scored by its whole cosine *plus* its best window's.

The towers embed a long document into one vector, in which a short query's few matching words are
diluted by every other word. Cut into windows of ``window`` words (``stride`` apart), each embedded
by the same document tower, a document's best window holds those words nearly alone. Search then
scores a candidate as ``cos(q, d) + max_w cos(q, w)`` (a document no longer than one window is its
own window: ``2 cos(q, d)``, the same order). Only the first stage's top
:data:`WINDOW_CANDIDATES` are re-scored, so the ANN index is unchanged. On debian-dev (short
synopsis → long description) this took DSSM alone from 0.579 to 0.642 nDCG@10 over 3 seeds and the
default search from 0.749 to 0.756 (docs/quality.md, "Windows of a document"); on label-free fits it
changed nothing measurable, so an index uses windows only where held-out labelled pairs show a
significant gain (:func:`choose_windows`, ``dssm index --windows auto``).

An index version stores its documents' window vectors in ``windows/`` (:class:`WindowRows`: the
layout of :class:`dssm.rerank_docs.DocumentRows`, keyed by each document's text, so the store stays
right through upserts, deletes and compactions, which carry it along unchanged); a candidate whose
text is not stored (written after the build) has its windows embedded at search time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

from dssm.config import config_from_dict, config_to_dict, field
from dssm.errors import ChecksumError, ConfigError, InputError
from dssm.query_numpy import l2_normalize_rows
from dssm.rerank_docs import DocumentRows, text_key, text_keys

__all__ = ["WindowConfig", "WindowRows", "WindowScorer", "WINDOWS_KIND", "WINDOW_CANDIDATES", "COMPUTED_TEXTS",
           "window_texts",
           "window_vectors", "choose_windows"]

WINDOWS_KIND = "windows"
#: Dense candidates re-scored per query (what the screen measured as ``@100``).
WINDOW_CANDIDATES = 100
#: Texts outside the store whose windows a store remembers once embedded at search time.
COMPUTED_TEXTS = 4096

Embed = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class WindowConfig:
    """How documents are cut into windows (saved in the store's manifest)."""

    window: int = field(8, "words per window (chosen on debian-dev's training pairs: 8/4 0.634, 8/8 0.614, "
                           "16/8 0.612 DSSM nDCG@10)")
    stride: int = field(4, "words between window starts")

    def __post_init__(self) -> None:
        if self.window < 1 or not 1 <= self.stride <= self.window:
            raise ConfigError(f"window {self.window} and stride {self.stride}: need window >= 1 and "
                              "1 <= stride <= window")


def window_texts(text: str, *, window: int, stride: int) -> list[str]:
    """``text``'s windows of ``window`` whitespace words, ``stride`` apart; the last one ends at the text's end.

    Raises:
        InputError: ``window < 1`` or ``stride`` outside ``[1, window]``.
    """
    if window < 1 or not 1 <= stride <= window:
        raise InputError(f"window {window} and stride {stride}: need window >= 1 and 1 <= stride <= window")
    words = text.split()
    if len(words) <= window:
        return [text]
    starts = list(range(0, len(words) - window, stride)) + [len(words) - window]
    return [" ".join(words[s:s + window]) for s in starts]


def window_vectors(texts: Sequence[str], embed_documents: Embed, config: WindowConfig) -> list[np.ndarray | None]:
    """Each text's ``[windows, dim]`` float16 unit window vectors, in one tower call for all; ``None``
    for a text of one window (its whole vector is its window)."""
    cuts = [window_texts(t, window=config.window, stride=config.stride) for t in texts]
    pieces = [w for cut in cuts if len(cut) > 1 for w in cut]
    if not pieces:
        return [None] * len(texts)
    vectors = l2_normalize_rows(np.asarray(embed_documents(pieces), dtype=np.float32)).astype(np.float16)
    out: list[np.ndarray | None] = []
    start = 0
    for cut in cuts:
        if len(cut) > 1:
            out.append(vectors[start:start + len(cut)])
            start += len(cut)
        else:
            out.append(None)
    return out


class WindowRows(DocumentRows):
    """Window vectors of documents, looked up by their text: document ``i``'s windows are
    ``rows[offsets[i]:offsets[i + 1]]``; documents of one window are not stored. The manifest names the
    model (sha256 of its ``manifest.json``) and holds the :class:`WindowConfig`.

    ``rows`` is ``[total, dim]`` int16 with ``scales`` ``[total]`` float32 (a window is ``rows[j] *
    scales[j]``, each row quantized on its own largest component): search gathers ~1,300 windows per
    query, and int16 → float32 runs ~6× faster than float16 → float32, which took a third of a dense
    search (docs/design.md, "Index directory"), at float16's size and a finer step (a unit row's
    components are off by at most ``max|x| / 65534``, float16's by up to ``|x| / 2048``). Stores written
    before (float16 ``rows``, no ``scales``) still load and score as written.
    """

    KIND, OWNER_FIELD, DTYPE = WINDOWS_KIND, "model", np.float16  # DTYPE: rows as built, before quantizing
    OPTIONAL_ARRAYS = ("scales",)

    def __init__(self, *, keys: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, rows: np.ndarray,
                 scales: np.ndarray | None = None) -> None:
        super().__init__(keys=keys, lengths=lengths, offsets=offsets, rows=rows)
        quantized = scales is not None
        if self.rows.dtype != (np.int16 if quantized else np.float16) or quantized and (
                scales.shape != (len(self.rows),) or scales.dtype != np.float32):
            raise ChecksumError(f"window rows of dtype {self.rows.dtype} with scales "
                                f"{None if scales is None else (scales.dtype, scales.shape)}: need int16 rows "
                                f"with [{len(self.rows)}] float32 scales, or float16 rows alone")
        self.scales = None if scales is None else np.asarray(scales)
        # Windows embedded at search time for texts the store lacks (written after it was made), kept
        # for the next query: a server reuses this object across the versions writes publish.
        self.computed: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self.computed_lock = threading.Lock()
        # Per base segment (by name), each base row's entry as a searcher found it (serving.windowing),
        # and the text fingerprint of a row this store lacks (its windows are in a written store).
        self.row_memos: dict[str, np.ndarray] = {}
        self.row_fingerprints: dict[str, dict[int, tuple[int, int]]] = {}

    def similarities(self, index: np.ndarray, query: np.ndarray) -> np.ndarray:
        """``[len(index)]`` float32 cosines of ``query`` ``[dim]`` with the stored windows ``rows[index]``."""
        sims = self.rows[index].astype(np.float32) @ query
        if self.scales is not None:
            sims *= self.scales[index]
        return sims

    def vectors(self, entry: int) -> np.ndarray:
        """``[windows, dim]`` float32 windows of the store's entry ``entry`` (:meth:`entries`)."""
        first, last = int(self.offsets[entry]), int(self.offsets[entry + 1])
        rows = self.rows[first:last].astype(np.float32)
        return rows if self.scales is None else rows * self.scales[first:last, None]

    @classmethod
    def merge(cls, stores: Sequence[WindowRows]) -> WindowRows:
        """One quantized store of every text in ``stores`` (a text in several: the first store's windows).

        Quantized rows are copied as they are (a float16 store is quantized first): each kept text's run
        of windows is gathered from the stores' rows laid end to end.
        """
        stores = [s for s in stores if len(s)]  # a store of no text adds nothing (and may have no width)
        if len(stores) == 1 and stores[0].scales is not None:
            return stores[0]
        if not stores:
            return cls(keys=np.zeros(0, np.uint64), lengths=np.zeros(0, np.int64), offsets=np.zeros(1, np.int64),
                       rows=np.zeros((0, 0), np.int16), scales=np.zeros(0, np.float32))
        keys = np.concatenate([s.keys for s in stores])
        source = np.repeat(np.arange(len(stores)), [len(s) for s in stores])
        order = np.lexsort((source, keys))  # by key, then by store
        keep = order[np.r_[True, keys[order][1:] != keys[order][:-1]]] if len(order) else order
        quantized = [(s.rows, s.scales) if s.scales is not None else cls.quantize(s.rows) for s in stores]
        base = np.cumsum([0] + [len(rows) for rows, _ in quantized[:-1]])
        first = np.concatenate([s.offsets[:-1] + b for s, b in zip(stores, base.tolist(), strict=True)])[keep]
        sizes = np.concatenate([np.diff(s.offsets) for s in stores])[keep]
        offsets = np.zeros(len(keep) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        index = np.repeat(first - offsets[:-1], sizes) + np.arange(int(offsets[-1]))
        return cls(keys=keys[keep], lengths=np.concatenate([s.lengths for s in stores])[keep], offsets=offsets,
                   rows=np.concatenate([rows for rows, _ in quantized])[index],
                   scales=np.concatenate([scales for _, scales in quantized])[index])

    @staticmethod
    def quantize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[n, dim]`` vectors as ``(int16 [n, dim], float32 scales [n])``: each row's largest component
        maps to ±32767, so a component is off by at most ``max|x| / 65534``."""
        if not len(vectors):  # a corpus with no document longer than one window
            return np.zeros(np.shape(vectors), np.int16), np.zeros(0, np.float32)
        rows, scales = np.empty(np.shape(vectors), np.int16), np.empty(len(vectors), np.float32)
        for start in range(0, len(vectors), 1 << 16):  # float32 copies of a slice only, not of millions of rows
            part = np.asarray(vectors[start:start + (1 << 16)], dtype=np.float32)
            scale = np.maximum(np.abs(part).max(axis=1), np.float32(1e-30)) / np.float32(32767)
            rows[start:start + len(part)] = np.rint(part / scale[:, None])
            scales[start:start + len(part)] = scale
        return rows, scales

    @classmethod
    def embed(cls, texts: Iterable[str], embed_documents: Embed, config: WindowConfig, *, batch: int = 1024,
              progress: Callable[[int], None] | None = None) -> WindowRows:
        """Every text's windows embedded by ``embed_documents`` (texts -> ``[len, dim]``), quantized."""
        built = cls.build(texts, lambda chunk: window_vectors(chunk, embed_documents, config), batch=batch,
                          progress=progress)
        rows, scales = cls.quantize(built.rows)
        return cls(keys=built.keys, lengths=built.lengths, offsets=built.offsets, rows=rows, scales=scales)

    @classmethod
    def write(cls, directory: str | Path, texts: Callable[[], Iterable[str]], embed_documents: Embed,
              config: WindowConfig, *, owner: str, batch: int = 1024,
              progress: Callable[[int], None] | None = None) -> WindowRows:
        """Every text's windows embedded and written into ``directory`` (created) as they come: the build's
        memory is one batch, not the store (:meth:`embed` holds it all, three times over while it sorts
        and quantizes: ~10 GB for a million descriptions of debian-dev's length).

        Args:
            texts: called twice, each time an iterable of the same texts in the same order: first to
                count each distinct text's windows (cutting only), then to embed them.
            owner: the sha256 of the model's ``manifest.json`` (:meth:`owner`).

        Returns:
            The written store, loaded (memory-mapped, verified).
        """
        counts: dict[int, tuple[int, int]] = {}  # text key -> (length, windows), texts of one window left out
        for text in texts():
            windows = len(window_texts(text, window=config.window, stride=config.stride))
            if windows > 1:
                counts.setdefault(text_key(text), (len(text), windows))
        keys = np.asarray(sorted(counts), np.uint64)
        offsets = np.zeros(len(keys) + 1, np.int64)
        np.cumsum([counts[k][1] for k in keys.tolist()], out=offsets[1:])
        directory = Path(directory)
        directory.mkdir(parents=True)
        rows = scales = None
        done = np.zeros(len(keys), bool)
        chunk: list[str] = []

        def flush() -> None:
            nonlocal rows, scales
            todo = {key: t for key, t in zip(text_keys(chunk)[0].tolist(), chunk, strict=True) if key in counts}
            entries = np.searchsorted(keys, np.fromiter(todo, np.uint64, len(todo)))
            fresh = [(int(e), t) for e, t in zip(entries.tolist(), todo.values(), strict=True) if not done[e]]
            vectors = window_vectors([t for _, t in fresh], embed_documents, config)
            if fresh:
                quantized, scaled = cls.quantize(np.concatenate(vectors))
                if rows is None:  # the width is known once the tower has run
                    rows = open_memmap(directory / "rows.npy", "w+", np.int16, (int(offsets[-1]), quantized.shape[1]))
                    scales = open_memmap(directory / "scales.npy", "w+", np.float32, (int(offsets[-1]),))
                start = 0
                for entry, _ in fresh:
                    first, last = offsets[entry], offsets[entry + 1]
                    rows[first:last], scales[first:last] = quantized[start:start + last - first], \
                        scaled[start:start + last - first]
                    start += last - first
                    done[entry] = True
            if progress is not None:
                progress(len(chunk))
            chunk.clear()

        for text in texts():
            chunk.append(text)
            if len(chunk) >= batch:
                flush()
        if chunk:
            flush()
        if not done.all():
            raise InputError(f"{int((~done).sum())} texts were not given again the second time: texts() must "
                             "yield the same texts twice")
        if rows is None:  # no text longer than one window
            np.save(directory / "rows.npy", np.zeros((0, 0), np.int16), allow_pickle=False)
            np.save(directory / "scales.npy", np.zeros(0, np.float32), allow_pickle=False)
        else:
            rows.flush()
            scales.flush()
            del rows, scales
        lengths = np.asarray([counts[k][0] for k in keys.tolist()], np.int64)
        for name, array in (("keys", keys), ("lengths", lengths), ("offsets", offsets)):
            np.save(directory / f"{name}.npy", array, allow_pickle=False)
        cls.write_manifest(directory, owner=owner, documents=len(keys), rows=int(offsets[-1]),
                           extra=cls.manifest_extra(config))
        return cls.load(directory, owner=owner)

    @property
    def config(self) -> WindowConfig:
        """The windows' :class:`WindowConfig` (from the loaded manifest)."""
        return config_from_dict(WindowConfig, self.manifest.get("config", {}))

    @staticmethod
    def manifest_extra(config: WindowConfig) -> dict[str, Any]:
        """What :meth:`save` writes beside the arrays for ``config``."""
        return {"config": config_to_dict(config)}


class WindowScorer:
    """Adds each candidate's best window cosine to its whole cosine.

    Args:
        store: stored window vectors (``None``: every candidate's windows are embedded here).
        config: how the store cut its documents (and how unstored texts are cut).
        embed_documents: the document tower, for texts not in ``store``; ``None`` leaves such a text
            scored as one window.
        written: stores of documents written after ``store`` was made
            (:mod:`dssm.index.written_windows`), looked up before a text is embedded.
    """

    def __init__(self, store: WindowRows | None, *, config: WindowConfig, embed_documents: Embed | None,
                 written: Sequence[WindowRows] = ()) -> None:
        self.store, self.config, self.embed_documents = store, config, embed_documents
        self.written = list(written)

    def _computed(self, texts: Sequence[str | None], missing: list[int]) -> dict[int, np.ndarray]:
        """``{i: window vectors}`` of ``texts[i]`` for ``i`` in ``missing`` (texts the store lacks) that have
        more than one window: from the stores of written documents, or embedded here once and
        remembered by the store (the last :data:`COMPUTED_TEXTS`)."""
        found: dict[int, np.ndarray] = {}
        if self.written and missing:
            found = {missing[j]: v for j, v in self.find_written(*text_keys([texts[i] for i in missing])).items()}
        if found:
            missing = [i for i in missing if i not in found]
        if not missing or self.embed_documents is None:
            return found
        return found | self._embedded(texts, missing)

    def find_written(self, keys: np.ndarray, lengths: np.ndarray) -> dict[int, np.ndarray]:
        """``{j: window vectors}`` of the texts fingerprinted ``keys[j]``/``lengths[j]`` (:func:`text_keys`)
        that a store of written documents holds (the newest store first); one fingerprint per text
        whatever the number of stores."""
        found: dict[int, np.ndarray] = {}
        for store in self.written:
            for j, entry in enumerate(store.find(keys, lengths).tolist()):
                if entry >= 0 and j not in found:
                    found[j] = store.vectors(entry)
            if len(found) == len(keys):
                break
        return found

    def _embedded(self, texts: Sequence[str | None], missing: list[int]) -> dict[int, np.ndarray]:
        """:meth:`_computed` for texts no store holds: embedded, or remembered from an earlier search."""
        if self.store is None:
            fresh = window_vectors([texts[i] for i in missing], self.embed_documents, self.config)
            return {i: v for i, v in zip(missing, fresh, strict=True) if v is not None}
        computed, lock = self.store.computed, self.store.computed_lock
        with lock:
            known = {i: computed[texts[i]] for i in missing if texts[i] in computed}
        todo = [i for i in missing if i not in known]
        fresh = window_vectors([texts[i] for i in todo], self.embed_documents, self.config) if todo else []
        with lock:
            for i, vectors in zip(todo, fresh, strict=True):
                computed[texts[i]] = vectors
            while len(computed) > COMPUTED_TEXTS:
                computed.popitem(last=False)
        return {i: v for i, v in [*known.items(), *zip(todo, fresh, strict=True)] if v is not None}

    def combined(self, queries: np.ndarray, texts: Sequence[Sequence[str]],
                 cosines: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per query, ``cosines + best window cosine`` of its candidates.

        Args:
            queries: [q, dim] unit query vectors.
            texts: per query, its candidates' full texts (title and body, as the towers read them).
            cosines: per query, ``[len(texts[i])]`` the candidates' whole-document cosines.

        Returns:
            Per query, ``[len(texts[i])]`` float32 combined scores.
        """
        flat = [t for group in texts for t in group]
        entries = self.store.entries(flat) if self.store is not None else np.full(len(flat), -1, np.int64)
        return self.combine(queries, entries, flat, cosines)

    def combine(self, queries: np.ndarray, entries: np.ndarray, texts: Sequence[str | None],
                cosines: Sequence[np.ndarray], *, known: Mapping[int, np.ndarray] | None = None) -> list[np.ndarray]:
        """:meth:`combined` for candidates already looked up (all queries' candidates in a row).

        Args:
            entries: ``[candidates]`` each one's store entry (:meth:`DocumentRows.entries`), or -1.
            texts: each candidate's full text where its entry is -1 (its windows are embedded or
                remembered); ``None`` there for a text known to be one window, or one in ``known``.
            cosines: per query, its candidates' whole cosines (their counts split ``entries``).
            known: ``{candidate: [windows, dim] vectors}`` of candidates whose windows the caller
                already found (in a written store, by a remembered fingerprint).
        """
        # a text given as None is known to be one window (or its windows are known): nothing to embed for it
        embedded = dict(known or {}) | self._computed(
            texts, [i for i in np.flatnonzero(entries < 0).tolist() if texts[i] is not None])
        out, start = [], 0
        for query, whole in zip(queries, cosines, strict=True):
            whole = np.asarray(whole, dtype=np.float32)
            best = whole.copy()
            part = entries[start:start + len(whole)]
            stored = np.flatnonzero(part >= 0)
            if stored.size:  # every stored candidate's windows gathered in one read
                first = self.store.offsets[part[stored]]
                sizes = self.store.offsets[part[stored] + 1] - first
                heads = np.r_[0, np.cumsum(sizes)[:-1]]
                index = np.repeat(first - heads, sizes) + np.arange(int(sizes.sum()))
                sims = self.store.similarities(index, query)
                best[stored] = np.maximum.reduceat(sims, heads)
            for i in (i for i in embedded if start <= i < start + len(whole)):
                best[i - start] = float((embedded[i].astype(np.float32) @ query).max())
            start += len(whole)
            out.append(whole + best)
        return out


def choose_windows(*, texts: Sequence[str], embeddings: np.ndarray, pairs: Sequence[tuple[str, str]],
                   embed_queries: Embed, embed_documents: Embed, bm25: Any, weight: float,
                   normalization: str = "minmax", config: WindowConfig | None = None, max_pairs: int = 1000,
                   alpha: float = 0.05, seed: int = 0) -> tuple[bool, dict[str, Any]]:
    """Whether windows help this corpus, decided on labelled pairs held out from training.

    Each pair's query ranks the corpus by cosine (exact); its target is the row with the pair's
    document text (pairs whose document is not in ``texts`` are left out). Windows are kept when
    re-scoring the dense top :data:`WINDOW_CANDIDATES` raises the target's reciprocal rank@10
    significantly (paired randomisation test, ``alpha``) **and** the hybrid at the index's
    ``weight`` with the re-scored dense side is not worse on average: the default search must not
    pay for a dense-only gain.

    Args:
        texts: [n] the corpus's full texts in row order; ``embeddings`` their [n, dim] unit rows.
        pairs: ``(query, document text)`` held-out labelled pairs.
        bm25: a BM25 index of ``texts`` (``.query(text)`` as :func:`dssm.hybrid.fused_rows` takes it).
        weight: the hybrid weight the index stores; ``normalization`` its normalisation.
        max_pairs: at most this many pairs (a seeded sample) bound the windows embedded here.

    Returns:
        ``(keep, report)``; the report holds both systems' means, the p-value and the counts.
    """
    # deferred: dssm.hybrid's fusion and the test, imported only when this runs
    from dssm.hybrid import rank_candidates, reciprocal_ranks
    from dssm.metrics import paired_randomization_test

    config = config or WindowConfig()
    row_of = {text: row for row, text in enumerate(texts)}
    usable = [(q, row_of[d]) for q, d in pairs if d in row_of]
    if len(usable) > max_pairs:
        usable = [usable[i] for i in sorted(np.random.default_rng(seed).permutation(len(usable))[:max_pairs])]
    report: dict[str, Any] = {"pairs": len(usable), "pairs_outside_corpus": sum(d not in row_of for _, d in pairs),
                              "config": config_to_dict(config), "alpha": alpha, "metric": "mrr@10"}
    if len(usable) < 30:  # as the hybrid weight: too few to tell a gain from noise
        return False, report | {"reason": f"only {len(usable)} labelled pairs with their document in the corpus"}
    queries = l2_normalize_rows(np.asarray(embed_queries([q for q, _ in usable]), dtype=np.float32))
    depth = min(WINDOW_CANDIDATES, len(texts))
    found = []  # per query: (candidate rows, their cosines, their BM25 scores, dense top rows)
    for (query, _), vector in zip(usable, queries, strict=True):
        cosines = np.asarray(embeddings @ vector, dtype=np.float32)
        dense = np.argpartition(-cosines, depth - 1)[:depth]
        sparse = bm25.query(query)
        rows = np.union1d(dense, sparse.top(depth))
        found.append((rows, cosines[rows], sparse.scores[rows], np.isin(rows, dense)))
    # every candidate's windows embedded once, then scored as search scores them
    candidates = sorted({int(r) for rows, *_ in found for r in rows})
    scorer = WindowScorer(WindowRows.embed((texts[r] for r in candidates), embed_documents, config),
                          config=config, embed_documents=None)
    combined = scorer.combined(queries, [[texts[r] for r in rows] for rows, *_ in found], [c for _, c, *_ in found])
    ranked: dict[str, list[np.ndarray]] = {"dssm": [], "dssm+windows": [], "hybrid": [], "hybrid+windows": []}
    for (rows, cosines, sparse, is_dense), both in zip(found, combined, strict=True):
        for name, dense_scores in (("", cosines), ("+windows", both)):
            top = np.lexsort((rows[is_dense], -dense_scores[is_dense]))[:10]
            ranked["dssm" + name].append(rows[is_dense][top])
            ranked["hybrid" + name].append(rank_candidates(rows, dense_scores, sparse, weight=weight,
                                                           normalization=normalization, k=10)[0])
    targets = [row for _, row in usable]
    rr = {name: reciprocal_ranks(lists, targets) for name, lists in ranked.items()}
    keyed = {name: dict(enumerate(values.tolist())) for name, values in rr.items()}
    p = paired_randomization_test(keyed["dssm"], keyed["dssm+windows"], seed=seed)
    means = {name: round(float(values.mean()), 4) for name, values in rr.items()}
    keep = bool(means["dssm+windows"] > means["dssm"] and p < alpha and means["hybrid+windows"] >= means["hybrid"])
    return keep, report | {"means": means, "p": p, "weight": weight, "windows": keep}

