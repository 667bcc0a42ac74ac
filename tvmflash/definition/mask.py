"""What a query sees: the visibility rule, the masked-score form and the safe row max.

Both definitions (``fused``, ``standard``) build their masks from these functions, and the
compiler's mask pass (``compiler.passes.unmask_full_kv_tiles``) recognises a masked score by
``is_masked_score``: the form written here is the contract between the two.
"""

from __future__ import annotations

from .._compat import tirx

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e))
LN2 = 0.6931471805599453  # ln(2): log(x) == log2(x) * ln(2)
NEG_INF = float("-inf")


def visible(row, col, seq_q, seq_k, causal: bool, even: bool = False, window=None):
    """Whether query ``row`` attends to key ``col`` (None: always, a non-causal even kernel).
    Causal is aligned to the bottom-right corner: row r sees keys c <= r + seq_k - seq_q.
    ``window``: (left, right) int expressions, FlashAttention-2's sliding window: row r sees keys
    r + seq_k - seq_q - left <= c <= r + seq_k - seq_q + right (``right`` None: the causal bound
    alone, as FlashAttention-2 sets right = 0 for causal). Each term is one bound, written
    ``col <= upper`` or ``col >= lower``: the tile-skipping and unmasking passes read them so."""
    terms = []
    if not even:  # past the end: the tiles' padding
        terms.append(col < seq_k)
    if causal:
        terms.append(col <= row + seq_k - seq_q)
    if window is not None:
        left, right = window
        terms.append(col >= row + seq_k - seq_q - left)
        if right is not None:
            terms.append(col <= row + seq_k - seq_q + right)
    if not terms:
        return None
    return terms[0] if len(terms) == 1 else tirx.all(*terms)


def masked(s, row, col, seq_q, seq_k, causal: bool, even: bool = False, window=None):
    """Score ``s`` of (row, col), or -inf where the query does not see the key:
    ``Select(visible, s, -inf)``, each term of ``visible`` one bound (``is_masked_score``)."""
    cond = visible(row, col, seq_q, seq_k, causal, even, window)
    return s if cond is None else tirx.Select(cond, s, tirx.const(NEG_INF, "float32"))


def is_masked_score(e) -> bool:
    """Whether expression ``e`` is a score masked by ``masked``: ``Select(visible, s, -inf)``."""
    return (isinstance(e, tirx.Select) and isinstance(e.false_value, tirx.FloatImm)
            and e.false_value.value == NEG_INF)


def guarded(even: bool, inside, value, dtype: str):
    """A tile element loaded from global memory: zero past the end, unless the kernel is even
    (lengths multiples of the tile)."""
    return value if even else tirx.if_then_else(inside, value, tirx.Cast(dtype, 0))


def finite(m):
    """The row max to subtract: 0 for a row that has seen no key yet (max = -inf), so that
    exp2(-inf - (-inf)) never produces NaN (FlashAttention's ``Check_inf``)."""
    return tirx.Select(m == tirx.const(NEG_INF, "float32"), tirx.const(0.0, "float32"), m)
