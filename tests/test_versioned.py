"""d2f's JSON documents refuse a value of the wrong type by name; ``bool`` is never an ``int`` (JSON's ``true`` is
not a step count), unless the key allows ``bool`` itself."""

import json

import pytest

from d2f._versioned import Document

DOC = Document(
    "d2f.example",
    1,
    frozenset({"steps"}),
    frozenset({"flag", "note"}),
    {"steps": (int,), "flag": (bool, int), "note": (str, type(None))},
)


def test_a_bool_where_an_int_is_wanted_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"^d2f.example document: steps=True is a bool; expected int$"):
        DOC.new(steps=True)
    with pytest.raises(ValueError, match=r"^d2f.example document: steps='3' is a str; expected int$"):
        DOC.new(steps="3")
    file = tmp_path / "doc.json"
    file.write_text(json.dumps({"format": "d2f.example", "version": 1, "steps": False}))
    with pytest.raises(ValueError, match=rf"^{file}: steps=False is a bool; expected int$"):
        DOC.read(file)


def test_a_value_of_none_of_several_types_is_refused_naming_them_all():
    with pytest.raises(ValueError, match=r"^d2f.example document: note=3 is a int; expected str or null$"):
        DOC.new(steps=1, note=3)
    assert DOC.new(steps=1, note=None)["note"] is None


def test_a_key_that_allows_bool_takes_it_and_ints_pass():
    assert DOC.new(steps=3, flag=True) == {"format": "d2f.example", "version": 1, "steps": 3, "flag": True}
    assert DOC.new(steps=0, flag=2)["flag"] == 2
