"""Data-preparation throughput: how fast the cleaning stage runs, next to the JPEG decode floor.

What it measures, on local storage in a temporary folder (nothing is written to the repository):

1. **Cleaning throughput** (pairs/s) of the real stage functions, exactly as the training DAG
   chains them: ``tasks.data.ingest.plan_batch`` -> ``clean_shard`` for every shard (one after the
   other, each with its ``io_threads`` pool) -> ``finalize_dataset``, with the default
   ``CleaningConfig()`` (working size 320) and ``shard_size`` 250. It runs on

   a. a synthetic catalogue from ``tasks.dev.synth.generate_catalogue`` (``--n`` pairs, web-catalogue
      sizes: long sides 480-1333 px, capped at ``--max-side``); generation time is not counted;
   b. the same catalogue rendered at studio size: ``--studio-n`` pairs whose long side is each of
      ``--studio-sides`` (default 2000 and 3000 px, what a studio camera's export delivers);
   c. ``../shared/data/viton-garments`` (real in-shop garment photos, 192x256) when that folder is
      present: ``--real-n`` pairs are copied into a temporary ``raw/<batch>/images|masks`` (the
      source files are only read). Skipped with a note when the folder is absent.

   Cleaning is timed at 1 thread, at one thread per core, and at ``--io-threads`` (default 4,
   clean_shard's default), all in one process; and with one spawned worker process per core, each
   cleaning whole shards with one thread, which is how Airflow runs the DAG's mapped ``clean_shard``
   tasks side by side (the workers are started before the clock runs, as task processes are; no
   more processes than the data set has shards, and no such row for a single shard, such as the
   studio sizes' 100 pairs).
2. **The decode floor**: reading the same files and decoding image (JPEG) + mask (PNG), nothing
   else, with Pillow (``Image.open(...).load()``) and with OpenCV (``cv2.imdecode``), at the same
   thread counts. Cleaning cannot beat full-resolution decoding, so
   "% of floor" (cleaning pairs/s over the faster decoder's pairs/s at the same thread count)
   says how much of the cleaning time is anything other than decoding. A reference row shows
   Pillow's reduced-scale JPEG decoding (``Image.draft``), which cleaning uses for the image (the
   mask is always decoded whole), so cleaning's own decoding costs less than the floor's.
3. **Peak memory, small vs large batch**: a batch of ``--mem-n`` pairs (default 500 and 5,000;
   distinct synthetic products at ``--max-side``) is cleaned in a fresh child process each
   (``prep_throughput.py --child ...``), which reports its own peak RSS (``VmHWM``: the high-water
   mark of its address space since ``exec``; ``os.wait4``'s ``ru_maxrss`` is the larger of that
   and the parent's peak, which the kernel carries over at ``exec``: earlier versions of this
   script printed the parent's peak for both batches). The peak must not grow
   with the batch size; the ratio is printed.

All inputs come from the page cache (they were just written), so the numbers are CPU-bound; with
S3 the network adds to them. Every throughput is the median of ``--repeats`` runs. The load
average at start and end is printed: other work on the machine shows up in the numbers.

Run it from the project root:

    .venv/bin/python benchmarks/prep_throughput.py            # full run, 8-10 minutes on 2 cores
    .venv/bin/python benchmarks/prep_throughput.py --quick    # smaller sizes, about 1 minute
    .venv/bin/python benchmarks/prep_throughput.py --json benchmarks/results/prep.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tasks.core import layout  # noqa: E402
from tasks.data.cleaning import CleaningConfig, working_size_for  # noqa: E402
from tasks.data.ingest import clean_shard, finalize_dataset, plan_batch  # noqa: E402
from tasks.dev.synth import SynthConfig, generate_catalogue  # noqa: E402

from process_memory import peak_rss_self_mib, rss_now_mib  # noqa: E402

VITON_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "viton-garments"
SHARD_SIZE = 250
MIB = 1024 * 1024

Pair = tuple[Path, Path]


# --------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def total_memory_gib() -> float | None:
    """Physical memory in GiB from ``/proc/meminfo``, or None when unavailable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return None


