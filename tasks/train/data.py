"""Training data: the manifest's pairs in a local cache, a dataset that feeds the network, and a
cluster-balanced sampler that splits each epoch across workers without overlap.

Preprocessing (``SegmentationDataset``): the image is resized to a square ``input_size`` ×
``input_size`` by a plain (aspect-changing) resize by default, like the original U2-Net
(``RescaleT(320)``) and like rembg, which serves the exported model with
``resize((320, 320))``. Training on the same geometry as inference keeps the two consistent, no
input pixel is spent on padding, and clean images are at most 1.5 : 1 (longer side 320), so the
stretch is mild. ``resize="letterbox"`` (longer side to ``input_size``, pad with zeros after
normalisation, i.e. the mean colour, and mask 0) is available for a pipeline that letterboxes at
inference. Pixels are scaled to [0, 1] and normalised with the ImageNet mean and standard
deviation; the mask becomes a float target in [0, 1] (bilinear resizing leaves soft edges, which
BCE takes as they are). Training samples are flipped horizontally with probability 0.5.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
import torch
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import Dataset, Sampler

from tasks.core import layout, storage
from tasks.core.manifest import STATUS_OK, audit_excluded, read_table
from tasks.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, letterbox_box, training_resize

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_CLUSTER",
    "ClusterBalancedDistributedSampler",
    "Sample",
    "SegmentationDataset",
    "ShardSampler",
    "default_cache_dir",
    "load_samples",
    "prepare_split",
    "require_manifest",
]

#: The cluster of a row whose ``cluster`` is null.
DEFAULT_CLUSTER = "all"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Sample:
    """One training pair on local disk: its key, image and mask paths, cluster and split."""

    key: str
    image_path: str
    mask_path: str
    cluster: str
    split: str


def default_cache_dir() -> str:
    """The local cache for downloaded pairs: ``$BGREMOVAL_CACHE/train`` or ``~/.cache/bgremoval/train``."""
    root = os.environ.get("BGREMOVAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bgremoval")
    return os.path.join(root, "train")


def _is_local(url: str, storage_options: dict | None) -> bool:
    fs, _ = storage.filesystem(url, storage_options)
    return isinstance(fs, LocalFileSystem)


def _absolute(url: str, base_url: str) -> str:
    """Resolve a manifest URL: absolute URLs and paths stay, relative ones join ``base_url``."""
    if _SCHEME.match(url) or url.startswith("/"):
        return url
    return storage.join(base_url, url)


#: Which rows the mask audit lets through (:func:`load_samples`'s ``audit``): the default leaves
#: out flagged masks that no reviewer kept or fixed; ``"only"`` gives just those; ``"all"`` both.
AUDIT_SELECTIONS = ("exclude", "only", "all")


def require_manifest(dataset_url: str, storage_options: dict | None = None) -> str:
    """The URL of ``dataset_url``'s manifest; ``FileNotFoundError`` saying what a dataset version is
    when it has none."""
    manifest_url = layout.manifest(dataset_url)
    if not storage.exists(manifest_url, storage_options):
        raise FileNotFoundError(
            f"no manifest at {manifest_url}: dataset_url must be a dataset version folder "
            "(datasets/<version>) written by the cleaning stage"
        )
    return manifest_url


def _read_rows(dataset_url: str, split: str, include_augmented: bool, storage_options: dict | None,
               audit: str = "exclude") -> pd.DataFrame:
    manifest_url = require_manifest(dataset_url, storage_options)
    frames = [(read_table(manifest_url, storage_options), dataset_url)]
    augmented_url = layout.manifest(layout.augmented(dataset_url))
    if include_augmented and split == "train" and storage.exists(augmented_url, storage_options):
        frames.append((read_table(augmented_url, storage_options), layout.augmented(dataset_url)))
    parts = []
    for frame, base in frames:
        missing = {"key", "image_url", "mask_url"} - set(frame.columns)
        if missing:
            raise ValueError(f"manifest under {base} lacks column(s) {sorted(missing)}")
        if "status" in frame:  # the augmented manifest holds generated samples only, all usable
            frame = frame[frame["status"] == STATUS_OK]
        excluded = audit_excluded(frame)
        if audit == "exclude":
            frame = frame[~excluded]
        elif audit == "only":
            frame = frame[excluded]
        frame = frame.copy()
        frame["split"] = frame["split"].fillna("train") if "split" in frame else "train"
        frame["cluster"] = frame["cluster"].fillna(DEFAULT_CLUSTER) if "cluster" in frame else DEFAULT_CLUSTER
        frame = frame[frame["split"] == split]
        frame["image_url"] = [_absolute(u, base) for u in frame["image_url"]]
        frame["mask_url"] = [_absolute(u, base) for u in frame["mask_url"]]
        parts.append(frame[["key", "image_url", "mask_url", "cluster", "split"]])
    return pd.concat(parts, ignore_index=True).sort_values("key", kind="stable").reset_index(drop=True)


def _cached_path(cache_root: str, url: str) -> str:
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
    ext = posixpath.splitext(url.split("?", 1)[0])[1].lower() or ".bin"
    return os.path.join(cache_root, digest[:2], f"{digest}{ext}")


def _download(url: str, path: str, storage_options: dict | None) -> bool:
    """Copy ``url`` to ``path`` atomically unless it is already there; True when downloaded."""
    if os.path.exists(path):
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = storage.read_bytes(url, storage_options)
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
    return True


def load_samples(dataset_url: str, split: str, storage_options: dict | None = None,
                 include_augmented: bool = True, audit: str = "exclude") -> list[tuple[str, str, str, str]]:
    """Return ``(key, image_url, mask_url, cluster)`` for the ``status == "ok"`` rows of ``split``.

    ``audit`` (one of :data:`AUDIT_SELECTIONS`): ``"exclude"`` (default) leaves out the pairs whose
    mask the audit flagged and no reviewer kept or fixed (:func:`tasks.core.manifest.audit_excluded`),
    ``"only"`` returns just those, ``"all"`` every row.

    Reads ``<dataset_url>/manifest.parquet`` (null ``split`` counts as ``"train"``, null
    ``cluster`` as ``"all"``) and, for the train split when ``include_augmented``,
    ``<dataset_url>/augmented/manifest.parquet``. Rows are sorted by key, so every worker sees the
    same order. Raises ``FileNotFoundError`` when the manifest is missing.
    """
    if audit not in AUDIT_SELECTIONS:
        raise ValueError(f"audit must be one of {AUDIT_SELECTIONS}, got {audit!r}")
    frame = _read_rows(dataset_url, split, include_augmented, storage_options, audit)
    return [(str(r.key), str(r.image_url), str(r.mask_url), str(r.cluster)) for r in frame.itertuples()]


def prepare_split(dataset_url: str, split: str, cache_dir: str | None = None,
                  storage_options: dict | None = None, include_augmented: bool = True,
                  threads: int = 8) -> list[Sample]:
    """Make the pairs of ``split`` available on local disk and return them as :class:`Sample` s.

    Remote files (e.g. ``s3://``) are downloaded once into ``<cache_dir>/<sha256 of URL>.<ext>``
    with ``threads`` parallel reads; files already in the cache are not read again, and each
    download is atomic (temporary name, then rename), so concurrent workers sharing a cache are
    safe. Local files are used where they lie, without a copy. Returns an empty list when the
    split has no rows.
    """
    rows = load_samples(dataset_url, split, storage_options, include_augmented)
    cache_root = cache_dir or default_cache_dir()
    jobs: list[tuple[str, str]] = []
    samples: list[Sample] = []
    for key, image_url, mask_url, cluster in rows:
        paths = []
        for url in (image_url, mask_url):
            if _is_local(url, storage_options):
                paths.append(storage.filesystem(url, storage_options)[1])
            else:
                path = _cached_path(cache_root, url)
                jobs.append((url, path))
                paths.append(path)
        samples.append(Sample(key=key, image_path=paths[0], mask_path=paths[1], cluster=cluster, split=split))
    if jobs:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            list(pool.map(lambda job: _download(job[0], job[1], storage_options), jobs))
    return samples


class SegmentationDataset(Dataset):
    """Image/mask pairs as network inputs.

    Args:
        samples: the pairs (from :func:`prepare_split`).
        input_size: side of the square input (320 for U2-Net).
        train: flip horizontally at random (p = 0.5) when True.
        resize: ``"stretch"`` (plain resize to a square, as U2-Net and rembg) or ``"letterbox"``
            (longer side to ``input_size``, centred, padded); see the module docstring.

    ``dataset[i]`` returns ``(image, mask)``: a float32 tensor 3×S×S normalised with the ImageNet
    mean/std and a float32 tensor 1×S×S in [0, 1]. Raises ``FileNotFoundError``/``ValueError``
    naming the file when an image or mask cannot be read.
    """

    def __init__(self, samples: Sequence[Sample], input_size: int, train: bool = False,
                 resize: str = "stretch") -> None:
        if resize not in ("stretch", "letterbox"):
            raise ValueError(f"resize must be 'stretch' or 'letterbox', got {resize!r}")
        self.samples = list(samples)
        self.input_size = int(input_size)
        self.train = train
        self.resize = resize
        self._mean = np.asarray(IMAGENET_MEAN, np.float32)
        self._std = np.asarray(IMAGENET_STD, np.float32)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def clusters(self) -> list[str]:
        """The cluster of every sample, in order (what the balanced sampler needs)."""
        return [s.cluster for s in self.samples]

    def _read(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        image = cv2.imread(sample.image_path, cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read image {sample.image_path} (key {sample.key!r}); "
                             "clear the training cache if the file is damaged")
        mask = cv2.imread(sample.mask_path, cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise ValueError(f"cannot read mask {sample.mask_path} (key {sample.key!r})")
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if mask.shape != image.shape[:2]:
            mask = cv2.resize(mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        return image, mask

    def _geometry(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = self.input_size
        image = image.astype(np.float32) * np.float32(1 / 255)
        image = (image - self._mean) / self._std
        mask = mask.astype(np.float32) * np.float32(1 / 255)
        if self.resize == "stretch":
            return training_resize(image, size, size), training_resize(mask, size, size)
        x0, y0, new_w, new_h = letterbox_box(mask.shape[0], mask.shape[1], size)
        out_image = np.zeros((size, size, 3), np.float32)
        out_mask = np.zeros((size, size), np.float32)
        out_image[y0:y0 + new_h, x0:x0 + new_w] = training_resize(image, new_w, new_h)
        out_mask[y0:y0 + new_h, x0:x0 + new_w] = training_resize(mask, new_w, new_h)
        return out_image, out_mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self._geometry(*self._read(self.samples[index]))
        if self.train and torch.rand(()) < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        mask_t = torch.from_numpy(np.ascontiguousarray(mask))[None]
        return image_t, mask_t.clamp_(0.0, 1.0)


class ClusterBalancedDistributedSampler(Sampler[int]):
    """Cluster-balanced sampling, split across workers without overlap.

    Each sample's weight is inverse to its cluster's frequency (``1 / (K · n_c)`` for K clusters),
    so every cluster fills about ``1/K`` of an epoch however rare it is. The epoch is drawn as
    one sequence of ``total_size`` indices seeded by ``(seed, epoch)``: each cluster gets its
    share of slots (the expected count under those weights, the remainder handed to random
    clusters), each cluster's slots are filled from successive seeded permutations of its
    members (so a member repeats only once all members of its cluster have been drawn), and
    the slots are shuffled. Rank ``r`` takes positions ``r, r + R, r + 2R, …`` of that sequence:
    the ranks' slices are disjoint, equally long and together make up the whole sequence.
    Every worker computes the same sequence from the same seed, so nothing is communicated.

    Args:
        clusters: the cluster of every sample (None counts as ``"all"``).
        num_replicas: the number of workers (the world size).
        rank: this worker's rank.
        seed: the base seed; ``set_epoch(e)`` must be called before each epoch.
        num_samples: samples per epoch over all workers (default: the dataset length); rounded up
            to a multiple of ``num_replicas``.
    """

    def __init__(self, clusters: Sequence[str | None], num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, num_samples: int | None = None) -> None:
        if len(clusters) == 0:
            raise ValueError("ClusterBalancedDistributedSampler needs at least one sample; "
                             "the training split is empty")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank {rank} of {num_replicas}")
        self.clusters = [DEFAULT_CLUSTER if c is None or (isinstance(c, float) and math.isnan(c)) else str(c)
                         for c in clusters]
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = int(seed)
        self.epoch = 0
        wanted = len(self.clusters) if num_samples is None else int(num_samples)
        if wanted < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = math.ceil(wanted / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.cluster_names = sorted(set(self.clusters))
        self.members = {name: [i for i, c in enumerate(self.clusters) if c == name] for name in self.cluster_names}
        counts = Counter(self.clusters)
        k = len(self.cluster_names)
        #: Per-sample probability of being drawn in one slot: inverse to the cluster's frequency.
        self.weights = torch.tensor([1.0 / (k * counts[c]) for c in self.clusters], dtype=torch.float64)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose sequence ``__iter__`` yields (changes the permutation)."""
        self.epoch = int(epoch)

    def global_indices(self) -> list[int]:
        """The whole epoch's sequence (all ranks), for the current ``(seed, epoch)``."""
        rng = np.random.default_rng([self.seed, self.epoch])
        k = len(self.cluster_names)
        quota = np.full(k, self.total_size // k)
        quota[rng.permutation(k)[: self.total_size - int(quota.sum())]] += 1
        slots = np.repeat(np.arange(k), quota)
        rng.shuffle(slots)
        sequence = np.empty(self.total_size, dtype=np.int64)
        for ci, name in enumerate(self.cluster_names):
            members = np.asarray(self.members[name])
            need = int(quota[ci])
            rounds = [rng.permutation(members) for _ in range(math.ceil(need / len(members)))]
            drawn = np.concatenate(rounds)[:need] if rounds else np.empty(0, np.int64)
            sequence[slots == ci] = drawn
        return sequence.tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_indices()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class ShardSampler(Sampler[int]):
    """Deterministic, non-repeating shard of ``range(length)`` for validation: rank ``r`` of
    ``R`` gets ``r, r + R, …`` (shards may differ in length by one; nothing is padded, so a
    sum of per-rank totals counts every sample exactly once)."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank {rank} of {num_replicas}")
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

