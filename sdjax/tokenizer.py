"""CLIP tokenizer: loading, padding/truncation to 77 tokens, and training a small CLIP-compatible BPE.

The tokenizer is transformers' `CLIPTokenizer`. `clip_tokenizer` builds the real one, OpenAI CLIP's BPE
vocabulary (shipped as package data, `sdjax/assets/bpe_simple_vocab_16e6.txt.gz`, MIT licence in
`sdjax/assets/LICENSE-CLIP`), which every SD 1.x / 2.x / XL text encoder uses; `build_tokenizer` trains merges
with the `tokenizers` library on a corpus (e.g. the shapes64 captions) and writes them in CLIP's own file layout
(vocab.json + merges.txt), so the same loading code serves the tiny model and real Stable Diffusion.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import warnings
from collections.abc import Iterable
from importlib import resources

import numpy as np


class _NoTorchNotice(logging.Filter):
    """Drops transformers' import-time "PyTorch was not found. Models won't be available..." advice: sdjax uses
    only its tokenizers, so without PyTorch nothing is missing (its other messages pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


_QUIET = _NoTorchNotice()
logging.getLogger("transformers").addFilter(_QUIET)  # only around transformers' first import, which logs it
import transformers  # noqa: E402
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers  # noqa: E402

logging.getLogger("transformers").removeFilter(_QUIET)

MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's merges file holds 49152 - 256 - 2 merges after its version line (49,408 tokens in all).
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# Pad tokens of the published tokenizers: OpenAI CLIP ViT-L/14 (SD 1.x, SDXL's first encoder) pads with
# <|endoftext|>; the OpenCLIP ViT-H / bigG tokenizers of SD 2.x (and SDXL's second encoder) with "!" (id 0).
PAD_TOKENS = {"clip": EOS_TOKEN, "open_clip": "!"}
# CLIP's word splitter (same as transformers' CLIPTokenizer): special tokens, contractions, letters, digits.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TokenizerError(ValueError):
    """A tokenizer folder or corpus that cannot be used."""


def load_tokenizer(path: str | os.PathLike) -> transformers.CLIPTokenizer:
    """Loads a CLIP tokenizer from a local folder (vocab.json + merges.txt, or tokenizer.json).

    Accepts the tokenizer folder itself or a diffusers pipeline folder with a `tokenizer/` subfolder.
    """
    path = os.fspath(path)
    for folder in (os.path.join(path, "tokenizer"), path):
        if os.path.isfile(os.path.join(folder, "vocab.json")) or os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    raise TokenizerError(
        f"no CLIP tokenizer at {path!r}; expected a local folder with vocab.json + merges.txt "
        "(or tokenizer.json), or a diffusers folder with a tokenizer/ subfolder"
    )


@functools.lru_cache(maxsize=4)
def clip_tokenizer(pad_token: str = EOS_TOKEN) -> transformers.CLIPTokenizer:
    """The real CLIP tokenizer, built from the vocabulary that ships with sdjax (no files, no network).

    Identical to openai/clip-vit-large-patch14's ``CLIPTokenizer`` (49,408 tokens, 77 positions) with the default
    ``pad_token``; ``pad_token="!"`` gives the SD 2.x (OpenCLIP) variant. Cached: build once per pad token. Treat
    the result as read-only (textual inversion copies it before adding tokens).
    """
    with resources.files("sdjax").joinpath("assets", CLIP_VOCAB_FILE).open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_NUM_MERGES + 1]]
    vocab = _clip_vocab(merges)
    if pad_token not in vocab:
        raise TokenizerError(f"pad_token {pad_token!r} is not a CLIP token; use {EOS_TOKEN!r} (SD 1.x) or '!' (SD 2.x)")
    return transformers.CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )


def tokenize(
    tokenizer: transformers.PreTrainedTokenizerBase, prompts: list[str], max_length: int = MAX_LENGTH
) -> np.ndarray:
    """Token ids of `prompts`: int32 (B, max_length), <|startoftext|> ... <|endoftext|> then padding.

    Prompts longer than `max_length` tokens are truncated (keeping the final <|endoftext|>, as CLIP)
    with a warning that names them.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TokenizerError(f"prompts must be a list of strings, got {type(prompts).__name__}: {prompts!r:.80}")
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]]
    truncated = [p for p, n in zip(prompts, lengths, strict=True) if n > max_length]
    if truncated:
        warnings.warn(
            f"{len(truncated)} prompt(s) longer than {max_length} tokens were truncated: "
            + "; ".join(repr(p) for p in truncated),
            stacklevel=2,
        )
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np")[
        "input_ids"
    ]
    return ids.astype(np.int32).reshape(len(prompts), max_length)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character map; its order is the order of CLIP's base vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # Bytes without a printable glyph (control chars, space, ...) borrow code points from 256 upwards.
    others = [b for b in range(256) if b not in set(printable)]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _clip_bpe() -> Tokenizer:
    bpe = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return bpe


def train_merges(texts: Iterable[str], max_merges: int = 10_000) -> list[tuple[str, str]]:
    """BPE merges learnt from `texts` with CLIP's normalisation, word splitting and "</w>" word ends."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(alphabet) + max_merges,
        min_frequency=1,
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    bpe = _clip_bpe()
    bpe.train_from_iterator(texts, trainer)
    return [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]


def _clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    # CLIP's layout: 256 byte characters, the same with "</w>", one token per merge, then the specials.
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + END_OF_WORD for c in chars), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def build_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike, max_merges: int = 10_000
) -> transformers.CLIPTokenizer:
    """Trains a small CLIP-compatible BPE tokenizer on `texts` and writes it to `out_dir`.

    Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json in the layout of
    openai/clip-vit-large-patch14 (pad = <|endoftext|>, model_max_length 77) and returns the tokenizer
    loaded back from `out_dir`. Words of the corpus become single tokens when `max_merges` allows.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise TokenizerError("build_tokenizer needs at least one non-empty text to learn merges from")
    merges = train_merges(texts, max_merges)
    os.makedirs(out_dir, exist_ok=True)
    stale = os.path.join(out_dir, "tokenizer.json")  # would take precedence over the files written here
    if os.path.exists(stale):
        os.remove(stale)
    _write_json(os.path.join(out_dir, "vocab.json"), _clip_vocab(merges))
    _write_merges(os.path.join(out_dir, "merges.txt"), merges)
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), specials)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True}
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {**config, **specials})
    return load_tokenizer(out_dir)


def save_tokenizer(tok: transformers.PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> None:
    """Saves a CLIP tokenizer in both layouts: transformers' ``save_pretrained`` files (tokenizer.json,
    tokenizer_config.json) and CLIP's own vocab.json + merges.txt, as the Hugging Face CLIP repositories ship it.

    transformers 5 saves only tokenizer.json; the vocab and merges are read back from its BPE model, so any
    CLIPTokenizer (or the original CLIP code) loads the folder."""
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(os.fspath(out_dir))
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise TokenizerError(f"cannot write vocab.json + merges.txt for a {model.get('type')} tokenizer; CLIP is BPE")
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    _write_json(os.path.join(out_dir, "vocab.json"), model["vocab"])
    _write_merges(os.path.join(out_dir, "merges.txt"), merges)


def _write_merges(path: str, merges) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
