"""Exchange with other ecosystems: export to Hugging Face ``transformers``."""
