"""`rn50 bench KIND ...`: dispatch to one benchmark module (each has `main(argv) -> int`)."""

from __future__ import annotations

import importlib
import sys

BENCHES: dict[str, tuple[str, str]] = {
    "loader": ("benchmarks.loader_bench", "loader img/s per backend and resolution (no model)"),
    "step": ("benchmarks.step_bench", "train step img/s on synthetic data already on the device (no loader)"),
    "keepup": ("benchmarks.keepup_bench", "the real loader feeding the real step: does it keep up?"),
    "convert": ("benchmarks.convert_bench", "conversion img/s: rn50 convert vs FFCV's DatasetWriter"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        width = max(map(len, BENCHES))
        text = "usage: rn50 bench KIND [ARGS...]\n\nkinds:\n" + "\n".join(
            f"  {k:<{width}}  {h}" for k, (_, h) in BENCHES.items())
        known = not argv or argv[0] in ("-h", "--help")
        print(text if known else f"rn50 bench: unknown kind {argv[0]!r}\n\n{text}", file=sys.stdout if known else sys.stderr)
        return 0 if known else 2
    return int(importlib.import_module(BENCHES[argv[0]][0]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
