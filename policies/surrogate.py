"""Quality surrogate: a cluster expansion over the per-layer mixer assignment.

quality(p) = intercept + sum_l unary[l, p_l] + sum_l pair[l, p_l, p_l+1]
             + sum_l triple[l, p_l, p_l+1, p_l+2]

Every (layer, mixer) one-hot is a feature, with no reference mixer dropped:
the ridge penalty makes the over-complete fit well posed, and the frontier DP
wants one coefficient per mixer anyway. Because such coefficients are only
defined up to moving constants between orders, a fitted model is reported in
one canonical gauge (``canonical``): each order carries only what the lower
orders cannot express (the interaction part), so coefficients from two fits
are comparable. Arrays are in ``MIXERS`` order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from policies.errors import ConfigError, InvalidPlacement, TableMismatch
from policies.placement import MIXERS, Placement

FORMAT = "supernet-router/surrogate"
VERSION = 1
# Ridge strength per sample: fit minimises mean squared error + alpha * |w|^2.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-6, 3, 19))
_ORDER_KEYS = ("unary", "pair", "triple")
_INDEX = {m: i for i, m in enumerate(MIXERS)}

PlacementsLike = Sequence["Placement | str"] | np.ndarray


def encode(placements: PlacementsLike, num_layers: int | None = None) -> np.ndarray:
    """Placements as an int array [n, layers] of indices into ``MIXERS``."""
    if isinstance(placements, np.ndarray):
        codes = np.asarray(placements, dtype=np.int64)
        if codes.ndim != 2 or (codes.size and (codes.min() < 0 or codes.max() >= len(MIXERS))):
            raise InvalidPlacement("encoded placements must be a [n, layers] array of mixer indices 0..3")
        if num_layers is not None and codes.shape[1] != num_layers:
            raise InvalidPlacement(f"placements have {codes.shape[1]} layers but the model has {num_layers}")
        return codes
    parsed = [Placement.parse(p, num_layers) for p in placements]
    if num_layers is None and parsed and len({len(p) for p in parsed}) > 1:
        raise InvalidPlacement("placements of different lengths: every placement needs one mixer per layer")
    width = num_layers if num_layers is not None else (len(parsed[0]) if parsed else 0)
    return np.array([[_INDEX[m] for m in p] for p in parsed], dtype=np.int64).reshape(len(parsed), width)


def _order_shapes(num_layers: int) -> tuple[tuple[int, ...], ...]:
    n = len(MIXERS)
    return (num_layers, n), (max(num_layers - 1, 0), n, n), (max(num_layers - 2, 0), n, n, n)


def _design(codes: np.ndarray, max_range: int) -> np.ndarray:
    """One-hot design matrix: a column per (layer, mixer), per (layer, pair), per (layer, triple)."""
    rows, num_layers = codes.shape
    n = len(MIXERS)
    blocks = []
    for order in range(1, max_range + 1):
        spans = num_layers - order + 1
        if spans <= 0:
            continue
        local = np.zeros((rows, spans), dtype=np.int64)
        for k in range(order):
            local = local * n + codes[:, k : k + spans]
        block = np.zeros((rows, spans * n**order))
        block[np.arange(rows)[:, None], np.arange(spans) * n**order + local] = 1.0
        blocks.append(block)
    return np.hstack(blocks)


@dataclass(frozen=True, slots=True, eq=False)
class ClusterExpansion:
    """A fitted (or hand-built) surrogate; orders above ``max_range`` hold zeros."""

    num_layers: int
    max_range: int
    intercept: float
    unary: np.ndarray  # [L, 4]
    pair: np.ndarray  # [L-1, 4, 4], layers (l, l+1)
    triple: np.ndarray  # [L-2, 4, 4, 4], layers (l, l+1, l+2)
    ridge_alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.max_range not in (1, 2, 3):
            raise ConfigError(f"need num_layers >= 1 and max_range 1..3, got {self.num_layers}, {self.max_range}")
        for order, (key, shape) in enumerate(zip(_ORDER_KEYS, _order_shapes(self.num_layers)), start=1):
            array = np.array(getattr(self, key), dtype=np.float64)
            if array.shape != shape:
                raise ConfigError(f"{key} coefficients have shape {array.shape}, expected {shape}")
            if order > self.max_range and np.any(array):
                raise ConfigError(f"{key} coefficients must be zero with max_range {self.max_range}")
            array.setflags(write=False)
            object.__setattr__(self, key, array)
        object.__setattr__(self, "intercept", float(self.intercept))

    @classmethod
    def fit(
        cls,
        placements: PlacementsLike,
        scores: Sequence[float] | np.ndarray,
        *,
        max_range: int = 3,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        folds: int = 5,
        seed: int = 0,
    ) -> "ClusterExpansion":
        """Ridge fit, reported in the canonical gauge.

        ``alpha`` comes from ``folds``-fold cross-validation over ``alphas`` (ties: the larger).
        """
        codes = encode(placements)
        y = np.asarray(scores, dtype=np.float64)
        if y.shape != (len(codes),) or not np.all(np.isfinite(y)):
            raise ConfigError(f"need one finite score per placement: {len(codes)} placements, scores {y.shape}")
        if max_range not in (1, 2, 3) or folds < 2 or len(codes) < folds:
            raise ConfigError(f"need max_range in 1..3 and folds >= 2, and at least {folds} placements")
        if not len(alphas) or min(alphas) <= 0:
            raise ConfigError("ridge alphas must be positive: the one-hot features are over-complete")
        X = _design(codes, max_range)
        grid = np.asarray(sorted(alphas), dtype=np.float64)
        fold_of = np.random.default_rng(seed).permutation(len(y)) % folds
        errors = np.zeros(len(grid))
        for fold in range(folds):
            train, test = fold_of != fold, fold_of == fold
            coefs, offsets = _ridge_path(X[train], y[train], grid)
            errors += ((X[test] @ coefs + offsets - y[test][:, None]) ** 2).sum(axis=0)
        alpha = float(grid[len(grid) - 1 - np.argmin(errors[::-1])])
        coefs, offsets = _ridge_path(X, y, np.array([alpha]))
        return cls._from_flat(codes.shape[1], max_range, float(offsets[0]), coefs[:, 0], alpha).canonical()

    @classmethod
    def _from_flat(cls, num_layers: int, max_range: int, intercept: float, w: np.ndarray, alpha: float):
        arrays, start = [], 0
        for order, shape in enumerate(_order_shapes(num_layers), start=1):
            size = int(np.prod(shape)) if order <= max_range else 0
            arrays.append(w[start : start + size].reshape(shape) if size else np.zeros(shape))
            start += size
        return cls(num_layers, max_range, intercept, *arrays, ridge_alpha=alpha)

    def canonical(self) -> "ClusterExpansion":
        """The same predictions with each order holding only what lower orders cannot express.

        A triple keeps its part with zero mean over its first and over its last
        layer (the (l, l+2) and three-way interaction); a pair is double-centred;
        unary terms have zero mean over mixers. The rest moves down an order.
        """
        unary, pair, triple = (np.array(a) for a in (self.unary, self.pair, self.triple))
        if len(triple):
            over_first, over_last = triple.mean(axis=1), triple.mean(axis=3)
            over_both = triple.mean(axis=(1, 3))
            triple = triple - over_first[:, None] - over_last[..., None] + over_both[:, None, :, None]
            pair[:-1] += over_last
            pair[1:] += over_first - over_both[..., None]
        if len(pair):
            rows, cols, both = pair.mean(axis=2), pair.mean(axis=1), pair.mean(axis=(1, 2))
            pair = pair - rows[..., None] - cols[:, None, :] + both[:, None, None]
            unary[:-1] += rows - both[:, None]
            unary[1:] += cols
        means = unary.mean(axis=1)
        unary = unary - means[:, None]
        intercept = self.intercept + float(means.sum())
        return ClusterExpansion(self.num_layers, self.max_range, intercept, unary, pair, triple, self.ridge_alpha)

    def predict(self, placement: "Placement | str") -> float:
        return float(self.predict_many([placement])[0])

    def predict_many(self, placements: PlacementsLike) -> np.ndarray:
        codes = encode(placements, self.num_layers)
        layers = np.arange(self.num_layers)
        total = self.intercept + self.unary[layers, codes].sum(axis=1)
        if self.num_layers >= 2:
            total += self.pair[layers[:-1], codes[:, :-1], codes[:, 1:]].sum(axis=1)
        if self.num_layers >= 3:
            total += self.triple[layers[:-2], codes[:, :-2], codes[:, 1:-1], codes[:, 2:]].sum(axis=1)
        return total

    def to_dict(self) -> dict:
        data = {"format": FORMAT, "version": VERSION, "num_layers": self.num_layers, "max_range": self.max_range}
        data |= {"mixers": [m.value for m in MIXERS], "intercept": self.intercept, "ridge_alpha": self.ridge_alpha}
        return data | {key: getattr(self, key).tolist() for key in _ORDER_KEYS[: self.max_range]}

    @classmethod
    def from_dict(cls, data: dict) -> "ClusterExpansion":
        """Validate a table written by ``to_dict``; ``TableMismatch`` names what is wrong."""
        where = "surrogate table"
        if not isinstance(data, dict):
            raise TableMismatch(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise TableMismatch(f"{where}: 'format' is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise TableMismatch(f"{where}: 'version' is {data.get('version')!r}, this code reads {VERSION}")
        max_range = data.get("max_range")
        if max_range not in (1, 2, 3):
            raise TableMismatch(f"{where}: 'max_range' is {max_range!r}, expected 1, 2 or 3")
        required = {"format", "version", "num_layers", "max_range", "mixers", "intercept", "ridge_alpha"}
        required |= set(_ORDER_KEYS[:max_range])
        if missing := sorted(required - data.keys()):
            raise TableMismatch(f"{where}: missing key(s) {', '.join(missing)}")
        if extra := sorted(data.keys() - required):
            raise TableMismatch(f"{where}: unexpected key(s) {', '.join(map(str, extra))} (max_range {max_range})")
        num_layers = data["num_layers"]
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise TableMismatch(f"{where}: 'num_layers' is {num_layers!r}, expected a positive integer")
        names = data["mixers"]
        if not isinstance(names, list):
            raise TableMismatch(f"{where}: 'mixers' is {names!r}, expected a list of mixer names")
        if unknown := [n for n in names if n not in {m.value for m in MIXERS}]:
            raise TableMismatch(f"{where}: unknown mixer(s) {unknown} in 'mixers'")
        if sorted(names) != sorted(m.value for m in MIXERS):
            raise TableMismatch(f"{where}: 'mixers' is {names}, expected each of {[m.value for m in MIXERS]} once")
        axis = [names.index(m.value) for m in MIXERS]  # table axis -> MIXERS order
        scalars = {}
        for key in ("intercept", "ridge_alpha"):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise TableMismatch(f"{where}: {key!r} is {value!r}, expected a finite number")
            scalars[key] = float(value)
        arrays = []
        for order, (key, shape) in enumerate(zip(_ORDER_KEYS, _order_shapes(num_layers)), start=1):
            if order > max_range:
                arrays.append(np.zeros(shape))
                continue
            try:
                array = np.array(data[key], dtype=np.float64)
            except (TypeError, ValueError):
                raise TableMismatch(f"{where}: {key!r} is not a nested list of numbers") from None
            if array.shape != shape:
                raise TableMismatch(
                    f"{where}: {key!r} has shape {list(array.shape)}, "
                    f"expected {list(shape)} for {num_layers} layers"
                )
            if not np.all(np.isfinite(array)):
                raise TableMismatch(f"{where}: {key!r} holds non-finite numbers")
            arrays.append(array[(slice(None),) + np.ix_(*[axis] * order)])
        return cls(num_layers, max_range, scalars["intercept"], *arrays, ridge_alpha=scalars["ridge_alpha"])


def _ridge_path(X: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge weights [features, alphas] and intercepts [alphas] (intercept unpenalised).

    One eigendecomposition serves every alpha: of the centred Gram matrix when
    placements outnumber features, else of the kernel matrix (the dual form).
    """
    x_mean, y_mean = X.mean(axis=0), y.mean()
    centred, shift = X - x_mean, len(y) * alphas[None, :]
    if X.shape[0] >= X.shape[1]:
        eigenvalues, V = np.linalg.eigh(centred.T @ centred)
        coefs = V @ ((V.T @ (centred.T @ (y - y_mean)))[:, None] / (eigenvalues[:, None] + shift))
    else:
        eigenvalues, U = np.linalg.eigh(centred @ centred.T)
        coefs = centred.T @ (U @ ((U.T @ (y - y_mean))[:, None] / (eigenvalues[:, None] + shift)))
    return coefs, y_mean - x_mean @ coefs


@dataclass(frozen=True, slots=True)
class HeldOutScore:
    spearman: float
    r2: float
    num_samples: int
    rmse: float = float("nan")  # root mean squared error of the predicted scores


def evaluate(model: ClusterExpansion, placements: PlacementsLike, scores: Sequence[float]) -> HeldOutScore:
    """How well ``model`` ranks and fits placements it was not trained on."""
    truth = np.asarray(scores, dtype=np.float64)
    predicted = model.predict_many(placements)
    if truth.shape != predicted.shape:
        raise ConfigError(f"{len(predicted)} placements but {truth.size} scores")
    residual = ((truth - predicted) ** 2).sum()
    total = ((truth - truth.mean()) ** 2).sum()
    r2 = 1.0 - residual / total if total > 0 else float("nan")
    rmse = float(np.sqrt(residual / truth.size)) if truth.size else float("nan")
    return HeldOutScore(spearman(truth, predicted), float(r2), len(truth), rmse)


def average_ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks); nan when either side is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    if len(ra) != len(rb):
        raise ConfigError(f"spearman needs equal lengths, got {len(ra)} and {len(rb)}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / norm) if norm > 0 else float("nan")
