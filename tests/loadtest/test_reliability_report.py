"""docs/reliability.md is generated from reports/reliability/*.json (loadtest/reliability_report.py): it cannot drift.

Pure file logic: no servers. A failure of the first test means the page, the template or a JSON file changed
without the others: run `make reliability-report` and commit the page with its inputs.
"""
from __future__ import annotations

import json
import re
import shutil

import pytest

from loadtest import reliability_report as rr


def test_the_committed_page_is_the_render_of_the_committed_json_files():
    text = rr.render()
    assert rr.DOC.read_text() == text, (
        "docs/reliability.md differs from a render of reports/reliability/*.json: run `make reliability-report` "
        "(never edit the page by hand: edit loadtest/reliability.md.in or refresh the JSON files)")


def test_check_mode_agrees(capsys):
    assert rr.main(["--check"]) == 0
    assert "is up to date" in capsys.readouterr().out


def test_every_input_file_is_quoted():
    template = rr.TEMPLATE.read_text()
    for name in rr.SOURCES:
        assert "{" + name + "." in template, f"reports/reliability/{name}.json is committed but never quoted"
    assert (rr.REPORTS_DIR / "soak.png").is_file(), "the page shows reports/reliability/soak.png"


# numbers the template may spell out: API contract constants and promised bounds, never a measurement
CONTRACT_NUMBERS = {
    "0",  # exit 0, in_flight_requests back to 0
    "1",  # [N, 1, 28, 28], [-1, 1], 1-minute load average
    "2",  # png_images[2] (an example field name)
    "5",  # recovery promise: < 5 s after Triton is ready
    "8",  # --max-request-bytes default, 8 MiB
    "10",  # the soak's promise: 10 minutes
    "16",  # the PNG mode I;16
    "28",  # 28x28 images
    "70",  # the soak's promise: 70% of measured capacity
    "100",  # refusal promise: p99 < 100 ms
    "200", "400", "413", "429", "500", "503", "504",  # HTTP status codes
    "127.0.0.1",  # where the tests run the stack
}


def test_the_template_types_in_no_figure():
    text = re.sub(r"<!--.*?-->", "", rr.TEMPLATE.read_text(), flags=re.S)
    prose = re.sub(r"\{[^{}]*\}", "", text.replace("{{", "").replace("}}", ""))
    numbers = set(re.findall(r"(?<![\w.])\d+(?:\.\d+)*", prose))
    assert numbers <= CONTRACT_NUMBERS, (
        f"figures typed into loadtest/reliability.md.in: {sorted(numbers - CONTRACT_NUMBERS)}; quote them from a "
        "JSON file ({source.key}) instead")


@pytest.fixture
def reports(tmp_path):
    """A copy of the committed inputs to break."""
    d = tmp_path / "reliability"
    shutil.copytree(rr.REPORTS_DIR, d)
    return d


def drop(path, *keys):
    data = json.loads(path.read_text())
    node = data
    for k in keys[:-1]:
        node = node[k]
    del node[keys[-1]]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("source,keys", [
    ("soak", ("rss", "gateway", "growth_pct")),  # quoted by the template
    ("overload", ("rejection_p99_ms_all",)),  # quoted by the template
    ("triton_faults", ("codes",)),  # read by a derived figure
])
def test_a_missing_key_is_a_clear_error(reports, source, keys):
    drop(reports / f"{source}.json", *keys)
    with pytest.raises(rr.ReportError) as e:
        rr.render(reports)
    msg = str(e.value)  # names the file, the missing key and what needed it
    assert f"{source}.json: no key {'.'.join(keys)!r}" in msg, msg
    assert f"{source}.{'.'.join(keys)}" in msg and ("template quotes" in msg or "derived figure needs" in msg), msg


def test_a_missing_file_names_the_command_that_makes_it(reports, capsys):
    (reports / "soak.json").unlink()
    with pytest.raises(rr.ReportError, match=r"soak\.json is missing: run `make soak`, then .*collect-soak"):
        rr.render(reports)
    assert rr.main(["--reports-dir", str(reports), "--check"]) == 2
    assert "soak.json is missing" in capsys.readouterr().err


def test_a_changed_figure_changes_the_page(reports):
    data = json.loads((reports / "overload.json").read_text())
    data["rejection_p99_ms_all"] = 12345.6
    (reports / "overload.json").write_text(json.dumps(data))
    assert "measured 12345.6 ms" in rr.render(reports)


def test_lookup_walks_dicts_and_lists():
    data = {"a": {"b": [10, {"c": 3}]}, "x y": 1}
    assert rr.lookup(data, "a.b.1.c", "f.json") == 3
    assert rr.lookup(data, "x y", "f.json") == 1
    with pytest.raises(rr.ReportError, match=r"f\.json: no key 'a\.b\.7'"):
        rr.lookup(data, "a.b.7", "f.json")


def test_collect_copies_what_the_last_run_wrote(reports, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    run = json.loads((reports / "tests_run.json").read_text())
    run["written"] = ["overload"]  # this run wrote only the overload figures
    (out / "tests_run.json").write_text(json.dumps(run))
    (out / "overload.json").write_text(json.dumps({**json.loads((reports / "overload.json").read_text()),
                                                   "rejection_p99_ms_all": 4321.5}))
    (out / "deadlines.json").write_text("{}")  # left over from an earlier run: not copied
    assert rr.main(["--reports-dir", str(reports), "collect", "--src", str(out)]) == 0
    assert "that run wrote no bad_input.json" in capsys.readouterr().err
    assert json.loads((reports / "deadlines.json").read_text()) != {}
    text = rr.render(reports)
    assert "measured 4321.5 ms" in text and "figures are from an earlier one" in text
    assert rr.main(["--reports-dir", str(reports), "collect", "--src", str(tmp_path / "none")]) == 2
    assert "run `make reliability` first" in capsys.readouterr().err
