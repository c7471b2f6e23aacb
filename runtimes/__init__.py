"""Deployed runtimes: ONNX Runtime (CPU / CUDA) now; TensorRT and llama.cpp arrive with their issues."""
