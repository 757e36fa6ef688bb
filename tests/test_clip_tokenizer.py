"""The CLIP BPE tokenizer against transformers' CLIPTokenizer on a small CLIP-format vocabulary
built here: ids and masks as the SD pipelines get them, both pad conventions, the ways a
diffusers folder names its special tokens, truncation warnings, save/load and file errors."""
import collections
import json
import re

import numpy as np
import pytest

from ldm_jax.data import tokenizer as tokenizer_lib
from ldm_jax.data import tokenizer_file
from ldm_jax.data.clip_tokenizer import (ClipTokenizer, build_clip_tokenizer, is_clip,
                                         load_clip_tokenizer, write_vocab_files)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CORPUS = """a photo of an astronaut riding a horse on the moon, highly detailed, trending on
artstation. a painting of a cat sitting in a garden; the cat's hat is red. don't stop, it's
fine, we're here, they've gone, i'm sure, you'll see, she'd know. portrait of a woman with
long hair, oil painting, 4k, 8k, ultra realistic, concept art, sharp focus, cinematic light"""
LONG = ", ".join(["a beautiful painting of a castle on a hill at sunset"] * 12)
PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "A Painting Of A CAT, highly detailed!!! (trending on artstation) [4k] #art @home",
    "portrait of a woman: oil painting; 8k -- ultra-realistic... 50% off? $9.99 & co.",
    "numbers 0 1 23 456 7890 3.14 1,000,000 2nd 1st",
    "don't stop, it's fine, we're here, they've gone, i'm sure, you'll see, she'd know",
    "DON'T IT'S the cat's hat ' quoted 'words' '' 's alone",
    "   repeated   spaces\tand\ttabs\nand\n\nnewlines \r\n  ",
    "café naïve résumé e\u0301 Ångström ÉCOLE straße İstanbul ǅ",
    "emoji 😀🎉 👩‍🚀 ❤️ ✨sparkles✨",
    "中文提示 日本語のテキスト 한국어 mixed中文text",
    "Ελληνικά русский текст עברית العربية हिन्दी",
    "control\x00chars\x01and\x7f\u200bzero width\ufeff\ufffd",
    "",
    " ",
    "<|endoftext|> typed eos, a<|startoftext|>b, <|ENDOFTEXT|> upper, <|EndOfText|>",
    "exclamation! marks!! everywhere !!! ! end!",
    "a <cat-toy> on the beach, a <CAT-TOY>,<cat-toy>s",
    LONG,
]


def _byte_symbols():
    """CLIP's (GPT-2's) printable stand-in for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return [table[b] for b in range(256)]


def _clip_vocab(n_merges=300):
    """vocab (token -> id) and merges in CLIP's layout: bytes, bytes + </w>, merges, specials."""
    sym = _byte_symbols()
    words = collections.Counter(re.findall(r"'[a-z]+|[^\W\d_]+|\d|[^\w\s]+", CORPUS.lower()))
    seqs = {w: [sym[b] for b in w.encode()] for w in words}
    for s in seqs.values():
        s[-1] += "</w>"
    vocab, merges = sym + [s + "</w>" for s in sym], []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, s in seqs.items():
            for pair in zip(s, s[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        a, b = max(pairs, key=lambda p: (pairs[p], p))
        merges.append((a, b))
        vocab.append(a + b)
        for w, s in seqs.items():
            i = 0
            while i < len(s) - 1:
                if s[i] == a and s[i + 1] == b:
                    s[i:i + 2] = [a + b]
                i += 1
    vocab += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab)}, merges


def _added_dict(content, normalized):
    return {"__type": "AddedToken", "content": content, "lstrip": False,
            "normalized": normalized, "rstrip": False, "single_word": False}


