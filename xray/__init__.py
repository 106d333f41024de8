"""The pneumonia X-ray assistant's engine: loading, model, training, inference, Grad-CAM, metrics,
model registry. Never imports streamlit."""
from .imageio import XrayImage, load_image
from .inference import Prediction, predict
from .registry import LoadedModel, ModelFileError, Registry

__all__ = ["XrayImage", "load_image", "Prediction", "predict", "LoadedModel", "ModelFileError", "Registry"]
