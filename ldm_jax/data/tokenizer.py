"""A word-level caption tokenizer, built from the training captions and kept in the workdir.

The text encoder that LDM trains jointly with its U-Net needs no pretrained vocabulary: every
word of the training captions gets an id, so nothing is downloaded. The vocabulary is sorted,
so the same captions give the same ids whatever order the data pipeline reads them in.

Every prompt becomes `[BOS] words... [EOS]` padded with `[PAD]` (id 0) to `max_length`; a
prompt that is too long keeps its first words and still ends in `[EOS]`. The empty prompt
(`[BOS][EOS]` and padding) is the unconditional input of classifier-free guidance.

`CaptionTokenizer` is also the interface of the pretrained CLIP tokenizer
(`ldm_jax.data.clip_tokenizer`); `ldm_jax.data.tokenizer_file.load` reads a saved file of
either kind.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3


def _base_tokenizer(vocab: dict) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # Splits on whitespace and separates punctuation runs from words ("left," -> "left", ",").
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _words(tok: Tokenizer, text: str) -> list:
    return [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))]


def train_word_tokenizer(captions: Iterable[str], max_length: int) -> "CaptionTokenizer":
    """A tokenizer whose vocabulary is every word of `captions` (after lowercasing)."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} leaves no room for [BOS] and [EOS]; use >= 2")
    splitter = _base_tokenizer({PAD: 0, UNK: 1})
    words = set()
    for caption in captions:
        words.update(_words(splitter, caption))
    if not words:
        raise ValueError("no words in the captions; cannot build a tokenizer vocabulary")
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in sorted(words):
        vocab[w] = len(vocab)
    tok = _base_tokenizer(vocab)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    # Truncation counts the two added tokens, so [EOS] stays the last real token.
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=vocab[PAD], pad_token=PAD, length=max_length)
    return CaptionTokenizer(tok)


def _special_names(tok: Tokenizer) -> dict:
    """The pad/unk/bos/eos token strings, read from the tokenizer itself so that a saved file
    needs no side information: padding gives pad, the model unk, the [BOS] $A [EOS] template
    the other two."""
    data = json.loads(tok.to_str())
    single = data["post_processor"]["single"]
    return {"pad": data["padding"]["pad_token"], "unk": data["model"]["unk_token"],
            "bos": single[0]["SpecialToken"]["id"], "eos": single[-1]["SpecialToken"]["id"]}


class CaptionTokenizer:
    """Prompts -> fixed-length id arrays and masks. Build with `train_word_tokenizer` or `load`."""

    _unit = "words"  # what truncation keeps, for the warning

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._vocab = tokenizer.get_vocab()
        self._max_length = int(tokenizer.truncation["max_length"])
        self._special = {k: self._vocab[t] for k, t in _special_names(tokenizer).items()}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def pad_id(self) -> int:
        return self._special["pad"]

    @property
    def unk_id(self) -> int:
        return self._special["unk"]

    @property
    def bos_id(self) -> int:
        return self._special["bos"]

    @property
    def eos_id(self) -> int:
        return self._special["eos"]

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` before truncation, [BOS] and [EOS] included."""
        return len(_words(self._tok, text)) + 2

    def unknown_words(self, text: str) -> list:
        """The (lowercased) words of `text` that map to [UNK], each once, in order."""
        seen = []
        for w in _words(self._tok, text):
            if w not in self._vocab and w not in seen:
                seen.append(w)
        return seen

    # The special tokens are not registered as `tokenizers` added tokens: a prompt containing
    # "[EOS]" is then three ordinary (unknown) pieces, never an injected end of sequence.
    def encode(self, texts, warn: Callable[[str], None] | None = None):
        """`texts` (a list of str, or one str) -> (ids int32 (N, max_length),
        mask bool (N, max_length)), mask True on [BOS], words and [EOS].

        `warn`, if given, is called once for each prompt that is truncated and once for each
        prompt with words outside the vocabulary.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode expects a list of strings")
        if warn is not None:
            for text in texts:
                n = self.count_tokens(text)
                if n > self._max_length:
                    warn(f"prompt {text!r} has {n} tokens, more than max_length "
                         f"{self._max_length}; it is truncated to its first "
                         f"{self._max_length - 2} {self._unit}")
                unknown = self.unknown_words(text)
                if unknown:
                    warn(f"prompt {text!r} has words outside the vocabulary, encoded as "
                         f"{self._tok.id_to_token(self.unk_id)}: {', '.join(unknown)}")
        if not texts:
            empty = np.zeros((0, self._max_length), np.int32)
            return empty, empty.astype(bool)
        encodings = self._tok.encode_batch(texts)
        ids = np.asarray([e.ids for e in encodings], np.int32)
        mask = np.asarray([e.attention_mask for e in encodings], bool)
        return ids, mask

    def decode(self, ids) -> str:
        """Ids -> words separated by spaces, special tokens dropped."""
        tokens = (self._tok.id_to_token(int(i)) for i in ids)
        return " ".join(t for t in tokens if t not in SPECIAL_TOKENS)

    def save(self, path: str) -> None:
        """One JSON file (the `tokenizers` format), written atomically."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(self._tok.to_str(pretty=True))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


FIX = ("delete it and let training rebuild it from the captions (a CLIP tokenizer: save it "
       "again from the model's tokenizer/ folder)")


def read_file(path: str) -> tuple:
    """(Tokenizer, its JSON as a dict) of a file written by `CaptionTokenizer.save`, with a
    one-line error for a missing or unparsable one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path} not found; train in this workdir first "
                                "(train.py writes it) or pass the right workdir")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = json.loads(text)  # a clearer failure than the library's for truncated files
        return Tokenizer.from_str(text), data
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user problem
        raise ValueError(f"tokenizer file {path} is corrupt ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); {FIX}") from None


def from_saved(tok: Tokenizer, path: str) -> CaptionTokenizer:
    """The word-level tokenizer read from `path`, checked to be one of this project's."""
    vocab = tok.get_vocab()
    specials_ok = all(vocab.get(t) == i for i, t in enumerate(SPECIAL_TOKENS))
    trunc, pad = tok.truncation, tok.padding
    try:
        ok = (specials_ok and trunc is not None and pad is not None
              and pad.get("length") == trunc.get("max_length")
              and _special_names(tok) == {"pad": PAD, "unk": UNK, "bos": BOS, "eos": EOS})
    except (KeyError, TypeError, IndexError):  # no [BOS] $A [EOS] template, or no unk
        ok = False
    if not ok:
        raise ValueError(f"tokenizer file {path} is not a caption tokenizer of this project "
                         f"(special tokens, padding or truncation differ); {FIX}")
    return CaptionTokenizer(tok)
