"""Sample encoder: bucketed images + captions -> cached Qwen2-VL prefix states, VAE latents, CLIP.

Input: PIL images already resized by the bucket step (sides multiples of 16) and their captions.
Output per sample (CPU tensors, un-padded), see SampleEncoder.encode for the exact keys:
  - the Qwen2-VL frozen prefix (input of the last decoder layer) for the image chat turn and for
    the caption chat turn, with the 3-D rope position ids and masks that replay needs
    (model/qwen2vl_tail.py), cast to hidden_dtype (fp8 with per-token absmax scales);
  - the RAW VAE latent (posterior mean or a sample; no scaling_factor/shift_factor applied);
  - the CLIP-L pooled caption embedding (FLUX's pooled_projections);
  - with `t5_caption`, FLUX's T5 states of the caption (256 tokens, unmasked: the released
    model's T5 text branch, components/data/t5_states.py), stored like the prefix states.
Checkpoints are a local directory or a hub id resolved through the local HF cache only.
"""

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPTextModel,
    CLIPTokenizer,
    Qwen2VLForConditionalGeneration,
)

from components.checkpoints import resolve_checkpoint
from model.qwen2vl_tail import PromptBatch, drop_last_layer, run_prefix

HIDDEN_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
IMAGE_SIDE_MULTIPLE = 16


