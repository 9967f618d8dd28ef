"""Model engines: a segmentation model behind one small interface, whatever file it came from.

``load_engine(source)`` opens a model — a ``.onnx`` file, a folder/URL holding ``model.onnx``
and/or ``model.pt`` + ``config.json`` (the training output layout), a registry URI
``models:/<name>@<alias>`` / ``models:/<name>/<version>``, or ``pretrained`` (the published
U2-NetP) — as an :class:`Engine`: OpenVINO or ONNX Runtime on the CPU, PyTorch on a CUDA GPU or
when only ``model.pt`` exists. An ONNX file is read as it is: its batch size, outputs and normalisation
come from the file. :class:`FlipAveragedEngine` adds test-time flip to any engine;
:func:`default_model` and :func:`audit_engine` choose a model by the project's rules;
:func:`probability_map` runs one photo (the mask audit and calibration use it). The batched
background-removal pipeline is :mod:`tasks.serving.pipeline`.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import posixpath
import queue
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tasks import registry
from tasks.core import storage
from tasks.model.config import PRETRAINED
from tasks.model.published import DEFAULT as PUBLISHED_DEFAULT
from tasks.model.published import find_pretrained_onnx, require_pretrained_onnx
from tasks.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, letterbox_box, prepare_input, resize_to_original
from tasks.model.refine_choice import RefineChoice, RefineConfig, load_refine_choice, resolve_refine

__all__ = [
    "BACKENDS",
    "ONNX_RUNTIMES",
    "NO_AUDIT_MODEL",
    "Engine",
    "FlipAveragedEngine",
    "OnnxEngine",
    "OpenVinoEngine",
    "TorchEngine",
    "audit_engine",
    "audit_predictor",
    "available_cores",
    "default_model",
    "load_engine",
    "openvino_installed",
    "probability_map",
    "published_source",
    "refinement_for",
    "unletterboxed",
]


#: What ``load_engine(backend=...)`` accepts; the ONNX runtimes run on the CPU only.
ONNX_RUNTIMES: tuple[str, ...] = ("onnx", "openvino")
BACKENDS: tuple[str, ...] = ("auto", *ONNX_RUNTIMES, "torch")


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class Engine(ABC):
    """A model that maps a preprocessed batch to probabilities.

    Attributes: ``input_size`` (S), ``resize`` (``"stretch"``/``"letterbox"``), ``mean``/``std``
    (the normalisation, RGB), ``backend`` (``"onnx"``/``"openvino"``/``"torch"``), ``device``, ``source`` and
    ``model_dir`` (the local folder the model came from; for a model on an object store, a local folder
    holding copies of the files beside it; None when neither exists).
    """

    input_size: int
    resize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    backend: str
    device: str = "cpu"
    source: str = ""
    model_dir: str | None = None

    @abstractmethod
    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Take float32 ``B×3×S×S``; return ``(B×S×S fused probabilities, B×6×S×S side
        probabilities or None)``."""

    @functools.cached_property
    def refine_choice(self) -> RefineChoice | None:
        """The edge-refinement choice measured for this model (``refinement.json`` in
        ``model_dir``), read once per engine; None when there is none."""
        return load_refine_choice(self.model_dir)

    def describe(self) -> str:
        """One line: backend, device, input size and source."""
        return f"{self.backend} on {self.device}, {self.input_size} px {self.resize}, {self.source}"


