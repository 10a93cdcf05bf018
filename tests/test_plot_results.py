"""benchmarks/plot_results.py reads the recorded results pages: the first table of each
page (the current grid) and its provenance line parse into the numbers the plots show.
Structure and parsing only: no test asserts a recorded speed (results are measurements, not
specifications; benchmarks never assert on speed either)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "benchmarks").is_dir():  # an unpacked sdist leaves benchmarks/ out (MANIFEST.in)
    pytest.skip("benchmarks/ is not in this source tree", allow_module_level=True)
spec = importlib.util.spec_from_file_location("plot_results", ROOT / "benchmarks" / "plot_results.py")
plot_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_results)


@pytest.mark.parametrize("page", ["decode_h200.md", "decode_h100.md"])
def test_decode_pages(page):
    head, rows, prov = plot_results.first_table((ROOT / "benchmarks" / "results" / page).read_text())
    assert {"batch", "context", "TB/s", "CUDNN_ATTENTION us (TB/s)"} <= set(head)
    assert "commit" in prov and "Device" in prov
    col = {h: i for i, h in enumerate(head)}
    assert len(rows) == 16 and all(len(r) == len(head) for r in rows)
    for r in rows:
        assert int(r[col["batch"]]) > 0 and int(r[col["context"]]) > 0
        assert plot_results.number(r[col["TB/s"]]) is not None  # a number where the plot reads one
        assert plot_results.rate_in_parens(r[col["CUDNN_ATTENTION us (TB/s)"]]) is not None


@pytest.mark.parametrize("page", ["prefill_h200.md", "prefill_h100.md"])
def test_prefill_pages(page):
    head, rows, prov = plot_results.first_table((ROOT / "benchmarks" / "results" / page).read_text())
    assert {"d", "s", "causal", "pf_fwd", "fa2_fwd", "pf_bwd", "fa2_bwd"} <= set(head)
    assert "commit" in prov
    col = {h: i for i, h in enumerate(head)}
    assert len(rows) == 24 and all(len(r) == len(head) for r in rows)
    for r in rows:
        assert int(r[col["d"]]) > 0 and int(r[col["s"]]) > 0 and r[col["causal"]] in ("True", "False")
        for name in ("pf_fwd", "fa2_fwd", "pf_bwd", "fa2_bwd"):  # the columns the plot draws
            assert plot_results.number(r[col[name]]) is not None, (name, r[col[name]])


def test_cells():
    assert plot_results.number("12.5 (3.41) expanded K/V") == 12.5
    assert plot_results.rate_in_parens("12.5 (3.41) expanded K/V") == 3.41
    assert plot_results.number("skipped (size)") is None
    assert plot_results.rate_in_parens("GQA unsupported") is None
