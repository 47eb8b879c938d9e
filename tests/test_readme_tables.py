"""The README's lists that mirror the code: the configuration table and the stable error codes."""

import re
from pathlib import Path

import pytest

from fastbackend import settings
from fastbackend.errors import ErrorCode

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def test_configuration_table_lists_exactly_the_settings_with_their_defaults():
    rows = {}
    for line in section("Configuration").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    assert rows == {setting.env: (setting.shown_default, setting.help) for setting in settings.ALL}


def test_readme_lists_exactly_the_error_codes():
    listed = re.search(r"`error_code` is stable \(([^)]*)\)", README).group(1)
    assert sorted(re.findall(r"`([a-z_]+)`", listed)) == sorted(code.value for code in ErrorCode)


def test_a_setting_that_does_not_parse_names_its_variable(monkeypatch):
    monkeypatch.setenv("FASTBACKEND_RUN_LIMIT_BYTES", "ten")
    with pytest.raises(ValueError, match=r"^environment variable FASTBACKEND_RUN_LIMIT_BYTES='ten' is not valid: "):
        settings.RUN_LIMIT_BYTES.get()


def test_reliability_table_counts_the_cases_the_suite_has():
    import subprocess
    import sys

    rows = {}
    for line in section("Reliability").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[3].startswith("`tests/"):
            rows[cells[3].strip("`")] = int(cells[1])
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", *rows],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    counts = {path: sum(1 for line in listed.splitlines() if line.startswith(f"{path}::")) for path in rows}
    assert rows and counts == rows
