"""PneuNet on small devices: an exported model (ONNX or TFLite) + numpy + Pillow, never torch.

    python -m edge.run IMAGE_OR_FOLDER... [--model PATH] [--csv out.csv] [--cam OUT_DIR]
"""
