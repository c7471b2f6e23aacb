"""Export wrappers: the language decoder with KV cache (inputs_embeds in), vision encoder, token embeddings."""
