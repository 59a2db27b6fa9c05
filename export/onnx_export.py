"""PyTorch -> ONNX fp32, and ONNX fp32 -> int8 (static QDQ, per-channel) with onnxruntime.quantization."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from export.graph import FEATURES_NAME, INPUT_NAME, LOGIT_NAME, EdgeGraph

OPSET = 17
CALIBRATION_BATCH = 16
# Activation ranges from the 99.99th percentile rather than min/max: a few outlier activations otherwise
# stretch the scale and cost resolution everywhere (validation only: see FLOAT_NODE_PREFIXES). Memory:
# onnxruntime's histogram calibrators hold every activation of every calibration image (~17 GB for 300).
CALIBRATION_PERCENTILE = 99.99
# Nodes kept float32 besides the classifier head (pooling, linear), by ONNX node-name prefix; chosen on
# the 652 validation images only (edge/README.md, "Status"): conv_head makes the feature map that the
# heatmap, the pooled logit and the input gate all read. Keeping blocks.6 float as well changed nothing
# on validation (agreement 99.08 % either way with MinMax), so it stays int8; Percentile beat MinMax
# (99.23 % vs 99.08 %, logit RMSE 0.40 vs 0.43).
FLOAT_NODE_PREFIXES = ("/features/conv_head/",)


def export_onnx_fp32(graph: EdgeGraph, image_size: int, channels: int, path: Path) -> None:
    """One self-contained .onnx file with a dynamic batch axis; input NCHW float32."""
    if graph.features_layout != "NCHW":
        raise ValueError("the ONNX export keeps NCHW features (ONNX's native layout)")
    example = torch.zeros(2, channels, image_size, image_size)
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is deprecated but needs no onnxscript and exports this
        # graph exactly; its deprecation and constant-folding notes are noise for this graph.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
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


def quantize_onnx_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> dict:
    """Static QDQ quantisation: uint8 asymmetric activations and uint8 asymmetric per-channel weights,
    percentile ranges from ``calibration`` (real preprocessed training images). Returns the quantisation
    facts for the sidecar, including the input's scale and zero point.

    Why uint8 weights, not int8: x86 CPUs without VNNI run uint8 x int8 products with VPMADDUBSW, whose
    int16 pair sums saturate with full-range int8 weights (on a trained Lite0: heatmap r 0.76 against
    fp32); the usual cure, 7-bit weights (``reduce_range``), costs accuracy here (heatmap r 0.92), while
    uint8 x uint8 kernels do not saturate and match onnxruntime's reference arithmetic (heatmap r 0.985,
    logit r 0.995, measured on 32 validation images).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Shape inference + graph optimisation first (BN folding, constant folding of the pad tables),
        # as onnxruntime recommends; quantising an unoptimised graph places Q/DQ pairs badly.
        quant_pre_process(str(fp32_path), str(prepared))
        float_nodes = _float_nodes(prepared)
        quantize_static(
            str(prepared), str(int8_path), _CalibrationReader(calibration),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.Percentile, extra_options={"CalibPercentile": CALIBRATION_PERCENTILE},
            nodes_to_exclude=float_nodes,
        )
    scale, zero_point = _input_quantisation(int8_path)
    return {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "activations": "uint8, asymmetric, per-tensor",
        "weights": "uint8, asymmetric, per-channel (uint8 x uint8 kernels: no VPMADDUBSW saturation on x86 without VNNI)",
        "calibration_method": f"Percentile {CALIBRATION_PERCENTILE}",
        "float_nodes": "the classifier head after the feature map (pooling, linear: the logit stays float) and "
                       + ", ".join(f"{prefix}*" for prefix in FLOAT_NODE_PREFIXES) + " (the feature map stays float)",
        "float_node_names": float_nodes,
        "input_scale": scale,
        "input_zero_point": zero_point,
        "io": "float32 in, float32 out (Q/DQ inside the graph)",
    }


def _float_nodes(path: Path, float_prefixes: tuple[str, ...] = FLOAT_NODE_PREFIXES) -> list[str]:
    """The head (everything downstream of the feature map) plus every node whose name starts with one
    of ``float_prefixes``: the nodes quantize_static leaves in float."""
    import onnx

    names = [node.name for node in onnx.load(str(path)).graph.node]
    chosen = [name for name in names if any(name.startswith(prefix) for prefix in float_prefixes)]
    missing = [prefix for prefix in float_prefixes if not any(name.startswith(prefix) for name in names)]
    if missing:
        raise RuntimeError(f"{path}: no nodes named {missing}*; the graph changed, update FLOAT_NODE_PREFIXES")
    return _head_nodes(path) + [name for name in chosen if name not in _head_nodes(path)]


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
