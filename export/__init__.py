"""Export a PneuNet checkpoint for small devices: ONNX and TFLite, fp32 and int8, with a sidecar JSON
and a parity gate against PyTorch.

    python -m export --checkpoint pneunet/weights/pneunet.safetensors --out edge/models
    python -m export.benchmark          # speed, size and memory report: docs/edge_benchmark.md
"""
