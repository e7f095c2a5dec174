"""Inference: a Backend runs an ONNX model (TensorRT, CUDA or CPU via ONNX Runtime), the slot serves one."""