def machine_facts() -> dict:
    """Cores, CPU model, memory, OS, Python and the decoding libraries' versions."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "cpu_model": cpu_model(),
        "memory_gib": total_memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "opencv": cv2.__version__,
        "opencv_threads": cv2.getNumThreads(),
        "numpy": np.__version__,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# --------------------------------------------------------------------------------------- inputs


def list_pairs(folder: Path) -> list[Pair]:
    """``(images/<stem>.jpg, masks/<stem>.png)`` pairs under ``folder``, sorted by stem."""
    masks = {p.stem: p for p in (folder / "masks").glob("*.png")}
    return [(img, masks[img.stem]) for img in sorted((folder / "images").glob("*.jpg")) if img.stem in masks]


def evenly_spaced(items: list, n: int) -> list:
    """``n`` items taken at even intervals over ``items`` (all of them when ``n`` is larger)."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def generate_synthetic(folder: Path, n: int, max_side: int, seed: int, progress: bool,
                       long_side: int | None = None) -> list[Pair]:
    """Write ``n`` synthetic products under ``folder`` with ``generate_catalogue`` (each scaled to
    ``long_side`` when given); return the pairs."""
    config = SynthConfig(n=n, seed=seed, max_side=max_side, long_side=long_side)
    generate_catalogue(str(folder), config, progress=progress)
    return list_pairs(folder)


def place_file(src: Path, dst: Path, link: bool) -> None:
    """Hard-link ``src`` to ``dst`` when ``link`` (falling back to a copy), else copy it.

    Copies only read the source, so a file from ``../shared/data`` is never modified.
    """
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def make_batch(bucket: Path, batch: str, pairs: list[Pair], link: bool) -> list[Pair]:
    """Lay ``pairs`` out as ``<bucket>/raw/<batch>/images|masks`` and return the new paths."""
    raw = Path(layout.raw_batch(str(bucket), batch))
    (raw / "images").mkdir(parents=True, exist_ok=True)
    (raw / "masks").mkdir(parents=True, exist_ok=True)
    placed = []
    for image, mask in pairs:
        new_image, new_mask = raw / "images" / image.name, raw / "masks" / mask.name
        place_file(image, new_image, link)
        place_file(mask, new_mask, link)
        placed.append((new_image, new_mask))
    return placed


def profile_pairs(pairs: list[Pair]) -> dict:
    """Median image size (from the headers) and mean file sizes of ``pairs``."""
    sizes = []
    for image, _ in pairs:
        with Image.open(image) as img:
            sizes.append(img.size)
    widths, heights = zip(*sizes) if sizes else ((0,), (0,))
    return {
        "median_width": int(statistics.median(widths)),
        "median_height": int(statistics.median(heights)),
        "max_side": int(max(max(w, h) for w, h in sizes)) if sizes else 0,
        "mean_image_kib": statistics.fmean(p.stat().st_size for p, _ in pairs) / 1024 if pairs else 0.0,
        "mean_mask_kib": statistics.fmean(m.stat().st_size for _, m in pairs) / 1024 if pairs else 0.0,
    }


# --------------------------------------------------------------------------------------- cleaning


def run_pipeline(bucket: Path, batch: str, io_threads: int, shard_size: int, progress: bool, desc: str,
                 pool: Executor | None = None) -> dict:
    """Run plan_batch -> clean_shard (each shard) -> finalize_dataset once; return times and counts.

    Without ``pool`` the shards are cleaned one after the other in this process; with a process pool
    they are cleaned side by side, one shard per worker process at a time, as Airflow runs the
    training DAG's mapped ``clean_shard`` tasks on several worker slots."""
    config = CleaningConfig()
    t0 = time.perf_counter()
    plan = plan_batch(str(bucket), batch, config, shard_size=shard_size)
    t1 = time.perf_counter()
    clean = partial(clean_shard, dataset_url=plan["dataset_url"], batch=batch, config=config, io_threads=io_threads)
    shards = tqdm(plan["shard_urls"], desc=desc, unit="shard", leave=False, disable=not progress)
    results = list(pool.map(clean, shards)) if pool is not None else [clean(url) for url in shards]
    t2 = time.perf_counter()
    summary = finalize_dataset(plan["dataset_url"], batch, [r["result_url"] for r in results], plan["listing_rejects_url"])
    t3 = time.perf_counter()
    return {
        "pairs": plan["n_pairs"],
        "shards": len(plan["shard_urls"]),
        "clean": summary["clean"],
        "quarantined": summary["quarantined"],
        "by_reason": summary["by_reason"],
        "plan_s": t1 - t0,
        "shards_s": t2 - t1,
        "finalize_s": t3 - t2,
        "total_s": t3 - t0,
        "pairs_per_s": plan["n_pairs"] / (t3 - t0),
    }


