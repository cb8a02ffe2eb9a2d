"""The README's generated blocks: rendered from the results files, and the check fails loudly when they disagree."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "readme_tables.py"
sys.path.insert(0, str(SCRIPT.parent))
import readme_tables  # noqa: E402

MORA = """# command: python benchmarks/mora_speed.py
# git commit: 0123456789ab

toy llama: hidden 512, 2 layers, all linear layers adapted; batch 4 x 128 tokens; 8 rounds; torch threads 1
adapter               trainable   step ms  time/LoRA  saved acts MiB  adapter state MiB  memory/LoRA
----------------------------------------------------------------------------------------------------
LoRA r=8                188,416     261.6      1.00x            78.4               2.88        1.00x
MoRA rotation r=8       185,784     304.8      1.17x            87.4               2.83        1.11x
"""

LOGPS = """# command: python benchmarks/prefix_grouper_logps.py --sweep all
heads  dim  kv     P     R   G |  stock s grouped s speedup  ideal meas/ideal wall x | stock MB grouped MB mem ratio
   16   64   4  2048  2048   8 |    61.70     35.99   1.71x  1.64x       1.05  1.72x |     4288       2489      0.58
   16   64   4   512  1024  16 |    38.47     26.96   1.43x  1.41x       1.01  0.91x |     3000       2100      0.71
   16   64   4   512  2048   8 |    31.20     32.00   0.98x  1.18x       0.83  0.95x |     3000       3300      1.10
   16   64   4  4096  4096  16 | skipped: stock needs about 40 GB
"""


def _readme(*names):
    blocks = "\n\n".join(f"<!-- table: {name} -->\nstale\n<!-- /table -->" for name in names)
    return f"# title\n\nprose before\n\n{blocks}\n\nprose after\n"


@pytest.fixture
def only(monkeypatch):
    """Restrict the renderers to the named blocks (the real README has all of them)."""

    def restrict(*names):
        monkeypatch.setattr(readme_tables, "BLOCKS", {n: readme_tables.BLOCKS[n] for n in names})

    return restrict


def test_the_readme_matches_the_results_files():
    out = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_check_fails_with_a_diff_and_write_repairs(tmp_path, only, capsys):
    only("mora_speed")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "mora_speed.txt").write_text(MORA)
    readme = tmp_path / "README.md"
    readme.write_text(_readme("mora_speed"))
    argv = ["--readme", str(readme), "--results", str(tmp_path / "results")]
    assert readme_tables.main(["--check", *argv]) == 1
    diff = capsys.readouterr().out
    assert "-stale" in diff and "+| MoRA rotation r=8 | 185,784 | 304.8 | 1.17x | 1.11x |" in diff
    assert readme_tables.main(["--write", *argv]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nprose before\n\n<!-- table: mora_speed -->\n| adapter |")
    assert text.endswith("<!-- /table -->\n\nprose after\n")
    assert readme_tables.main(["--check", *argv]) == 0
    # A figure retyped by hand in the block is caught.
    readme.write_text(text.replace("1.17x", "1.13x"))
    assert readme_tables.main(["--check", *argv]) == 1
    assert "-| MoRA rotation r=8 | 185,784 | 304.8 | 1.13x" in capsys.readouterr().out


def test_prefix_grouper_summary_states_the_unflattering_points(tmp_path):
    path = tmp_path / "logps.txt"
    path.write_text(LOGPS)
    block = readme_tables.prefix_grouper_logps(path)
    assert "| 16 × 64 (4) | 512 | 1024 | 16 | 38.47 | 26.96 | 1.43x | 1.41x | 1.01 | 0.91x | 0.71 |" in block
    assert "| 16 × 64 (4) | 4096 | 4096 | 16 | skipped: stock needs about 40 GB |" in block
    assert "2 of 3 points are faster than stock in process CPU time; not faster at P=512, R=2048, G=8 (0.98x)" in block
    assert "at 0.83 to 1.05 of the ideal ratio, with not always lower peak memory (0.58 to 1.10 of stock)" in block
    assert "below 1x at P=512, R=1024, G=16 (0.91x), P=512, R=2048, G=8 (0.95x)" in block


def test_malformed_readmes_and_results_are_refused(tmp_path, only, capsys):
    only("mora_speed")
    results = tmp_path / "results"
    results.mkdir()
    readme = tmp_path / "README.md"
    argv = ["--check", "--readme", str(readme), "--results", str(results)]
    cases = {
        _readme("mora_speed"): "does not exist",  # no results file yet
        _readme("nope"): "unknown block 'nope'",
        "<!-- table: mora_speed -->\nrow\n": "never closed",
        "text\n": "no block for mora_speed",
        _readme("mora_speed") + _readme("mora_speed"): "appears twice",
    }
    for text, message in cases.items():
        readme.write_text(text)
        assert readme_tables.main(argv) == 2
        assert message in capsys.readouterr().err
    (results / "mora_speed.txt").write_text("# header only\n")
    readme.write_text(_readme("mora_speed"))
    assert readme_tables.main(argv) == 2
    assert "expected at least 2 line(s)" in capsys.readouterr().err


def test_a_point_the_table_cannot_read_is_an_error_not_a_dropped_row(tmp_path):
    path = tmp_path / "logps.txt"
    unreadable = "   16   64   4   512   256   4 |     0.01      0.01   1.00x  1.96x       0.51  1.00x |        0          0       n/a\n"
    path.write_text(LOGPS + unreadable)
    with pytest.raises(readme_tables.ResultsFormatError, match="cannot read the row '16   64   4   512   256   4"):
        readme_tables.prefix_grouper_logps(path)
