"""The procedural shapes world and its oracle."""
import pytest

from mmalign.toyworld.world import (COLORS, SHAPES, all_prompts, analyse, describe, is_correct, make_dataset, oracle_score,
                                parse_prompt, render, Scene)


def test_prompts_and_parsing():
    assert len(all_prompts()) == len(COLORS) * len(SHAPES) == 18
    assert describe("orange", "square") == "an orange square" and describe("red", "circle") == "a red circle"
    assert parse_prompt("An Orange square") == ("orange", "square")
    with pytest.raises(ValueError, match="names no colour"):
        parse_prompt("a photo of a dog")


def test_oracle_prefers_the_prompt():
    data = make_dataset(60, seed=3)
    for im, p, sc in data:
        assert is_correct(im, p)
        other_c = describe(next(c for c in COLORS if c != sc.color), sc.shape)
        other_s = describe(sc.color, next(s for s in SHAPES if s != sc.shape))
        assert oracle_score(im, p) > oracle_score(im, other_c) + 0.3
        assert oracle_score(im, p) > oracle_score(im, other_s) + 0.2
    blank = render(Scene("red", "circle", 1, 16, 16))
    assert oracle_score(blank, "a red circle") == 0.0 and analyse(blank)["color"] is None
