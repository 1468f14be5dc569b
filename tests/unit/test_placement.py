import pytest

from policies.errors import InvalidPlacement
from policies.placement import Mixer, Placement


def test_code_and_names_round_trip():
    placement = Placement.parse("AASGKG")
    assert placement.code == "AASGKG"
    assert placement.names == ["attention", "attention", "sliding_window", "gdn", "kda", "gdn"]
    assert Placement.parse(placement.names) == placement
    assert Placement.parse(",".join(placement.names)) == placement
    assert Placement.parse("aasgkg") == placement


def test_counts_include_every_mixer():
    counts = Placement.parse("AASGKG").counts()
    assert counts == {Mixer.ATTENTION: 2, Mixer.SLIDING_WINDOW: 1, Mixer.GDN: 2, Mixer.KDA: 1}
    assert Placement.uniform("gdn", 3).counts()[Mixer.ATTENTION] == 0


@pytest.mark.parametrize(
    "spec, layers, message",
    [
        ("AASGKX", 6, "unknown letter(s) X"),
        ("AAS", 6, "has 3 layers but the model has 6"),
        ("", None, "unknown letter"),
        (["attention", "mamba"], None, "unknown mixer 'mamba'"),
        ("attention,linear", None, "unknown mixer 'linear'"),
    ],
)
def test_bad_placements_say_what_is_wrong(spec, layers, message):
    with pytest.raises(InvalidPlacement, match=message.replace("(", r"\(").replace(")", r"\)")):
        Placement.parse(spec, layers)


def test_placements_are_hashable_for_grouping():
    assert len({Placement.parse("AG"), Placement.parse(["attention", "gdn"]), Placement.parse("GA")}) == 2
