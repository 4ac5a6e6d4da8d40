"""The run report (alflow.report) on a real 2-iteration run: files, valid PNGs, HTML embeds them."""

from __future__ import annotations

import base64
import re
import struct
import sys
from pathlib import Path

import pytest

from alflow.cli import main
from alflow.config import config_from_dict
from alflow.loop import LoopRun, run_loop
from alflow.report import FIGURES, write_report

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import tiny_config  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk of a PNG; fails unless ``data`` is one."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "run"
    run_loop(config_from_dict(tiny_config(path)))
    return path


def test_report_files_figures_and_html(run_dir):
    html_path = write_report(run_dir)
    assert html_path == run_dir / "report.html"
    md = (run_dir / "report.md").read_text()
    html = html_path.read_text()
    pngs = {}
    for name in FIGURES:  # every figure has data in a run with labels
        data = (run_dir / "report" / f"{name}.png").read_bytes()
        width, height = png_size(data)
        assert width >= 300 and height >= 200
        pngs[name] = data
        assert f"](report/{name}.png)" in md
    embedded = [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)]
    assert sorted(embedded) == sorted(pngs.values())  # the HTML carries the same images: self-contained
    assert "report/" not in html.split("<body>")[1].split("<img")[0]  # no links to files outside the page
    for text in (md, html):
        assert "max_iterations" in text and "iter_001/train/committee.pt" in text
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 3  # header + 2 iterations
    assert table[1].split("|")[1].strip() == "0" and table[2].split("|")[-2].strip() == "max_iterations"


def test_report_command_and_unfinished_runs(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no state.json" in capsys.readouterr().err
    # a run that has not finished a stage yet: a report without figures, saying so
    fresh = tmp_path / "fresh"
    with LoopRun.open(config_from_dict(tiny_config(fresh))):
        pass
    write_report(fresh)
    assert "No finished iteration yet" in (fresh / "report.md").read_text()
    assert not list((fresh / "report").glob("*.png"))
    assert "data:image/png" not in (fresh / "report.html").read_text()
