"""The examples of docs/api.md run as written."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
EXAMPLES = re.findall(r"^## (.+?)\n.*?```python\n(.*?)```", DOC.read_text(), flags=re.S | re.M)


def test_the_document_has_its_examples():
    assert [title for title, _ in EXAMPLES] == ["MIRA in a plain loop", "CoKe in a plain loop"]


@pytest.mark.parametrize("code", [code for _, code in EXAMPLES], ids=[title for title, _ in EXAMPLES])
def test_example_runs_as_written(code, capsys):
    exec(compile(code, str(DOC), "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert "MIRA step 4" in out or "CoKe epoch 1" in out
