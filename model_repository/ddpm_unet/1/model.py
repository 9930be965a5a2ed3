"""Triton python-backend model: a single-shot ONNX model (serving.triton_backend.SingleShotModel).

The same file serves the three GAN generators and ddpm_unet; input and output names come from config.pbtxt.
"""
import sys
from pathlib import Path

try:
    from serving.triton_backend import SingleShotModel as TritonPythonModel  # noqa: F401
except ImportError:  # repository checkout without `pip install -e .`: model_repository/<model>/1/model.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from serving.triton_backend import SingleShotModel as TritonPythonModel  # noqa: F401
