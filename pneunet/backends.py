"""Backends: turn a preprocessed model input into what the inference core needs, (logits, feature map).

    backend = load_backend("edge/models/model_fp32.onnx")  # or .tflite, or a .safetensors checkpoint
    logits, features = backend.run(inputs)                  # (N, channels, H, W) float32 -> (N,), (N, C, h, w)
    backend.config, backend.classifier_weight, backend.name

Exports (``python -m export``) run on onnxruntime (``.onnx``) or ai-edge-litert / tflite-runtime
(``.tflite``); both read ``pneunet_edge.json`` beside the model, which says which output is which, carries
the model config and the classifier weights (for the heatmap), and the sha256 of every file, checked
before a runtime reads it. A ``.safetensors`` checkpoint runs on PyTorch (``pneunet.torch_backend``), for
training, evaluation and parity; torch is imported only then.

Serving default (``default_model``): the committed int8 ONNX export where it passed its parity gate, else
the fp32 one; TFLite where only a TFLite runtime is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pneunet.config import ModelConfig
from pneunet.integrity import ModelFileError, sha256_of

SIDECAR_NAME = "pneunet_edge.json"
SIDECAR_FORMAT = "pneunet-edge/1"
# The committed exports of the shipped model (written by ``python -m export --out edge/models``).
EXPORT_DIR = Path(__file__).resolve().parent.parent / "edge" / "models"
INT8_ONNX = EXPORT_DIR / "model_int8.onnx"
FP32_ONNX = EXPORT_DIR / "model_fp32.onnx"
INT8_TFLITE = EXPORT_DIR / "model_int8.tflite"
# The shipped PyTorch checkpoint: what training writes and export reads; served only with the torch backend.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "pneunet.safetensors"
CHECKPOINT_ENV = "PNEUNET_CHECKPOINT"
MODEL_ENV = "PNEUNET_MODEL"  # a model file to serve instead of the default (.onnx, .tflite or .safetensors)
BACKEND_ENV = "PNEUNET_BACKEND"  # "torch" serves the PyTorch checkpoint (development); default: the export
INT8_KERNELS = ("auto", "fused", "reference")
BACKENDS = ("auto", "onnx", "tflite", "torch")


class Backend(Protocol):
    name: str  # e.g. "onnxruntime", "ai-edge-litert", "torch"
    sha256: str  # of the model file
    config: ModelConfig
    classifier_weight: np.ndarray | None  # (C,) of a pooled-linear head: the heatmap; None without one

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, channels, H, W) float32 model inputs -> logits (N,) and feature maps (N, C, h, w), float32."""


def default_checkpoint() -> Path:
    """The checkpoint the torch backend, evaluation and export load by default: ``$PNEUNET_CHECKPOINT`` if set,
    else the shipped model."""
    return Path(os.environ.get(CHECKPOINT_ENV) or DEFAULT_CHECKPOINT)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def passes_parity(model: Path) -> bool:
    """Whether the export sidecar beside ``model`` records a passed parity gate for it."""
    try:
        entry = json.loads((model.parent / SIDECAR_NAME).read_text())["models"][model.name]
    except (OSError, ValueError, KeyError):
        return False
    return entry.get("parity_gate", {}).get("result") == "pass"


