"""The released model's T5 text branch: FLUX.1-dev's T5 encoder (text_encoder_2/, tokenizer_2/)
run on a prompt as the authors' code runs it (components/data/t5_states.py, the one T5 encoder
the data pipeline uses too), and its states mapped into FLUX's inner width by the package's
t5_embedder.

With a prompt, the released model's FLUX text tokens are
    cat([context_embedder(connector(Qwen2-VL image-token states)), t5_embedder(T5(prompt))], 1)
the T5 part skipping context_embedder (model/flux_forward.py: FluxConditioning.embedded_BUE);
the prompt is padded (or cut) to 256 T5 tokens and every position is kept, padding included, as
the authors' pipeline passes no T5 attention mask; text ids are all zeros; the CLIP pooled input
is the empty prompt's.
"""

from __future__ import annotations

import torch
from torch import nn

from components.data.t5_states import T5PromptEncoder

__all__ = ["T5PromptEncoder", "t5_text_tokens"]


def t5_text_tokens(states_UD: torch.Tensor, t5_embedder: nn.Linear) -> torch.Tensor:
    """[U, E] tokens in FLUX's inner width: t5_embedder applied to T5's states."""
    weight = t5_embedder.weight
    return t5_embedder(states_UD.to(weight.device, weight.dtype))
