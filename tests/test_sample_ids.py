"""Sample and point ids (stages.schema.make_sample_id): injective in the upstream text, so two
upstream records never share an id, and stable (nothing but the text decides them)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stages.schema import make_sample_id

# The collisions issue 13 found with the old slugging (which stripped `_` and mapped every other
# character to `_`): each group must give as many ids as it has members.
COLLIDED = [
    [("aaaa",), ("aaaa_",)],
    [("1860116",), ("_1860116",)],
    [("pt.1",), ("pt_1",), ("pt 1",), ("pt/1",), ("pt-1",)],
    [("s1073", "a b.jpg"), ("s1073", "a_b.jpg"), ("s1073", "a_b_jpg")],
    [("a-b", "c"), ("a", "b-c"), ("a_b", "c")],  # a `-` inside a part cannot move the boundary
    [("",), ("_",)],
]


def test_the_issues_collisions_give_distinct_ids():
    for group in COLLIDED:
        ids = [make_sample_id("mermaid", *parts) for parts in group]
        assert len(set(ids)) == len(group), (group, ids)
        for sid in ids:
            assert sid.isascii() and "." not in sid and "/" not in sid and " " not in sid


def test_plain_ids_are_kept_as_they_are_and_the_rest_say_they_were_changed():
    assert make_sample_id("inat2017", 1860116) == "inat2017-1860116"
    assert make_sample_id("coralnet", "s1073", "DSC_4411-x") == "coralnet-s1073-DSC_4411-x"
    slugged = make_sample_id("mermaid", "pt.1")
    assert slugged.startswith("mermaid-pt_1-") and len(slugged.rsplit("-", 1)[1]) == 8
    # NFC and NFD spellings of one name are one id (names are compared in NFC)
    assert make_sample_id("seatizen", "S\u00e9pia") == make_sample_id("seatizen", "Se\u0301pia")


part = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@settings(max_examples=400, deadline=None)
@given(st.lists(part, min_size=1, max_size=3), st.lists(part, min_size=1, max_size=3))
def test_distinct_parts_give_distinct_ids(a: list[str], b: list[str]):
    import unicodedata

    if len(a) != len(b) or [unicodedata.normalize("NFC", x) for x in a] == [
        unicodedata.normalize("NFC", x) for x in b
    ]:
        return
    assert make_sample_id("src", *a) != make_sample_id("src", *b)


def test_seatizen_ids_of_names_with_and_without_an_extension_stay_apart():
    from stages.ingest.seatizen import sample_id_for

    names = ["a_b.jpg", "a_b_jpg", "a_b.JPG", "a b.jpg", "a_b", "a.b.jpg"]
    ids = [sample_id_for(n) for n in names]
    assert len(set(ids)) == len(names), ids
    assert sample_id_for("20190420_MYT_scuba_DSCI1495.JPG") == "seatizen-20190420_MYT_scuba_DSCI1495_JPG"
