"""Fine-tuning a pretrained run: chat SFT on conversations (built-in stdlib questions or JSONL), LoRA, layer freezing."""
