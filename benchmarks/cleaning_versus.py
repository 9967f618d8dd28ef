"""One pair's cleaning work, this checkout against a git revision, side by side in one run.

For each pair of a synthetic studio catalogue (and of ``../shared/data/viton-garments`` when present):
SHA-256 of both files, ``clean_pair``, ``encode_clean_pair`` and the mask audit, all in memory (no
storage), one thread. The same work is timed with the ``tasks.data`` modules of ``--rev`` (read with
``git show`` into a temporary package, never checked out), and the JPEG + PNG decode floor
(Pillow and OpenCV, as in ``prep_throughput.py``). Rounds interleave the rows, and the fastest round of
each is kept, because other work on a shared machine only slows a round down. The table prints ms per
pair, the share of the decode floor and the speed-up of the checkout over ``--rev``; the load average
is printed before and after.

    .venv/bin/python benchmarks/cleaning_versus.py --rev 1cacb3e            # about 1 minute on 2 cores
    .venv/bin/python benchmarks/cleaning_versus.py --rev HEAD~3 --n 200 --rounds 5

It says whether a change to cleaning pays; ``prep_throughput.py`` says where the whole stage stands
(planning, storage and finalising included, at several thread counts).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import cv2  # noqa: E402

from prep_throughput import (  # noqa: E402
    VITON_DIR,
    decode_cv2,
    decode_pil,
    evenly_spaced,
    generate_synthetic,
    list_pairs,
)
from tasks.data import cleaning, mask_audit  # noqa: E402
from tasks.data.config import CleaningConfig  # noqa: E402

#: The modules timed at both revisions (their imports of the rest of ``tasks`` resolve to this checkout).
MODULES = ("tasks/data/cleaning.py", "tasks/data/mask_audit.py")


def load_revision(rev: str, folder: Path) -> tuple:
    """``(cleaning, mask_audit)`` as they are at ``rev``, imported from files ``git show`` wrote into
    ``folder`` under private module names."""
    loaded = []
    for relpath in MODULES:
        source = subprocess.run(["git", "show", f"{rev}:{relpath}"], cwd=ROOT, check=True, capture_output=True).stdout
        name = f"at_{rev.replace('~', '_').replace('^', '_')}_{Path(relpath).stem}"
        path = folder / f"{name}.py"
        path.write_bytes(source)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        loaded.append(module)
    return tuple(loaded)


def clean_all(data: list[tuple[bytes, bytes]], clean_module, audit_module, config: CleaningConfig) -> float:
    """Seconds per pair to hash, clean, encode and audit every pair once."""
    start = time.perf_counter()
    for image, mask in data:
        cleaning.sha256(image)
        cleaning.sha256(mask)
        pair = clean_module.clean_pair(image, mask, config)
        clean_module.encode_clean_pair(pair, config.jpeg_quality)
        audit_module.audit_pair(pair.image, pair.mask)
    return (time.perf_counter() - start) / len(data)


def decode_all(pairs, decode) -> float:
    """Seconds per pair to read and fully decode every pair once."""
    start = time.perf_counter()
    for pair in pairs:
        decode(pair)
    return (time.perf_counter() - start) / len(pairs)


def measure(name: str, pairs, old: tuple, rev: str, rounds: int) -> list[list[str]]:
    """The table rows of one data set."""
    data = [(image.read_bytes(), mask.read_bytes()) for image, mask in pairs]
    config = CleaningConfig()
    rows = {f"cleaning at {rev}": lambda: clean_all(data, *old, config),
            "cleaning, this checkout": lambda: clean_all(data, cleaning, mask_audit, config),
            "decode floor: Pillow": lambda: decode_all(pairs, decode_pil),
            "decode floor: cv2.imdecode": lambda: decode_all(pairs, decode_cv2)}
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(rounds):
        for label, run in rows.items():
            best[label] = min(best[label], run())
    floor = min(best["decode floor: Pillow"], best["decode floor: cv2.imdecode"])
    table = []
    for label, seconds in best.items():
        share = f"{floor / seconds:.0%}" if label.startswith("cleaning") else ""
        speedup = f"{best[f'cleaning at {rev}'] / seconds:.2f}x" if label == "cleaning, this checkout" else ""
        table.append([name, str(len(pairs)), label, f"{seconds * 1000:.2f}", f"{1 / seconds:.1f}", share, speedup])
    return table


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, time both revisions and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", required=True, help="the git revision to compare with (e.g. HEAD~3)")
    parser.add_argument("--n", type=int, default=120, help="synthetic pairs (default 120)")
    parser.add_argument("--max-side", type=int, default=1333, help="long side of synthetic images (default 1333)")
    parser.add_argument("--real-n", type=int, default=300, help="viton-garments pairs when present (default 300)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds; the fastest is kept (default 4)")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cleaning-versus-") as work:
        old = load_revision(args.rev, Path(work))
        sets = [(f"synthetic, max_side {args.max_side}", generate_synthetic(Path(work) / "synthetic", args.n,
                                                                            args.max_side, 0, False))]
        if VITON_DIR.is_dir():
            sets.append(("viton-garments (real)", evenly_spaced(list_pairs(VITON_DIR), args.real_n)))
        rows = [row for name, pairs in sets for row in measure(name, pairs, old, args.rev, args.rounds)]
    headers = ["dataset", "pairs", "what (1 thread, in memory)", "ms/pair", "pairs/s", "% of floor", "speed-up"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print(f"cleaning_versus: load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end "
          f"({os.cpu_count()} cores); fastest of {args.rounds} interleaved rounds")
    for line in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.rjust(w) if i >= 3 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
