"""CLIP's byte-level BPE tokenizer for Stable Diffusion prompts, read from a diffusers
`tokenizer/` folder (vocab.json, merges.txt, and tokenizer_config.json /
special_tokens_map.json when present).

Encodings equal transformers' `CLIPTokenizer` called as the SD pipelines call it
(`padding="max_length", max_length=77, truncation=True`): `<|startoftext|> tokens...
<|endoftext|>` then the pad token (SD v1: `<|endoftext|>`; SD v2: `!`), truncated so that
`<|endoftext|>` stays the last real token.

Text is NFC-normalised, each run of whitespace becomes one space and everything is lowercased;
CLIP's regex cuts it into words (letter runs, single digits, punctuation runs, English
contractions), each word is written as byte symbols and the last symbol of a word carries the
`</w>` suffix before the merges apply. Every byte has a symbol, so with a real CLIP vocabulary
no word is unknown.

As in transformers, special tokens typed in a prompt are special: "<|endoftext|>" inside a
prompt is the end-of-text id, and with SD v2's pad token every "!" is the pad id (0), not
"!</w>". Upper-case spellings ("<|ENDOFTEXT|>") stay ordinary text unless the folder marks the
token `normalized`.
"""
from __future__ import annotations

import json
import os

from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, processors)

from ldm_jax.data.tokenizer import CaptionTokenizer, _special_names

SUFFIX = "</w>"
DEFAULT_MAX_LENGTH = 77
# transformers writes a huge model_max_length when a tokenizer has none.
_NO_MAX_LENGTH = 10**6
DEFAULT_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
# CLIP's word pattern. Its case-insensitive flag is moot: the text is lowercased first.
_WORDS = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
          r"|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+")
_REFETCH = "download the model's tokenizer/ folder again"


def build_clip_tokenizer(vocab: dict, merges: list, max_length: int = DEFAULT_MAX_LENGTH,
                         specials: dict | None = None, added: list = ()) -> "ClipTokenizer":
    """A `ClipTokenizer` from a vocabulary (token -> id) and merges (pairs, highest priority
    first). `specials` maps bos_token/eos_token/unk_token/pad_token to a str or an
    `AddedToken` (defaults: CLIP's, pad = `<|endoftext|>`); `added` are further added tokens."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} leaves no room for the start and end tokens; "
                         "use >= 2")
    specials = {**DEFAULT_SPECIALS, **(specials or {})}
    tok = Tokenizer(models.BPE(vocab, [tuple(m) for m in merges],
                               unk_token=_content(specials["unk_token"]),
                               end_of_word_suffix=SUFFIX, continuing_subword_prefix="",
                               fuse_unk=False, dropout=None))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),
        # use_regex=True also applies GPT-2's split inside each word, as transformers does: it
        # only matters for "<|endoftext|>" spelled in upper case (-> "<|", "endoftext", "|>").
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    for token in map(_added, added):
        if not token.special:
            tok.add_tokens([token])
        else:
            tok.add_special_tokens([token])
    tok.add_special_tokens([_added(specials[k]) for k in
                            ("bos_token", "eos_token", "unk_token", "pad_token")])
    bos, eos, pad = (_content(specials[k]) for k in ("bos_token", "eos_token", "pad_token"))
    tok.post_processor = processors.TemplateProcessing(
        single=[bos, "$A", eos],
        special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    # Truncation counts the two added tokens, so the end token stays the last real token.
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=tok.token_to_id(pad), pad_token=pad, length=max_length)
    return ClipTokenizer(tok)


def load_clip_tokenizer(folder: str, max_length: int | None = None) -> "ClipTokenizer":
    """Reads a diffusers `tokenizer/` folder. `max_length` defaults to the folder's
    model_max_length (77 for SD). A folder saved by transformers 5 holds tokenizer.json instead
    of vocab.json and merges.txt; its vocabulary and added tokens are read as transformers
    reads them."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder {folder} not found; pass the model's "
                                "tokenizer/ folder (it holds vocab.json and merges.txt)")
    vocab_path, merges_path = (os.path.join(folder, n) for n in ("vocab.json", "merges.txt"))
    json_path = os.path.join(folder, "tokenizer.json")
    saved = _read_optional_json(json_path)
    if os.path.isfile(vocab_path) or os.path.isfile(merges_path) or not saved:
        vocab = _read_vocab(vocab_path)
        merges = _read_merges(merges_path, vocab)
    else:
        vocab, merges = _saved_vocab(saved, json_path)
    config = _read_optional_json(os.path.join(folder, "tokenizer_config.json"))
    in_file = [t for t in saved.get("added_tokens") or [] if isinstance(t, dict) and "content" in t]
    in_file.sort(key=lambda t: t.get("id", 0))
    specials, added = _special_tokens(config, folder, in_file)
    if max_length is None:
        configured = config.get("model_max_length")
        max_length = (int(configured) if isinstance(configured, (int, float))
                      and 2 <= configured < _NO_MAX_LENGTH else DEFAULT_MAX_LENGTH)
    return build_clip_tokenizer(vocab, merges, max_length, specials, added)


