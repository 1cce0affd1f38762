"""The README's generated tables (activation bytes saved, the cost model's rows) are what the code
computes now: `python -m benchmarks.readme_tables --write` regenerates them after a change."""
from benchmarks import readme_tables


def test_readme_tables_are_current():
    assert readme_tables.main(["--check"]) == 0, "stale README tables: run python -m benchmarks.readme_tables --write"


def test_a_missing_block_is_named(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    try:
        readme_tables.replace_blocks(readme.read_text(), {"saved-bytes": "x"})
    except ValueError as exc:
        assert "<!-- table:saved-bytes:start -->" in str(exc)
    else:
        raise AssertionError("a README without the markers was accepted")
