"""Every key in the README's config table is named by a test that shows its effect.

A key counts as named when a test file other than this one mentions it as a YAML key (``key:``),
a dict key (``"key"``) or an attribute (``.key``). This is the floor, not the proof: the test
that names a key must assert what the key does (a value in the optimizer, a weight in the loss, a
file on disk, a number in the answer).
"""

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
README = (TESTS.parent / "README.md").read_text()


def table_keys() -> set[str]:
    start = README.index("| section | implemented |")
    table = README[start : README.index("\n\n", start)]
    keys = set()
    for row in table.splitlines()[2:]:
        implemented = row.split("|")[2]
        # Backticked words that look like keys; values (flux, adamw, ...) are listed by their keys' tests.
        keys |= {word for word in re.findall(r"`([a-z_0-9]+)`", implemented) if "_" in word or word in SHORT_KEYS}
    return keys


# Keys without an underscore in the table (the rest of its backticked words without one are values).
SHORT_KEYS = {"device", "arch", "quantize", "revision", "type", "linear", "rank", "alpha", "dropout", "resolution"}
SHORT_KEYS |= {"steps", "lr", "optimizer", "dtype", "seed", "prompts", "samples", "sampler", "width", "height"}
SHORT_KEYS |= {"neg", "format"}


def mentioned(key: str, text: str) -> bool:
    # as a key (`key:`, "key", .key, key=) or, for the table's few values with underscores, as `: value`
    return re.search(rf"(\b{key}:|[\"']{key}[\"']|\.{key}\b|\b{key}=|: {key}\b)", text) is not None


def test_every_config_key_in_the_readme_is_named_by_a_test():
    sources = "\n".join(p.read_text() for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name)
    sources += "\n".join(p.read_text() for p in (TESTS / "fixtures").rglob("*.yaml"))
    missing = sorted(key for key in table_keys() if not mentioned(key, sources))
    assert missing == []


def test_the_table_is_read():
    assert {"caption_dropout_rate", "gradient_accumulation_steps", "max_step_saves_to_keep", "lr"} <= table_keys()
