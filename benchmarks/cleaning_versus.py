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

``--stage`` times the whole stage instead (``plan_batch`` -> ``clean_shard`` -> ``finalize_dataset`` on
local files, as ``prep_throughput.py`` runs it), the ``tasks`` package of ``--rev`` (a temporary
``git worktree``) against this checkout's, each run in a fresh interpreter on the same raw batch,
rounds interleaved, the fastest kept:

    .venv/bin/python benchmarks/cleaning_versus.py --rev HEAD --stage --n 500 --threads 1 2
    .venv/bin/python benchmarks/cleaning_versus.py --rev HEAD --stage --n 500 --threads 1 2 --workdir /dev/shm
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
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
    make_batch,
    time_decode,
)
from tasks.core.heap import keep_freed_memory  # noqa: E402
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


#: Run by a fresh interpreter: ``tree``'s ``tasks`` package first on ``sys.path`` (this checkout's
#: ``benchmarks`` after it, for ``prep_throughput.run_pipeline``), the whole stage twice on a fresh
#: ``datasets/``, pairs/s of the second run (the first pays the lazy imports) as JSON.
STAGE_CHILD = """
import json, shutil, sys
tree, root, bucket, batch, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
sys.path[:0] = [tree]
sys.path += [root, root + "/benchmarks"]
import tasks
assert tasks.__file__.startswith(tree), f"imported {tasks.__file__}, not the tree {tree}"
from prep_throughput import SHARD_SIZE, run_pipeline
for _ in range(2):
    shutil.rmtree(f"{bucket}/datasets", ignore_errors=True)
    run = run_pipeline(bucket, batch, threads, SHARD_SIZE, False, "stage")
print(json.dumps({"pairs_per_s": run["pairs_per_s"], "pairs": run["pairs"]}))
"""


def stage_once(tree: Path, bucket: Path, batch: str, threads: int) -> float:
    """Pairs/s of the whole stage with ``tree``'s ``tasks`` package, on a fresh ``datasets/`` (the second
    of two runs in one interpreter)."""
    out = subprocess.run([sys.executable, "-c", STAGE_CHILD, str(tree), str(ROOT), str(bucket), batch, str(threads)],
                         cwd=tree, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["pairs_per_s"]


def measure_stage(name: str, pairs, work: Path, rev: str, rounds: int, thread_counts: list[int]) -> list[list[str]]:
    """The table rows of one data set for ``--stage``: the stage at ``rev`` and now, and the decode floor,
    at each thread count."""
    bucket = work / f"bucket-{len(pairs)}-{abs(hash(name))}"
    make_batch(bucket, "versus", pairs, link=True)
    trees = {f"stage at {rev}": work / "tree", "stage, this checkout": ROOT}
    table = []
    for threads in thread_counts:
        best = dict.fromkeys(trees, 0.0)
        floor = 0.0
        for _ in range(rounds):
            for label, tree in trees.items():
                best[label] = max(best[label], stage_once(tree, bucket, "versus", threads))
            floor = max(floor, time_decode(pairs, decode_cv2, threads, False, "floor"),
                        time_decode(pairs, decode_pil, threads, False, "floor"))
        for label, rate in best.items():
            speedup = f"{rate / best[f'stage at {rev}']:.2f}x" if label == "stage, this checkout" else ""
            table.append([name, str(len(pairs)), str(threads), label, f"{1000 / rate:.2f}", f"{rate:.1f}",
                          f"{rate / floor:.0%}", speedup])
        table.append([name, str(len(pairs)), str(threads), "decode floor (faster of Pillow, cv2)", f"{1000 / floor:.2f}",
                      f"{floor:.1f}", "", ""])
    shutil.rmtree(bucket, ignore_errors=True)
    return table


def print_table(headers: list[str], rows: list[list[str]], right_from: int, title: str) -> None:
    """Print ``rows`` under ``headers``, columns from ``right_from`` on right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print(title)
    for line in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.rjust(w) if i >= right_from else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(line, widths))))


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, time both revisions and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", required=True, help="the git revision to compare with (e.g. HEAD~3)")
    parser.add_argument("--n", type=int, default=120, help="synthetic pairs (default 120)")
    parser.add_argument("--max-side", type=int, default=1333, help="long side of synthetic images (default 1333)")
    parser.add_argument("--real-n", type=int, default=300, help="viton-garments pairs when present (default 300)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds; the fastest is kept (default 4)")
    parser.add_argument("--stage", action="store_true", help="time the whole stage in fresh interpreters instead")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="--stage: io_threads values (default 1)")
    parser.add_argument("--workdir", help="parent folder for the temporary files (default: the system temp folder); "
                                          "/dev/shm keeps a slow disk's writes out of --stage's figures")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    keep_freed_memory()  # as clean_shard does: the floor decodes with the same allocator as cleaning
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cleaning-versus-", dir=args.workdir) as work:
        sets = [(f"synthetic, max_side {args.max_side}", generate_synthetic(Path(work) / "synthetic", args.n,
                                                                            args.max_side, 0, False))]
        if VITON_DIR.is_dir():
            sets.append(("viton-garments (real)", evenly_spaced(list_pairs(VITON_DIR), args.real_n)))
        if args.stage:
            subprocess.run(["git", "worktree", "add", "--detach", str(Path(work) / "tree"), args.rev], cwd=ROOT,
                           check=True, capture_output=True)
            try:
                rows = [row for name, pairs in sets
                        for row in measure_stage(name, pairs, Path(work), args.rev, args.rounds, args.threads)]
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(Path(work) / "tree")], cwd=ROOT, check=True)
            headers = ["dataset", "pairs", "threads", "what (whole stage, local files)", "ms/pair", "pairs/s",
                       "% of floor", "speed-up"]
            right_from = 4
        else:
            old = load_revision(args.rev, Path(work))
            rows = [row for name, pairs in sets for row in measure(name, pairs, old, args.rev, args.rounds)]
            headers = ["dataset", "pairs", "what (1 thread, in memory)", "ms/pair", "pairs/s", "% of floor", "speed-up"]
            right_from = 3
    print_table(headers, rows, right_from,
                f"cleaning_versus: load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end "
                f"({os.cpu_count()} cores); fastest of {args.rounds} interleaved rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
