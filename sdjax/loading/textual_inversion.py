"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): learned token embeddings added to a CLIP
tokenizer and text encoder, as diffusers' ``load_textual_inversion`` adds them.

Files (``.safetensors`` only; pickles are never read):

- A1111: ``{"emb_params": (n, D)}``; the token defaults to the file's name.
- diffusers ``learned_embeds.safetensors``: ``{token: (D,) or (n, D)}``.
- SDXL (A1111 / diffusers): ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``, one part per text encoder; the SDXL
  pipeline reads each part with ``part="clip_l"`` / ``"clip_g"``.

An n-vector embedding becomes n tokens, ``token token_1 ... token_{n-1}``, and :func:`expand_prompt` rewrites
``token`` in a prompt to all of them (diffusers' ``maybe_convert_prompt``). The functions take and return params:
:func:`read_embedding` (validated tokens and vectors), :func:`grow_token_embedding` (a text encoder module with a
larger vocabulary and params with the vectors at the new token ids), :func:`add_tokens` (a tokenizer copy).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sdjax import weights
from sdjax.errors import PipelineError
from sdjax.loading.lora import PICKLE_SUFFIXES

A1111_KEY = "emb_params"
SDXL_PARTS = ("clip_l", "clip_g")
# Where CLIPTextModel keeps its token embedding table (vocab_size, hidden_size).
TOKEN_EMBEDDING = ("embeddings", "token_embedding", "embedding")


def read_embedding(
    path: Any, token: str | None, tokenizer: Any, text_encoder: Any, part: str | None = None
) -> tuple[list[str], np.ndarray]:
    """The tokens and float32 vectors (n, D) of an embedding file for ``text_encoder`` (D = its hidden_size).

    Args:
      token: the token to add; None: the diffusers file's key, or the A1111 file's name.
      part: for SDXL files, which text encoder's part ("clip_l" or "clip_g"); None refuses SDXL files.
    Raises:
      PipelineError (one line): missing file, pickle, unreadable or unknown layout, SDXL file without ``part``,
      width other than D, NaN/inf, a token already in the tokenizer's vocabulary.
    """
    path = Path(path)
    state = _read(path)
    if set(SDXL_PARTS) & set(state):
        if part is None:
            raise PipelineError(
                f"{path.name} is an SDXL embedding ({', '.join(sorted(state))}: one part per text encoder); this "
                "pipeline has one CLIP text encoder: load it into StableDiffusionXL"
            )
        name, vectors = token or path.stem, state.get(part)
        if vectors is None:
            raise PipelineError(f"{path.name} has no {part!r} part; it has {', '.join(sorted(state))}")
    elif len(state) == 1:
        key, vectors = next(iter(state.items()))
        name = token or (path.stem if key == A1111_KEY else key)
    else:
        raise PipelineError(
            f"{path.name} holds {len(state)} tensors ({weights._short_list(sorted(state), 3)}); expected one "
            f"embedding: A1111 {{{A1111_KEY!r}: (n, D)}} or diffusers {{token: (n, D)}}"
        )
    vectors = np.asarray(vectors, np.float32)
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    width = text_encoder.config.hidden_size
    if vectors.ndim != 2 or vectors.shape[1] != width or not vectors.shape[0]:
        raise PipelineError(
            f"{path.name}: embedding of shape {tuple(np.shape(vectors))}, this text encoder takes (n, {width}) "
            "vectors (an embedding for another model family?)"
        )
    if not np.isfinite(vectors).all():
        raise PipelineError(f"{path.name}: the embedding holds NaN or inf values (the file is damaged)")
    tokens = [name] + [f"{name}_{i}" for i in range(1, vectors.shape[0])]
    taken = [t for t in tokens if t in tokenizer.get_vocab()]
    if taken:
        raise PipelineError(
            f"token {taken[0]!r} is already in the tokenizer's vocabulary; load the embedding with another token="
        )
    return tokens, vectors


def add_tokens(tokenizer: Any, tokens: list[str]) -> Any:
    """A copy of ``tokenizer`` with ``tokens`` added (ids len(tokenizer), len(tokenizer) + 1, ...)."""
    tokenizer = copy.deepcopy(tokenizer)  # tokenizers are shared (clip_tokenizer is cached)
    tokenizer.add_tokens(tokens)
    return tokenizer


def grow_token_embedding(
    text_encoder: Any, params: Any, tokenizer: Any, tokens: list[str], vectors: np.ndarray
) -> tuple[Any, Any]:
    """(text encoder module with a vocabulary that holds the new ids, its params with ``vectors`` (n, D) as the
    embeddings of ``tokens``), the ids being those :func:`add_tokens` gives them on ``tokenizer``. The table
    keeps its dtype; the other params are the same objects."""
    first = len(tokenizer)
    table = params[TOKEN_EMBEDDING[0]][TOKEN_EMBEDDING[1]][TOKEN_EMBEDDING[2]]
    vocab = max(table.shape[0], first + len(tokens))
    grown = jnp.zeros((vocab, table.shape[1]), table.dtype).at[: table.shape[0]].set(table)
    grown = grown.at[first : first + len(tokens)].set(jnp.asarray(vectors, table.dtype))
    embeddings = {**params[TOKEN_EMBEDDING[0]], TOKEN_EMBEDDING[1]: {TOKEN_EMBEDDING[2]: grown}}
    module = text_encoder.clone(config=dataclasses.replace(text_encoder.config, vocab_size=vocab))
    return module, {**params, TOKEN_EMBEDDING[0]: embeddings}


def expand_prompt(tokenizer: Any, prompt: str) -> str:
    """``prompt`` with each added token that has ``token_1 ..`` companions (a multi-vector embedding) replaced by
    ``token token_1 ... token_{n-1}``, as diffusers' ``maybe_convert_prompt``; other prompts are returned as is."""
    added = tokenizer.added_tokens_encoder
    for token in set(tokenizer.tokenize(prompt)):
        if token in added and f"{token}_1" in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement, i = f"{replacement} {token}_{i}", i + 1
            prompt = prompt.replace(token, replacement)
    return prompt


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise PipelineError(f"embedding file {path} does not exist")
    if path.suffix in PICKLE_SUFFIXES:
        raise PipelineError(
            f"{path.name} is a PyTorch pickle ({path.suffix}); sdjax does not unpickle files (it can run code): "
            "convert it to .safetensors"
        )
    if path.is_dir() or path.suffix != ".safetensors":
        raise PipelineError(f"{path.name}: embeddings are read from a .safetensors file only")
    try:
        return weights.read_safetensors([path])
    except weights.WeightsError as e:
        raise PipelineError(f"cannot read embedding {path}: {str(e).splitlines()[0]}") from e
