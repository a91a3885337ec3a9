"""util.tables: the one CSV writer and text-table layout of every task's evaluation."""
import csv
import math

from util.tables import fmt_cell, text_table, write_csv


def test_write_csv_columns_cells_and_atomicity(tmp_path):
    p = tmp_path / "m.csv"
    write_csv(str(p), [{"a": 1.23456789, "b": None}, {"c": float("nan"), "a": 2}])
    assert not (tmp_path / "m.csv.tmp").exists()
    with open(p) as f:
        rows = list(csv.reader(f))
    assert rows == [["a", "b", "c"], ["1.23457", "", ""], ["2", "", "nan"]]
    # fixed columns leave the others out; NaN as asked
    write_csv(str(p), [{"a": float("nan"), "z": 5}], fields=["a"], nan_cell="")
    with open(p) as f:
        assert f.read().splitlines() == ["a", '""']


def test_text_table_alignment_and_rule():
    cells = [["name", "v"], ["x", "10"], ["longer", "2"]]
    assert text_table(cells).splitlines() == ["name    v", "x       10", "longer  2"]
    assert text_table(cells, align="right", rule=True).splitlines() == [
        "  name   v", "------  --", "     x  10", "longer   2"]
    assert text_table([]) == ""
    assert [fmt_cell(v) for v in (None, math.nan, 1.234567, 123456.0, "s", 3)] == ["-", "-", "1.235", "1.235e+05",
                                                                                   "s", "3"]
