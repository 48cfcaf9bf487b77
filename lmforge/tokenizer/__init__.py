"""Byte-level BPE tokenizers (Hugging Face `tokenizers` format) and encoding corpora into token shards."""

from lmforge.tokenizer.bpe import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    END,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    SYSTEM,
    USER,
    StreamDecoder,
    Tokenizer,
    train_tokenizer,
)
from lmforge.tokenizer.shards import encode_corpus, load_tokens, read_token_meta, token_dtype

__all__ = [
    "ASSISTANT",
    "BOS",
    "CHAT_TEMPLATE",
    "END",
    "EOS",
    "PAD",
    "SPECIAL_TOKENS",
    "SYSTEM",
    "USER",
    "StreamDecoder",
    "Tokenizer",
    "encode_corpus",
    "load_tokens",
    "read_token_meta",
    "token_dtype",
    "train_tokenizer",
]
