"""Mixers and placements: which of the four trained mixers each decoder layer runs.

A placement is one mixer per layer. It is written either as a compact code, one
letter per layer (``AASGKG``), or as a list of the checkpoint's mixer names
(``["attention", "attention", "sliding_window", "gdn", "kda", "gdn"]``).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from policies.errors import InvalidPlacement


class Mixer(str, enum.Enum):
    """The four mixers, named exactly as in the checkpoint's stochastic mixer."""

    ATTENTION = "attention"
    SLIDING_WINDOW = "sliding_window"
    GDN = "gdn"
    KDA = "kda"

    @property
    def letter(self) -> str:
        return _LETTERS[self]

    @classmethod
    def parse(cls, text: str) -> "Mixer":
        """A mixer from its name (``gdn``) or its letter (``G``)."""
        if len(text) == 1 and text.upper() in _BY_LETTER:
            return _BY_LETTER[text.upper()]
        try:
            return cls(text)
        except ValueError:
            raise InvalidPlacement(
                f"unknown mixer {text!r}: use one of {', '.join(m.value for m in cls)} "
                f"or their letters {''.join(_LETTERS.values())}"
            ) from None


_LETTERS = {Mixer.ATTENTION: "A", Mixer.SLIDING_WINDOW: "S", Mixer.GDN: "G", Mixer.KDA: "K"}
_BY_LETTER = {letter: mixer for mixer, letter in _LETTERS.items()}
MIXERS: tuple[Mixer, ...] = tuple(Mixer)


@dataclass(frozen=True, slots=True)
class Placement:
    """One mixer per decoder layer; hashable, so batches can group rows by it."""

    mixers: tuple[Mixer, ...]
    code: str = field(init=False, compare=False, repr=False)  # one letter per layer (``AASGKG``), made once

    def __post_init__(self) -> None:
        if not self.mixers:
            raise InvalidPlacement("a placement needs at least one layer")
        object.__setattr__(self, "code", "".join(m.letter for m in self.mixers))

    @classmethod
    def parse(cls, spec: "str | Sequence[str] | Placement", num_layers: int | None = None) -> "Placement":
        """Parse a code (``AASGKG``), a comma-separated or list form of mixer names, or a Placement.

        With ``num_layers`` the length is checked too.
        """
        if isinstance(spec, Placement):
            placement = spec
        elif isinstance(spec, str):
            text = spec.strip()
            if "," in text:
                placement = cls(tuple(Mixer.parse(part.strip()) for part in text.split(",")))
            elif text in {m.value for m in Mixer}:
                placement = cls((Mixer(text),))
            else:
                bad = sorted({c for c in text.upper() if c not in _BY_LETTER})
                if bad or not text:
                    raise InvalidPlacement(
                        f"placement code {spec!r} has unknown letter(s) {''.join(bad) or '(empty)'}: "
                        f"use A (attention), S (sliding_window), G (gdn), K (kda), one per layer"
                    )
                placement = cls(tuple(_BY_LETTER[c] for c in text.upper()))
        else:
            placement = cls(tuple(Mixer.parse(str(name)) for name in spec))
        if num_layers is not None and len(placement) != num_layers:
            raise InvalidPlacement(
                f"placement {placement.code} has {len(placement)} layers but the model has {num_layers}: "
                f"give exactly one mixer per layer"
            )
        return placement

    @classmethod
    def uniform(cls, mixer: Mixer | str, num_layers: int) -> "Placement":
        return cls((Mixer.parse(mixer) if isinstance(mixer, str) else mixer,) * num_layers)

    @property
    def names(self) -> list[str]:
        return [m.value for m in self.mixers]

    def counts(self) -> dict[Mixer, int]:
        """How many layers run each mixer (every mixer present, zeros included)."""
        counted = Counter(self.mixers)
        return {m: counted.get(m, 0) for m in MIXERS}

    def layers_with(self, mixer: Mixer) -> list[int]:
        return [i for i, m in enumerate(self.mixers) if m is mixer]

    def __len__(self) -> int:
        return len(self.mixers)

    def __iter__(self) -> Iterable[Mixer]:
        return iter(self.mixers)

    def __getitem__(self, layer: int) -> Mixer:
        return self.mixers[layer]

    def __str__(self) -> str:
        return self.code
