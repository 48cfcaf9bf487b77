"""Train, load and use the byte-level BPE tokenizer.

The tokenizer is stored in Hugging Face's own format (``tokenizer.json`` plus the two small config files
``transformers`` reads), so an exported model loads with ``AutoTokenizer.from_pretrained`` and no custom
code. Encoding is exact for every Unicode string: there is no normalizer, every byte is in the initial
alphabet, and special-token strings typed in ordinary text are encoded as text, never as control tokens.
"""

from __future__ import annotations

import codecs
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge import artifacts
from lmforge.config import TokenizerConfig
from lmforge.errors import LmforgeError

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
# The order fixes the ids: BOS is 0, EOS is 1, ... END is 6, whatever the corpus.
SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# Each message is its role token, its content and <|end|>; a generation prompt opens an assistant turn.
# No BOS here: callers that build training sequences add it themselves, as for plain documents.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat roles must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
CHAT_ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# transformers' own "no limit" value; the export stage may set the model's context length instead.
UNLIMITED_LENGTH = int(1e30)


def _new_byte_level_bpe() -> HFTokenizer:
    tokenizer = HFTokenizer(models.BPE())
    # No normalizer: decoding must give back exactly the text that was encoded.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _train_texts(data_dir: Path, counts: dict[str, int]) -> Iterator[str]:
    """Stream the train split's texts, counting documents and characters on the way."""
    from lmforge.data.stage import iter_documents

    for document in iter_documents(data_dir, "train"):
        counts["documents"] += 1
        counts["characters"] += len(document["text"])
        yield document["text"]


def train_tokenizer(config: TokenizerConfig, data_dir: Path, out_dir: Path, progress: bool = True) -> dict:
    """Train a byte-level BPE on the data folder's train split and write it to ``out_dir``.

    Returns the manifest. The vocabulary may come out smaller than ``config.vocab_size`` when the corpus
    has too few distinct pairs; the manifest records the size actually reached.
    """
    data_manifest = artifacts.read_manifest(data_dir, "data")
    started = time.perf_counter()
    tokenizer = _new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # The Rust progress bar writes blank lines when stderr is a log file rather than a terminal.
        show_progress=progress and sys.stderr.isatty(),
    )
    counts = {"documents": 0, "characters": 0}
    expected_documents = data_manifest["stats"].get("train_documents")  # only sizes the progress bar
    tokenizer.train_from_iterator(_train_texts(data_dir, counts), trainer=trainer, length=expected_documents)
    if counts["documents"] == 0:
        raise LmforgeError(f"the train split of {data_dir} has no documents to train a tokenizer on")

    out_dir = artifacts.fresh_folder(out_dir)
    artifacts.atomic_write_text(out_dir / TOKENIZER_FILE, tokenizer.to_str(pretty=True))
    _write_transformers_config(out_dir)
    stats = {
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "requested_vocab_size": config.vocab_size,
        "special_tokens": len(SPECIAL_TOKENS),
        "train_documents": counts["documents"],
        "train_characters": counts["characters"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    return artifacts.write_manifest(
        out_dir, "tokenizer", config.model_dump(mode="json"), inputs={"data": data_manifest["fingerprint"]}, stats=stats
    )


def _write_transformers_config(folder: Path, model_max_length: int = UNLIMITED_LENGTH) -> None:
    """The files that let ``transformers.AutoTokenizer`` load ``tokenizer.json`` with no custom code."""
    special_tokens_map = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END],
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens_map,
        # Byte-level BPE can encode every string, so there is no unknown token.
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    artifacts.atomic_write_json(folder / SPECIAL_TOKENS_MAP_FILE, special_tokens_map)
    artifacts.atomic_write_json(folder / TOKENIZER_CONFIG_FILE, tokenizer_config)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that stands for it in byte-level tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    next_free = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_free)
            next_free += 1
    return mapping


