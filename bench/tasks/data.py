"""Seeded generators for the state-tracking and regular-language suite.

Every task returns, for a batch of sequences of one length L,

* ``tokens``  (B, L) int64: the input symbols,
* ``targets`` (B, L) int64: the label of every prefix ``tokens[:, :t + 1]``,
* ``valid``   (B, L) bool: where that prefix label is defined (all True except for
  modular arithmetic, whose prefixes ending in an operator have no value).

Prefix labels make training dense (every prefix is itself an example of the language);
``Task.score`` says what the test metric reads: the last token (``"last"``, the
Chomsky-hierarchy protocol) or every token (``"all"``, the word-problem protocol).

The tasks, following Deletang et al. (2023, "Neural Networks and the Chomsky Hierarchy"),
Grazzi et al. (2025, "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues")
and Merrill et al. (2024, "The Illusion of State in State-Space Models"):

=================  ==========================================  ======  ======
task               label of the prefix x_1..x_t                vocab   classes
=================  ==========================================  ======  ======
parity             x_1 xor ... xor x_t (bits)                  2       2
mod_arith          value of "n op n op ... n" mod 5, usual     8       5
                   precedence (* before + and -), no brackets
cycle_nav          position on a 5-cycle after moves           3       5
                   {0: stay, 1: +1, 2: -1}, starting at 0
even_pairs         #"ab" + #"ba" substrings is even            2       2
                   (equivalently x_1 == x_t)
s3 / s5 / a5       running product g_1 g_2 ... g_t of group    |G|     |G|
                   elements (permutations); 6 / 120 / 60
=================  ==========================================  ======  ======
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import numpy as np

MODULUS = 5  # modular arithmetic and cycle navigation both work mod 5
OP_PLUS, OP_MINUS, OP_TIMES = MODULUS, MODULUS + 1, MODULUS + 2  # operator tokens follow the digits


# --------------------------------------------------------------------------------------------
# Permutation groups
# --------------------------------------------------------------------------------------------

def permutation_parity(perm: Tuple[int, ...]) -> int:
    """0 for an even permutation, 1 for an odd one (by counting inversions)."""
    n = len(perm)
    inversions = sum(1 for i in range(n) for j in range(i + 1, n) if perm[i] > perm[j])
    return inversions % 2


class PermutationGroup:
    """A finite permutation group (S_n or A_n) with a multiplication table.

    Elements are tuples ``p`` with ``p[i]`` the image of point i, listed in lexicographic
    order; element 0 is the identity. The product ``g * h`` is the composition
    "apply h first, then g": ``(g * h)[i] = g[h[i]]``, so a running product
    ``g_1 g_2 ... g_t`` applies ``g_t`` first. Its permutation matrix (``P[p[i], i] = 1``)
    is then the matrix product ``P(g_1) @ ... @ P(g_t)``.
    """

    def __init__(self, n: int, alternating: bool = False):
        perms = list(itertools.permutations(range(n)))
        if alternating:
            perms = [p for p in perms if permutation_parity(p) == 0]
        self.n = n
        self.elements: List[Tuple[int, ...]] = perms
        self.index: Dict[Tuple[int, ...], int] = {p: i for i, p in enumerate(perms)}
        size = len(perms)
        # table[a, b] = index of elements[a] * elements[b]
        self.table = np.empty((size, size), dtype=np.int64)
        for a, pa in enumerate(perms):
            for b, pb in enumerate(perms):
                self.table[a, b] = self.index[tuple(pa[pb[i]] for i in range(n))]

    def __len__(self) -> int:
        return len(self.elements)

    def matrix(self, element: int) -> np.ndarray:
        """The (n, n) permutation matrix of ``elements[element]``: ``M[p[i], i] = 1``."""
        p = self.elements[element]
        m = np.zeros((self.n, self.n), dtype=np.int64)
        m[list(p), list(range(self.n))] = 1
        return m


_GROUPS: Dict[str, PermutationGroup] = {}


def get_group(name: str) -> PermutationGroup:
    """``"s3"``, ``"s5"`` or ``"a5"``, built once and cached."""
    if name not in _GROUPS:
        n = int(name[1:])
        _GROUPS[name] = PermutationGroup(n, alternating=name.startswith("a"))
    return _GROUPS[name]


# --------------------------------------------------------------------------------------------
# Generators: (rng, batch, length) -> tokens (B, L), targets (B, L), valid (B, L)
# --------------------------------------------------------------------------------------------

Sample = Tuple[np.ndarray, np.ndarray, np.ndarray]


def gen_parity(rng: np.random.Generator, batch: int, length: int) -> Sample:
    """Bits; the label of each prefix is the xor of its bits."""
    tokens = rng.integers(0, 2, size=(batch, length))
    targets = np.cumsum(tokens, axis=1) % 2
    return tokens, targets, np.ones_like(tokens, dtype=bool)


def gen_even_pairs(rng: np.random.Generator, batch: int, length: int) -> Sample:
    """Strings over {a=0, b=1}; label 1 when the number of "ab" and "ba" substrings is even.

    That count changes by one at every change of symbol, so it is even exactly when the
    first and the current symbol agree; the label is computed by counting, not by that shortcut.
    """
    tokens = rng.integers(0, 2, size=(batch, length))
    changes = np.concatenate([np.zeros((batch, 1), dtype=np.int64),
                              (tokens[:, 1:] != tokens[:, :-1]).astype(np.int64)], axis=1)
    targets = (np.cumsum(changes, axis=1) % 2 == 0).astype(np.int64)
    return tokens, targets, np.ones_like(tokens, dtype=bool)


def gen_cycle_nav(rng: np.random.Generator, batch: int, length: int) -> Sample:
    """Moves {0: stay, 1: +1, 2: -1} on a cycle of 5 positions starting at 0; label = position."""
    tokens = rng.integers(0, 3, size=(batch, length))
    step = np.array([0, 1, -1])[tokens]
    targets = np.cumsum(step, axis=1) % MODULUS
    return tokens, targets, np.ones_like(tokens, dtype=bool)


def gen_mod_arith(rng: np.random.Generator, batch: int, length: int) -> Sample:
    """Expressions ``n op n op ... n`` over digits 0..4 and {+, -, *}, evaluated mod 5.

    Multiplication binds tighter than addition and subtraction (no brackets). Tokens: digits
    0..4, then ``+`` = 5, ``-`` = 6, ``*`` = 7. An odd number of tokens is needed for a complete
    expression, so an even ``length`` is rounded up by one. The label of each prefix that ends
    in a digit is that prefix's value; prefixes ending in an operator are not valid.

    The running value is tracked as ``total + sign * term`` (finished terms, and the product
    being built), which is the finite-state machine that makes this language regular.
    """
    if length % 2 == 0:
        length += 1
    tokens = np.empty((batch, length), dtype=np.int64)
    tokens[:, 0::2] = rng.integers(0, MODULUS, size=(batch, (length + 1) // 2))
    tokens[:, 1::2] = rng.integers(OP_PLUS, OP_TIMES + 1, size=(batch, length // 2))
    targets = np.zeros((batch, length), dtype=np.int64)
    valid = np.zeros((batch, length), dtype=bool)
    valid[:, 0::2] = True
    total = np.zeros(batch, dtype=np.int64)   # sum of the finished terms
    sign = np.ones(batch, dtype=np.int64)     # sign of the term being built
    term = tokens[:, 0].copy()                # product being built
    targets[:, 0] = term % MODULUS
    for t in range(1, length, 2):
        op, digit = tokens[:, t], tokens[:, t + 1]
        times = op == OP_TIMES
        # + or -: close the current term, start a new one with the digit
        total = np.where(times, total, (total + sign * term) % MODULUS)
        sign = np.where(times, sign, np.where(op == OP_PLUS, 1, -1))
        term = np.where(times, term * digit, digit) % MODULUS
        targets[:, t + 1] = (total + sign * term) % MODULUS
    return tokens, targets, valid


def make_group_generator(name: str) -> Callable[[np.random.Generator, int, int], Sample]:
    """Word problem of group ``name``: uniform random elements; label = running product."""

    def gen(rng: np.random.Generator, batch: int, length: int) -> Sample:
        group = get_group(name)
        tokens = rng.integers(0, len(group), size=(batch, length))
        targets = np.empty_like(tokens)
        product = np.zeros(batch, dtype=np.int64)  # the identity
        for t in range(length):
            product = group.table[product, tokens[:, t]]
            targets[:, t] = product
        return tokens, targets, np.ones_like(tokens, dtype=bool)

    gen.__doc__ = f"Word problem of {name.upper()}: label of each prefix = product of its elements."
    return gen


# --------------------------------------------------------------------------------------------
# Task registry with the CPU-scaled protocol
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """One task and its protocol.

    ``train_lengths`` is the inclusive range training lengths are drawn from, uniformly per
    sequence; ``test_lengths`` are the lengths accuracy is reported at; ``score`` is
    ``"last"`` (accuracy of the last token) or ``"all"`` (of every valid token).
    """

    name: str
    generate: Callable[[np.random.Generator, int, int], Sample]
    vocab_size: int
    num_classes: int
    train_lengths: Tuple[int, int]
    test_lengths: Tuple[int, ...]
    score: str


def _group_task(name: str, train_lengths, test_lengths) -> Task:
    size = len(get_group(name))
    return Task(name, make_group_generator(name), size, size, train_lengths, test_lengths, "all")


# Chomsky-hierarchy tasks: train 3..40, test 40..256 (Deletang et al.; Grazzi et al.).
# Word problems: every token scored; S3 as the regular tasks, S5 and A5 at short lengths.
TASKS: Dict[str, Callable[[], Task]] = {
    "parity": lambda: Task("parity", gen_parity, 2, 2, (3, 40), (40, 64, 128, 256), "last"),
    "mod_arith": lambda: Task("mod_arith", gen_mod_arith, 8, MODULUS, (3, 40), (40, 64, 128, 256), "last"),
    "cycle_nav": lambda: Task("cycle_nav", gen_cycle_nav, 3, MODULUS, (3, 40), (40, 64, 128, 256), "last"),
    "even_pairs": lambda: Task("even_pairs", gen_even_pairs, 2, 2, (3, 40), (40, 64, 128, 256), "last"),
    "s3": lambda: _group_task("s3", (3, 40), (40, 64, 128, 256)),
    "s5": lambda: _group_task("s5", (2, 16), (16, 32, 64)),
    "a5": lambda: _group_task("a5", (2, 16), (16, 32, 64)),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]()


def add_bos(tokens: np.ndarray, targets: np.ndarray, valid: np.ndarray, bos: int) -> Sample:
    """Prepends a beginning-of-sequence token ``bos`` (whose position has no label) to a batch.

    A linear recurrence started from the zero state cannot flip the sign of nothing: parity and
    the word problems need some content in the state before the first symbol acts on it. A BOS
    token gives every model that start signal (the models' vocabularies hold ``vocab_size + 1``).
    Returns tokens, targets, valid, each (B, L + 1).
    """
    batch = tokens.shape[0]
    tokens = np.concatenate([np.full((batch, 1), bos, dtype=tokens.dtype), tokens], axis=1)
    targets = np.concatenate([np.zeros((batch, 1), dtype=targets.dtype), targets], axis=1)
    valid = np.concatenate([np.zeros((batch, 1), dtype=bool), valid], axis=1)
    return tokens, targets, valid


def sample_train_batch(task: Task, rng: np.random.Generator, batch: int) -> Sample:
    """A training batch with per-sequence lengths drawn from ``task.train_lengths``.

    Sequences are generated at the longest length and then cut: positions past a sequence's own
    length become invalid (padding at the end never affects earlier outputs of a causal model).
    Returns tokens, targets, valid, each (B, L_max).
    """
    lo, hi = task.train_lengths
    tokens, targets, valid = task.generate(rng, batch, hi)
    lengths = rng.integers(lo, hi + 1, size=batch)
    positions = np.arange(tokens.shape[1])[None, :]
    valid = valid & (positions < lengths[:, None])
    return tokens, targets, valid