class _OnnxFileEngine(Engine):
    """An ONNX file read as it is (:func:`tasks.model.onnx_metadata.read_onnx_metadata`): input
    size and normalisation, a fixed batch size (rembg's files take one image: a batch is run
    image by image), the side outputs (this project's ``sides``, or the six extra outputs of a
    U2-Net file) and whether output 0 is a probability or a logit. A subclass runs the file on
    one of ``sessions`` parallel sessions (:meth:`_run_on`), each with ``threads // sessions``
    threads; a batch is split over the sessions, which pays for int8 models
    (``benchmarks/README.md``)."""

    def __init__(self, onnx_path: str, threads: int | None, source: str | None, sessions: int) -> None:
        from tasks.model.onnx_metadata import read_onnx_metadata

        if sessions < 1:
            raise ValueError(f"sessions must be >= 1, got {sessions}")
        meta = read_onnx_metadata(onnx_path)
        self.threads_per_session = max(1, int(threads or available_cores()) // sessions)
        self.n_sessions = sessions
        self._pool = ThreadPoolExecutor(sessions, thread_name_prefix="bgremoval-model") if sessions > 1 else None
        self._outputs = [meta["output"], *meta["side_outputs"]]
        self._fixed_batch = meta["batch"]
        self._logits = not meta["probabilities"]
        self.input_size, self.resize = int(meta["input_size"]), str(meta["resize"])
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self.source = source or onnx_path
        self.model_dir = os.path.dirname(os.path.abspath(onnx_path))
        self.onnx_path = onnx_path

    @abstractmethod
    def _run_on(self, session: int, chunk: np.ndarray) -> list[np.ndarray]:
        """The outputs named in ``self._outputs`` for one chunk, on session number ``session``."""

    def _chunks(self, batch: np.ndarray) -> list[np.ndarray]:
        """The model calls a batch takes: whole, or image by image for a fixed batch of 1, or one
        part per session."""
        if self._fixed_batch is not None and len(batch) != self._fixed_batch:
            if self._fixed_batch != 1:
                raise ValueError(f"{self.source} takes batches of exactly {self._fixed_batch} images, got {len(batch)}")
            return [batch[i:i + 1] for i in range(len(batch))]
        if self._fixed_batch is None and self.n_sessions > 1 and len(batch) > 1:
            return [part for part in np.array_split(batch, min(self.n_sessions, len(batch))) if len(part)]
        return [batch]

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        chunks = self._chunks(batch)
        if len(chunks) == 1:
            return self._run_on(0, chunks[0])
        if self._pool is None:
            parts = [self._run_on(0, c) for c in chunks]
        else:  # each session runs every n-th chunk, the sessions side by side
            n = self.n_sessions

            def run_share(k: int) -> list[list[np.ndarray]]:
                return [self._run_on(k, c) for c in chunks[k::n]]

            shares = list(self._pool.map(run_share, range(min(n, len(chunks)))))
            parts = [shares[i % n][i // n] for i in range(len(chunks))]
        return [np.concatenate(column) for column in zip(*parts, strict=True)]

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self._run(np.ascontiguousarray(batch, dtype=np.float32))
        if self._logits:
            out = [1.0 / (1.0 + np.exp(-np.clip(o, -80.0, 80.0))) for o in out]
        fused = out[0][:, 0]
        if len(out) == 1:
            return fused, None
        sides = out[1] if len(out) == 2 else np.concatenate([o[:, :1] for o in out[1:]], axis=1)
        return fused, sides


class OnnxEngine(_OnnxFileEngine):
    """ONNX Runtime on the CPU, tuned for throughput: intra-op threads = ``threads`` (default:
    the usable cores) split evenly over ``sessions``, no spin-waiting (the decode/encode threads
    share the cores), sequential execution, all graph optimisations."""

    backend = "onnx"

    def __init__(self, onnx_path: str, threads: int | None = None, source: str | None = None,
                 sessions: int = 1) -> None:
        import onnxruntime as ort

        super().__init__(onnx_path, threads, source, sessions)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads_per_session
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = [ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
                         for _ in range(sessions)]
        self._input = self.sessions[0].get_inputs()[0].name

    def _run_on(self, session: int, chunk: np.ndarray) -> list[np.ndarray]:
        return self.sessions[session].run(self._outputs, {self._input: chunk})


class OpenVinoEngine(_OnnxFileEngine):
    """OpenVINO on the CPU (``pip install 'bgremoval[openvino]'``): the same ONNX file, compiled
    for this CPU in float32 (the precision is pinned: OpenVINO would otherwise pick bf16 on a CPU
    that has it, which moves the masks: ``benchmarks/README.md``). Measured side by side on the
    published U2-NetP it runs the float32 model 1.10x faster than ONNX Runtime with the same
    masks, and an int8 file from ``bgremoval quantize`` 1.6x faster than ONNX Runtime runs it.
    ``sessions`` become OpenVINO streams; a batch's parts run side by side on inference requests
    taken from a pool of idle ones (a request serves one call at a time, so concurrent callers,
    e.g. ``bgremoval serve``, each take their own)."""

    backend = "openvino"

    def __init__(self, onnx_path: str, threads: int | None = None, source: str | None = None,
                 sessions: int = 1) -> None:
        import openvino

        super().__init__(onnx_path, threads, source, sessions)
        self.compiled = openvino.Core().compile_model(onnx_path, "CPU", {
            "INFERENCE_NUM_THREADS": self.threads_per_session * sessions,
            "NUM_STREAMS": sessions,
            "INFERENCE_PRECISION_HINT": "f32",
        })
        ports = {name: port for port in self.compiled.outputs for name in port.get_names()}
        missing = [name for name in self._outputs if name not in ports]
        if missing:
            raise ValueError(f"OpenVINO does not see the outputs {missing} in {onnx_path}")
        self._ports = [ports[name] for name in self._outputs]
        self._free: queue.SimpleQueue = queue.SimpleQueue()  # idle requests; the streams serve any of them

    def _run_on(self, session: int, chunk: np.ndarray) -> list[np.ndarray]:
        try:
            request = self._free.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            result = request.infer({0: chunk})  # copies the outputs: the request's buffers are reused
            return [result[port] for port in self._ports]
        finally:
            self._free.put(request)


class TorchEngine(Engine):
    """PyTorch (``model.pt`` + ``config.json``, :func:`tasks.model.io.load_model`) on ``device``."""

    backend = "torch"

    def __init__(self, model_url: str, device: str = "cpu", storage_options: dict | None = None,
                 source: str | None = None) -> None:
        import torch

        from tasks.model.io import load_model

        model, meta = load_model(model_url, storage_options=storage_options)
        self._torch = torch
        self.device = device
        self.model = model.to(device)
        self.input_size, self.resize = int(meta["input_size"]), str(meta["resize"])
        self.mean, self.std = tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
        self.source = source or model_url
        self.model_dir = _local_dir(meta["model_url"]) or _sidecars_copy(meta["model_url"], storage_options)

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            out = self.model(x)
        fused = out.fused if hasattr(out, "fused") else out[0] if isinstance(out, (tuple, list)) else out
        probs = torch.sigmoid(fused.float())[:, 0].cpu().numpy()
        sides = getattr(out, "sides", None)
        side_probs = torch.sigmoid(torch.cat([s[:, :1].float() for s in sides], 1)).cpu().numpy() if sides else None
        return probs, side_probs


class FlipAveragedEngine(Engine):
    """Test-time flip around another engine: each batch is run as it is and mirrored, and the
    fused and side probabilities are averaged in logit space after mirroring back. Twice the
    model time; measured on real photos (``benchmarks/quality_real.py --flip``) it adds about
    half a point of mean IoU on photos of people and nothing on packshots on white."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.input_size, self.resize, self.mean, self.std = engine.input_size, engine.resize, engine.mean, engine.std
        self.backend, self.device, self.source, self.model_dir = (engine.backend, engine.device, engine.source,
                                                                  engine.model_dir)

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        probs, sides = self.engine.predict(batch)
        mirrored_probs, mirrored_sides = self.engine.predict(np.ascontiguousarray(batch[..., ::-1]))
        fused = _mean_in_logits(probs, mirrored_probs[..., ::-1])
        if sides is None or mirrored_sides is None:
            return fused, None
        return fused, _mean_in_logits(sides, mirrored_sides[..., ::-1])

    def describe(self) -> str:
        """The wrapped engine's line, marked as flip-averaged."""
        return f"{self.engine.describe()}, test-time flip"


def _mean_in_logits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    eps = 1e-6
    a = np.clip(a.astype(np.float64), eps, 1 - eps)
    b = np.clip(b.astype(np.float64), eps, 1 - eps)
    logit = (np.log(a / (1 - a)) + np.log(b / (1 - b))) / 2
    return (1 / (1 + np.exp(-logit))).astype(np.float32)


def _local_dir(url: str) -> str | None:
    return os.path.dirname(os.path.abspath(url)) if "://" not in url else None


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def published_source(source: str) -> str:
    """The published weights' ONNX file for ``"pretrained"`` / ``"pretrained:<model>"`` (raises
    ``FileNotFoundError`` saying how to fetch one that is missing); any other source as it is."""
    if source == PRETRAINED or source.startswith(f"{PRETRAINED}:"):
        return str(require_pretrained_onnx(model=source.partition(":")[2] or PUBLISHED_DEFAULT))
    return source


def load_engine(source: str, storage_options: dict | None = None, device: str = "auto",
                backend: str = "auto", threads: int | None = None, sessions: int = 1) -> Engine:
    """Open a model for inference.

    Args:
        source: ``"pretrained"`` (the published U2-NetP weights, :mod:`tasks.model.published`),
            ``"pretrained:u2net"`` (the published full U2-Net, once fetched); a
            ``.onnx`` file (this project's export, or any U2-Net-family file rembg runs); a folder or URL holding ``model.onnx`` and/or ``model.pt`` +
            ``config.json``; a ``model.pt``; or ``models:/<name>@<alias>`` /
            ``models:/<name>/<version>`` (downloaded with ``tasks.registry.download_model``).
        storage_options: fsspec options for ``s3://`` sources.
        device: ``"auto"`` (CUDA when a GPU is present and ``model.pt`` exists, else CPU),
            ``"cpu"`` or ``"cuda"``.
        backend: ``"auto"`` (on the CPU when ``model.onnx`` exists: OpenVINO when it is
            installed, otherwise ONNX Runtime; PyTorch when there is no ``model.onnx``),
            ``"onnx"`` (ONNX Runtime), ``"openvino"`` or ``"torch"``.
        threads: the model's threads (default: the usable cores).
        sessions: sessions (OpenVINO: streams) sharing ``threads``, each running part of a batch.

    Returns an :class:`Engine`. Raises ``FileNotFoundError`` when the source holds no model and
    ``ValueError`` for an impossible combination (e.g. ``backend="onnx"`` with ``device="cuda"``).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1 (leave it out for all cores), got {threads}")
    if device == "cuda" and backend in ONNX_RUNTIMES:
        raise ValueError(f"the {backend} engine runs on the CPU; use backend='torch' (or 'auto') for CUDA")
    if backend == "openvino" and not openvino_installed():
        raise ValueError("backend='openvino' needs OpenVINO: pip install 'bgremoval[openvino]'")
    if device == "cuda" and not _cuda_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU")
    original, resolved = source, published_source(source)
    if resolved != source:
        original, source = f"{source} ({resolved})", resolved
    if source.startswith("models:/"):
        pinned = registry.pinned_uri(source)
        if pinned != source:
            original = f"{source} (version {pinned.rsplit('/', 1)[1]})"
        source = registry.download_model(pinned, _process_temp_dir("bgremoval-model-"))
        storage_options = None
    onnx_url = pt_url = None
    if source.endswith(".onnx"):
        onnx_url = source
    elif source.endswith(".pt"):
        pt_url = source
    else:
        for name in ("model.onnx", "model.pt"):
            url = storage.join(source, name)
            if storage.exists(url, storage_options):
                onnx_url, pt_url = (url, pt_url) if name == "model.onnx" else (onnx_url, url)
    if onnx_url and not storage.exists(onnx_url, storage_options):
        raise FileNotFoundError(f"no ONNX model at {onnx_url}")
    if not onnx_url and not pt_url:
        raise FileNotFoundError(f"no model.onnx or model.pt at {source}")
    gpu = device == "cuda" or (device == "auto" and backend not in ONNX_RUNTIMES and pt_url is not None and _cuda_available())
    use_torch = backend == "torch" or gpu or (backend == "auto" and onnx_url is None)
    if use_torch:
        if pt_url is None:
            raise FileNotFoundError(f"the PyTorch engine needs a model.pt + config.json, and {original} is an ONNX "
                                    "model only: use --backend onnx or openvino, or, for the published weights, "
                                    "`bgremoval pretrained export --out DIR` then --model DIR")
        return TorchEngine(pt_url, "cuda" if gpu else "cpu", storage_options, source=original)
    if onnx_url is None:
        raise FileNotFoundError(f"no model.onnx at {source} (backend={backend!r})")
    runtime = OpenVinoEngine if backend == "openvino" or (backend == "auto" and openvino_installed()) else OnnxEngine
    return runtime(_local_copy(onnx_url, storage_options), threads=threads, source=original, sessions=sessions)


def refinement_for(engine: Engine, mode: str | bool = "auto") -> tuple[RefineConfig | None, str]:
    """The edge refinement to publish ``engine``'s cut-outs with under ``mode`` (``auto``: the choice
    measured for its model, ``refinement.json`` in its folder, read once per engine, else on; ``on``/``off``; see
    :func:`tasks.model.refine_choice.resolve_refine`). Returns ``(RefineConfig or None, why)``;
    raises ``ValueError`` for an unknown mode."""
    if engine.model_dir is None:
        return resolve_refine(mode, None, no_choice="no local model folder to read a measured choice from")
    return resolve_refine(mode, engine.refine_choice)


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported (the ``openvino`` extra)."""
    return importlib.util.find_spec("openvino") is not None


def default_model(registered_name: str = registry.DEFAULT_MODEL_NAME) -> tuple[str, str]:
    """The model ``bgremoval remove`` uses when none is named: the registered model's champion
    when an MLflow registry is configured (``MLFLOW_TRACKING_URI``) and has one, otherwise the
    published U2-NetP weights.

    Returns ``(source for load_engine, a sentence saying which and why)``. Raises
    ``FileNotFoundError`` saying how to get a model when there is neither.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    why = "no MLflow registry is configured (MLFLOW_TRACKING_URI)"
    if uri and (store := registry.missing_store(uri)):
        why = f"the MLflow store {store} does not exist"
    elif uri:
        try:
            version = registry.alias_version(registered_name, registry.CHAMPION, tracking_uri=uri)
        except Exception as exc:  # noqa: BLE001 - an unreachable or empty registry means: no champion
            version, why = None, f"the registry at {uri} gave no champion ({type(exc).__name__}: {str(exc)[:120]})"
        else:
            why = f"{registered_name!r} has no champion at {uri}"
        if version is not None:
            return (registry.model_uri(registered_name, registry.CHAMPION),
                    f"the champion of {registered_name!r} (version {version}) from {uri}")
    path = find_pretrained_onnx() or require_pretrained_onnx()  # the latter raises, saying how to get the file
    return str(path), f"the published U2-NetP weights, not fine-tuned ({why}): {path}"


#: ``audit_model`` values that turn the mask audit's model check off.
NO_AUDIT_MODEL = ("", "none")


def audit_engine(reference: str, registered_name: str = registry.DEFAULT_MODEL_NAME,
                 storage_options: dict | None = None) -> tuple[Engine | None, str]:
    """The model whose predictions the mask audit compares masks with (``model_disagrees``).

    ``reference``: ``"auto"`` (what :func:`default_model` picks: the champion, else the published
    weights; no check when neither is there), ``"champion"``, ``"pretrained"``, ``"none"``/``""``
    (no check), or anything :func:`load_engine` takes. Returns ``(engine or None, a sentence saying
    which and why)``. An explicitly named model that cannot be loaded raises.
    """
    reference = (reference or "").strip()
    if reference.lower() in NO_AUDIT_MODEL:
        return None, "no model check (audit_model=none)"
    if reference == "auto":
        try:
            source, why = default_model(registered_name)
        except FileNotFoundError:
            return None, "no model check: no champion and no published weights on this machine"
    elif reference == "champion":
        source, why = registry.model_uri(registered_name, registry.CHAMPION), f"the champion of {registered_name!r}"
    else:
        source, why = reference, reference
    return load_engine(source, storage_options), why


def audit_predictor(reference: str, registered_name: str = registry.DEFAULT_MODEL_NAME,
                    storage_options: dict | None = None) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str]:
    """The mask audit's model check as cleaning takes it: ``(photo → probability map, or None; why)``.

    The model is :func:`audit_engine`'s choice for ``reference``; the function is
    :func:`probability_map` on it.
    """
    engine, why = audit_engine(reference, registered_name, storage_options)
    return (functools.partial(probability_map, engine) if engine else None), why


def _process_temp_dir(prefix: str) -> str:
    """A private temporary folder removed when this process exits (a task's downloaded model)."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _local_copy(url: str, storage_options: dict | None) -> str:
    """A local path for ``url`` (ONNX Runtime reads files): the path itself, or a temp copy, with
    the :data:`tasks.core.layout.MODEL_SIDECARS` found beside it copied next to it."""
    fs, path = storage.filesystem(url, storage_options)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return path
    folder = _sidecars_copy(url, storage_options, prefix="bgremoval-onnx-")
    local = os.path.join(folder, posixpath.basename(path))
    with open(local, "wb") as fh:
        fh.write(storage.read_bytes(url, storage_options))
    return local


def _sidecars_copy(url: str, storage_options: dict | None, prefix: str = "bgremoval-model-") -> str:
    """A new local folder holding the files found beside the model file at ``url`` (the calibrated
    threshold, the refinement choice: :func:`tasks.registry.copy_sidecars`), which production and
    ``auto`` read from the engine's ``model_dir``."""
    folder = _process_temp_dir(prefix)
    registry.copy_sidecars(url, folder, storage_options)
    return folder


def unletterboxed(prob_s: np.ndarray, sides: np.ndarray | None, engine: Engine, height: int,
                   width: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The network-size maps of a photo of ``height × width`` cropped to the photo's box (when the
    engine letterboxes) and cleaned to [0, 1]; ``sides`` (the side outputs) may be None."""
    if engine.resize == "letterbox":
        x0, y0, new_w, new_h = letterbox_box(height, width, engine.input_size)
        prob_s = prob_s[y0:y0 + new_h, x0:x0 + new_w]
        sides = None if sides is None else sides[:, y0:y0 + new_h, x0:x0 + new_w]
    return np.clip(np.nan_to_num(prob_s, nan=0.0), 0.0, 1.0), sides



def probability_map(engine: Engine, image_rgb: np.ndarray) -> np.ndarray:
    """The model's foreground probability for one RGB ``uint8`` photo, at the photo's size
    (float32 ``H×W`` in [0, 1]): what :func:`tasks.serving.pipeline.remove_backgrounds` cuts out with."""
    height, width = image_rgb.shape[:2]
    tensor = prepare_input(image_rgb, engine.input_size, engine.resize, engine.mean, engine.std)
    prob_s, _ = unletterboxed(engine.predict(tensor[None])[0][0], None, engine, height, width)
    return resize_to_original(np.ascontiguousarray(prob_s, dtype=np.float32), (width, height))