def _warm_up(seconds: float) -> int:
    """Run in a worker process: its imports are done by now; hold the worker so the next warm-up
    call lands on another one."""
    time.sleep(seconds)
    return os.getpid()


def shard_processes(n: int) -> ProcessPoolExecutor:
    """``n`` fresh worker processes (spawned, as Airflow's task processes are separate interpreters),
    started and their imports done before anything is timed."""
    pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"))
    started = set(pool.map(_warm_up, [0.5] * n))
    if len(started) != n:
        pool.shutdown()
        raise RuntimeError(f"wanted {n} warm worker processes, got {len(started)}")
    return pool


def measure_cleaning(bucket: Path, batch: str, io_threads: int, shard_size: int, repeats: int, progress: bool,
                     processes: int = 1) -> dict:
    """Clean the batch ``repeats`` times (a fresh ``datasets/`` each time); median and spread. With
    ``processes`` > 1 the shards go to that many warm worker processes (``io_threads`` each)."""
    runs = []
    pool = shard_processes(processes) if processes > 1 else None
    try:
        for index in range(repeats):
            shutil.rmtree(bucket / layout.DATASETS, ignore_errors=True)
            label = f"clean {batch} {processes}p" if pool else f"clean {batch} x{io_threads}"
            runs.append(run_pipeline(bucket, batch, io_threads, shard_size, progress, f"{label} #{index + 1}", pool))
    finally:
        if pool is not None:
            pool.shutdown()
    shutil.rmtree(bucket / layout.DATASETS, ignore_errors=True)
    rates = [r["pairs_per_s"] for r in runs]
    best = runs[rates.index(statistics.median_low(rates))]
    return {**best, "pairs_per_s": statistics.median(rates), "min_pairs_per_s": min(rates),
            "max_pairs_per_s": max(rates), "repeats": repeats, "processes": processes}


# --------------------------------------------------------------------------------------- decode floor


def decode_pil(pair: Pair) -> None:
    """Read and fully decode image and mask with Pillow."""
    for path in pair:
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            img.load()