class ClipTokenizer(CaptionTokenizer):
    """CLIP BPE prompts -> fixed-length id arrays and masks, with the `CaptionTokenizer`
    interface. Build with `load_clip_tokenizer` or `ldm_jax.data.tokenizer_file.load`."""

    _unit = "tokens"

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        # The same pipeline without truncation or padding, to count a prompt's real length.
        self._full = Tokenizer.from_str(tokenizer.to_str())
        self._full.no_truncation()
        self._full.no_padding()

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` before truncation, start and end tokens included."""
        return len(self._full.encode(text).ids)

    def unknown_words(self, text: str) -> list:
        """Words of `text` (normalised) with a byte symbol missing from the vocabulary, each once,
        in order; always [] with a real CLIP vocabulary."""
        normal = self._tok.normalizer.normalize_str(text)
        seen = []
        for piece, (start, end) in self._tok.pre_tokenizer.pre_tokenize_str(normal):
            word = normal[start:end]
            pieces = self._tok.model.tokenize(piece)
            if word not in seen and any(t.id == self.unk_id for t in pieces):
                seen.append(word)
        return seen

    def decode(self, ids) -> str:
        """Ids -> text, without the start token, the end token and the padding after it; the
        `</w>` suffixes read as spaces."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        while ids and ids[-1] == self.pad_id:
            ids.pop()
        if ids and ids[-1] == self.eos_id:  # the end token, unless it was also the pad token
            ids.pop()
        return self._tok.decode(ids, skip_special_tokens=False).replace(SUFFIX, " ").strip()


def is_clip(tok) -> bool:
    """Whether `tok` (from `ldm_jax.data.tokenizer_file.load` or this module) is a CLIP tokenizer."""
    return isinstance(tok, ClipTokenizer)


def write_vocab_files(tok: ClipTokenizer, folder: str) -> None:
    """A diffusers `tokenizer/` folder (vocab.json, merges.txt, special_tokens_map.json,
    tokenizer_config.json) that `load_clip_tokenizer` and transformers read back to the same
    encodings; added tokens keep their flags through `added_tokens_decoder`."""
    data = json.loads(tok._tok.to_str())
    names = _special_names(tok._tok)
    specials = {f"{k}_token": v for k, v in names.items()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    decoder = {str(t["id"]): {k: t[k] for k in ("content", "single_word", "lstrip", "rstrip",
                                                "normalized", "special")}
               for t in data["added_tokens"]}
    config = {**specials, "model_max_length": tok.max_length, "do_lower_case": True,
              "tokenizer_class": "CLIPTokenizer", "added_tokens_decoder": decoder}
    os.makedirs(folder, exist_ok=True)
    files = {"vocab.json": json.dumps(data["model"]["vocab"], ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "".join(m + "\n" for m in merges),
             "special_tokens_map.json": json.dumps(specials, indent=2),
             "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False)}
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)


def from_saved(tok: Tokenizer, path: str) -> ClipTokenizer:
    """Checks a BPE tokenizer read by `ldm_jax.data.tokenizer_file.load` from `path`."""
    trunc, pad = tok.truncation, tok.padding
    try:
        names = _special_names(tok)
        ok = (getattr(tok.model, "end_of_word_suffix", None) == SUFFIX
              and trunc is not None and pad is not None
              and pad.get("length") == trunc.get("max_length")
              and all(tok.token_to_id(t) is not None for t in names.values()))
    except (KeyError, TypeError, IndexError):  # no <start> $A <end> template, or no padding
        ok = False
    if not ok:
        raise ValueError(f"tokenizer file {path} is not a CLIP tokenizer of this project "
                         "(suffix, special tokens, padding or truncation differ); delete it and "
                         "save it again from the model's tokenizer/ folder")
    return ClipTokenizer(tok)


def _read_vocab(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; copy vocab.json and merges.txt (or "
                                "tokenizer.json) from the model's tokenizer/ folder")
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
        if not (isinstance(vocab, dict) and vocab
                and all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values())):
            raise ValueError("not a JSON object of token -> integer id")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({_first_line(e)}); {_REFETCH}") from None
    return vocab


def _read_merges(path: str, vocab: dict) -> list:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; copy vocab.json and merges.txt (or "
                                "tokenizer.json) from the model's tokenizer/ folder")
    merges = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is damaged ({_first_line(e)}); {_REFETCH}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split()
        problem = ("not two symbols" if len(pair) != 2 else
                   "a symbol missing from vocab.json" if not all(p in vocab for p in pair) else "")
        if problem:
            raise ValueError(f"{path} is damaged (line {n}: {line[:40]!r} has {problem}); "
                             f"{_REFETCH}")
        merges.append(tuple(pair))
    return merges


def _read_optional_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({_first_line(e)}); {_REFETCH} "
                         "or delete the file to use CLIP's defaults") from None
    return data


def _special_tokens(config: dict, folder: str, in_file: list):
    """(named special tokens, other added tokens), resolved as transformers resolves them: a
    config with `added_tokens_decoder` is complete; otherwise special_tokens_map.json overrides
    tokenizer_config.json (SD v2's config says pad <|endoftext|>, its map says "!") and the added
    tokens are tokenizer.json's. A named token takes the flags of the added token it names."""
    named = {k: config[k] for k in DEFAULT_SPECIALS if config.get(k) is not None}
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict) and decoder:
        added = [_added(decoder[k]) for k in sorted(decoder, key=int)]
    else:
        token_map = _read_optional_json(os.path.join(folder, "special_tokens_map.json"))
        named.update({k: token_map[k] for k in DEFAULT_SPECIALS if token_map.get(k) is not None})
        added = [_added(t) for t in in_file]
    by_text = {str(t): t for t in added}
    return {k: by_text.get(_content(v), v) for k, v in named.items()}, added


def _saved_vocab(saved: dict, path: str):
    """vocab and merges of a tokenizer.json (merges as "a b" strings or [a, b] pairs)."""
    model = saved.get("model")
    try:
        if not (isinstance(model, dict) and model.get("type") == "BPE"
                and isinstance(model.get("vocab"), dict) and isinstance(model.get("merges"), list)):
            raise ValueError("no BPE vocabulary and merges")
        merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
        if any(len(m) != 2 for m in merges):
            raise ValueError("a merge is not two symbols")
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is damaged ({_first_line(e)}); {_REFETCH}") from None
    return model["vocab"], merges


def _content(token) -> str:
    return token["content"] if isinstance(token, dict) else str(token)  # str(AddedToken) too


def _added(token) -> AddedToken:
    """A str, an `AddedToken` or transformers' serialised form -> `AddedToken` (special unless
    the serialised form says otherwise)."""
    if isinstance(token, AddedToken):
        return token
    if isinstance(token, str):
        return AddedToken(token, special=True)
    flags = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special")
             if k in token}
    flags.setdefault("special", True)
    return AddedToken(token["content"], **flags)


def _first_line(e: Exception) -> str:
    text = str(e).splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
