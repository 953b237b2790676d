"""The numeric kernels of the numpy re-ranker (:mod:`dssm.rerank_fast`): RBF kernel pooling as a chain of
products, and distinct ids by counting."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["KernelChain", "rbf_kernels", "distinct_ids", "NEGLIGIBLE"]

#: A kernel value below this for every cosine of a call is left out (:func:`rbf_kernels`).
NEGLIGIBLE = 1e-10
_LOG_NEGLIGIBLE = float(np.log(NEGLIGIBLE))


def rbf_kernels(cosine: np.ndarray, *, mu: np.ndarray, neg_inv_two_sigma_sq: np.ndarray, chain: KernelChain | None,
                out: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int]:
    """``[n, q]`` cosines → ``[K, n, q]`` RBF kernel values ``exp(-(cos - mu)^2 / (2 sigma^2))`` in ``out``, each
    kernel possibly divided by a constant: ``(out, [K] constants to multiply back or None, used)``, where
    only the first ``used`` kernels were computed and the others are negligible (treat them as 0).

    With a ``chain`` (the soft kernels share ``sigma`` and evenly spaced centres) neighbouring kernels
    differ by a factor ``exp(∓ rate · cos)`` and a constant (:class:`KernelChain`): two exponentials per
    cosine instead of one per kernel. Kernels lead so each in-place pass runs over a contiguous block.
    A chain also stops at the first kernel centred below every cosine whose largest value is under
    ``NEGLIGIBLE`` (conv-knrm's relu'd vectors have no negative cosine, so its two lowest kernels are
    at most ``exp(-24.5)``): summed over a 200-word document it stays below 2e-8, beneath what a
    float32 score resolves.

    Args:
        cosine: ``[n, q]`` float32 in [-1, 1].
        mu, neg_inv_two_sigma_sq: ``[K]`` float32 centres and ``-1 / (2 sigma_k^2)``.
        chain: :meth:`KernelChain.of` of them, or None to compute every kernel directly.
        out: ``[K, n, q]`` float32 work array; step: ``[n, q]`` float32 work array.
    """
    if chain is None:
        np.subtract(cosine[None], mu[:, None, None], out=out)
        np.square(out, out=out)
        np.multiply(out, neg_inv_two_sigma_sq[:, None, None], out=out)
        return np.exp(out, out=out), None, len(out)
    used, low = len(out), float(cosine.min(initial=1.0))
    for k in range(chain.middle + 1, len(out)):
        if mu[k] < low and neg_inv_two_sigma_sq[k] * (low - mu[k]) ** 2 < _LOG_NEGLIGIBLE:
            used = k
            break
    for k in (0, chain.middle):
        np.subtract(cosine, mu[k], out=out[k])
        np.square(out[k], out=out[k])
        np.multiply(out[k], neg_inv_two_sigma_sq[k], out=out[k])
        np.exp(out[k], out=out[k])
    np.multiply(cosine, np.float32(chain.rate), out=step)
    np.exp(step, out=step)
    for k in range(chain.middle, 1, -1):
        np.multiply(out[k], step, out=out[k - 1])
    np.reciprocal(step, out=step)
    for k in range(chain.middle, used - 1):
        np.multiply(out[k], step, out=out[k + 1])
    return out, chain.scale, used


@dataclasses.dataclass(frozen=True)
class KernelChain:
    """How :meth:`NumpyReranker._kernels` steps from one soft kernel to the next.

    With ``a = 1 / (2 sigma^2)`` and centres ``mu_{k+1} = mu_k - Δ``, ``K_{k+1}(x) = K_k(x) · exp(-2aΔx) ·
    exp(2aΔ mu_k - aΔ²)``. The chain starts at the soft kernel nearest 0 (``middle``, computed
    directly) and multiplies by ``exp(±rate · x)`` outwards, leaving the constants out:
    ``K_k = scale[k] · value_k``. It is used only where every value and step stays inside float32's
    range for cosines in [-1, 1]; other shapes compute every kernel directly.

    Attributes:
        middle: index of the starting kernel (≥ 1; kernel 0, the exact match, is always direct).
        rate: ``2 a Δ``.
        scale: ``[K]`` float32, what each kernel's values are multiplied by after summing (1 for 0 and ``middle``).
    """

    middle: int
    rate: float
    scale: np.ndarray

    @classmethod
    def of(cls, mu: np.ndarray, sigma: float) -> KernelChain | None:
        """The chain for kernel centres ``mu`` (``kernel_centres``) of width ``sigma``, or None if unsafe."""
        soft = mu[1:].astype(np.float64)
        if len(soft) < 3:
            return None
        a, step = 1.0 / (2.0 * sigma * sigma), float(soft[0] - soft[1])
        middle = 1 + int(np.argmin(np.abs(soft)))
        log_scale = np.zeros(len(mu))
        for k in range(middle, len(mu) - 1):  # down: K_{k+1} = K_k · exp(-rate x) · exp(rate mu_k - a step²)
            log_scale[k + 1] = log_scale[k] + 2 * a * step * mu[k] - a * step * step
        for k in range(middle, 1, -1):  # up: K_{k-1} = K_k · exp(rate x) · exp(-rate mu_k - a step²)
            log_scale[k - 1] = log_scale[k] - 2 * a * step * mu[k] - a * step * step
        # value_k = K_k / scale_k ≤ 1 / scale_k, and the middle kernel must not underflow anywhere in [-1, 1]
        safe = -log_scale.min() < 80 and a * (1 + abs(float(mu[middle]))) ** 2 < 80 and 2 * a * step < 80
        return cls(middle, 2 * a * step, np.exp(log_scale).astype(np.float32)) if safe else None


def distinct_ids(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(rows, return_inverse=True)`` for small non-negative ids, by counting instead of sorting.

    A query's ~6,000 candidate words are ids below ~the vocabulary size: marking them in an array of
    that size is linear and ~3x faster than the sort ``np.unique`` runs.
    """
    if not rows.size:
        return rows.copy(), np.zeros(0, np.int64)
    seen = np.bincount(rows)
    distinct = np.flatnonzero(seen)
    where = np.empty(len(seen), np.int64)
    where[distinct] = np.arange(len(distinct))
    return distinct, where[rows]
