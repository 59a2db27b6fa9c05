"""PneuNet: pneumonia screening on chest X-rays (normal / pneumonia, calibrated probability, heatmap).

    import pneunet
    predictor = pneunet.load_predictor()   # the bundled model
    predictor.predict("xray.jpeg").pneumonia_probability

Not a medical device; not for diagnosis.
"""

from pneunet.config import ModelConfig
from pneunet.preprocessing import InvalidImageError

__all__ = ["ModelConfig", "InvalidImageError", "load_predictor"]


def load_predictor(checkpoint=None, device: str = "cpu"):
    """Load a checkpoint (default: the shipped model) into a ready ``Predictor``."""
    from pneunet.predictor import Predictor  # torch is imported only when a model is needed

    return Predictor.load(checkpoint, device)
