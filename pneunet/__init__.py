"""PneuNet: pneumonia screening on chest X-rays (normal / pneumonia, calibrated probability, heatmap).

    import pneunet
    predictor = pneunet.load_predictor()   # the bundled model
    predictor.predict("xray.jpeg").pneumonia_probability

Not a medical device; not for diagnosis.
"""

from pneunet.config import ModelConfig
from pneunet.preprocessing import InvalidImageError

__all__ = ["ModelConfig", "InvalidImageError", "load_predictor"]


def load_predictor(model=None, backend: str = "auto"):
    """Load a model (default: the served export of the shipped model; ``pneunet.backends.default_model``)
    into a ready ``Predictor``. ``model`` may be an export (.onnx, .tflite) or a checkpoint (.safetensors)."""
    from pneunet.predictor import Predictor

    return Predictor.load(model, backend)