def decode_cv2(pair: Pair) -> None:
    """Read and fully decode image (colour) and mask (unchanged) with OpenCV."""
    image, mask = pair
    if cv2.imdecode(np.frombuffer(image.read_bytes(), np.uint8), cv2.IMREAD_COLOR) is None:
        raise ValueError(f"OpenCV could not decode {image}")
    if cv2.imdecode(np.frombuffer(mask.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED) is None:
        raise ValueError(f"OpenCV could not decode {mask}")


def decode_pil_draft(pair: Pair, working_size: int = CleaningConfig().working_size) -> None:
    """Decode the JPEG at the smallest DCT scale that still covers the working size; full mask:
    the decoding cleaning itself does."""
    image, mask = pair
    with Image.open(io.BytesIO(image.read_bytes())) as img:
        img.draft("RGB", working_size_for(img.width, img.height, working_size))
        img.load()
    with Image.open(io.BytesIO(mask.read_bytes())) as img:
        img.load()


def time_decode(pairs: list[Pair], decode: Callable[[Pair], None], threads: int, progress: bool, desc: str) -> float:
    """Decode every pair once with ``threads`` threads; return pairs/s."""
    start = time.perf_counter()
    bar = tqdm(total=len(pairs), desc=desc, unit="pair", leave=False, disable=not progress)
    if threads == 1:
        for pair in pairs:
            decode(pair)
            bar.update()
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(decode, pairs):
                bar.update()
    bar.close()
    return len(pairs) / (time.perf_counter() - start)


def measure_decode(pairs: list[Pair], decode: Callable[[Pair], None], threads: int, repeats: int,
                   progress: bool, desc: str) -> dict:
    """Median, min and max pairs/s of ``repeats`` decoding passes over ``pairs``."""
    rates = [time_decode(pairs, decode, threads, progress, f"{desc} #{i + 1}") for i in range(repeats)]
    return {"pairs_per_s": statistics.median(rates), "min_pairs_per_s": min(rates), "max_pairs_per_s": max(rates)}


DECODERS: tuple[tuple[str, str, Callable[[Pair], None]], ...] = (
    ("pil", "decode floor: Pillow open().load()", decode_pil),
    ("cv2", "decode floor: cv2.imdecode", decode_cv2),
    ("pil_draft", "reference: Pillow JPEG draft to >=320 px", decode_pil_draft),
)


def benchmark_dataset(name: str, bucket: Path, batch: str, pairs: list[Pair], args: argparse.Namespace) -> dict:
    """Cleaning and every decoder at 1 thread, one thread per core, and ``io_threads`` threads."""
    cores = os.cpu_count() or 1
    processes = min(cores, -(-len(pairs) // args.shard_size))  # no more processes than shards to clean
    thread_counts = sorted({1, cores, args.io_threads} | ({processes} if processes > 1 else set()))
    result: dict = {"dataset": name, "pairs": len(pairs), "profile": profile_pairs(pairs), "cleaning": {}, "decode": {}}
    for threads in thread_counts:
        result["cleaning"][threads] = measure_cleaning(bucket, batch, threads, args.shard_size, args.repeats, args.progress)
    result["processes"] = {processes: measure_cleaning(bucket, batch, 1, args.shard_size, args.repeats, args.progress,
                                                       processes=processes)} if processes > 1 else {}
    for key, _, decode in DECODERS:
        result["decode"][key] = {
            threads: measure_decode(pairs, decode, threads, args.repeats, args.progress, f"{key} x{threads}")
            for threads in thread_counts
        }
    for runs in (result["cleaning"], result["processes"]):
        for threads, entry in runs.items():
            floor = max(result["decode"][k][threads]["pairs_per_s"] for k in ("pil", "cv2"))
            entry["floor_pairs_per_s"] = floor
            entry["share_of_floor"] = entry["pairs_per_s"] / floor
    return result


# --------------------------------------------------------------------------------------- memory


def child_main(args: argparse.Namespace) -> int:
    """``--child``: clean one batch once, write times, counts and memory to ``--child-out``."""
    rss_after_imports = rss_now_mib()
    run = run_pipeline(Path(args.child_bucket), args.child_batch, args.io_threads, args.shard_size,
                       args.progress, f"child {args.child_batch}")
    run.update(rss_after_imports_mib=rss_after_imports, peak_rss_self_mib=peak_rss_self_mib())
    Path(args.child_out).write_text(json.dumps(run))
    return 0


def run_child(bucket: Path, batch: str, out: Path, args: argparse.Namespace) -> dict:
    """Clean ``batch`` in a fresh interpreter; return its report, whose ``peak_rss_mib`` is the one
    the child measured of itself (:func:`peak_rss_self_mib`)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child",
           "--child-bucket", str(bucket), "--child-batch", batch, "--child-out", str(out),
           "--io-threads", str(args.io_threads), "--shard-size", str(args.shard_size)]
    if not args.progress:
        cmd.append("--no-progress")
    returncode = subprocess.run(cmd, check=False).returncode
    if returncode != 0:
        raise RuntimeError(f"child for batch {batch} exited with {returncode}")
    report = json.loads(out.read_text())
    report["peak_rss_mib"] = report["peak_rss_self_mib"]
    return report


def benchmark_memory(work: Path, catalogue: list[Pair], args: argparse.Namespace) -> list[dict]:
    """One child process per size in ``--mem-n``, each on the first ``n`` catalogue pairs."""
    rows = []
    for n in args.mem_n:
        bucket = work / f"mem-{n}"
        make_batch(bucket, f"mem{n}", catalogue[:n], link=True)
        report = run_child(bucket, f"mem{n}", work / f"child-{n}.json", args)
        report["made_of"] = f"synthetic items 0-{n - 1}, distinct, max_side {args.max_side}"
        rows.append(report)
        shutil.rmtree(bucket, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------------------- output


def render_table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    """Plain-text table with aligned columns; column indexes in ``right`` are right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def format_header(facts: dict, args: argparse.Namespace) -> str:
    """Machine facts and the run's settings."""
    memory = f"{facts['memory_gib']:.1f} GiB RAM" if facts["memory_gib"] else "RAM unknown"
    load = facts["load_average_at_start"]
    load_text = f", load average {load[0]:.2f} at start" if load else ""
    return "\n".join([
        "prep_throughput: cleaning stage vs decode floor" + ("  (--quick)" if args.quick else ""),
        f"machine : {facts['cores']} cores ({facts['cores_usable']} usable), CPU {facts['cpu_model']!r}, {memory}, "
        f"{facts['os']}{load_text}",
        f"software: Python {facts['python']}, Pillow {facts['pillow']}, OpenCV {facts['opencv']} "
        f"({facts['opencv_threads']} cv2 threads), numpy {facts['numpy']}",
        f"settings: CleaningConfig() (working_size {CleaningConfig().working_size}), shard_size {args.shard_size}, "
        f"io_threads {args.io_threads}, median of {args.repeats} run(s), local files in the page cache",
    ])


def _rate(entry: dict) -> str:
    return f"{entry['pairs_per_s']:.1f}"


def _spread(entry: dict) -> str:
    return f"{entry['min_pairs_per_s']:.1f}-{entry['max_pairs_per_s']:.1f}"


def format_throughput(results: list[dict]) -> str:
    """Section 1 + 2: cleaning and decode rows for every dataset."""
    headers = ["dataset", "pairs", "image size (median)", "what", "threads", "pairs/s", "range", "% of floor"]
    rows = []
    for res in results:
        prof = res["profile"]
        lead = [res["dataset"], str(res["pairs"]),
                f"{prof['median_width']}x{prof['median_height']}, {prof['mean_image_kib']:.0f} KiB jpg"]
        blank = ["", "", ""]
        for threads, clean in res["cleaning"].items():
            rows.append(lead + ["cleaning: plan -> clean_shard -> finalize", str(threads), _rate(clean),
                                _spread(clean), f"{clean['share_of_floor']:.0%}"])
            lead = blank
        for processes, clean in res.get("processes", {}).items():
            rows.append(blank + [f"cleaning: {processes} shard processes, 1 thread each", str(processes), _rate(clean),
                                 _spread(clean), f"{clean['share_of_floor']:.0%}"])
        for key, label, _ in DECODERS:
            for threads, entry in res["decode"][key].items():
                rows.append(blank + [label, str(threads), _rate(entry), _spread(entry), ""])
    return "Throughput (pairs/s = image + mask; % of floor = cleaning / faster full decoder at the same threads)\n" \
        + render_table(headers, rows, right={1, 4, 5, 6, 7})


def format_stages(results: list[dict]) -> str:
    """Where the cleaning time goes, per dataset and thread count (the median run)."""
    headers = ["dataset", "threads", "shards", "plan s", "clean_shard s", "finalize s", "total s", "clean", "quarantined"]
    rows = []
    for res in results:
        runs = [(str(t), c) for t, c in res["cleaning"].items()]
        runs += [(f"{n} processes", c) for n, c in res.get("processes", {}).items()]
        for threads, c in runs:
            rows.append([res["dataset"], threads, str(c["shards"]), f"{c['plan_s']:.2f}", f"{c['shards_s']:.2f}",
                         f"{c['finalize_s']:.2f}", f"{c['total_s']:.2f}", str(c["clean"]), str(c["quarantined"])])
    return "Cleaning time by stage (median run)\n" + render_table(headers, rows, right=set(range(1, 9)))


def format_memory(rows: list[dict], args: argparse.Namespace) -> str:
    """Section 3: peak RSS per batch size, and the large/small ratio."""
    headers = ["batch", "pairs", "shards", "RSS after imports", "peak RSS", "peak - imports", "pairs/s", "clean"]
    table = [[r["made_of"], str(r["pairs"]), str(r["shards"]), f"{r['rss_after_imports_mib']:.0f} MiB",
              f"{r['peak_rss_mib']:.0f} MiB", f"{r['peak_rss_mib'] - r['rss_after_imports_mib']:.0f} MiB",
              f"{r['pairs_per_s']:.1f}", str(r["clean"])] for r in rows]
    text = (f"Peak memory (one fresh child process per batch, io_threads {args.io_threads}, shard_size {args.shard_size}; "
            "peak RSS: the child's VmHWM)\n" + render_table(headers, table, right=set(range(1, 8))))
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
        work_ratio = (large["peak_rss_mib"] - large["rss_after_imports_mib"]) / max(
            small["peak_rss_mib"] - small["rss_after_imports_mib"], 1e-9)
        text += (f"\npeak RSS ratio {large['pairs']}/{small['pairs']} pairs: {ratio:.2f}x "
                 f"(above imports: {work_ratio:.2f}x) for {large['pairs'] / small['pairs']:.0f}x the pairs")
    return text


# --------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="about 1 minute: --n 100 --real-n 200 --mem-n 100 1000 --repeats 1")
    parser.add_argument("--n", type=int, default=500, help="synthetic pairs for the throughput rows (default 500)")
    parser.add_argument("--max-side", type=int, default=1333, help="long side of synthetic images (default 1333)")
    parser.add_argument("--studio-sides", type=int, nargs="*", default=[2000, 3000], metavar="PX",
                        help="also measure the catalogue rendered with each of these long sides (default 2000 3000; "
                             "none: skip)")
    parser.add_argument("--studio-n", type=int, default=100, help="pairs per studio size (default 100)")
    parser.add_argument("--real-n", type=int, default=1000, help="viton-garments pairs to use (default 1000)")
    parser.add_argument("--viton-dir", type=Path, default=VITON_DIR, help=f"real pairs (default {VITON_DIR})")
    parser.add_argument("--mem-n", type=int, nargs="+", default=[500, 5000],
                        help="batch sizes for the peak-memory children (default 500 5000)")
    parser.add_argument("--io-threads", type=int, default=4, help="clean_shard io_threads and floor threads (default 4)")
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE, help=f"pairs per shard (default {SHARD_SIZE})")
    parser.add_argument("--repeats", type=int, default=3, help="runs per throughput number; the median is shown (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic catalogue seed (default 0)")
    parser.add_argument("--workdir", type=Path, default=None, help="parent folder for the temporary files (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every number to PATH as JSON")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    internal = parser.add_argument_group("internal (used by the peak-memory child process)")
    internal.add_argument("--child", action="store_true", help="clean one batch and exit")
    internal.add_argument("--child-bucket", help="bucket folder holding raw/<batch>")
    internal.add_argument("--child-batch", help="batch name")
    internal.add_argument("--child-out", help="where the child writes its JSON report")
    return parser


def apply_quick(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Shrink the sizes for ``--quick`` unless they were given explicitly."""
    if not args.quick:
        return
    quick = {"n": 100, "studio_n": 30, "real_n": 200, "mem_n": [100, 1000], "repeats": 1}
    for name, value in quick.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)


def validate(args: argparse.Namespace) -> None:
    """Reject sizes that cannot produce a measurement."""
    if min([args.n, args.studio_n, args.real_n, args.io_threads, args.shard_size, args.repeats, *args.mem_n]) < 1:
        raise SystemExit("--n, --studio-n, --real-n, --mem-n, --io-threads, --shard-size and --repeats must be >= 1")
    if any(side < 32 for side in args.studio_sides):
        raise SystemExit("--studio-sides must be at least 32 px")


def run_benchmark(args: argparse.Namespace, work: Path) -> dict:
    """Generate the inputs, run the three measurements, return every number."""
    from tasks.core.heap import keep_freed_memory

    keep_freed_memory()  # as clean_shard does: the floor decodes with the same allocator as cleaning
    facts = machine_facts()
    print(format_header(facts, args), flush=True)
    total = max(args.n, *args.mem_n)
    print(f"\ngenerating {total} synthetic pairs (max_side {args.max_side}, seed {args.seed}; not timed) ...", flush=True)
    catalogue = generate_synthetic(work / "catalogue", total, args.max_side, args.seed, args.progress)

    results = []
    synth_bucket = work / "synthetic"
    synth_pairs = make_batch(synth_bucket, "synthetic", catalogue[: args.n], link=True)
    print(f"measuring synthetic ({len(synth_pairs)} pairs) ...", flush=True)
    results.append(benchmark_dataset(f"synthetic, max_side {args.max_side}", synth_bucket, "synthetic", synth_pairs, args))
    shutil.rmtree(synth_bucket, ignore_errors=True)

    for side in args.studio_sides:
        print(f"generating {args.studio_n} synthetic pairs at long side {side} (not timed) ...", flush=True)
        studio = generate_synthetic(work / f"studio-{side}", args.studio_n, args.max_side, args.seed, args.progress,
                                    long_side=side)
        studio_bucket = work / f"studio-bucket-{side}"
        studio_pairs = make_batch(studio_bucket, "studio", studio, link=True)
        print(f"measuring synthetic at long side {side} ({len(studio_pairs)} pairs) ...", flush=True)
        results.append(benchmark_dataset(f"synthetic, long side {side}", studio_bucket, "studio", studio_pairs, args))
        shutil.rmtree(studio_bucket, ignore_errors=True)
        shutil.rmtree(work / f"studio-{side}", ignore_errors=True)

    notes = []
    viton = list_pairs(args.viton_dir) if args.viton_dir.is_dir() else []
    if viton:
        viton_bucket = work / "viton"
        viton_pairs = make_batch(viton_bucket, "viton", evenly_spaced(viton, args.real_n), link=False)
        print(f"measuring viton-garments ({len(viton_pairs)} pairs, copied from {args.viton_dir}) ...", flush=True)
        results.append(benchmark_dataset("viton-garments (real)", viton_bucket, "viton", viton_pairs, args))
        shutil.rmtree(viton_bucket, ignore_errors=True)
    else:
        notes.append(f"note: {args.viton_dir} not present (or holds no pairs): real-photo rows skipped")
        print(notes[-1], flush=True)

    print(f"measuring peak memory for batches of {', '.join(map(str, args.mem_n))} pairs (child processes) ...", flush=True)
    memory = benchmark_memory(work, catalogue, args)

    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load_end:
        notes.append(f"load average at end: {load_end[0]:.2f} (1 min), {load_end[1]:.2f} (5 min) on {facts['cores']} cores")
    report = "\n\n".join([format_header(facts, args), format_throughput(results), format_stages(results),
                          format_memory(memory, args), *(["\n".join(notes)] if notes else [])])
    print("\n" + report, flush=True)
    return {"machine": facts, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                           if not k.startswith("child")},
            "throughput": results, "memory": memory, "notes": notes, "load_average_at_end": load_end, "table": report}


def main(argv: list[str] | None = None) -> int:
    """Entry point: the child mode, or the full benchmark."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        if not (args.child_bucket and args.child_batch and args.child_out):
            parser.error("--child needs --child-bucket, --child-batch and --child-out")
        return child_main(args)
    apply_quick(args, parser)
    validate(args)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="prep_throughput-", dir=args.workdir))
    try:
        numbers = run_benchmark(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(numbers, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