def default_model() -> Path:
    """What serving runs without ``--model``: ``$PNEUNET_MODEL`` if set; else the committed int8 ONNX export
    if it passed its parity gate, else the fp32 one (when it passed); the int8 TFLite export where only a
    TFLite runtime is installed. Int8 arithmetic is made exact on CPUs where the fused kernels saturate
    (``int8_kernels_saturate``), so a gate passed at export holds on this CPU."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    if not installed("onnxruntime") and (installed("ai_edge_litert") or installed("tflite_runtime")):
        return INT8_TFLITE
    if not passes_parity(INT8_ONNX) and passes_parity(FP32_ONNX):
        return FP32_ONNX
    return INT8_ONNX


def int8_kernels_saturate(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on x86 CPUs without VNNI. There onnxruntime's fused uint8 x int8 kernels multiply with
    VPMADDUBSW, whose int16 pair sums saturate (255 * 127 * 2 > 32767): on PneuNet's int8 model that moved
    logits by ~1 and cut heatmap r to 0.6 (docs/int8_variants.md). VNNI (VPDPBUSD) and ARM kernels
    accumulate in int32 and are exact. Outside Linux the flags cannot be read: assume the worst."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        flags = cpuinfo.read_text(errors="replace")
    except OSError:
        return True
    return re.search(r"\b(avx512_vnni|avx_vnni)\b", flags) is None


def read_sidecar(model_path: Path, sidecar_path: Path | None = None) -> tuple[dict, dict]:
    """The sidecar (whole) and its entry for ``model_path``, after checking the model's sha256."""
    sidecar_path = Path(sidecar_path) if sidecar_path else model_path.parent / SIDECAR_NAME
    if not model_path.is_file():
        raise ModelFileError(f"{model_path}: no such model file; export one with: python -m export --checkpoint CKPT --out DIR")
    if not sidecar_path.is_file():
        raise ModelFileError(f"{sidecar_path}: sidecar missing; every exported model needs the {SIDECAR_NAME} "
                             "written beside it by python -m export")
    sidecar = json.loads(sidecar_path.read_text())
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise ModelFileError(f"{sidecar_path}: format {sidecar.get('format')!r}, this runner reads {SIDECAR_FORMAT!r}")
    entry = sidecar["models"].get(model_path.name)
    if entry is None:
        raise ModelFileError(f"{sidecar_path} does not describe {model_path.name}; it lists {sorted(sidecar['models'])}")
    verify_file(model_path, entry, sidecar_path)
    return sidecar, entry


def verify_file(path: Path, entry: dict, sidecar_path: Path) -> None:
    """Refuse ``path`` unless its size and sha256 are the ones the sidecar recorded at export time."""
    if "sha256" not in entry:
        raise ModelFileError(f"refusing to load {path}: {sidecar_path} records no sha256 for {path.name}; re-export")
    size = path.stat().st_size
    if entry.get("bytes") is not None and size != entry["bytes"]:
        raise ModelFileError(f"refusing to load {path}: {size} bytes, but {sidecar_path.name} says {entry['bytes']} "
                             f"(sha256 mismatch: the file is truncated, damaged or belongs to another export); "
                             "re-copy it or re-export with python -m export")
    actual = sha256_of(path)
    if actual != entry["sha256"]:
        raise ModelFileError(f"refusing to load {path}: sha256 {actual[:12]}... differs from {entry['sha256'][:12]}... "
                             f"in {sidecar_path.name}; the file is damaged, modified or belongs to another export; "
                             "re-copy it or re-export with python -m export")


def _quantise(values: np.ndarray, dtype: np.dtype, scale: float, zero_point: int) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.round(values / scale + zero_point), info.min, info.max).astype(dtype)


