"""Runtimes for exported artefacts, all with the reference model's generation API.

``load(path)`` picks the backend from the artefact: an export directory or ``.onnx`` file →
ONNX Runtime (`OrtModel`), a ``.engine`` → TensorRT (`TrtModel`, needs TensorRT + a GPU).
"""

from hybridtrt.runtime.loader import load

__all__ = ["load"]
