"""The prompts a shapes64 model is scored on: a tuning set and a held-out set, disjoint, fixed in code.

Each set holds every ordered (colour, background) pair of different palette colours once (30 prompts), the shape
cycling through circle, square, triangle with the pair's index, so each shape gets 10 prompts and each colour is
the foreground 5 times and the background 5 times, with every shape among them. The two sets cycle from different
shapes, so no prompt is in both:

- `tuning_prompts()`: what the v1 bar (issue 5) and the v2 recipe search looked at;
- `heldout_prompts()`: written down before the v2 model was trained and never used to choose anything in its
  recipe; the model's bar (tests/test_shapes64_model.py) is measured on these.

(The training data shows every caption: "held out" means the prompts were not used for tuning, not unseen words.)
"""

from __future__ import annotations

from sdjax.shapes64.scene import COLORS, SHAPES, caption


def _cycled_prompts(first_shape: int) -> list[str]:
    pairs = [(c, b) for c in COLORS for b in COLORS if c != b]
    return [caption(c, SHAPES[(first_shape + i) % len(SHAPES)], b) for i, (c, b) in enumerate(pairs)]


def tuning_prompts() -> list[str]:
    """The 30 prompts of the v1 bar, used to tune the v2 recipe ("a red circle on a green background", ...)."""
    return _cycled_prompts(0)


def heldout_prompts() -> list[str]:
    """The 30 held-out prompts the v2 model is judged on ("a red square on a green background", ...); disjoint from
    :func:`tuning_prompts`."""
    return _cycled_prompts(1)
