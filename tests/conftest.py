import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pytest_terminal_summary(terminalreporter):
    """Print the figures tests record with ``record_property``: "figures" (a line of text) and
    "bad_inputs" (a count of bad inputs a test tried, each expected to give a one-line error)."""
    figures, bad = {}, {}
    for key in ("passed", "failed"):
        for rep in terminalreporter.stats.get(key, []):
            for name, value in getattr(rep, "user_properties", ()):
                if name == "figures":
                    figures[rep.nodeid] = value
                elif name == "bad_inputs":
                    bad[rep.nodeid] = value
    if not (figures or bad):
        return
    terminalreporter.write_sep("-", "condiff reliability figures")
    for nodeid, value in figures.items():
        terminalreporter.write_line(f"{nodeid.split('::')[-1]}: {value}")
    if bad:
        failed = sum(1 for rep in terminalreporter.stats.get("failed", []) if rep.nodeid in bad)
        terminalreporter.write_line(f"bad inputs tried: {sum(bad.values())} in {len(bad)} tests, {failed} failed; "
                                    "each must give one error line, exit code 2 and no output file")
