"""PyTorch -> ONNX fp32, and ONNX fp32 -> int8 (static QDQ, per-channel) with onnxruntime.quantization."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.graph import FEATURES_NAME, INPUT_NAME, LOGIT_NAME, EdgeGraph

OPSET = 17
CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class Int8Recipe:
    """How ``quantize_onnx_int8`` quantises: weight type, activation-range method, nodes kept float."""

    weights: str = "int8"  # "int8": symmetric per-channel (onnxruntime's default); "uint8": asymmetric
    calibration: str = "percentile"  # "percentile" (99.99th) or "minmax"
    float_prefixes: tuple[str, ...] = ()  # ONNX node-name prefixes kept float32, besides the head

    @property
    def label(self) -> str:
        floats = " + ".join(prefix.strip("/").split("/")[-1] for prefix in self.float_prefixes) or "none"
        return f"{self.weights} weights, {self.calibration}, float besides head: {floats}"


# Chosen on the 652 validation images only (docs/int8_variants.md, python -m export.int8_variants): int8
# symmetric per-channel weights (uint8 weights skip onnxruntime's int32-bias range fix: biases overflow
# and are clipped, logit shift +0.3), percentile ranges (a few outlier activations otherwise stretch the
# scales: lower logit RMSE and better heatmaps than min/max), everything int8 but the head (keeping
# conv_head float changed nothing on validation and costs 1.2 MB).
INT8_RECIPE = Int8Recipe()
CALIBRATION_PERCENTILE = 99.99  # onnxruntime's histogram calibrator holds every activation: ~17 GB for 300 images


def export_onnx_fp32(graph: EdgeGraph, image_size: int, channels: int, path: Path) -> None:
    """One self-contained .onnx file with a dynamic batch axis; input NCHW float32."""
    if graph.features_layout != "NCHW":
        raise ValueError("the ONNX export keeps NCHW features (ONNX's native layout)")
    example = torch.zeros(2, channels, image_size, image_size)
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is deprecated but needs no onnxscript and exports this
        # graph exactly; its deprecation and constant-folding notes are noise for this graph.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message="You are using the legacy TorchScript")
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        torch.onnx.export(
            graph, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[LOGIT_NAME, FEATURES_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, LOGIT_NAME: {0: "batch"}, FEATURES_NAME: {0: "batch"}},
        )


class _CalibrationReader:
    """Feeds calibration batches to onnxruntime's calibrator (its CalibrationDataReader protocol)."""

    def __init__(self, inputs: np.ndarray):
        # Equal-sized batches: the percentile calibrator stacks every batch's activations into one array.
        size = max(d for d in range(1, CALIBRATION_BATCH + 1) if len(inputs) % d == 0)
        self._batches = iter([inputs[i:i + size] for i in range(0, len(inputs), size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}


def quantize_onnx_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray, recipe: Int8Recipe = INT8_RECIPE) -> dict:
    """Static QDQ quantisation: uint8 asymmetric activations, per-channel weights as ``recipe`` says,
    ranges from ``calibration`` (real preprocessed training images). The head after the feature map
    stays float. Returns the quantisation facts for the sidecar, including the input's scale and zero
    point. On x86 CPUs without VNNI the runner runs this model with reference arithmetic
    (``pneunet.backends.int8_kernels_saturate``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Shape inference + graph optimisation first (BN folding, constant folding of the pad tables),
        # as onnxruntime recommends; quantising an unoptimised graph places Q/DQ pairs badly.
        quant_pre_process(str(fp32_path), str(prepared))
        float_nodes = _float_nodes(prepared, recipe.float_prefixes)
        percentile = recipe.calibration == "percentile"
        quantize_static(
            str(prepared), str(int8_path), _CalibrationReader(calibration),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8 if recipe.weights == "int8" else QuantType.QUInt8,
            calibrate_method=CalibrationMethod.Percentile if percentile else CalibrationMethod.MinMax,
            extra_options={"CalibPercentile": CALIBRATION_PERCENTILE} if percentile else {},
            nodes_to_exclude=float_nodes,
        )
    scale, zero_point = _input_quantisation(int8_path)
    weights = ("int8, symmetric, per-channel" if recipe.weights == "int8" else "uint8, asymmetric, per-channel")
    return {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "activations": "uint8, asymmetric, per-tensor",
        "weights": weights,
        "calibration_method": f"Percentile {CALIBRATION_PERCENTILE}" if percentile else "MinMax",
        "float_nodes": "the classifier head after the feature map (pooling, linear: the logit stays float)"
                       + "".join(f", {prefix}*" for prefix in recipe.float_prefixes),
        "float_node_names": float_nodes,
        "input_scale": scale,
        "input_zero_point": zero_point,
        "io": "float32 in, float32 out (Q/DQ inside the graph)",
        "kernels": "x86 without VNNI: run with Q/DQ unfused (fused uint8 x int8 kernels saturate there); "
                   "ARM and x86 with VNNI: fused int8 kernels (pneunet.backends.int8_kernels_saturate)",
    }


def _float_nodes(path: Path, float_prefixes: tuple[str, ...]) -> list[str]:
    """The head (everything downstream of the feature map) plus every node whose name starts with one
    of ``float_prefixes``: the nodes quantize_static leaves in float."""
    import onnx

    names = [node.name for node in onnx.load(str(path)).graph.node]
    chosen = [name for name in names if any(name.startswith(prefix) for prefix in float_prefixes)]
    missing = [prefix for prefix in float_prefixes if not any(name.startswith(prefix) for name in names)]
    if missing:
        raise RuntimeError(f"{path}: no nodes named {missing}*; the graph changed, update the int8 recipe")
    head = _head_nodes(path)
    return head + [name for name in chosen if name not in head]


def _head_nodes(path: Path) -> list[str]:
    """Names of the nodes downstream of the feature map (pooling, flatten, linear, squeeze). Kept in
    float: they are a negligible share of the compute, and quantising the logit itself flips labels
    near the threshold once the temperature sharpens it."""
    import onnx

    graph = onnx.load(str(path)).graph
    downstream, names = {FEATURES_NAME}, []
    for node in graph.node:  # ONNX graphs are topologically sorted
        if any(name in downstream for name in node.input):
            downstream.update(node.output)
            names.append(node.name)
    if not names:
        raise RuntimeError(f"{path}: no nodes read the feature map {FEATURES_NAME!r}")
    return names


def _input_quantisation(path: Path) -> tuple[float, int]:
    """Scale and zero point of the QuantizeLinear that reads the graph input."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == INPUT_NAME:
            return float(constants[node.input[1]]), int(constants[node.input[2]])
    raise RuntimeError(f"{path}: no QuantizeLinear on the input {INPUT_NAME!r}; the int8 graph is not static QDQ")
