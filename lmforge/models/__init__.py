"""Model families. The decoder is Llama-compatible and uses Hugging Face Llama parameter names."""
