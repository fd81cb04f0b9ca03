"""ONNX: export of converted models, the ONNX front end and convert_onnx, ONNX Runtime (README.md here)."""
