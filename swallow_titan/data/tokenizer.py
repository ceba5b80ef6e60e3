"""The project's tokenizers: Llama 3 on tiktoken, Qwen on Hugging Face ``tokenizers``.

``load_tokenizer`` picks the family (``[model] tokenizer_kind``, "auto" reads
the file, see ``detect_tokenizer_kind``). Every tokenizer here exposes the same
small interface the data pipeline uses: ``encode_ordinary``, ``encode_batch``,
``decode``, ``bos_id`` (None for a family without one), ``eos_id`` and
``n_words``.

Llama 3
-------

Llama 3 ships its vocabulary twice: ``tokenizer.model`` (tiktoken's format:
one ``base64(token bytes) rank`` pair per line) and ``tokenizer.json`` (Hugging
Face byte-level BPE, where each byte is written as a printable unicode
character). Both load here into the same tiktoken encoding: the BPE ranks, Llama
3's pre-tokenisation regex and 256 special tokens placed right after the ranks
(``<|begin_of_text|>`` = first special id, ``<|end_of_text|>`` = second).

Documents are encoded as ordinary text: a document that merely contains
``<|end_of_text|>`` gets the ids of those characters, never the special id.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken
from torchtitan.components.tokenizer import BaseTokenizer

# Llama 3's pre-tokenisation regex (from its tokenizer.json "Split" pre-tokenizer).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"

# The named special tokens of Llama 3.1 in id order after the BPE ranks; the
# remaining slots are "<|reserved_special_token_N|>".
_NAMED_SPECIAL_TOKENS = (
    BOS_TOKEN,
    EOS_TOKEN,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)

# Where generation ends: Llama-3.1-Instruct's generation_config.json
# ``eos_token_id`` list (end of text, end of message, end of turn), at which
# transformers' ``generate`` (lm-eval's ``hf`` model) stops.
END_OF_GENERATION_TOKENS = (EOS_TOKEN, "<|eom_id|>", "<|eot_id|>")

# tiktoken needs a long run of identical characters cut into pieces, or its
# regex engine panics (pyo3 PanicException, not an Exception) at about 1M spaces.
_MAX_CHARS_PER_PIECE = 100_000


class TokenizerFileError(ValueError):
    """A tokenizer file is missing or malformed; the message names the file."""


def llama3_special_tokens() -> list[str]:
    """The 256 special token strings of Llama 3.1, in id order."""
    reserved = (
        f"<|reserved_special_token_{i}|>"
        for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
    )
    return [*_NAMED_SPECIAL_TOKENS, *reserved]


def _byte_level_decoder() -> dict[str, int]:
    """Map the printable characters of byte-level BPE back to byte values.

    Byte-level BPE writes bytes that are printable Latin-1 as themselves and
    moves the others (controls, space, ...) to code points from 256 upwards, in
    byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    chars = list(printable)
    moved = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + moved)
            moved += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = _byte_level_decoder()


def bytes_from_byte_level(token: str) -> bytes:
    """The bytes a byte-level BPE token string stands for."""
    return bytes(_BYTE_DECODER[ch] for ch in token)


def byte_level_from_bytes(data: bytes) -> str:
    """The byte-level BPE spelling of ``data`` (inverse of bytes_from_byte_level)."""
    encoder = {b: ch for ch, b in _BYTE_DECODER.items()}
    return "".join(encoder[b] for b in data)


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken ``.model`` file: lines of ``base64(token) rank``."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerFileError(
                    f"{path}:{lineno}: expected 'base64-token rank', got {line[:80]!r}"
                )
            try:
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except (binascii.Error, ValueError) as e:
                raise TokenizerFileError(f"{path}:{lineno}: {e}") from e
    _check_ranks(ranks, path)
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: Path) -> None:
    """Write ranks in tiktoken's ``.model`` format, ordered by rank."""
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


