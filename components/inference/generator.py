"""Image generation with a trained Qwen2VL-Flux model: every mode of the released model.

`GeneratorParts` is what a model package loads into (the trained networks plus the paths of the
verified frozen bases); `Generator` turns a `GenerationRequest`
(components/inference/request_schema.py: one request, parsed and validated as far as its fields
go) into an image.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from PIL import Image

from components.data.encode import EncodeConfig, SampleEncoder
from components.inference.control import (
    DEPTH_DETECTOR_MISSING,
    control_map,
    union_mode,
)
from components.inference.generator_parts import GeneratorParts
from components.inference.request_schema import (
    INIT_IMAGE_MODES,
    REFERENCE_MODES,
    FocusCircle,
    FocusGrid,
    GenerationRequest,
    uses_prompt_tokens,
    uses_reference_tokens,
    validate_request,
)
from components.inference.t5_branch import T5PromptEncoder, t5_text_tokens
from model.conditioning import (
    flux_conditioning,
    image_token_states,
    real_token_states,
    unconditional_conditioning,
)
from model.flux_forward import (
    ControlCondition,
    FluxConditioning,
    control_residuals,
    predict_velocity,
)
from model.generation import (
    apply_focus,
    circle_focus_weights,
    grid_focus_weights,
    img2img_start_index,
    inpaint_sample,
    latent_size,
    merged_grid,
    pack_mask,
    repaint_mask,
)
from model.latent_codec import latent_image_ids, pack_latents
from model.qwen2vl_tail import PromptBatch, run_prefix
from model.rectified_flow import (
    add_noise,
    euler_sample,
    flux_sigmas,
    guided,
    resolution_shift_mu,
    sample,
)


def focus_weights(focus: FocusCircle | FocusGrid, grid: tuple[int, int]) -> torch.Tensor:
    """[G] float32 weights of the reference image's tokens on their (rows, columns) grid."""
    if isinstance(focus, FocusCircle):
        return circle_focus_weights(
            *grid, center_x=focus.center_x, center_y=focus.center_y, radius=focus.radius
        )
    return grid_focus_weights(*grid, rows=focus.rows, columns=focus.columns, cells=focus.cells)


