"""Deployed runtimes: ONNX Runtime (CPU / CUDA, float and quantized graphs), TensorRT (engines from the same ONNX
graphs, the SCR plugin) and llama.cpp (GGUF with SCR hooks); the SCR kernels they share are in ``kernels``."""
