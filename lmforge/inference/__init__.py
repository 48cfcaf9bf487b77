"""Generation: KV cache and sampling."""
