"""python -m dlntorch.atlas <instrument> [--quick] [--out DIR]"""
import sys

from . import INSTRUMENTS, measure
from .common import parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser(INSTRUMENTS).parse_args(argv)
    book = measure(args.instrument, args.out, args.quick, ["python", "-m", "dlntorch.atlas", *argv])
    print(f"wrote {book.out}/table.csv, settings.json, figure.png")


if __name__ == "__main__":
    main()
