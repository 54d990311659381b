"""Copy a TSV/CSV file with a derived `length_band` column (short / medium / long by word count), for
`peftkit eval --group-by length_band`. The shared data is never written: the copy goes where --out says.

The band edges are the word-count terciles of --bands-from (default: the file itself): short is at most the first
tercile, medium at most the second, long above. Only the text decides a row's band, never its label or a
prediction, so the groups are honest for a fairness report.

    python scripts/length_bands.py ../shared/data/glue/SST-2/dev.tsv --out /tmp/sst2-dev-bands.tsv \\
        --bands-from ../shared/data/glue/SST-2/train.tsv
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

csv.field_size_limit(sys.maxsize)


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    # SST-2's sentences hold bare quote characters: read every cell as written, no CSV quoting on TSV files
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, **_dialect(path)))
    return rows[0], rows[1:]


def _dialect(path: Path) -> dict[str, object]:
    tsv = path.suffix.lower() == ".tsv"
    return {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"delimiter": ",", "quoting": csv.QUOTE_MINIMAL}


def _words(rows: list[list[str]], column: int) -> np.ndarray:
    return np.array([len(row[column].split()) for row in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="the copy with the length_band column")
    parser.add_argument("--bands-from", type=Path, default=None, help="file whose terciles set the band edges")
    parser.add_argument("--text-column", default="sentence")
    args = parser.parse_args(argv)

    header, rows = _read(args.data)
    if args.text_column not in header:
        sys.exit(f"error: {args.data} has no column {args.text_column!r} (its columns: {', '.join(header)}); "
                 "pass --text-column")
    reference_header, reference = _read(args.bands_from) if args.bands_from else (header, rows)
    if args.text_column not in reference_header:
        sys.exit(f"error: {args.bands_from} has no column {args.text_column!r}; pass --text-column")
    first, second = np.quantile(_words(reference, reference_header.index(args.text_column)), [1 / 3, 2 / 3])
    counts = _words(rows, header.index(args.text_column))
    bands = np.where(counts <= first, "short", np.where(counts <= second, "medium", "long"))
    with args.out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n", **_dialect(args.out))
        writer.writerow([*header, "length_band"])
        writer.writerows([*row, band] for row, band in zip(rows, bands))
    sizes = ", ".join(f"{name} {int((bands == name).sum())}" for name in ("short", "medium", "long"))
    print(f"{args.out}: band edges {first:g} and {second:g} words (terciles of "
          f"{args.bands_from or args.data}); rows: {sizes}")


if __name__ == "__main__":
    main()