# The ways diffusers folders spell their special tokens.
LAYOUTS = {
    # Only the two files: CLIP's defaults, pad = <|endoftext|>.
    "bare": ({}, None),
    # SD v1: plain strings.
    "sd1": ({"model_max_length": 77, "do_lower_case": True},
            {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}),
    # SD v2: the config's pad is <|endoftext|>, special_tokens_map.json overrides it with "!";
    # start/end tokens are `normalized`, so "<|ENDOFTEXT|>" in upper case is special too.
    "sd2": ({"model_max_length": 77, "bos_token": _added_dict(BOS, True),
             "eos_token": _added_dict(EOS, True), "unk_token": _added_dict(EOS, True),
             "pad_token": EOS},
            {"bos_token": _added_dict(BOS, True), "eos_token": _added_dict(EOS, True),
             "unk_token": _added_dict(EOS, True), "pad_token": "!"}),
    # Saved by newer transformers: added_tokens_decoder makes special_tokens_map.json moot.
    "decoder": ({"model_max_length": 77, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
                 "pad_token": "!", "added_tokens_decoder": "filled in below"},
                {"pad_token": EOS}),
}


@pytest.fixture(scope="module")
def transformers():
    """The reference; only the comparisons need it."""
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vocab_and_merges():
    return _clip_vocab()


def _write_folder(root, layout, vocab_and_merges):
    vocab, merges = vocab_and_merges
    folder = root / layout
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config, token_map = LAYOUTS[layout]
    if config:
        config = dict(config, tokenizer_class="CLIPTokenizer")
        if "added_tokens_decoder" in config:
            config["added_tokens_decoder"] = {
                str(vocab[t]): {**_added_dict(t, False), "special": True} for t in ("!", BOS, EOS)}
            del config["added_tokens_decoder"][str(vocab["!"])]["__type"]
            # A textual-inversion word: an ordinary added token after the vocabulary.
            config["added_tokens_decoder"][str(len(vocab))] = {
                **_added_dict("<cat-toy>", True), "special": False}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if token_map:
        (folder / "special_tokens_map.json").write_text(json.dumps(token_map))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, vocab_and_merges):
    root = tmp_path_factory.mktemp("clip")
    return {name: _write_folder(root, name, vocab_and_merges) for name in LAYOUTS}


def _reference(tok, prompts, max_length=77):
    out = tok(prompts, padding="max_length", max_length=max_length, truncation=True)
    return np.asarray(out["input_ids"]), np.asarray(out["attention_mask"]).astype(bool)


def _assert_same(mine, ref, prompts):
    for (a, b), name in zip(zip(mine, ref), ("ids", "mask")):
        for i, p in enumerate(prompts):
            np.testing.assert_array_equal(a[i], b[i], err_msg=f"{name} differ for {p!r}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_transformers_from_pretrained(transformers, folders, layout):
    ref = transformers.CLIPTokenizer.from_pretrained(str(folders[layout]))
    tok = load_clip_tokenizer(folders[layout])
    assert tok.max_length == 77  # the folder's model_max_length, else SD's 77
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (
        ref.pad_token_id, ref.bos_token_id, ref.eos_token_id, ref.unk_token_id)
    assert tok.vocab_size == len(ref)
    ids, mask = tok.encode(PROMPTS)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (len(PROMPTS), 77)
    _assert_same((ids, mask), _reference(ref, PROMPTS), PROMPTS)
    if tok.pad_id == tok.eos_id:  # else transformers drops every "!" as a special token
        for row, prompt in zip(ids[:12], PROMPTS):
            assert tok.decode(row) == ref.decode(row, skip_special_tokens=True), prompt


@pytest.mark.parametrize("layout", ["sd2", "decoder"])
def test_matches_a_folder_saved_by_transformers_5(transformers, folders, layout, tmp_path):
    """transformers 5 writes tokenizer.json and tokenizer_config.json, no vocab.json/merges.txt."""
    transformers.CLIPTokenizer.from_pretrained(str(folders[layout])).save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists() and (tmp_path / "tokenizer.json").exists()
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    tok = load_clip_tokenizer(tmp_path)
    assert (tok.vocab_size, tok.pad_id) == (len(ref), ref.pad_token_id)
    _assert_same(tok.encode(PROMPTS), _reference(ref, PROMPTS), PROMPTS)
    _assert_same(tok.encode(PROMPTS), load_clip_tokenizer(folders[layout]).encode(PROMPTS), PROMPTS)


@pytest.mark.parametrize("pad", [EOS, "!"])
def test_matches_transformers_built_from_paths(transformers, folders, pad):
    folder = folders["bare"]
    # transformers 5 takes the two paths positionally (as keywords they are ignored).
    ref = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                     pad_token=pad)
    vocab, merges = _clip_vocab()
    tok = build_clip_tokenizer(vocab, merges, max_length=20, specials={"pad_token": pad})
    _assert_same(tok.encode(PROMPTS), _reference(ref, PROMPTS, 20), PROMPTS)
    assert tok.pad_id == vocab[pad]


