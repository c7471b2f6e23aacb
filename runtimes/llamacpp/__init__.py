"""llama.cpp path: GGUF writing / quantization, and SCR through ggml's eval callback (work in progress, issue 4)."""
