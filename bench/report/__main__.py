"""``python -m bench.report <sweep_dir>``: rebuild a sweep's ``table.csv`` and paper table
from its run records.

Exit status: 0 when every job the sweep launched has a record; 1 when some have none
(the table is written all the same, their rows say ``missing``, and one line on stderr
names them); 2 on bad input."""

from __future__ import annotations

import sys

from bench.report.sweep import write_tables


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.report <sweep_dir>", file=sys.stderr)
        return 2
    try:
        tables = write_tables(argv[0])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tables.path)
    for out in tables.paper:
        print(out)
    if tables.missing:
        print(tables.missing_line(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