def read_tokenizer_json(path: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Read the BPE ranks and special tokens of a byte-level ``tokenizer.json``.

    Returns (ranks, specials). Special tokens are taken from ``added_tokens``;
    those whose ids lie beyond the 256 slots after the ranks (for example Llama
    3.2's ``<|image|>`` at 128256) are left out, since no Llama 3 text model
    has an embedding for them.
    """
    spec = _read_json(path)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerFileError(
            f"{path}: field 'model' must be a byte-level BPE model with a 'vocab'"
        )
    try:
        ranks = {bytes_from_byte_level(tok): rank for tok, rank in model["vocab"].items()}
    except KeyError as e:
        raise TokenizerFileError(
            f"{path}: field 'model.vocab' holds a token that is not byte-level BPE "
            f"(character {e})"
        ) from e
    _check_ranks(ranks, path)
    first_special = len(ranks)
    specials = {
        tok["content"]: tok["id"]
        for tok in spec.get("added_tokens", [])
        if first_special <= tok["id"] < first_special + NUM_SPECIAL_TOKENS
    }
    return ranks, specials


def _check_ranks(ranks: dict[bytes, int], path: Path) -> None:
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerFileError(f"{path}: ranks must be exactly 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerFileError(
            f"{path}: {len(missing)} single bytes have no rank (e.g. {missing[0]}); "
            "byte-level BPE needs all 256"
        )


def find_tokenizer_file(hf_assets_path: str | os.PathLike) -> Path:
    """Locate the tokenizer inside an HF-style model folder.

    Looks, in order, for ``original/tokenizer.model``, ``tokenizer.model`` and
    ``tokenizer.json`` (a direct path to one of those files also works).
    """
    root = Path(hf_assets_path)
    if root.is_file():
        return root
    candidates = [
        root / "original" / "tokenizer.model",
        root / "tokenizer.model",
        root / "tokenizer.json",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if not root.exists():
        raise TokenizerFileError(
            f"[model] hf_assets_path = {str(root)!r} does not exist; it must name a "
            "folder holding tokenizer.model or tokenizer.json"
        )
    raise TokenizerFileError(
        f"[model] hf_assets_path = {str(root)!r} holds no tokenizer: looked for "
        + ", ".join(str(c) for c in candidates)
    )


class Llama3Tokenizer(BaseTokenizer):
    """Llama 3 tokenizer (tiktoken BPE + Llama 3 regex + 256 special tokens).

    Works for any vocabulary in that layout, including the small one shipped
    for the CPU example, whose special ids start right after its ranks.
    """

    def __init__(self, path: str | os.PathLike, num_threads: int = 1):
        super().__init__()
        self.path = find_tokenizer_file(path)
        if self.path.suffix == ".json":
            ranks, specials = read_tokenizer_json(self.path)
        else:
            ranks, specials = read_tiktoken_ranks(self.path), {}
        n_ranks = len(ranks)
        default_specials = {
            tok: n_ranks + i for i, tok in enumerate(llama3_special_tokens())
        }
        # tokenizer.json may rename slots; fill any it leaves out with defaults.
        taken = set(specials.values())
        for tok, idx in default_specials.items():
            if idx not in taken and tok not in specials:
                specials[tok] = idx
        if BOS_TOKEN not in specials or EOS_TOKEN not in specials:
            # E.g. Qwen's tokenizer.json, whose <|endoftext|> takes Llama's BOS slot.
            raise TokenizerFileError(
                f"{self.path}: not a Llama 3 tokenizer ({BOS_TOKEN!r} and {EOS_TOKEN!r} "
                "are not among its special tokens); load it with load_tokenizer, which "
                "reads the family from the file"
            )
        self.special_tokens = specials
        self.num_threads = num_threads
        self._encoding = tiktoken.Encoding(
            name=self.path.parent.name or "llama3",
            pat_str=LLAMA3_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=specials,
        )
        self.n_words = n_ranks + NUM_SPECIAL_TOKENS
        self.bos_id = specials[BOS_TOKEN]
        self.eos_id = specials[EOS_TOKEN]

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False
    ) -> list[int]:
        """Encode ``text`` as ordinary text, optionally wrapped in BOS/EOS."""
        ids = self.encode_ordinary(text)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings are plain text here."""
        if len(text) <= _MAX_CHARS_PER_PIECE:
            return self._encoding.encode_ordinary(text)
        return [
            i
            for piece in _split_long_text(text)
            for i in self._encoding.encode_ordinary(piece)
        ]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many documents; uses ``num_threads`` tiktoken threads."""
        if all(len(t) <= _MAX_CHARS_PER_PIECE for t in texts):
            return self._encoding.encode_ordinary_batch(
                list(texts), num_threads=self.num_threads
            )
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode(list(ids))

    def decode_text(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` without the special tokens, as transformers'
        ``decode(skip_special_tokens=True)`` gives it (every Llama 3 special
        token is marked special; their ids follow the BPE ranks)."""
        return self.decode([i for i in ids if i < self.bos_id])

    def get_vocab_size(self) -> int:
        return self.n_words

    @property
    def end_of_generation_ids(self) -> list[int]:
        """Ids at which generation stops (:data:`END_OF_GENERATION_TOKENS` this vocabulary has)."""
        return [self.special_tokens[t] for t in END_OF_GENERATION_TOKENS if t in self.special_tokens]


def _split_long_text(text: str) -> Iterable[str]:
    """Cut very long text into pieces at the last newline (or space) of each window.

    Cutting at whitespace keeps the token sequence almost identical to
    encoding the whole text; cutting is needed only for texts longer than
    _MAX_CHARS_PER_PIECE, where tiktoken's regex can exhaust its stack.
    """
    start = 0
    while start < len(text):
        end = min(start + _MAX_CHARS_PER_PIECE, len(text))
        if end < len(text):
            cut = max(text.rfind("\n", start, end), text.rfind(" ", start, end))
            if cut > start:
                end = cut
        yield text[start:end]
        start = end


# Qwen2, Qwen2.5 and Qwen3 share one vocabulary: 151,643 byte-level BPE tokens,
# then the added tokens, the first of which ends a document.
QWEN_EOS_TOKEN = "<|endoftext|>"

# Where generation ends for Qwen: the end of a document and the end of a chat
# turn, the ``eos_token_id`` list of Qwen3's (post-trained) generation_config.json,
# as END_OF_GENERATION_TOKENS takes Llama-3.1-Instruct's.
QWEN_END_OF_GENERATION_TOKENS = (QWEN_EOS_TOKEN, "<|im_end|>")

TOKENIZER_KINDS = ("llama3", "qwen")


class QwenTokenizer(BaseTokenizer):
    """Qwen's byte-level BPE ``tokenizer.json`` on Hugging Face ``tokenizers``.

    Why not tiktoken, as for Llama 3: the file declares an NFC normalizer, and
    Python's ``unicodedata`` (Unicode 14 on Python 3.11) composes some runs of
    combining marks differently from the Rust normalizer ``tokenizers`` uses
    (for example U+0898 U+0899); and the file lists one merge per token, while
    tiktoken merges any adjacent pair whose concatenation is a token (142,779
    such extra splits in Qwen's vocabulary), so equal ids are not guaranteed by
    construction. ``tokenizers`` reading the file itself is exact by definition.

    Added tokens (``<|endoftext|>``, ``<|im_start|>``, ``<think>``, ...) get
    their ids only where the pipeline puts them (the end of a document): a
    document that contains their strings is encoded as the text it is. Qwen
    has no BOS (``bos_id`` is None); ``<|endoftext|>`` ends every document.
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        super().__init__()
        from tokenizers import Tokenizer  # the runtime dependency of this family only

        root = Path(path)
        self.path = root if root.is_file() else root / "tokenizer.json"
        if self.path.suffix != ".json" or not self.path.is_file():
            raise TokenizerFileError(
                f"{self.path}: the qwen tokenizer reads a tokenizer.json (a file, or the "
                "HF-style folder holding it); [model] tokenizer_kind = \"auto\" picks "
                "the family from the files there"
            )
        spec = _read_json(self.path)
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise TokenizerFileError(
                f"{self.path}: field 'model' must be a byte-level BPE model with a 'vocab'"
            )
        added = spec.get("added_tokens") or []
        try:
            specials = {tok["content"]: int(tok["id"]) for tok in added}
        except (KeyError, TypeError, ValueError) as e:
            raise TokenizerFileError(
                f"{self.path}: field 'added_tokens' entries need 'content' and 'id' ({e})"
            ) from e
        if QWEN_EOS_TOKEN not in specials:
            raise TokenizerFileError(
                f"{self.path}: field 'added_tokens' has no {QWEN_EOS_TOKEN!r}, which "
                "ends every Qwen document"
            )
        n_ordinary = len(model["vocab"])
        if min(specials.values()) < n_ordinary:
            raise TokenizerFileError(
                f"{self.path}: field 'added_tokens' reuses ids below {n_ordinary:,} "
                "(the BPE vocabulary's)"
            )
        # Without its added tokens the file's normalizer, pre-tokenizer and BPE
        # still apply, and no string in a document can become a special id.
        ordinary = dict(spec, added_tokens=[])
        try:
            self._hf = Tokenizer.from_str(json.dumps(ordinary))
        except Exception as e:  # tokenizers raises its own untyped errors
            raise TokenizerFileError(f"{self.path}: tokenizers cannot load it ({e})") from e
        self.special_tokens = specials
        self._special_by_id = {i: tok for tok, i in specials.items()}
        # The added tokens the file marks special (<|endoftext|>, <|im_start|>, ...);
        # the others (<think>, <tool_call>, <|fim_prefix|>, ...) stay in decoded text.
        self._marked_special = frozenset(int(tok["id"]) for tok in added if tok.get("special"))
        self.n_ordinary = n_ordinary
        self.n_words = max(n_ordinary, max(specials.values()) + 1)
        self.bos_id: int | None = None
        self.eos_id = specials[QWEN_EOS_TOKEN]
        # tokenizers sizes its thread pool once per process (RAYON_NUM_THREADS);
        # the argument exists for the interface of Llama3Tokenizer.
        self.num_threads = num_threads

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False
    ) -> list[int]:
        """Encode ``text`` as ordinary text, optionally followed by ``<|endoftext|>``.

        ``add_bos`` adds nothing: Qwen documents have no BOS.
        """
        ids = self.encode_ordinary(text)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of ``text`` (NFC-normalised first, as the file says);
        special-token strings are plain text here."""
        try:
            return self._hf.encode(text, add_special_tokens=False).ids
        except TypeError:  # tokenizers refuses str holding lone surrogates
            return self._hf.encode(_without_lone_surrogates(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many documents on tokenizers' thread pool."""
        try:
            encodings = self._hf.encode_batch(list(texts), add_special_tokens=False)
        except TypeError:
            encodings = self._hf.encode_batch(
                [_without_lone_surrogates(t) for t in texts], add_special_tokens=False
            )
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; added tokens are written as their strings."""
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i < self.n_ordinary:
                run.append(i)
                continue
            if run:
                parts.append(self._hf.decode(run, skip_special_tokens=False))
                run = []
            parts.append(self._special_by_id.get(i, ""))
        if run:
            parts.append(self._hf.decode(run, skip_special_tokens=False))
        return "".join(parts)

    def decode_text(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` without the tokens the file marks special, as
        transformers' ``decode(skip_special_tokens=True)`` gives it (ids past
        the vocabulary, the model's padding rows, give no text either way)."""
        return self.decode([i for i in ids if i not in self._marked_special])

    def get_vocab_size(self) -> int:
        return self.n_words

    @property
    def end_of_generation_ids(self) -> list[int]:
        """Ids at which generation stops (:data:`QWEN_END_OF_GENERATION_TOKENS` this vocabulary has)."""
        return [self.special_tokens[t] for t in QWEN_END_OF_GENERATION_TOKENS if t in self.special_tokens]


def _without_lone_surrogates(text: str) -> str:
    """``text`` with each lone UTF-16 surrogate (JSON can carry them, UTF-8
    cannot) replaced by U+FFFD, as tiktoken does for Llama 3."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


DocumentTokenizer = Llama3Tokenizer | QwenTokenizer
"""Any of the project's tokenizers (the interface the data pipeline uses)."""


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(spec, dict):
        raise TokenizerFileError(f"{path}: expected a JSON object")
    return spec


def detect_tokenizer_kind(path: str | os.PathLike) -> str:
    """The tokenizer family of a file or HF-style folder, from its contents.

    A tiktoken ``tokenizer.model`` is Llama 3. A ``tokenizer.json`` is Llama 3
    when its added tokens hold ``<|begin_of_text|>``, Qwen when they hold
    ``<|endoftext|>`` and no BOS; anything else is refused (name the family with
    ``[model] tokenizer_kind``).
    """
    file = find_tokenizer_file(path)
    if file.suffix != ".json":
        return "llama3"
    added = {
        tok.get("content")
        for tok in _read_json(file).get("added_tokens") or []
        if isinstance(tok, dict)
    }
    if BOS_TOKEN in added:
        return "llama3"
    if QWEN_EOS_TOKEN in added:
        return "qwen"
    raise TokenizerFileError(
        f"{file}: cannot tell the tokenizer family (its added_tokens hold neither "
        f"{BOS_TOKEN!r} nor {QWEN_EOS_TOKEN!r}); set [model] tokenizer_kind to one "
        f"of {', '.join(TOKENIZER_KINDS)}"
    )


def load_tokenizer(path: str | os.PathLike, kind: str = "auto") -> DocumentTokenizer:
    """The tokenizer in ``path`` (a file or HF-style folder) of family ``kind``.

    ``kind`` is "auto" (``detect_tokenizer_kind``), "llama3" (tiktoken, BOS +
    doc + EOS) or "qwen" (Qwen2/2.5/3 ``tokenizer.json``, doc + ``<|endoftext|>``).
    """
    if kind == "auto":
        kind = detect_tokenizer_kind(path)
    if kind == "llama3":
        return Llama3Tokenizer(path)
    if kind == "qwen":
        return QwenTokenizer(path)
    raise TokenizerFileError(
        f"[model] tokenizer_kind = {kind!r} is not one of auto, {', '.join(TOKENIZER_KINDS)}"
    )


def build_tokenizer(job_config) -> DocumentTokenizer:
    """TrainSpec builder: the tokenizer in ``[model] hf_assets_path`` of the
    family ``[model] tokenizer_kind`` names (default: read from the file)."""
    return load_tokenizer(job_config.model.hf_assets_path, job_config.model.tokenizer_kind)
