"""FLUX.1-dev's T5 encoder (text_encoder_2/, tokenizer_2/) run on text as the released
Qwen2vl-Flux runs it: padded (or cut) to 256 tokens with every position kept, padding included,
because the authors' pipeline passes no T5 attention mask. The one place T5 states are made:
the data pipeline caches them for captions (`data.encode.t5_caption`), the generator makes them
for prompts (components/inference/t5_branch.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import T5EncoderModel, T5TokenizerFast

from model.presets import T5_MAX_TOKENS

T5_FOLDERS = ("text_encoder_2", "tokenizer_2")
"""The FLUX folders T5 is read from."""


class T5PromptEncoder:
    """T5's last hidden states of texts, [max_tokens, d_model] each, in the compute dtype."""

    def __init__(
        self,
        flux_path: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_tokens: int = T5_MAX_TOKENS,
    ) -> None:
        missing = [name for name in T5_FOLDERS if not (Path(flux_path) / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{flux_path} has no {' or '.join(f'{name}/' for name in missing)}: the T5 text "
                "branch needs FLUX.1-dev's T5 encoder and tokenizer"
            )
        self.tokenizer = T5TokenizerFast.from_pretrained(flux_path, subfolder="tokenizer_2")
        self.model = T5EncoderModel.from_pretrained(
            flux_path, subfolder="text_encoder_2", dtype=dtype
        )
        self.model.to(device).eval().requires_grad_(False)
        self.device = device
        self.max_tokens = max_tokens

    @property
    def d_model(self) -> int:
        return int(self.model.config.d_model)

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        """[B, max_tokens] ids: each text, </s>, then <pad> up to max_tokens (cut when longer)."""
        return self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """[B, max_tokens, d_model] states of `texts`, unmasked."""
        ids_BU = self.token_ids(texts).to(self.device)
        return self.model(input_ids=ids_BU).last_hidden_state

    def __call__(self, prompt: str) -> torch.Tensor:
        """[max_tokens, d_model] states of one prompt."""
        return self.encode([prompt])[0]

    def describe(self, flux: str) -> dict:
        """What a data manifest says of the cached caption states."""
        return {
            "encoder": f"{flux}/text_encoder_2",
            "max_tokens": self.max_tokens,
            "d_model": self.d_model,
            "attention_mask": "none (every position kept, padding included)",
        }