@dataclass(frozen=True, kw_only=True, slots=True)
class EncodeConfig:
    """What the encode step loads and how it stores what it computes."""

    qwen2vl: str
    """Qwen2-VL checkpoint: a local directory or a hub id resolved through the local HF cache."""
    qwen2vl_revision: str | None = None
    """Hub revision (branch, tag or commit) of qwen2vl; None = main. Must be None for a dir."""
    flux: str
    """FLUX diffusers root (holds vae/, text_encoder/, tokenizer/): local dir or hub id."""
    flux_revision: str | None = None
    """Hub revision of flux; None = main. Must be None for a local directory."""
    instruction: str = "Describe this image."
    """Text after the image in the user turn of the image prompt."""
    image_tokens: int = 512
    """Qwen2-VL image size target: min_pixels = max_pixels = image_tokens * 28 * 28."""
    batch_size: int = 8
    """Samples that go through the models together (padded on the right)."""
    hidden_dtype: str = "bfloat16"
    """Stored dtype of prefix hidden states: float32, bfloat16 or float8_e4m3fn (+ scales)."""
    latent_mode: str = "mean"
    """VAE posterior: 'mean' (deterministic) or 'sample' (drawn with seed)."""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda."""
    compute_dtype: str = "float32"
    """dtype the encoders run in: float32 or bfloat16."""
    seed: int = 0
    """Seed of the generator for latent_mode='sample' (draws depend on call order)."""
    max_caption_tokens: int = 512
    """Captions are cut to this many tokens before encoding (counted); inference caps prompts
    at the same length (infer.requests.max_prompt_tokens)."""
    t5_caption: bool = False
    """Also cache FLUX's T5 (text_encoder_2/) states of each caption, 256 x 4096 per sample at
    real scale (2 MiB in bf16), for training the released model's T5 text branch."""

    def __post_init__(self) -> None:
        for name in ("qwen2vl", "flux", "instruction"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must be a non-empty string")
        if self.image_tokens < 4:
            raise ValueError(f"image_tokens must be >= 4, got {self.image_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_caption_tokens < 1:
            raise ValueError(f"max_caption_tokens must be >= 1, got {self.max_caption_tokens}")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"hidden_dtype must be one of {sorted(HIDDEN_DTYPES)}")
        if self.latent_mode not in ("mean", "sample"):
            raise ValueError(f"latent_mode must be 'mean' or 'sample', got {self.latent_mode!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}")


def decode_hidden(tensor: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Stored hidden states [L, D] (float32, bf16, or fp8 with per-token scale [L]) -> float32."""
    values = tensor.to(torch.float32)
    if scale is None:
        return values
    return values * scale.to(torch.float32).unsqueeze(-1)


def encode_hidden(hidden: torch.Tensor, dtype_name: str) -> dict[str, torch.Tensor]:
    """float hidden [L, D] -> {'hidden': stored dtype} (+ 'scale' float32 [L] for fp8)."""
    if dtype_name != "float8_e4m3fn":
        return {"hidden": hidden.to(HIDDEN_DTYPES[dtype_name])}
    hidden = hidden.to(torch.float32)
    scale = hidden.abs().amax(dim=-1).clamp_min(1e-12) / FP8_MAX
    quantised = (hidden / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    return {"hidden": quantised, "scale": scale}


def image_chat_tokens(tokenizer, image_processor, images: list[Image.Image], *, instruction, size):
    """(tokens, vision) of a user turn holding an image and `instruction`, with the generation
    prompt: the chat text with <|image_pad|> repeated once per merged image patch, tokenized
    and right-padded, and the image processor's pixel_values and image_grid_thw."""
    vision = image_processor(
        images=[image.convert("RGB") for image in images], size=size, return_tensors="pt"
    )
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}
    ]
    template = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_pad = "<|image_pad|>"
    merge_area = image_processor.merge_size**2
    texts = [
        template.replace(image_pad, image_pad * (int(grid.prod()) // merge_area), 1)
        for grid in vision["image_grid_thw"]
    ]
    tokens = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    return tokens, vision


def image_size_for(image_processor, image_tokens: int) -> dict[str, int]:
    """The processor size that gives `image_tokens` merged image tokens (fixed pixel count)."""
    target_pixels = image_tokens * (image_processor.patch_size * 2) ** 2
    return {"shortest_edge": target_pixels, "longest_edge": target_pixels}


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _image_to_vae_input(image: Image.Image) -> torch.Tensor:
    """PIL -> float32 [3, H, W] in [-1, 1] (what diffusers' VaeImageProcessor produces)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class SampleEncoder:
    """Loads the frozen encoders once and turns (image, caption) samples into cached tensors."""

    def __init__(self, config: EncodeConfig) -> None:
        self.config = config
        self.device = _pick_device(config.device)
        self.compute_dtype = COMPUTE_DTYPES[config.compute_dtype]
        self.qwen2vl = resolve_checkpoint(
            config.qwen2vl,
            revision=config.qwen2vl_revision,
            root_file="config.json",
            required=("model",),
        )
        self.flux = resolve_checkpoint(
            config.flux,
            revision=config.flux_revision,
            root_file="model_index.json",
            required=(
                "vae/config.json",
                "vae/diffusion_pytorch_model",
                "text_encoder/config.json",
                "text_encoder/model",
                "tokenizer/",
            ),
        )
        self._prefix_sha256: str | None = None
        self._load_qwen2vl()
        self._load_flux_parts()
        self.t5 = None
        if config.t5_caption:
            from components.data.t5_states import T5PromptEncoder

            self.t5 = T5PromptEncoder(self.flux.path, device=self.device, dtype=self.compute_dtype)
        self._generator = torch.Generator(device=self.device).manual_seed(config.seed)

    def _load_qwen2vl(self) -> None:
        full = Qwen2VLForConditionalGeneration.from_pretrained(
            self.qwen2vl.path, dtype=self.compute_dtype
        )
        self.num_layers = full.config.text_config.num_hidden_layers
        self.image_token_id = full.config.image_token_id
        # Keep only the inner model: lm_head and the last layer are never used by the prefix.
        self.prefix_model = full.model
        del full
        drop_last_layer(self.prefix_model)
        self.prefix_model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.qwen2vl.path)
        if self.tokenizer.chat_template is None:
            template_file = self.qwen2vl.path / "chat_template.json"
            self.tokenizer.chat_template = json.loads(template_file.read_text())["chat_template"]
        self.image_processor = AutoImageProcessor.from_pretrained(self.qwen2vl.path)
        self._image_size = image_size_for(self.image_processor, self.config.image_tokens)

    def _load_flux_parts(self) -> None:
        root = self.flux.path
        self.vae = AutoencoderKL.from_pretrained(
            root, subfolder="vae", torch_dtype=self.compute_dtype
        )
        self.vae.to(self.device).eval().requires_grad_(False)
        self.clip = CLIPTextModel.from_pretrained(
            root, subfolder="text_encoder", dtype=self.compute_dtype
        )
        self.clip.to(self.device).eval().requires_grad_(False)
        self.clip_tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")

    @torch.inference_mode()
    def encode(
        self, images: list[Image.Image], captions: list[str]
    ) -> list[dict[str, torch.Tensor]]:
        """Encode samples in mini-batches of batch_size; one dict of CPU tensors per sample.

        Keys: vae_latent float32 [16, H/8, W/8] (RAW: before shift_factor/scaling_factor),
        image_prompt_hidden [L, D], image_prompt_position_ids int32 [3, L],
        image_prompt_attention_mask int8 [L], image_prompt_image_mask int8 [L] (1 at
        <|image_pad|>), image_grid_thw int32 [3], caption_prompt_hidden [L2, D],
        caption_prompt_position_ids int32 [3, L2], caption_prompt_attention_mask int8 [L2],
        clip_pooled float32 [pooled_dim]; with t5_caption, caption_t5_hidden [256, d_model];
        hidden states in hidden_dtype, and for float8_e4m3fn also image_prompt_hidden_scale /
        caption_prompt_hidden_scale (/ caption_t5_hidden_scale) float32 [L].
        """
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        for index, image in enumerate(images):
            if image.width % IMAGE_SIDE_MULTIPLE or image.height % IMAGE_SIDE_MULTIPLE:
                raise ValueError(
                    f"image {index} is {image.width}x{image.height}: sides must be multiples of "
                    f"{IMAGE_SIDE_MULTIPLE} (bucket the images first)"
                )
        samples = []
        for start in range(0, len(images), self.config.batch_size):
            stop = start + self.config.batch_size
            samples.extend(self._encode_batch(images[start:stop], captions[start:stop]))
        return samples

    def _encode_batch(
        self, images: list[Image.Image], captions: list[str]
    ) -> list[dict[str, torch.Tensor]]:
        image_batch = self.image_prompt_batch(images)
        image_rows = self._prefix_rows(image_batch, "image_prompt")
        caption_rows = self._prefix_rows(self.caption_prompt_batch(captions), "caption_prompt")
        latents = self.encode_latents(images)
        pooled = self.encode_clip_pooled(captions)
        t5_rows = self._t5_rows(captions)
        samples = []
        for index in range(len(images)):
            sample = {"vae_latent": latents[index], "clip_pooled": pooled[index]}
            sample.update(image_rows[index])
            sample.update(caption_rows[index])
            sample.update(t5_rows[index])
            sample["image_grid_thw"] = image_batch.image_grid_thw_N3[index].to(torch.int32).cpu()
            samples.append(sample)
        return samples

    def fit_caption(self, caption: str) -> tuple[str, bool]:
        """(caption, was it cut): cut to max_caption_tokens tokens of the Qwen2-VL tokenizer."""
        ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.config.max_caption_tokens:
            return caption, False
        return self.tokenizer.decode(ids[: self.config.max_caption_tokens]).strip(), True

    def _chat_text(self, content: list[dict]) -> str:
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")

    def image_prompt_batch(
        self, images: list[Image.Image], *, image_tokens: int | None = None
    ) -> PromptBatch:
        """User turn (image + instruction) with generation prompt, like the Qwen2-VL processor;
        each image resized to `image_tokens` merged tokens (default: config.image_tokens)."""
        size = self._image_size
        if image_tokens is not None:
            size = image_size_for(self.image_processor, image_tokens)
        tokens, vision = image_chat_tokens(
            self.tokenizer,
            self.image_processor,
            images,
            instruction=self.config.instruction,
            size=size,
        )
        return PromptBatch(
            input_ids_BL=tokens["input_ids"].to(self.device),
            attention_mask_BL=tokens["attention_mask"].to(self.device),
            mm_token_type_ids_BL=(tokens["input_ids"] == self.image_token_id).int().to(self.device),
            pixel_values_PC=vision["pixel_values"].to(self.device, self.compute_dtype),
            image_grid_thw_N3=vision["image_grid_thw"].to(self.device),
        )

    def caption_prompt_batch(self, captions: list[str]) -> PromptBatch:
        """Text-only user turn holding the caption, with generation prompt."""
        texts = [self._chat_text([{"type": "text", "text": caption}]) for caption in captions]
        tokens = self._tokenize(texts)
        return PromptBatch(
            input_ids_BL=tokens["input_ids"].to(self.device),
            attention_mask_BL=tokens["attention_mask"].to(self.device),
            mm_token_type_ids_BL=torch.zeros_like(tokens["input_ids"], dtype=torch.int32).to(
                self.device
            ),
        )

    def _prefix_rows(self, batch: PromptBatch, prefix: str) -> list[dict[str, torch.Tensor]]:
        """Run the prefix and cut each right-padded row back to its real tokens."""
        output = run_prefix(self.prefix_model, batch)
        rows = []
        for index, length in enumerate(batch.attention_mask_BL.sum(dim=1).tolist()):
            stored = encode_hidden(
                output.hidden_BLD[index, :length].cpu(), self.config.hidden_dtype
            )
            row = {
                f"{prefix}_hidden": stored["hidden"],
                f"{prefix}_position_ids": output.position_ids_3BL[:, index, :length]
                .to(torch.int32)
                .cpu(),
                f"{prefix}_attention_mask": batch.attention_mask_BL[index, :length]
                .to(torch.int8)
                .cpu(),
            }
            if "scale" in stored:
                row[f"{prefix}_hidden_scale"] = stored["scale"]
            if batch.pixel_values_PC is not None:
                image_mask = batch.input_ids_BL[index, :length] == self.image_token_id
                row[f"{prefix}_image_mask"] = image_mask.to(torch.int8).cpu()
            rows.append(row)
        return rows

    def _t5_rows(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """caption_t5_hidden (+ its scale for fp8) per caption; nothing without t5_caption."""
        if self.t5 is None:
            return [{} for _ in captions]
        rows = []
        for states_UD in self.t5.encode(captions):
            stored = encode_hidden(states_UD.cpu(), self.config.hidden_dtype)
            row = {"caption_t5_hidden": stored["hidden"]}
            if "scale" in stored:
                row["caption_t5_hidden_scale"] = stored["scale"]
            rows.append(row)
        return rows

    def encode_latents(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """RAW VAE latents float32 [16, H/8, W/8]; same-size images go through the VAE together."""
        latents: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(image.size, []).append(index)
        for indices in by_size.values():
            pixels = torch.stack([_image_to_vae_input(images[i]) for i in indices])
            posterior = self.vae.encode(pixels.to(self.device, self.compute_dtype)).latent_dist
            if self.config.latent_mode == "mean":
                batch_latents = posterior.mean
            else:
                batch_latents = posterior.sample(generator=self._generator)
            for index, latent in zip(indices, batch_latents, strict=True):
                latents[index] = latent.to(torch.float32).cpu()
        return latents

    def encode_clip_pooled(self, captions: list[str]) -> torch.Tensor:
        """CLIP pooled caption embeddings float32 [B, pooled_dim] (see clip_pooled)."""
        return clip_pooled(self.clip_tokenizer, self.clip, captions)

    @property
    def prefix_sha256(self) -> str:
        """sha256 of the frozen Qwen2-VL prefix these states come from (computed once; see
        components/training/encoder_tail.py: qwen2vl_prefix_sha256)."""
        if self._prefix_sha256 is None:
            from components.training.encoder_tail import qwen2vl_prefix_sha256

            self._prefix_sha256 = qwen2vl_prefix_sha256(self.qwen2vl.path)
        return self._prefix_sha256

    def describe(self) -> dict:
        """Everything the data manifest needs to say how the cached tensors were made."""
        config = self.config
        return {
            "qwen2vl": config.qwen2vl,
            "qwen2vl_revision": self.qwen2vl.revision_id,
            "qwen2vl_prefix_sha256": self.prefix_sha256,
            "flux": config.flux,
            "flux_revision": self.flux.revision_id,
            "clip": f"{config.flux}/text_encoder",
            "vae": f"{config.flux}/vae",
            "layer_cut": f"input of decoder layer {self.num_layers - 1} of {self.num_layers}",
            "hidden_dtype": config.hidden_dtype,
            "compute_dtype": config.compute_dtype,
            "image_tokens": config.image_tokens,
            "image_pixels": self._image_size["longest_edge"],
            "instruction": config.instruction,
            "max_caption_tokens": config.max_caption_tokens,
            "chat_template_sha256": hashlib.sha256(
                self.tokenizer.chat_template.encode("utf-8")
            ).hexdigest(),
            "padding_side": "right",
            "latent_mode": config.latent_mode,
            "latent_is_raw": True,
            "vae_scaling_factor": float(self.vae.config.scaling_factor),
            "vae_shift_factor": float(self.vae.config.shift_factor or 0.0),
            "t5_caption": None if self.t5 is None else self.t5.describe(config.flux),
        }


@torch.no_grad()
def clip_pooled(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, captions: list[str]):
    """CLIP-L pooled embeddings float32 [B, pooled_dim] on the CPU, tokenised like FluxPipeline
    (padded to the tokenizer's max length, truncated): FLUX's pooled_projections. The one place
    they are computed: captions in the data pipeline, prompts and the empty prompt elsewhere."""
    tokens = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    output = text_encoder(tokens["input_ids"].to(device), output_hidden_states=False)
    return output.pooler_output.to(torch.float32).cpu()
