"""An optional dependency that is missing is named, with the extra that brings it and the command to get it."""

import pytest

from d2f._extras import require


def test_a_missing_module_is_named_with_its_extra_and_the_install_command():
    with pytest.raises(
        ImportError, match=r"^d2f\.thing needs no_such_d2f_module from the 'train' extra: pip install 'd2f\[train\]'"
    ):
        require("numpy", "no_such_d2f_module", extra="train", feature="d2f.thing")
    with pytest.raises(ImportError, match=r"^d2f\.thing needs no_such_a, no_such_b from the 'train' extra"):
        require("no_such_a", "numpy", "no_such_b", extra="train", feature="d2f.thing")
    assert require("numpy", "torch", extra="train", feature="d2f.thing") is None