class StreamDecoder:
    """Turns token ids into text one id at a time, for streaming generation.

    A byte-level token can end in the middle of a multi-byte UTF-8 character; those bytes are held back
    until the character is complete, so no replacement character ever appears for a split character.
    Bytes that can never form a character decode to U+FFFD.
    """

    def __init__(self, token_bytes: list[bytes]):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token (often empty, never a partial character)."""
        return self._utf8.decode(self._token_bytes[token_id])

    def flush(self) -> str:
        """Whatever is still held back at the end of generation (replacement characters, if any)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """A trained lmforge tokenizer: exact encoding and decoding, plus the special-token ids."""

    def __init__(self, hf_tokenizer: HFTokenizer, source: str = "<memory>"):
        self._check_special_tokens(hf_tokenizer, source)
        # Special-token strings in user text are encoded as ordinary text, so a document that mentions
        # "<|eos|>" cannot end itself early and decode(encode(s)) == s holds for every string.
        hf_tokenizer.encode_special_tokens = True
        self._tokenizer = hf_tokenizer
        self.bos_id = hf_tokenizer.token_to_id(BOS)
        self.eos_id = hf_tokenizer.token_to_id(EOS)
        self.pad_id = hf_tokenizer.token_to_id(PAD)
        self._token_bytes = self._build_token_bytes()

    @staticmethod
    def _check_special_tokens(hf_tokenizer: HFTokenizer, source: str) -> None:
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            found = hf_tokenizer.token_to_id(token)
            if found != expected_id:
                raise LmforgeError(f"{source} is not an lmforge tokenizer: {token} has id {found}, expected {expected_id}")

    @classmethod
    def load(cls, folder: Path) -> "Tokenizer":
        """Load from a folder holding ``tokenizer.json`` (a tokenizer stage, checkpoint or export folder)."""
        path = Path(folder) / TOKENIZER_FILE
        if not path.exists():
            raise LmforgeError(f"tokenizer file not found: {path}; run `lmforge tokenizer` first")
        try:
            hf_tokenizer = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception for any parse error
            reason = " ".join(str(exc).split())
            raise LmforgeError(f"tokenizer file is corrupt: {path}: {reason}") from None
        return cls(hf_tokenizer, source=str(path))

    def save(self, folder: Path, model_max_length: int = UNLIMITED_LENGTH) -> None:
        """Write the tokenizer files (not a manifest) into ``folder``, e.g. a checkpoint or export folder."""
        folder = Path(folder)
        artifacts.atomic_write_text(folder / TOKENIZER_FILE, self._tokenizer.to_str(pretty=True))
        _write_transformers_config(folder, model_max_length)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of a token string such as ``"<|user|>"``."""
        found = self._tokenizer.token_to_id(token)
        if found is None:
            raise LmforgeError(f"token {token!r} is not in the vocabulary")
        return found

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS are added and special-token strings stay plain text."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Like ``encode`` for many texts, spread over the tokenizers thread pool."""
        # The "fast" variant skips computing character offsets, which we never use.
        return [encoding.ids for encoding in self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens decode to their strings, nothing is skipped or cleaned up."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
        """Ids of a conversation laid out as ``CHAT_TEMPLATE`` renders it (no BOS)."""
        end_id = self.token_id(END)
        ids: list[int] = []
        for message in messages:
            role_token = CHAT_ROLES.get(message["role"])
            if role_token is None:
                raise LmforgeError(f"chat roles must be system, user or assistant, got {message['role']!r}")
            ids += [self.token_id(role_token), *self.encode(message["content"]), end_id]
        if add_generation_prompt:
            ids.append(self.token_id(ASSISTANT))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a single token stands for (may be part of a UTF-8 character)."""
        return self._token_bytes[token_id]

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder; see ``StreamDecoder``."""
        return StreamDecoder(self._token_bytes)

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield text as ids arrive, holding back partial characters; the pieces join to ``decode(ids)``."""
        decoder = self.stream_decoder()
        for token_id in ids:
            if piece := decoder.push(token_id):
                yield piece
        if tail := decoder.flush():
            yield tail

    def _build_token_bytes(self) -> list[bytes]:
        byte_of_char = {char: byte for byte, char in _bytes_to_unicode().items()}
        token_bytes = [b""] * self.vocab_size
        special = set(SPECIAL_TOKENS)
        for token, token_id in self._tokenizer.get_vocab(with_added_tokens=True).items():
            if token in special:
                token_bytes[token_id] = token.encode("utf-8")
            else:
                token_bytes[token_id] = bytes(byte_of_char[char] for char in token)
        return token_bytes

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

