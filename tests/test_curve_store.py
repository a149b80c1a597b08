"""The per-image curve store (core/store.py: CurveTable, write_curves, read_curves, RowStore's curve files)."""

import numpy as np
import pytest

from maskbench.core.errors import MaskbenchError
from maskbench.core.store import CurveTable, RowStore, read_curves, write_curves

X = np.linspace(0, 1, 5)


def table(ids, key="k1", offset=0.0):
    y = np.stack([np.linspace(0, 1, 5) * 0.5 + offset + 0.01 * i for i in range(len(ids))]) if ids else \
        np.zeros((0, 5))
    return CurveTable(list(ids), [key] * len(ids), {"insertion": X}, {"insertion": y})


def test_round_trip_keeps_ids_keys_grid_and_float16_values_and_same_bytes(tmp_path):
    t = table(["b", "a"])
    t.y["insertion"][1, 2] = np.nan  # an undefined point stays undefined
    write_curves(tmp_path / "c.npz", t)
    back, problems = read_curves(tmp_path / "c.npz", (0.0, 1.0))
    assert not problems and back.image_ids == ["b", "a"] and back.run_keys == ["k1", "k1"]
    np.testing.assert_array_equal(back.x["insertion"], X)
    np.testing.assert_allclose(back.y["insertion"], t.y["insertion"], atol=5e-4)  # float16
    assert np.isnan(back.y["insertion"][1, 2])
    first = (tmp_path / "c.npz").read_bytes()
    write_curves(tmp_path / "c.npz", back)  # float16 -> float32 -> float16 is exact: the same bytes again
    assert (tmp_path / "c.npz").read_bytes() == first


def test_values_orders_rows_by_the_given_ids_and_fills_missing_images_with_nan():
    t = table(["b", "a"])
    v = t.values("insertion", ["a", "zz", "b"])
    np.testing.assert_array_equal(v[0], t.y["insertion"][1])
    np.testing.assert_array_equal(v[2], t.y["insertion"][0])
    assert np.isnan(v[1]).all()


def test_concat_lets_a_later_image_replace_an_earlier_one_and_refuses_other_grids():
    old, new = table(["a", "b"], offset=0.0), table(["b", "c"], offset=0.3)
    both = CurveTable.concat([old, new, CurveTable()])
    assert both.image_ids == ["a", "b", "c"]
    np.testing.assert_array_equal(both.y["insertion"][1], new.y["insertion"][0])  # b from the later part
    np.testing.assert_array_equal(both.y["insertion"][0], old.y["insertion"][0])
    other = CurveTable(["d"], ["k1"], {"insertion": np.linspace(0, 1, 3)}, {"insertion": np.zeros((1, 3))})
    with pytest.raises(MaskbenchError, match="x grids"):
        CurveTable.concat([old, other])
    assert len(CurveTable.concat([])) == 0
    assert both.with_key("k2").image_ids == [] and both.with_key("k1").image_ids == ["a", "b", "c"]


def test_damaged_files_and_out_of_range_images_are_problems_never_values(tmp_path):
    p = tmp_path / "c.npz"
    p.write_bytes(b"PK\x03\x04 truncated")
    t, problems = read_curves(p)
    assert len(t) == 0 and len(problems) == 1 and "unreadable" in problems[0] and str(p) in problems[0]
    bad = table(["a", "b", "c"])
    bad.y["insertion"][1, 3] = 1.7  # outside [0, 1]
    bad.y["insertion"][2, 0] = np.inf
    write_curves(p, bad)
    t, problems = read_curves(p, (0.0, 1.0))
    assert t.image_ids == ["a"] and len(problems) == 2
    assert "image b" in problems[0] and "image c" in problems[1]
    assert read_curves(tmp_path / "absent.npz") == (CurveTable(), [])


def test_rank_shards_merge_into_the_method_file_and_are_dropped_with_its_rows_shards(tmp_path):
    store = RowStore(tmp_path)
    store.save_curve_shard("constant-0", "curves", 1, table(["c"], offset=0.2))
    store.save_curve_shard("constant-0.5", "curves", 1, table(["z"]))  # another method: untouched
    merged, problems = store.merge_curve_shards("constant-0", "curves", table(["a", "c"]))
    assert not problems and merged.image_ids == ["a", "c"]
    np.testing.assert_allclose(merged.y["insertion"][1], table(["c"], offset=0.2).y["insertion"][0], atol=5e-4)
    store.drop_shards("constant-0", ["curves"])
    assert store.curve_shards("constant-0", "curves") == []
    assert len(store.curve_shards("constant-0.5", "curves")) == 1