class Generator:
    """The frozen bases (loaded once) + the trained networks: GenerationRequest -> PIL image.

    Conditioning is built as training builds it: Qwen2-VL prefix -> trained tail (last layer +
    norm) -> image tokens and/or prompt tokens -> connector -> FLUX encoder_hidden_states, with
    the CLIP-L pooled vector of the prompt (of "" when no prompt conditions). Sampling is FLUX's
    shifted-sigma Euler; the initial noise is drawn on the CPU from request.seed, so a request
    gives the same image on any device up to kernel differences (byte-identical on the CPU).
    """

    def __init__(
        self, parts: GeneratorParts, *, device: str = "cpu", compute_dtype: str = "float32"
    ) -> None:
        settings = parts.settings
        self.parts = parts
        self.encoder = SampleEncoder(
            EncodeConfig(
                qwen2vl=str(parts.qwen2vl_path),
                flux=str(parts.flux_path),
                instruction=settings.instruction,
                image_tokens=settings.image_tokens,
                batch_size=1,
                hidden_dtype="float32",
                latent_mode="mean",
                device=device,
                compute_dtype=compute_dtype,
            )
        )
        self.device = self.encoder.device
        self.dtype = self.encoder.compute_dtype
        self._prepare_trained_parts()
        vae_config = self.encoder.vae.config
        self.vae_scale_factor = 2 ** (len(vae_config.block_out_channels) - 1)
        self.latent_channels = int(vae_config.latent_channels)
        self.has_guidance_embeds = bool(parts.transformer.config.guidance_embeds)
        with torch.inference_mode():
            self._empty_pooled_P = self.encoder.encode_clip_pooled([""])[0]
        self.t5: T5PromptEncoder | None = None
        if settings.text_branch == "t5":
            if parts.t5_embedder is None:
                raise ValueError("text_branch 't5' needs the package's t5_embedder")
            self.t5 = T5PromptEncoder(parts.flux_path, device=self.device, dtype=self.dtype)

    def _prepare_trained_parts(self) -> None:
        parts = self.parts
        # The rope's inverse frequencies stay float32 (as load_qwen2vl_tail keeps them).
        frozen = [part for part in (parts.controlnet, parts.t5_embedder) if part is not None]
        cast = [parts.transformer, parts.connector, *frozen]
        cast += [child for name, child in parts.tail.named_children() if name != "rotary_emb"]
        for module in (parts.transformer, parts.connector, parts.tail, *frozen):
            module.to(device=self.device).eval().requires_grad_(False)
        for module in cast:
            if any(param.dtype != self.dtype for param in module.parameters()):
                module.to(dtype=self.dtype)

    def generate(self, request: GenerationRequest) -> Image.Image:
        """One RGB image of exactly request.width x request.height (validates first)."""
        return self.decode_latents(self.generate_latents(request))[0]

    def generate_many(self, requests: Sequence[GenerationRequest]) -> list[Image.Image]:
        """generate() for each request in order (every request is validated before any runs)."""
        for request in requests:
            validate_request(request)
        return [self.generate(request) for request in requests]

    @torch.inference_mode()
    def generate_latents(self, request: GenerationRequest) -> torch.Tensor:
        """The sampled RAW VAE latent float32 [1, C, height / 8, width / 8] on the CPU (before
        the VAE decoder; shift and scaling already undone)."""
        validate_request(request)
        latent_height, latent_width = latent_size(
            request.width, request.height, vae_scale_factor=self.vae_scale_factor
        )
        self.check_supported(request)
        reference = self._reference_image(request)
        conditioning = self._conditioning(request, reference)
        controls = self._control_conditions(request)
        seeded = torch.Generator("cpu").manual_seed(int(request.seed))
        noise_BCHW = torch.randn(
            (1, self.latent_channels, latent_height, latent_width),
            generator=seeded,
            dtype=torch.float32,
        )
        noise_BLC = pack_latents(noise_BCHW).to(self.device)
        image_ids_L3 = latent_image_ids(latent_height, width_latent=latent_width).to(self.device)
        velocity = partial(self._velocity, image_ids_L3=image_ids_L3, controls=controls)
        conditional, unconditional = partial(velocity, conditioning=conditioning), None
        if request.cfg_scale != 1.0:
            empty = unconditional_conditioning(
                self.parts.connector, conditioning, empty_pooled_P=self._empty_pooled_P
            )
            unconditional = partial(velocity, conditioning=empty)
        if request.mode in INIT_IMAGE_MODES:
            sigmas_N1 = flux_sigmas(request.steps, mu=resolution_shift_mu(noise_BLC.shape[1]))
            packed_BLC = self._sample_from_init(
                request,
                reference,
                velocity=guided(conditional, unconditional, request.cfg_scale),
                noise_BLC=noise_BLC,
                sigmas_N1=sigmas_N1.to(self.device),
            )
        else:
            packed_BLC = sample(
                conditional,
                noise_BLC,
                num_steps=request.steps,
                unconditional=unconditional,
                cfg_scale=request.cfg_scale,
            )
        codec = self.parts.settings.codec
        return codec.decode(packed_BLC, height=latent_height, width=latent_width).cpu()

    @torch.inference_mode()
    def decode_latents(self, raw_BCHW: torch.Tensor) -> list[Image.Image]:
        """RAW VAE latents -> RGB images (diffusers' postprocess: [-1, 1] -> round(x * 255))."""
        pixels = self.encoder.vae.decode(raw_BCHW.to(self.device, self.dtype)).sample
        array = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return [Image.fromarray(image) for image in array.permute(0, 2, 3, 1).cpu().numpy()]

    def check_supported(self, request: GenerationRequest) -> None:
        """What this generator's parts can do: ValueError "control: ..." for a control request
        without a ControlNet, or a depth source picture without a depth detector."""
        if not request.control:
            return
        if self.parts.controlnet is None:
            raise ValueError(
                "control: no ControlNet is configured (infer.controlnet), so control requests "
                "cannot be generated"
            )
        needs_depth = any(c.kind == "depth" and not c.preprocessed for c in request.control)
        if needs_depth and self.parts.depth_detector is None:
            raise ValueError(DEPTH_DETECTOR_MISSING)

    @torch.inference_mode()
    def control_maps(self, request: GenerationRequest) -> list[Image.Image]:
        """The RGB control map of each control, at the output size (detectors applied)."""
        size = (int(request.width), int(request.height))
        depth = self.parts.depth_detector
        return [control_map(control, size=size, depth=depth) for control in request.control]

    def _control_conditions(self, request: GenerationRequest) -> list[ControlCondition]:
        """Each control map VAE-encoded (posterior mean), scaled and packed like the latents."""
        if not request.control:
            return []
        settings = self.parts.settings
        conditions = []
        for control, image in zip(request.control, self.control_maps(request), strict=True):
            raw_BCHW = self.encoder.encode_latents([image])[0][None]
            conditions.append(
                ControlCondition(
                    image_BLC=settings.codec.encode(raw_BCHW).to(self.device, self.dtype),
                    mode=union_mode(self.parts.controlnet, control.kind),
                    strength=float(control.strength),
                )
            )
        return conditions

    def _reference_image(self, request: GenerationRequest) -> Image.Image | None:
        if request.image is None or request.mode not in REFERENCE_MODES:
            return None
        image = request.image.convert("RGB")
        size = (int(request.width), int(request.height))
        if request.mode in INIT_IMAGE_MODES and image.size != size:
            # The init image is what the sampler starts from: it takes the output size.
            image = image.resize(size, Image.Resampling.LANCZOS)
        return image

    def _final_states(self, batch: PromptBatch) -> torch.Tensor:
        """Frozen prefix, then the trained tail (last layer + norm): final hidden [1, L, D]."""
        prefix = run_prefix(self.encoder.prefix_model, batch)
        return self.parts.tail(prefix.hidden_BLD, prefix.position_ids_3BL, prefix.attention_mask_BL)

    @torch.inference_mode()
    def reference_tokens(
        self, image: Image.Image, *, image_tokens: int | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The reference image's token states [G, D] (row-major) and their (rows, columns), at
        `image_tokens` (default: the settings' image_tokens)."""
        batch = self.encoder.image_prompt_batch([image], image_tokens=image_tokens)
        final_BLD = self._final_states(batch)
        image_mask_BL = batch.input_ids_BL == self.encoder.image_token_id
        tokens_GD = image_token_states(final_BLD, image_mask_BL=image_mask_BL)[0]
        grid = merged_grid(
            batch.image_grid_thw_N3[0].tolist(), merge_size=self.encoder.image_processor.merge_size
        )
        return tokens_GD, grid

    @torch.inference_mode()
    def prompt_tokens(self, prompt: str) -> torch.Tensor:
        """The caption prompt's real-token states [T, D] (the chat turn holding `prompt`)."""
        batch = self.encoder.caption_prompt_batch([prompt])
        final_BLD = self._final_states(batch)
        return real_token_states(final_BLD, attention_mask_BL=batch.attention_mask_BL)[0]

    @torch.inference_mode()
    def conditioning(self, request: GenerationRequest) -> FluxConditioning:
        """What FLUX is conditioned on for a request (batch of 1): connector output of the
        chosen tokens (image tokens first, focus applied, then prompt tokens), all-True mask,
        CLIP pooled vector of the prompt or of "", and the guidance value."""
        validate_request(request)
        return self._conditioning(request, self._reference_image(request))

    def _conditioning(
        self, request: GenerationRequest, reference: Image.Image | None
    ) -> FluxConditioning:
        if self.t5 is not None:
            return self._t5_conditioning(request, reference)
        chosen_TD = []
        if uses_reference_tokens(request):
            tokens_GD, grid = self.reference_tokens(reference)
            if request.focus is not None:
                tokens_GD = apply_focus(tokens_GD, focus_weights(request.focus, grid))
            chosen_TD.append(tokens_GD)
        pooled_P = self._empty_pooled_P
        if uses_prompt_tokens(request):
            chosen_TD.append(self.prompt_tokens(request.prompt))
            pooled_P = self.encoder.encode_clip_pooled([request.prompt])[0]
        hidden_BTD = torch.cat(chosen_TD)[None]
        guidance = self.parts.settings.guidance if request.guidance is None else request.guidance
        return flux_conditioning(
            self.parts.connector,
            hidden_BTD,
            torch.ones(hidden_BTD.shape[:2], dtype=torch.bool, device=self.device),
            pooled_BP=pooled_P[None].to(self.device, self.dtype),
            guidance=float(guidance) if self.has_guidance_embeds else None,
        )

    def _t5_conditioning(
        self, request: GenerationRequest, reference: Image.Image | None
    ) -> FluxConditioning:
        """The released model's conditioning (components/inference/t5_branch.py): the reference
        image's tokens (at prompt_image_tokens next to a prompt, image_tokens without; focus
        applied) through the connector, then the prompt's T5 tokens through t5_embedder; the
        empty prompt's CLIP pooled vector."""
        settings, connector = self.parts.settings, self.parts.connector
        has_prompt = bool(request.prompt.strip())
        hidden_1GD = torch.zeros(1, 0, connector.in_features, device=self.device, dtype=self.dtype)
        if reference is not None:
            budget = settings.image_tokens
            if has_prompt and settings.prompt_image_tokens:
                budget = settings.prompt_image_tokens
            tokens_GD, grid = self.reference_tokens(reference, image_tokens=budget)
            if request.focus is not None:
                tokens_GD = apply_focus(tokens_GD, focus_weights(request.focus, grid))
            hidden_1GD = tokens_GD[None]
        embedded_1UE = None
        if has_prompt:
            embedded_1UE = t5_text_tokens(self.t5(request.prompt), self.parts.t5_embedder)[None]
        guidance = settings.guidance if request.guidance is None else request.guidance
        return flux_conditioning(
            connector,
            hidden_1GD,
            torch.ones(hidden_1GD.shape[:2], dtype=torch.bool, device=self.device),
            pooled_BP=self._empty_pooled_P[None].to(self.device, self.dtype),
            guidance=float(guidance) if self.has_guidance_embeds else None,
            embedded_BUE=embedded_1UE,
        )

    def _velocity(
        self,
        sample_BLC: torch.Tensor,
        sigmas_B: torch.Tensor,
        *,
        image_ids_L3: torch.Tensor,
        conditioning: FluxConditioning,
        controls: Sequence[ControlCondition] = (),
    ) -> torch.Tensor:
        # The sample stays float32 between steps; only the networks run in compute dtype.
        sample_BLC = sample_BLC.to(self.dtype)
        residuals = None
        if controls:
            residuals = control_residuals(
                self.parts.controlnet,
                sample_BLC,
                image_ids_L3=image_ids_L3,
                sigmas_B=sigmas_B,
                conditioning=conditioning,
                controls=list(controls),
            )
        velocity_BLC = predict_velocity(
            self.parts.transformer,
            sample_BLC,
            image_ids_L3=image_ids_L3,
            sigmas_B=sigmas_B,
            conditioning=conditioning,
            control=residuals,
        )
        return velocity_BLC.float()

    def _sample_from_init(
        self,
        request: GenerationRequest,
        reference: Image.Image,
        *,
        velocity,
        noise_BLC: torch.Tensor,
        sigmas_N1: torch.Tensor,
    ) -> torch.Tensor:
        start_index = img2img_start_index(request.steps, request.strength)
        settings = self.parts.settings
        raw_BCHW = self.encoder.encode_latents([reference])[0][None]
        init_BLC = settings.codec.encode(raw_BCHW).to(self.device)
        noised_BLC = add_noise(
            init_BLC, noise_BLP=noise_BLC, sigmas_B=sigmas_N1[start_index : start_index + 1]
        )
        if request.mode == "img2img":
            return euler_sample(velocity, noised_BLC, sigmas_N1=sigmas_N1, start_index=start_index)
        mask = request.mask.convert("L").resize(reference.size, Image.Resampling.NEAREST)
        repaint_HW = torch.from_numpy(np.asarray(mask) >= 128)
        repaint_hw = repaint_mask(repaint_HW, vae_scale_factor=self.vae_scale_factor)
        repaint_BLC = pack_mask(repaint_hw, num_channels=self.latent_channels).to(self.device)
        return inpaint_sample(
            velocity,
            noised_BLC,
            sigmas_N1=sigmas_N1,
            start_index=start_index,
            init_BLC=init_BLC,
            noise_BLC=noise_BLC,
            repaint_BLC=repaint_BLC,
        )
