"""hybridtrt: hybrid Mamba-2 + Transformer models from PyTorch to ONNX and TensorRT, with proof."""

__version__ = "0.1.0"

#: Version of the artefact contract (DESIGN.md): graph I/O names, state layouts, op signatures.
CONTRACT_VERSION = 2  # 2: hybridtrt.json records size and sha256 of every file (`files`)