def test_layout_of_a_prompt_and_both_pad_conventions(folders, vocab_and_merges):
    vocab, _ = vocab_and_merges
    v1, v2 = load_clip_tokenizer(folders["sd1"]), load_clip_tokenizer(folders["sd2"])
    assert (v1.pad_id, v2.pad_id) == (vocab[EOS], vocab["!"])
    for tok in (v1, v2):
        ids, mask = tok.encode(["A  Photo\tof the MOON", ""])
        n = tok.count_tokens("a photo of the moon")
        assert ids[0, 0] == vocab[BOS] and ids[0, n - 1] == vocab[EOS]
        assert (ids[0, n:] == tok.pad_id).all() and (ids[1, 2:] == tok.pad_id).all()
        assert list(ids[1, :2]) == [vocab[BOS], vocab[EOS]]
        np.testing.assert_array_equal(mask[0], np.arange(77) < n)
        np.testing.assert_array_equal(mask[1], np.arange(77) < 2)
        assert tok.decode(ids[0]) == "a photo of the moon"
        assert tok.decode(ids[1]) == ""
    # "!" typed in a prompt is the special pad token under SD v2's convention, as in transformers.
    for tok, last in ((v1, "!</w>"), (v2, "!")):
        n = tok.count_tokens("wow!")
        assert tok.encode(["wow!"])[0][0, n - 2] == vocab[last]


def test_truncation_keeps_eos_last_and_warns_once_per_long_prompt(folders):
    tok = load_clip_tokenizer(folders["sd1"])
    messages = []
    ids, mask = tok.encode([LONG, "a cat", LONG + " again"], warn=messages.append)
    n = tok.count_tokens(LONG)
    assert n > 77 and len(messages) == 2
    assert f"{n} tokens" in messages[0] and "max_length 77" in messages[0] and LONG in messages[0]
    assert ids[0, -1] == tok.eos_id and mask[0].all() and mask[2].all()
    assert tok.count_tokens("a cat") == int(mask[1].sum())
    short = load_clip_tokenizer(folders["sd1"], max_length=8)
    ids, mask = short.encode(["a photo of an astronaut riding a horse on the moon"])
    assert ids.shape == (1, 8) and ids[0, -1] == short.eos_id and mask.all()


def test_nothing_is_unknown_with_every_byte_in_the_vocabulary(folders):
    tok = load_clip_tokenizer(folders["sd1"])
    messages = []
    tok.encode(PROMPTS, warn=messages.append)
    assert not [m for m in messages if "outside the vocabulary" in m]
    assert all(tok.unknown_words(p) == [] for p in PROMPTS)


def test_a_missing_byte_symbol_is_an_unknown_word(tmp_path, vocab_and_merges):
    vocab, merges = vocab_and_merges
    vocab = {t: i for i, t in enumerate(t for t in vocab if t != "z</w>")}
    merges = [m for m in merges if "z</w>" not in m and "".join(m) in vocab]
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("".join(f"{a} {b}\n" for a, b in merges))
    tok = load_clip_tokenizer(folder)
    assert tok.unknown_words("a jazz quiz, a cat") == ["jazz", "quiz"]
    messages = []
    tok.encode(["a jazz quiz"], warn=messages.append)
    assert len(messages) == 1 and "jazz, quiz" in messages[0]


