import pytest

from maskbench.core.errors import MaskbenchError, UnknownNameError
from maskbench.core.registry import Registry


def test_register_get_list_natural_sort():
    reg = Registry("thing")

    @reg.register("b10")
    class B10: ...

    reg.register("b9", obj=int)
    reg.register("a", obj=str, note="x")
    assert reg.list() == ["a", "b9", "b10"]
    assert reg.list("b*") == ["b9", "b10"]
    assert reg.list("*", exclude="b1*") == ["a", "b9"]
    assert reg.get("b10") is B10
    assert reg.meta("a") == {"note": "x"}
    assert "a" in reg and "zzz" not in reg
    assert reg.origin("b10") == __name__


def test_duplicate_name_is_an_error_but_same_object_is_fine():
    reg = Registry("thing")
    reg.register("x", obj=int)
    reg.register("x", obj=int)
    with pytest.raises(MaskbenchError, match="already registered"):
        reg.register("x", obj=str)


def test_unknown_name_lists_valid_names_and_suggests():
    reg = Registry("method")
    for n in ("gradcam", "rise"):
        reg.register(n, obj=object())
    with pytest.raises(UnknownNameError) as err:
        reg.get("gradcm")
    msg = str(err.value)
    assert "Unknown method 'gradcm'" in msg
    assert "Did you mean: gradcam" in msg
    assert "gradcam, rise" in msg
