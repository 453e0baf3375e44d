"""The released model's T5 text branch: FLUX.1-dev's T5 encoder (text_encoder_2/, tokenizer_2/)
run on a prompt as the authors' code runs it, and its states mapped into FLUX's inner width by the
package's t5_embedder.

With a prompt, the released model's FLUX text tokens are
    cat([context_embedder(connector(Qwen2-VL image-token states)), t5_embedder(T5(prompt))], 1)
the T5 part skipping context_embedder (model/flux_forward.py: FluxConditioning.embedded_BUE);
the prompt is padded (or cut) to 256 T5 tokens and every position is kept, padding included, as
the authors' pipeline passes no T5 attention mask; text ids are all zeros; the CLIP pooled input
is the empty prompt's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import T5EncoderModel, T5TokenizerFast

from model.presets import T5_MAX_TOKENS


class T5PromptEncoder:
    """T5's last hidden states of a prompt, [max_tokens, d_model] float32-or-compute-dtype."""

    def __init__(
        self,
        flux_path: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_tokens: int = T5_MAX_TOKENS,
    ) -> None:
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

    def token_ids(self, prompt: str) -> torch.Tensor:
        """[1, max_tokens] ids: the prompt, </s>, then <pad> up to max_tokens (cut when longer)."""
        return self.tokenizer(
            [prompt],
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.inference_mode()
    def __call__(self, prompt: str) -> torch.Tensor:
        ids_BU = self.token_ids(prompt).to(self.device)
        return self.model(input_ids=ids_BU).last_hidden_state[0]


def t5_text_tokens(states_UD: torch.Tensor, t5_embedder: nn.Linear) -> torch.Tensor:
    """[U, E] tokens in FLUX's inner width: t5_embedder applied to T5's states."""
    weight = t5_embedder.weight
    return t5_embedder(states_UD.to(weight.device, weight.dtype))
