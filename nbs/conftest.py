"""pytest --nbval for the notebooks in nbs/ (the committed outputs are the book's examples).

`nbdev-clean` (which keeps notebooks and modules in sync) sets every cell's `execution_count` to None, and nbval
treats such a cell as never run: it refuses one that has outputs and skips comparing one that has none. Every
notebook here is committed executed top to bottom (`.ci/refresh-notebook`), so each code cell is marked as run
before nbval compares: a cell must print exactly its committed output (after nbs/sanitize.cfg), and a cell
committed with no output must still print nothing.
"""


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is not None and cell.get("cell_type") == "code" and cell.get("execution_count") is None:
            cell["execution_count"] = 1
