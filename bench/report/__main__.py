"""``python -m bench.report <sweep_dir>``: rebuild a sweep's ``table.csv`` and paper table
from its run records.

``python -m bench.report <sweep_dir> [<sweep_dir> ...] --out <dir>``: the same for every
sweep, then one document of them all in ``<dir>``: ``report.md``, ``report.tex`` and the
figures (:mod:`bench.report.document`). Records of different commits or record versions
are flagged in the document and on stderr.

Exit status: 0 when every job the sweeps launched has a record; 1 when some have none
(the tables and the document are written all the same, their rows say ``missing``, and
one line per sweep on stderr names them); 2 on bad input (nothing is written).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from bench.report.document import warn_mixed, write_report
from bench.report.jobs import planned_jobs
from bench.report.records import RECORD_NAME
from bench.report.sweep import write_tables

USAGE = "usage: python -m bench.report <sweep_dir> [<sweep_dir> ...] [--out <dir>]"


class _BadInput(Exception):
    pass


def _parse(argv: list[str]) -> tuple[list[str], str | None]:
    dirs, out = [], None
    words = iter(argv)
    for w in words:
        if w == "--out" or w.startswith("--out="):
            value = w.partition("=")[2] if "=" in w else next(words, None)
            if not value:
                raise _BadInput("--out needs a directory (where report.md and report.tex go)")
            if out is not None:
                raise _BadInput("--out is given twice")
            out = value
        elif w.startswith("-") and w != "-":
            raise _BadInput(f"unknown option {w} (valid: --out <dir>)")
        else:
            dirs.append(w)
    if not dirs:
        raise _BadInput("no sweep directory given")
    if len(dirs) > 1 and out is None:
        raise _BadInput(f"{len(dirs)} sweep directories make one document: give --out <dir> for report.md and "
                        "report.tex")
    return dirs, out


def _check(dirs: list[str], out: str | None) -> None:
    """Every input is a sweep before anything is written."""
    seen: dict[Path, str] = {}
    for d in dirs:
        path = Path(d)
        if not path.is_dir():
            raise _BadInput(f"sweep directory {d}: no such directory")
        if not any(path.glob(f"*/{RECORD_NAME}")) and not planned_jobs(path):
            raise _BadInput(f"no {RECORD_NAME} under {d}/*/ and no jobs it launched: not a sweep directory")
        key = path.resolve()
        if key in seen:
            raise _BadInput(f"sweep directory {d} is given twice (as {seen[key]})")
        seen[key] = d
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise _BadInput(f"--out {out} is a file, not a directory")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    try:
        dirs, out = _parse(argv)
        if out is not None:
            _check(dirs, out)
    except _BadInput as e:
        print(f"error: {e}; {USAGE}", file=sys.stderr)
        return 2
    if out is None:
        return _one(dirs[0])
    try:
        written = write_report(dirs, out, "python -m bench.report " + " ".join(shlex.quote(a) for a in argv))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for part in written.parts:
        print(part.tables.path)
        for path in part.tables.paper:
            print(path)
    for path in written.paths:
        print(path)
    warn_mixed(written.trust)
    for line in written.missing:
        print(line, file=sys.stderr)
    return 1 if written.missing else 0


def _one(sweep_dir: str) -> int:
    """The single-sweep use: ``table.csv`` and the paper table, nothing else."""
    try:
        tables = write_tables(sweep_dir)
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
