"""Add-ons every pipeline family takes, as diffusers mutates its pipelines: LoRA and textual inversion, thin
methods over :mod:`sdjax.loading.lora` / :mod:`sdjax.loading.textual_inversion` ("params in, params out"). A LoRA is
merged into the params (see lora.py's docstring)."""

from __future__ import annotations

import os
from typing import Any

from sdjax.loading import lora, textual_inversion


class AddOns:
    """LoRA and textual-inversion methods of a pipeline with ``params``, ``modules``, ``_lora`` and its text
    encoders (``text_encoder_slots``) and tokenizers."""

    params: dict[str, Any]
    _lora: Any  # the loaded LoRAs (sdjax.loading.lora.LoraState) or None

    @property
    def modules(self) -> dict[str, Any]:
        """The networks by component name ("unet", "vae", "text_encoder", ...)."""
        raise NotImplementedError  # each family lists its own

    def load_lora_weights(self, path: str | os.PathLike, scale: float = 1.0, adapter_name: str | None = None) -> None:
        """Loads a kohya / A1111 or diffusers / PEFT LoRA ``.safetensors`` file (or a folder holding
        ``pytorch_lora_weights.safetensors``) as adapter ``adapter_name`` (default ``default_N``) and makes it the
        only active one, with weight ``scale`` (as diffusers). Nothing changes when it raises PipelineError."""
        state = self._lora or lora.LoraState(base=dict(self.params))
        name = lora.default_adapter_name(self._lora) if adapter_name is None else adapter_name
        adapter = lora.read_adapter(path, name, self.modules, state.base)
        self._set_lora(lora.add_adapter(state, adapter, scale))

    def set_adapters(self, names: str | list[str], weights: float | list[float] | None = None) -> None:
        """Activates exactly the LoRAs ``names`` with ``weights`` (one per name, one for all, None: 1.0), as
        diffusers' ``set_adapters``; re-merges from the original params (no recompile)."""
        self._set_lora(lora.set_adapters(self._lora, names, weights))

    def unload_lora_weights(self) -> None:
        """Removes every LoRA: the params become the ones loaded before the first LoRA (the same arrays)."""
        if self._lora is not None:
            self.params, self._lora = dict(self._lora.base), None

    @property
    def active_adapters(self) -> dict[str, float]:
        """The active LoRAs and their weights."""
        return dict(self._lora.active) if self._lora else {}

    def _set_lora(self, state: lora.LoraState) -> None:
        self.params, self._lora = lora.merged_params(state), state

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None) -> None:
        """Loads an A1111 (``emb_params``) or diffusers (``{token: vectors}``) embedding ``.safetensors`` (SDXL:
        its ``clip_l`` / ``clip_g`` parts into the matching text encoders): each tokenizer gets ``token``
        (default: the diffusers file's token, the A1111 file's name) and, for an n-vector embedding,
        ``token_1 .. token_{n-1}``; each text encoder's embedding table grows by n rows. Prompts containing
        ``token`` use all n vectors (see :func:`textual_inversion.expand_prompt`). Nothing changes when it
        raises PipelineError."""
        read = [
            (encoder, tokenizer_name, textual_inversion.read_embedding(
                path, token, self._tokenizer(tokenizer_name), getattr(self, encoder), part
            ))
            for encoder, tokenizer_name, part in self.text_encoder_slots
        ]  # fmt: skip
        for encoder, tokenizer_name, (tokens, vectors) in read:
            tok = self._tokenizer(tokenizer_name)
            module, params = textual_inversion.grow_token_embedding(
                getattr(self, encoder), self.params[encoder], tok, tokens, vectors
            )
            if self._lora is not None:  # a later re-merge starts from the base params: they need the new rows too
                _, base = textual_inversion.grow_token_embedding(
                    getattr(self, encoder), self._lora.base[encoder], tok, tokens, vectors
                )
                self._lora = lora.with_base(self._lora, encoder, base)
            setattr(self, encoder, module)
            self.params = {**self.params, encoder: params}
            self._set_tokenizer(tokenizer_name, textual_inversion.add_tokens(tok, tokens))

    @property
    def text_encoder_slots(self) -> list[tuple[str, str, str | None]]:
        """(text encoder attribute, tokenizer name, SDXL embedding part) per text encoder of the pipeline."""
        raise NotImplementedError  # each family lists its own

    def _tokenizer(self, name: str) -> Any:
        raise NotImplementedError

    def _set_tokenizer(self, name: str, tok: Any) -> None:
        raise NotImplementedError