def _dequantise(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return (scale * (values.astype(np.float32) - zero_point)).astype(np.float32)


def onnx_session(path: Path, num_threads: int | None = None, int8_kernels: str | None = None):
    """An onnxruntime CPU session for ``path`` and a name saying how it runs. ``int8_kernels`` (int8 models
    only; None for float ones): "fused" integer kernels, "reference" (Q/DQ unfused), or "auto": reference
    where the fused ones saturate (``int8_kernels_saturate``)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    name = "onnxruntime"
    if int8_kernels is not None:
        if int8_kernels not in INT8_KERNELS:
            raise ModelFileError(f"int8 kernels {int8_kernels!r}: choose one of {', '.join(INT8_KERNELS)}")
        if int8_kernels == "reference" or (int8_kernels == "auto" and int8_kernels_saturate()):
            # Keep Q/DQ unfused: the same int8 values and scales, multiplied in float32, instead of the
            # saturating integer kernels. Slower than fp32 on such CPUs, still a third of the size.
            options.add_session_config_entry("session.disable_quant_qdq", "1")
            name = "onnxruntime (int8, reference arithmetic: Q/DQ unfused)"
        else:
            name = "onnxruntime (int8, fused kernels)"
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), name


class _OnnxRunner:
    def __init__(self, path: Path, entry: dict, num_threads: int | None, int8_kernels: str = "auto"):
        if not installed("onnxruntime"):
            raise ModelFileError(f"{path}: an .onnx model needs onnxruntime: pip install onnxruntime")
        int8 = entry.get("precision") == "int8"
        self.session, self.name = onnx_session(path, num_threads, int8_kernels if int8 else None)
        model_input = self.session.get_inputs()[0]
        if model_input.type != "tensor(float)":
            raise ModelFileError(f"{path}: input type {model_input.type}; this runner feeds float32")
        self.input_name = model_input.name
        self.input_shape = model_input.shape  # e.g. ['batch', 1, 224, 224]
        self.outputs = [entry["outputs"]["pneumonia_logit"]["name"], entry["outputs"]["features"]["name"]]
        # One image per run even with a dynamic batch axis: on a CPU a batch was no faster per image here,
        # and its activations raise the runner's peak memory (measured once with /usr/bin/time on the six
        # examples: 187 MB as one batch; docs/edge_benchmark.md has the one-at-a-time runner).
        self.max_batch = 1

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = [len(batch)] + [int(d) for d in self.input_shape[1:]]
        logits, features = self.session.run(self.outputs, {self.input_name: batch.reshape(shape)})
        return logits, features


class _TfliteRunner:
    def __init__(self, path: Path, entry: dict, num_threads: int | None):
        try:
            from ai_edge_litert.interpreter import Interpreter
            self.name = "ai-edge-litert"
        except ImportError:
            try:
                from tflite_runtime.interpreter import Interpreter
                self.name = "tflite-runtime"
            except ImportError as error:
                raise ModelFileError(f"{path}: a .tflite model needs a TFLite runtime: pip install ai-edge-litert "
                                     "(or tflite-runtime with NumPy < 2), or use the .onnx model with onnxruntime") from error
        self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        by_name = {detail["name"]: detail for detail in self.interpreter.get_output_details()}
        try:
            self.logit = by_name[entry["outputs"]["pneumonia_logit"]["name"]]
            self.features = by_name[entry["outputs"]["features"]["name"]]
        except KeyError as error:
            raise ModelFileError(f"{path}: output {error} named in the sidecar is not in the model; re-export") from error
        self.max_batch = int(self.input["shape"][0])

    def _output(self, detail: dict) -> np.ndarray:
        values = self.interpreter.get_tensor(detail["index"])
        if np.issubdtype(values.dtype, np.integer):
            scale, zero_point = detail["quantization"]
            return _dequantise(values, scale, zero_point)
        return values

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        model_input = batch.reshape(self.input["shape"])  # one channel: NCHW and NHWC are the same bytes
        if self.input["dtype"] != np.float32:  # full-integer model: quantise with the model's own parameters
            scale, zero_point = self.input["quantization"]
            model_input = _quantise(model_input, self.input["dtype"], scale, zero_point)
        self.interpreter.set_tensor(self.input["index"], model_input)
        self.interpreter.invoke()
        return self._output(self.logit), self._output(self.features)


@dataclass
class ExportedModel:
    """An exported model (.onnx / .tflite) with its sidecar: config, classifier weights for the heatmap,
    and a runtime. A ``Backend``."""

    path: Path
    sidecar: dict
    entry: dict
    config: ModelConfig
    classifier_weight: np.ndarray  # (C,)
    runner: object

    @classmethod
    def load(cls, model_path: str | Path | None = None, sidecar_path: str | Path | None = None,
             num_threads: int | None = None, int8_kernels: str = "auto") -> "ExportedModel":
        """``model_path`` defaults to ``default_model()``; ``int8_kernels``: see ``onnx_session``."""
        model_path = Path(model_path or default_model())
        sidecar, entry = read_sidecar(model_path, sidecar_path)
        config = ModelConfig.from_dict(sidecar["config"])
        if config.channels != 1 and entry["input"]["layout"] != "NCHW":
            raise ModelFileError(f"{model_path}: {config.channels}-channel NHWC input needs a transpose this runner lacks")
        if model_path.suffix == ".onnx":
            runner = _OnnxRunner(model_path, entry, num_threads, int8_kernels)
        elif model_path.suffix == ".tflite":
            runner = _TfliteRunner(model_path, entry, num_threads)
        else:
            raise ModelFileError(f"{model_path}: unknown model type {model_path.suffix!r}; expected .onnx or .tflite")
        weight = np.asarray(sidecar["classifier"]["weight"], dtype=np.float32)
        return cls(model_path, sidecar, entry, config, weight, runner)

    @property
    def name(self) -> str:
        return self.runner.name

    @property
    def sha256(self) -> str:
        """The model file's sha256 (checked at load): what a site profile is bound to."""
        return self.entry["sha256"]

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, channels, H, W) float32 model inputs -> logits (N,) and features (N, C, h, w) float32."""
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        step = self.runner.max_batch or len(inputs)
        logits, features = [], []
        for start in range(0, len(inputs), step):
            logit, feature = self.runner.run(inputs[start:start + step])
            logits.append(np.asarray(logit, dtype=np.float32).reshape(-1))
            features.append(feature)
        features = np.concatenate(features)
        if self.entry["outputs"]["features"]["layout"] == "NHWC":
            features = features.transpose(0, 3, 1, 2)
        return np.concatenate(logits), np.ascontiguousarray(features, dtype=np.float32)

    def file_beside(self, key: str) -> Path | None:
        """The gate or lung-field file the sidecar lists under ``key``, checked against its sha256 (None
        when the export ships none)."""
        entry = self.sidecar.get(key)
        if not entry:
            return None
        path = self.path.parent / entry["file"]
        if not path.is_file() or sha256_of(path) != entry["sha256"]:
            raise ModelFileError(f"{path}: missing or changed (sha256 differs from {SIDECAR_NAME}); "
                                 "re-copy the export folder or re-export with python -m export")
        return path


def load_backend(model: str | Path | None = None, backend: str = "auto", num_threads: int | None = None,
                 int8_kernels: str = "auto") -> Backend:
    """The backend for ``model`` (default ``default_model()``, or the shipped checkpoint for ``backend="torch"``):
    ``.onnx`` / ``.tflite`` exports, or a ``.safetensors`` checkpoint on PyTorch. ``backend`` "auto" goes by
    the file (without a model, ``$PNEUNET_BACKEND`` may name one); "onnx"/"tflite"/"torch" insist on that runtime."""
    if backend == "auto" and model is None and os.environ.get(BACKEND_ENV):
        backend = os.environ[BACKEND_ENV]  # e.g. PNEUNET_BACKEND=torch: the app and the CLI serve PyTorch
    if backend not in BACKENDS:
        raise ModelFileError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if model is None and backend == "torch":
        model = default_checkpoint()
    path = Path(model) if model is not None else default_model()
    expected = {"onnx": ".onnx", "tflite": ".tflite", "torch": ".safetensors"}.get(backend)
    if expected and path.suffix != expected:
        raise ModelFileError(f"{path}: the {backend} backend runs {expected} files")
    if path.suffix == ".safetensors":
        from pneunet.torch_backend import TorchBackend  # the only place serving may reach torch

        return TorchBackend.load(path)
    return ExportedModel.load(path, num_threads=num_threads, int8_kernels=int8_kernels)