@pytest.mark.parametrize("layout", ["sd1", "sd2", "decoder"])
def test_save_load_round_trip(folders, layout, tmp_path):
    tok = load_clip_tokenizer(folders[layout])
    path = tmp_path / "workdir" / "tokenizer.json"
    tok.save(str(path))
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]
    loaded = tokenizer_file.load(str(path))
    assert isinstance(loaded, ClipTokenizer)
    assert (loaded.max_length, loaded.vocab_size, loaded.pad_id, loaded.eos_id) == (
        tok.max_length, tok.vocab_size, tok.pad_id, tok.eos_id)
    for a, b in zip(loaded.encode(PROMPTS), tok.encode(PROMPTS)):
        np.testing.assert_array_equal(a, b)
    assert loaded.count_tokens(LONG) == tok.count_tokens(LONG)


@pytest.mark.parametrize("layout", ["sd2", "decoder"])
def test_written_vocab_files_read_back_the_same(transformers, folders, layout, tmp_path):
    tok = load_clip_tokenizer(folders[layout])
    write_vocab_files(tok, tmp_path / "tokenizer")
    again = load_clip_tokenizer(tmp_path / "tokenizer")
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    _assert_same(again.encode(PROMPTS), tok.encode(PROMPTS), PROMPTS)
    _assert_same(again.encode(PROMPTS), _reference(ref, PROMPTS), PROMPTS)
    assert is_clip(again) and not is_clip(tokenizer_lib.train_word_tokenizer(["a cat"], 8))


def test_saved_file_that_is_not_a_clip_tokenizer_is_rejected(folders, tmp_path):
    path = tmp_path / "tokenizer.json"
    load_clip_tokenizer(folders["sd1"]).save(str(path))
    data = json.loads(path.read_text())
    data["model"]["end_of_word_suffix"] = None
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a CLIP tokenizer") as err:
        tokenizer_file.load(str(path))
    assert "\n" not in str(err.value)


def test_missing_and_damaged_files_name_the_file_and_the_fix(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.*tokenizer/ folder"):
        load_clip_tokenizer(tmp_path / "nope")
    for name in ("vocab.json", "merges.txt"):
        folder = tmp_path / f"no_{name}"
        folder.mkdir()
        other = "merges.txt" if name == "vocab.json" else "vocab.json"
        (folder / other).write_bytes((folders["sd1"] / other).read_bytes())
        with pytest.raises(FileNotFoundError, match=rf"{name} not found; copy vocab.json"):
            load_clip_tokenizer(folder)
    damaged = {
        "vocab.json": ['{"a": 0, "b": ', '["a", "b"]', '{"a": "zero"}', b"\xff\xfe{"],
        "merges.txt": ["#version: 0.2\na b c\n", "#version: 0.2\nnot-in-vocab x\n"],
        "tokenizer_config.json": ["{model_max_length: 77"],
        "special_tokens_map.json": ["[]"],
    }
    for name, contents in damaged.items():
        for content in contents:
            folder = tmp_path / "damaged"
            folder.mkdir(exist_ok=True)
            for good in ("vocab.json", "merges.txt"):
                (folder / good).write_bytes((folders["sd1"] / good).read_bytes())
            for extra in ("tokenizer_config.json", "special_tokens_map.json"):
                (folder / extra).unlink(missing_ok=True)
            target = folder / name
            target.write_bytes(content if isinstance(content, bytes) else content.encode())
            with pytest.raises(ValueError, match=rf"{name} is damaged .*download") as err:
                load_clip_tokenizer(folder)
            assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="max_length"):
        load_clip_tokenizer(folders["sd1"], max_length=1)
