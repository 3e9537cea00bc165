"""Specification of sdjax.tokenizer: CLIP tokenizer loading, 77-token padding/truncation, BPE training."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import regex
import transformers

from sdjax import tokenizer as T

CAPTIONS = [
    f"a {c} {s} on a {b} background"
    for c in ("red", "green", "blue", "yellow", "white", "black")
    for s in ("circle", "square", "triangle")
    for b in ("red", "green", "blue", "yellow", "white", "black")
    if b != c
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    T.build_tokenizer(CAPTIONS, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return T.load_tokenizer(tok_dir)


def _reference_clip_bpe(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """CLIP's original algorithm (openai/CLIP simple_tokenizer, without ftfy): lowercase, split into words,
    bytes -> unicode, "</w>" on the last symbol, then repeatedly apply the best-ranked merge."""
    ranks = {m: i for i, m in enumerate(merges)}
    byte_chars = T.bytes_to_unicode()
    ids = [vocab[T.BOS_TOKEN]]
    for word in regex.findall(T._CLIP_SPLIT, " ".join(text.lower().split())):
        symbols = [byte_chars[b] for b in word.encode()]
        symbols[-1] += T.END_OF_WORD
        while len(symbols) > 1:
            rank = min(ranks.get(pair, np.inf) for pair in zip(symbols[:-1], symbols[1:], strict=True))
            if rank == np.inf:
                break
            best = merges[int(rank)]
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids += [vocab[s] for s in symbols]
    return ids + [vocab[T.EOS_TOKEN]]


def test_build_tokenizer_writes_clip_tokenizer_files(tok_dir):
    names = {p.name for p in tok_dir.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert json.loads((tok_dir / "tokenizer_config.json").read_text())["model_max_length"] == 77


def test_vocab_has_clips_layout(tok_dir):
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    by_id = sorted(vocab, key=vocab.get)
    chars = list(T.bytes_to_unicode().values())
    assert by_id[:256] == chars
    assert by_id[256:512] == [c + "</w>" for c in chars]
    assert by_id[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert sorted(vocab.values()) == list(range(len(vocab)))


def test_bytes_to_unicode_is_the_gpt2_clip_byte_map():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert list(T.bytes_to_unicode().items()) == list(bytes_to_unicode().items())


def test_caption_words_are_single_tokens_without_unknowns(tok):
    caption = "a yellow triangle on a black background"
    tokens = tok.tokenize(caption)
    assert tokens == [w + "</w>" for w in caption.split()]
    assert tok.unk_token_id not in tok(caption)["input_ids"][1:-1]


def test_caption_round_trips_through_decode(tok):
    caption = "a green square on a white background"
    assert tok.decode(tok(caption)["input_ids"], skip_special_tokens=True) == caption


def test_encoding_matches_clips_reference_bpe_on_unseen_text(tok, tok_dir):
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    lines = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines]
    for text in ["A Red  CIRCLE, on 3 backgrounds!", "don't squares' triangle's", "blau über grün 12"]:
        assert tok(text)["input_ids"] == _reference_clip_bpe(text, vocab, merges), text


def test_tokenize_pads_to_77_with_endoftext_after_startoftext(tok):
    ids = T.tokenize(tok, ["a red circle on a white background", ""])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    assert ids[0, 0] == tok.bos_token_id and ids[0, 8] == tok.eos_token_id
    assert (ids[0, 9:] == tok.pad_token_id).all()
    assert ids[1, 0] == tok.bos_token_id and (ids[1, 1:] == tok.eos_token_id).all()


def test_tokenize_lowercases_like_clip(tok):
    np.testing.assert_array_equal(T.tokenize(tok, ["A RED Circle"]), T.tokenize(tok, ["a red circle"]))


def test_tokenize_truncates_long_prompts_keeping_endoftext_and_warns_with_the_prompt(tok):
    long_prompt = "red " * 100
    with pytest.warns(UserWarning, match="red red red"):
        ids = T.tokenize(tok, [long_prompt, "a red circle"])
    assert ids.shape == (2, 77)
    assert ids[0, -1] == tok.eos_token_id and ids[0, 0] == tok.bos_token_id
    assert (ids[0, 1:-1] == tok.convert_tokens_to_ids("red</w>")).all()


def test_tokenize_does_not_warn_for_prompts_that_fit(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.tokenize(tok, ["red " * 75])  # 75 words + 2 special tokens = exactly 77


def test_tokenize_rejects_a_bare_string(tok):
    with pytest.raises(ValueError, match="list of strings"):
        T.tokenize(tok, "a red circle")


def test_load_tokenizer_reads_the_tokenizer_subfolder_of_a_diffusers_folder(tok_dir, tmp_path):
    (tmp_path / "tokenizer").symlink_to(tok_dir, target_is_directory=True)
    assert T.load_tokenizer(tmp_path).tokenize("red circle") == ["red</w>", "circle</w>"]


def test_save_tokenizer_writes_clips_own_files_that_load_alone(tok, tok_dir, tmp_path):
    """transformers 5 saves tokenizer.json only; save_tokenizer also writes vocab.json + merges.txt, and those two
    files alone give a CLIPTokenizer with the same ids (on text outside the training captions too)."""
    T.save_tokenizer(tok, tmp_path / "saved")
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= {p.name for p in (tmp_path / "saved").iterdir()}
    (tmp_path / "only").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "only" / name).write_bytes((tmp_path / "saved" / name).read_bytes())
    vocab = json.loads((tmp_path / "only" / "vocab.json").read_text())
    assert vocab == json.loads((tok_dir / "vocab.json").read_text())  # what build_tokenizer wrote
    alone = transformers.CLIPTokenizer.from_pretrained(tmp_path / "only")
    for text in ("a red circle on a blue background", "A Yellow TRIANGLE, on black!!", "zebras 42"):
        assert alone(text).input_ids == tok(text).input_ids


def test_load_tokenizer_without_files_raises_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no CLIP tokenizer"):
        T.load_tokenizer(tmp_path / "missing")


def test_build_tokenizer_rejects_an_empty_corpus(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        T.build_tokenizer([], tmp_path)


# ------------------------------------------------------------------------------------------- the real CLIP vocabulary

OPEN_CLIP_IDS = json.loads((Path(__file__).parent / "fixtures" / "open_clip_ids.json").read_text())["ids"]
# Where transformers' CLIPTokenizer (what diffusers and the published tokenizer folders give) departs from OpenAI's
# original tokenizer as open_clip runs it: its ByteLevel step re-splits runs of punctuation ("?!", "!" after a
# word), and it has no ftfy clean-up (full-width letters, curly quotes) and reads "<|endoftext|>" in a prompt as
# the special token. sdjax follows transformers, so that prompts embed as diffusers embeds them.
TRANSFORMERS_DEPARTS_FROM_OPEN_CLIP = {
    "hello, world!",
    "Hello... World?!",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "fullwidth ＡＢＣ１２３",
    "ellipsis… em—dash – en-dash “curly” ‘quotes’",
}


@pytest.fixture(scope="module")
def published_layout_tokenizers(tmp_path_factory):
    """transformers' CLIPTokenizer loaded from vocab.json + merges.txt and the published tokenizer configs of
    SD 1.5 (pad <|endoftext|>) and SD 2.1 (pad "!"), as from_pretrained reads openai/clip-vit-large-patch14."""
    fixtures = Path(__file__).parent / "fixtures" / "published"
    out = {}
    for name in ("sd15", "sd21"):
        folder = tmp_path_factory.mktemp(name)
        T.save_tokenizer(T.clip_tokenizer(), folder)
        (folder / "tokenizer.json").unlink()  # the published SD folders ship vocab.json + merges.txt only
        for config in ("tokenizer_config.json", "special_tokens_map.json"):
            (folder / config).write_text((fixtures / name / "tokenizer" / config).read_text())
        out[name] = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    return out


def test_clip_tokenizer_has_the_full_clip_vocabulary():
    tok = T.clip_tokenizer()
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77
    assert T.clip_tokenizer("!").pad_token_id == 0


@pytest.mark.parametrize("name, pad_token", [("sd15", T.EOS_TOKEN), ("sd21", "!")])
def test_clip_tokenizer_equals_the_published_tokenizer(published_layout_tokenizers, name, pad_token):
    ref = published_layout_tokenizers[name]
    ours = T.clip_tokenizer(pad_token)
    assert ref.pad_token == pad_token
    assert ours.get_vocab() == ref.get_vocab()
    prompts = list(OPEN_CLIP_IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(T.tokenize(ours, prompts), T.tokenize(ref, prompts))


def test_clip_tokenizer_ids_equal_open_clip(published_layout_tokenizers):
    prompts = [p for p in OPEN_CLIP_IDS if p not in TRANSFORMERS_DEPARTS_FROM_OPEN_CLIP]
    assert len(prompts) >= 50
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = T.tokenize(T.clip_tokenizer("!"), prompts)  # open_clip pads with 0, the id of "!"
    np.testing.assert_array_equal(ids, np.array([OPEN_CLIP_IDS[p] for p in prompts]))


def test_known_departures_from_open_clip_are_transformers_own(published_layout_tokenizers):
    prompts = sorted(TRANSFORMERS_DEPARTS_FROM_OPEN_CLIP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = T.tokenize(T.clip_tokenizer("!"), prompts)
        ref = T.tokenize(published_layout_tokenizers["sd21"], prompts)
    np.testing.assert_array_equal(ours, ref)
    assert all((ours[i] != OPEN_CLIP_IDS[p]).any() for i, p in enumerate(prompts))


def test_clip_tokenizer_truncates_long_prompts_keeping_the_end_token():
    long_prompt = next(p for p in OPEN_CLIP_IDS if p.startswith("very very"))
    with pytest.warns(UserWarning, match="truncated"):
        ids = T.tokenize(T.clip_tokenizer(), [long_prompt])
    assert ids.shape == (1, 77) and ids[0, -1] == 49407


def test_clip_tokenizer_rejects_an_unknown_pad_token():
    with pytest.raises(T.TokenizerError, match="pad_token"):
        T.clip_tokenizer("<pad>")
