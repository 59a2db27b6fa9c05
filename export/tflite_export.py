"""PyTorch -> TFLite fp32 and int8 with litert-torch. Runs in the converter environment (.venv-tflite,
see export/requirements-tflite.txt), called by ``python -m export``; by hand:

    .venv-tflite/bin/python -m export.tflite_export --checkpoint CKPT --out DIR [--calibration-images 300]

Writes model_fp32.tflite, model_int8.tflite and tflite_facts.json (what the sidecar needs to know).
Input (1, H, W, channels) float32 (NHWC: TFLite's layout); outputs the pneumonia logit (1,) and the
feature map (1, h, w, C). int8: PT2E static quantisation (per-channel int8 weights, int8 activations
from histogram observers on real preprocessed training images; a convolution + ReLU6 is observed after the
ReLU6, see _move_relu6_observers; for a model trained on lung fields, the lung-suppressed inputs of
``pneunet.lungs.model_view``, cut by the checkpoint's segmenter on onnxruntime) of everything except the
modules in FLOAT_MODULES, which stay float32
(the same choice as the ONNX int8 export); the converter makes the input int8 (the runner quantises with
the model's own scale and zero point), the outputs stay float32.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import torch

from export.calibration import DEFAULT_CALIBRATION_IMAGES, calibration_inputs
from export.graph import edge_graph
from pneunet.checkpoint import load_checkpoint
from pneunet.predictor import load_lung_finder

# Kept float32 in the int8 model, as in the ONNX int8 export (export.onnx_export.INT8_RECIPE): the
# classifier head (pooling + linear: the logit). Module paths inside PneuNetModel. conv_head (the 1x1
# convolution that makes the feature map) is int8: keeping it float changed nothing on the 652 validation
# images (agreement 99.39 %, logit RMSE 0.233, heatmap r 0.975 either way; a one-off comparison, not a repo
# script) and made the file 5.2 MB, not 4.0.
FLOAT_MODULES = ("head",)


def _quantised_node_filter(float_modules: tuple[str, ...]):
    """fx-node filter: True for nodes that are not inside one of ``float_modules`` (matched as whole
    dotted path segments, so "head" is the classifier and not "conv_head")."""
    pattern = re.compile(r"(^|\.)(" + "|".join(re.escape(name) for name in float_modules) + r")(\.|$)")

    def keep(node) -> bool:
        for path, _ in node.meta.get("nn_module_stack", {}).values():
            path = re.sub(r"^L\['self'\]\.?", "", str(path))
            if pattern.search(path):
                return False
        return True

    return keep


def _move_relu6_observers(model, node_filter) -> None:
    """Give each ReLU6 after an annotated convolution its own output observer, taken off the convolution.

    Why: litert-torch's "conv_relu" pattern knows only aten.relu; EfficientNet-Lite's ReLU6 is aten.hardtanh,
    which its propagate_annotation makes *share* the convolution's observer. The clamped [0, 6] output then
    gets the pre-activation scale (e.g. [-67, 81]: ~23 of 256 levels left, 8 after some depthwise convs),
    which cost ~6x the error the quantisation needs (validation logit RMSE 1.49, bias -1.09, measured once
    outside the repo; docs/export_parity.md before the fix: agreement 98.16 %, heatmap r 0.849). Observing the
    ReLU6 output instead, as "conv_relu" does for ReLU, gives TFLite's fused conv + RELU6 its real range.
    """
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    convs = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)
    relu6 = (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default)
    for node in model.graph.nodes:
        is_relu6 = node.op == "call_function" and node.target in relu6 and tuple(node.args[1:3]) == (0.0, 6.0)
        conv = node.args[0] if is_relu6 else None
        annotation = getattr(conv, "meta", {}).get("quantization_annotation")
        if (conv is None or conv.target not in convs or len(conv.users) != 1 or annotation is None
                or annotation.output_qspec is None or not node_filter(node)):
            continue
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            output_qspec=annotation.output_qspec, _annotated=True)
        annotation.output_qspec = None


def _quantizer(float_modules: tuple[str, ...]):
    """litert-torch's PT2E quantizer (int8, per-channel symmetric weights, static activations) that leaves
    ``float_modules`` unannotated, i.e. float, and fuses convolution + ReLU6 (``_move_relu6_observers``).
    Its own set_module_name cannot name them: it rebuilds module paths from nn_module_stack keys by turning
    every "_" into ".", so "conv_head" never matches."""
    from litert_torch.quantize import pt2e_quantizer

    node_filter = _quantised_node_filter(float_modules)

    class _PartialQuantizer(pt2e_quantizer.PT2EQuantizer):
        def _annotate_for_static_quantization_config(self, model):
            self._annotate_all_static_patterns(model, self.global_config, node_filter)
            _move_relu6_observers(model, node_filter)  # before propagate_annotation shares them
            return model

    return _PartialQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))


def convert(checkpoint: Path, out_dir: Path, calibration_images: int, seed: int = 0) -> dict:
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import quantize_pt2e

    model, config = load_checkpoint(checkpoint)
    graph = edge_graph(model, config, features_layout="NHWC")
    # NHWC input; with one channel it is the same bytes as NCHW, so the runner only reshapes.
    graph = litert_torch.to_channel_last_io(graph, args=[0]).eval()
    example = (torch.zeros(1, config.image_size, config.image_size, config.channels),)
    out_dir.mkdir(parents=True, exist_ok=True)

    litert_torch.convert(graph, example).export(str(out_dir / "model_fp32.tflite"))

    quantizer = _quantizer(FLOAT_MODULES)
    prepared = quantize_pt2e.prepare_pt2e(torch.export.export(graph, example).module(), quantizer)
    inputs, paths = calibration_inputs(config, calibration_images, seed=seed, lungs=load_lung_finder(checkpoint, config))
    with torch.no_grad():
        for model_input in inputs:  # the exported graph has batch 1
            prepared(torch.from_numpy(model_input).permute(1, 2, 0)[None])
    quantized = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    litert_torch.convert(quantized, example, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(
        str(out_dir / "model_int8.tflite"))

    facts = {
        "converter": f"litert-torch {litert_torch.__version__}",
        "source_checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        "quantization": {
            "tool": "litert-torch PT2E (torchao prepare_pt2e / convert_pt2e)",
            "activations": "int8, affine, per-tensor (histogram observer; conv + ReLU6 observed after the ReLU6)",
            "weights": "int8, symmetric, per-channel",
            "float_modules": list(FLOAT_MODULES),
            "float_nodes": "the classifier head (pooling, linear: the logit) stays float32; everything before "
                           "it, conv_head (the feature map) included, is int8",
            "calibration_images": len(paths),
            "calibration_split": "train",
            "calibration_seed": seed,
            "calibration_inputs": "pneunet.lungs.model_view" + (" (lung-suppressed)" if config.lungs else ""),
            "io": "int8 in (scale and zero point in the model: the runner quantises), float32 out",
        },
    }
    (out_dir / "tflite_facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model .safetensors")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
                        help="training images for int8 calibration (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="calibration sample seed (default: %(default)s)")
    return parser


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    convert(Path(args.checkpoint), Path(args.out), args.calibration_images, args.seed)
