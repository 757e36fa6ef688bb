"""The caption tokenizer: deterministic vocabulary, [BOS]/[EOS]/[PAD] layout, warnings for
long prompts and unknown words, and a save/load round trip with clear errors."""
import json

import numpy as np
import pytest

from ldm_jax.data import tokenizer_file
from ldm_jax.data.tokenizer import train_word_tokenizer

CAPTIONS = [
    "a large red circle in the center on a gray background",
    "a small blue square in the top left and a large green cross in the bottom right "
    "on a black background",
    "a small yellow triangle in the bottom left on a white background",
]
PAD, UNK, BOS, EOS = 0, 1, 2, 3


@pytest.fixture
def tok():
    return train_word_tokenizer(CAPTIONS, max_length=16)


def test_vocabulary_is_every_word_and_independent_of_caption_order(tok):
    words = {w for c in CAPTIONS for w in c.split()}
    assert tok.vocab_size == len(words) + 4
    shuffled = train_word_tokenizer(list(reversed(CAPTIONS)) + [CAPTIONS[1].upper()], 16)
    assert shuffled.vocab_size == tok.vocab_size
    probe = CAPTIONS + ["background a zebra"]
    np.testing.assert_array_equal(shuffled.encode(probe)[0], tok.encode(probe)[0])


def test_special_token_placement_and_mask(tok):
    ids, mask = tok.encode(["A Large RED circle", "red"])
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (2, 16)
    assert list(ids[0, :6]) == [BOS, *tok.encode(["a large red circle"])[0][0, 1:5], EOS]
    assert all(i > EOS for i in ids[0, 1:5])  # real words, none unknown
    assert (ids[0, 6:] == PAD).all() and (ids[1, 3:] == PAD).all()
    assert ids[1, 0] == BOS and ids[1, 2] == EOS
    np.testing.assert_array_equal(mask[0], np.arange(16) < 6)
    np.testing.assert_array_equal(mask[1], np.arange(16) < 3)
    assert tok.decode(ids[0]) == "a large red circle"


def test_empty_prompt_is_bos_eos_and_padding(tok):
    ids, mask = tok.encode([""])
    assert list(ids[0]) == [BOS, EOS] + [PAD] * 14
    assert list(mask[0]) == [True, True] + [False] * 14


def test_truncation_keeps_eos_last_and_warns_once_per_prompt():
    tok = train_word_tokenizer(CAPTIONS, max_length=8)
    messages = []
    ids, mask = tok.encode([CAPTIONS[1], "a red circle", CAPTIONS[0]], warn=messages.append)
    assert len(messages) == 2
    n_long = len(CAPTIONS[1].split()) + 2
    assert f"{n_long} tokens" in messages[0] and "max_length 8" in messages[0]
    assert CAPTIONS[1] in messages[0] and CAPTIONS[0] in messages[1]
    assert ids[0, 0] == BOS and ids[0, -1] == EOS and mask[0].all()
    assert tok.decode(ids[0]) == " ".join(CAPTIONS[1].split()[:6])
    assert tok.count_tokens(CAPTIONS[1]) == n_long


def test_unknown_words_map_to_unk_and_are_reported(tok):
    messages = []
    ids, _ = tok.encode(["a purple circle next to a Purple star", "a red circle"],
                        warn=messages.append)
    assert tok.unknown_words("a purple circle next to a Purple star") == [
        "purple", "next", "to", "star"]
    assert tok.unknown_words("a red circle") == []
    assert list(ids[0, 1:10]).count(UNK) == 5
    assert len(messages) == 1 and "purple, next, to, star" in messages[0]
    # Special-token text in a prompt is ordinary (unknown) text, not a control token.
    ids, _ = tok.encode(["red [EOS] circle"])
    assert list(ids[0, :7]) == [BOS, ids[0, 1], UNK, UNK, UNK, ids[0, 5], EOS]


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "workdir" / "tokenizer.json"
    tok.save(str(path))
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no tmp file left
    loaded = tokenizer_file.load(str(path))
    assert (loaded.vocab_size, loaded.max_length) == (tok.vocab_size, 16)
    probe = CAPTIONS + ["", "a zebra"]
    for a, b in zip(loaded.encode(probe), tok.encode(probe)):
        np.testing.assert_array_equal(a, b)


def test_load_errors_name_file_and_fix(tok, tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        tokenizer_file.load(str(missing))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"tokenizer.json is corrupt.*delete it") as err:
        tokenizer_file.load(str(path))
    assert "\n" not in str(err.value)
    # Valid JSON for `tokenizers`, but without our padding/truncation: rejected too.
    data = json.loads(text)
    data["padding"] = None
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a caption tokenizer"):
        tokenizer_file.load(str(path))


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_length"):
        train_word_tokenizer(CAPTIONS, max_length=1)
    with pytest.raises(ValueError, match="no words"):
        train_word_tokenizer(["", "  "], max_length=8)
