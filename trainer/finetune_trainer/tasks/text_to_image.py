"""text-to-image: LoRA on the UNet attention of a diffusers Stable Diffusion or SDXL pipeline,
trained on captioned images, as diffusers' examples/text_to_image/train_text_to_image_lora.py
and train_text_to_image_lora_sdxl.py train them (diffusion_pipelines.py: what differs).

The VAE and the text encoders are frozen; each step encodes the images into latents, noises them
at random timesteps of the pipeline's noise scheduler, and trains the UNet's LoRA to predict the
noise (epsilon) or the velocity (v_prediction), by mean squared error, optionally Min-SNR
weighted (`training.snrGamma`). The held-out score, `denoising_loss`, is the same error on the
evaluation images at fixed noise seeds and timesteps. The artifact is the LoRA as diffusers loads
it (`pytorch_lora_weights.safetensors`, `save_lora_weights`) plus sample images generated with
the fine-tuned pipeline at fixed seeds (`samples/NN.png`, listed in `samples/samples.jsonl`),
which the model card shows.

`model.source` is a pipeline folder (or Hub repo) as `DiffusionPipeline.from_pretrained` loads
it: model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/, and for SDXL
text_encoder_2/ and tokenizer_2/. The "tokens" the loop counts for telemetry are the captions'
real (non-pad) tokens, as the first tokenizer splits them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from datasets import Image as ImageFeature
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import PreTrainedTokenizerBase

from finetune_api.v1alpha1 import TEXT_TO_IMAGE, FineTuneJobSpec, ImageSampleSpec
from finetune_trainer import data, modeling
from finetune_trainer.evaluation import evaluating, scores_from_main
from finetune_trainer.model_card import source_id
from finetune_trainer.scoring import ScorerUnavailable
from finetune_trainer.sources import downloading
from finetune_trainer.tasks.base import (
    Artifact,
    Batch,
    CardInfo,
    Task,
    TaskData,
    Timed,
    untimed,
)
from finetune_trainer.tasks.diffusion_pipelines import (
    Pipeline,
    encode_prompt,
    part_class,
    pipeline_of,
    reads_last_layer,
    time_ids,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LORA_WEIGHTS",
    "SAMPLES_DIR",
    "Collator",
    "Crop",
    "DiffusionModel",
    "TextToImage",
    "denoising_loss",
    "eval_schedule",
    "pixel_values",
    "training_noise",
]

# The UNet's attention projections, as diffusers' LoRA script adapts them.
DEFAULT_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
# A CLIP text encoder's, as its --train_text_encoder adapts them.
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
SAMPLES_DIR = "samples"
SAMPLES_INDEX = "samples.jsonl"
# Columns of the rows build_data makes: the image, its caption's token ids and mask (and for
# SDXL its second tokenizer's ids), and for the evaluation rows the fixed noise seed and timestep.
IMAGE, CAPTION = "image", "caption"
# The batch keys DiffusionModel.forward takes besides the evaluation rows' seeds and timesteps.
MODEL_INPUTS = ("pixel_values", "input_ids", "input_ids_2", "time_ids")


def _resized(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """An image's (width, height) once its shorter side is resized to `resolution`."""
    scale = resolution / min(size)
    return max(resolution, round(size[0] * scale)), max(resolution, round(size[1] * scale))


class Draws(Protocol):
    """What cropping draws from: Python's `random` module, or a `random.Random`."""

    def randint(self, a: int, b: int) -> int: ...
    def random(self) -> float: ...


@dataclass(frozen=True)
class Crop:
    """Where an image's square is cut from it once resized, as (top, left), and whether the
    square is then mirrored left to right."""

    top: int
    left: int
    flip: bool = False

    @classmethod
    def centre(cls, size: tuple[int, int], resolution: int) -> Crop:
        """The centre square of an image of `size` (width, height): every evaluation image's,
        and a training image's under training.centerCrop."""
        width, height = _resized(size, resolution)
        return cls((height - resolution) // 2, (width - resolution) // 2)

    @classmethod
    def drawn(
        cls,
        size: tuple[int, int],
        resolution: int,
        *,
        center: bool,
        flip: bool,
        rng: Draws,
    ) -> Crop:
        """A training image's crop, drawn as diffusers' scripts draw it: the centre, or a place
        at random (RandomCrop); then, with `flip`, a coin for the mirror."""
        if center:
            crop = cls.centre(size, resolution)
        else:
            width, height = _resized(size, resolution)
            crop = cls(rng.randint(0, height - resolution), rng.randint(0, width - resolution))
        return dataclasses.replace(crop, flip=flip and rng.random() < 0.5)

    def top_left(self, size: tuple[int, int], resolution: int) -> tuple[int, int]:
        """What SDXL is conditioned on: where the square starts in the resized image as the UNet
        sees it, mirrored with the square. (diffusers' SDXL scripts give a mirrored square
        `resolution - left`, which is that only when the crop is centred on a square image.)"""
        if not self.flip:
            return self.top, self.left
        width, _ = _resized(size, resolution)
        return self.top, width - resolution - self.left


def pixel_values(image: Image.Image, resolution: int, crop: Crop | None = None) -> torch.Tensor:
    """An image as the VAE takes it: RGB, the shorter side resized to `resolution`, the square
    `crop` cut from it (default its centre) and mirrored if the crop says so, channels first, in
    -1..1."""
    image = image.convert("RGB")
    if min(image.size) != resolution:
        image = image.resize(_resized(image.size, resolution), Image.Resampling.BILINEAR)
    crop = crop or Crop.centre(image.size, resolution)
    image = image.crop((crop.left, crop.top, crop.left + resolution, crop.top + resolution))
    if crop.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def eval_schedule(n: int, num_train_timesteps: int, seed: int) -> tuple[list[int], list[int]]:
    """Per evaluation row, its noise seed and timestep: the timesteps spread evenly over the
    schedule (each row's own, so the score weighs every noise level alike), the seeds fixed, so
    the score before and after training is of the same noised latents."""
    timesteps = [
        min(num_train_timesteps - 1, int((i + 0.5) * num_train_timesteps / n)) for i in range(n)
    ]
    return [seed * 1_000_003 + i for i in range(n)], timesteps


def denoising_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    snr_gamma: float | None,
) -> torch.Tensor:
    """Per example, the mean squared error of the UNet's prediction; with `snr_gamma`, weighted
    by min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1) for v-prediction
    (Min-SNR, as diffusers' compute_snr weighting)."""
    error = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.dim())))
    if snr_gamma is None:
        return error
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = torch.clamp(snr, max=snr_gamma)
    weight = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1.0)
    return error * weight


def training_noise(latents: torch.Tensor, offset: float | None) -> torch.Tensor:
    """A training step's noise, from the rank's seeded generator: standard normal, plus with
    `offset` one value per example and latent channel of standard deviation `offset` (offset
    noise, as diffusers' scripts add it for --noise_offset). Plain noise never averages far
    from zero over an image, so the base can only learn images of mid brightness."""
    noise = torch.randn_like(latents)
    if offset:
        noise += offset * torch.randn(
            (*latents.shape[:2], 1, 1), device=latents.device, dtype=latents.dtype
        )
    return noise


class DiffusionModel(torch.nn.Module):
    """The pipeline parts one training step runs, as one module: one `accelerate.prepare` (DDP)
    wraps it, and its forward is the step's forward, so DDP syncs the UNet's LoRA gradients. The
    VAE and the text encoders are frozen and stay in eval mode."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: torch.nn.Module,
        scheduler: DDPMScheduler,
        text_encoder_2: torch.nn.Module | None = None,
        noise_offset: float | None = None,
    ) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        # SDXL's second encoder (CLIPTextModelWithProjection); None for Stable Diffusion.
        self.text_encoder_2 = text_encoder_2
        self.scheduler = scheduler
        self.noise_offset = noise_offset  # training.noiseOffset
        self.register_buffer(
            "alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False
        )

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def trained_text_encoders(self) -> bool:
        """Whether the text encoders carry a LoRA that trains (training.trainTextEncoder)."""
        return any(p.requires_grad for e in self.text_encoders for p in e.parameters())

    def train(self, mode: bool = True) -> DiffusionModel:
        super().train(mode)
        frozen = [self.vae] if self.trained_text_encoders else [self.vae, *self.text_encoders]
        for part in frozen:
            part.eval()
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        input_ids_2: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        noise_seeds: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The UNet's prediction, its target and the timesteps, for images and caption ids (and
        for SDXL the second tokenizer's ids and the images' time ids). Without `noise_seeds` and
        `timesteps` (training), noise and timesteps are drawn from the rank's seeded generator;
        with them (evaluation), each row's are fixed."""
        with torch.no_grad():
            posterior = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
            # Training samples the posterior, as the recipe does; evaluation takes its mode.
            latents = posterior.mode() if noise_seeds is not None else posterior.sample()
            latents = latents * self.vae.config.scaling_factor
        ids = [i for i in (input_ids, input_ids_2) if i is not None]
        with contextlib.nullcontext() if self.trained_text_encoders else torch.no_grad():
            encoder_hidden_states, pooled = encode_prompt(self.text_encoders, ids)
        added = None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
        if noise_seeds is None or timesteps is None:
            noise = training_noise(latents, self.noise_offset)
            timesteps = torch.randint(
                0,
                self.scheduler.config.num_train_timesteps,
                (latents.shape[0],),
                device=latents.device,
            )
        else:
            noise = torch.stack(
                [
                    torch.randn(
                        latents.shape[1:], generator=torch.Generator().manual_seed(int(seed))
                    )
                    for seed in noise_seeds.tolist()
                ]
            ).to(latents.device, latents.dtype)
        timesteps = timesteps.long()
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = self.unet(
            noisy, timesteps, encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]
        return prediction, target, timesteps


@dataclass
class Collator:
    """Rows (an image and its caption's ids) -> pixel values and padded ids, plus SDXL's time ids
    (`micro_conditioned`) and the fixed noise seeds and timesteps of evaluation rows.

    Training images are cropped and mirrored as training.centerCrop and randomFlip say, drawn
    from Python's `random`, which each rank seeds with seed + rank and a checkpoint keeps, so a
    resumed run draws what the uninterrupted one would have. Evaluation rows are always the centre
    square, unmirrored, so that the score before and after is of the same pixels."""

    resolution: int
    micro_conditioned: bool = False
    center_crop: bool = True
    random_flip: bool = False

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        # Captions come padded to the tokenizer's length, as the pipeline pads its prompts: the
        # UNet cross-attends to every position, pad ones included.
        batch = {
            key: torch.tensor([r[key] for r in rows], dtype=torch.long)
            for key in ("input_ids", "attention_mask", "input_ids_2")
            if key in rows[0]
        }
        images, size = [row[IMAGE] for row in rows], self.resolution
        evaluation = "noise_seed" in rows[0]
        crops = [
            Crop.centre(i.size, size)
            if evaluation
            else Crop.drawn(
                i.size, size, center=self.center_crop, flip=self.random_flip, rng=random
            )
            for i in images
        ]
        batch["pixel_values"] = torch.stack(
            [pixel_values(i, size, c) for i, c in zip(images, crops, strict=True)]
        )
        if self.micro_conditioned:
            conditions = [
                time_ids((i.height, i.width), c.top_left(i.size, size), size)
                for i, c in zip(images, crops, strict=True)
            ]
            batch["time_ids"] = torch.tensor(conditions, dtype=torch.float32)
        if evaluation:
            batch["noise_seeds"] = torch.tensor([r["noise_seed"] for r in rows], dtype=torch.long)
            batch["timesteps"] = torch.tensor([r["timestep"] for r in rows], dtype=torch.long)
        return batch


class TextToImage(Task):
    name = TEXT_TO_IMAGE

    def __init__(self, spec: FineTuneJobSpec) -> None:
        super().__init__(spec)
        self.location = modeling.source_location(spec.model.source)

    @property
    def revision(self) -> str | None:
        # The commit rank 0 resolved, once the sources are fetched (fetch.py).
        return modeling.pinned_revision(self.spec.model)

    @property
    def _cached(self) -> dict[str, bool]:
        return {"local_files_only": modeling.cached_only(self.spec.model)}

    @property
    def sample_spec(self) -> ImageSampleSpec:
        return self.spec.evaluation.image_samples or ImageSampleSpec()

    @property
    def guidance_scale(self) -> float:
        """The samples' guidanceScale, else the pipeline's own default."""
        given = self.sample_spec.guidance_scale
        return self.pipeline.guidance_scale if given is None else given

    def _from_pretrained(self, cls: Any, subfolder: str, **kwargs: Any) -> Any:
        """One part of the pipeline (its subfolder); a missing source is ModelNotFound."""
        with downloading("model", self.location, self.revision) as token:
            return cls.from_pretrained(
                self.location,
                subfolder=subfolder,
                revision=self.revision,
                token=token,
                **self._cached,
                **kwargs,
            )

    def _vae(self, dtype: torch.dtype) -> AutoencoderKL:
        """The pipeline's VAE, or model.vae in its place."""
        own = self.spec.model.vae
        if own is None:
            fp32 = self.pipeline.vae_in_fp32 and dtype == torch.float16
            return self._from_pretrained(
                AutoencoderKL, "vae", torch_dtype=torch.float32 if fp32 else dtype
            )
        # At the other parts' precision, as diffusers' scripts load a VAE given to them: it is
        # given to run where the pipeline's cannot (SDXL's fp16-fix VAE in fp16).
        location, revision = (
            modeling.source_location(own.source),
            modeling.pinned_revision(own, "vae"),
        )
        with downloading("vae", location, revision) as token:
            return AutoencoderKL.from_pretrained(
                location,
                revision=revision,
                token=token,
                local_files_only=modeling.cached_only(own, "vae"),
                torch_dtype=dtype,
            )

    def _part(self, part: str, **kwargs: Any) -> Any:
        """A part of the class model_index.json names for it (CLIPTokenizer, CLIPTextModel...)."""
        return self._from_pretrained(part_class(self.model_index, part), part, **kwargs)

    def _config(self, cls: Any, subfolder: str | None) -> dict[str, Any]:
        with downloading("model", self.location, self.revision) as token:
            return dict(
                cls.load_config(
                    self.location,
                    subfolder=subfolder,
                    revision=self.revision,
                    token=token,
                    **self._cached,
                )
            )

    @functools.cached_property
    def model_index(self) -> dict[str, Any]:
        """The pipeline's model_index.json: its class and each part's."""
        from diffusers import DiffusionPipeline

        return self._config(DiffusionPipeline, None)

    @property
    def pipeline(self) -> Pipeline:
        """Stable Diffusion or SDXL; another pipeline is InvalidSpec (pipeline_of)."""
        return pipeline_of(self.model_index, self.spec.model.source)

    def resolution(self) -> int:
        """training.resolution, else the pipeline's: the UNet's sample size times the VAE's
        downscaling factor."""
        if self.spec.training.resolution is not None:
            return self.spec.training.resolution
        unet = self._config(UNet2DConditionModel, "unet")
        vae = self._config(AutoencoderKL, "vae")
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)

    def build_data(self, train: Dataset, evaluation: Dataset) -> TaskData:
        pipeline = self.pipeline
        # The pipeline's tokenizers by part name (tokenizer, tokenizer_2), as it takes them, each
        # of the class model_index names, as the pipeline loads them: AutoTokenizer would look
        # for a config.json that a pipeline's tokenizer folder does not have, and fail offline.
        tokenizers = {t: self._part(t) for t in pipeline.tokenizers}
        resolution = self.resolution()
        steps = int(self._config(DDPMScheduler, "scheduler").get("num_train_timesteps", 1000))
        with data.dataset_errors():  # the tokenizers are the model's; from here on, the data's
            rows = self._rows(train, tokenizers)
            eval_rows = self._rows(evaluation, tokenizers)
            seeds, timesteps = eval_schedule(len(eval_rows), steps, self.spec.training.seed)
            eval_rows = eval_rows.add_column("noise_seed", seeds).add_column("timestep", timesteps)
        return TaskData(
            processor=tokenizers,
            train=rows,
            evaluation=eval_rows,
            collate=Collator(
                resolution,
                pipeline.micro_conditioned,
                center_crop=self.spec.training.crops_centre,
                random_flip=bool(self.spec.training.random_flip),
            ),
        )

    def _rows(self, ds: Dataset, tokenizers: dict[str, PreTrainedTokenizerBase]) -> Dataset:
        """The image (decoded lazily, as a `datasets` Image) and its caption's token ids: the
        first tokenizer's as input_ids (and its attention_mask), the second's as input_ids_2."""
        d = self.spec.dataset
        data.require_columns(ds, {"imageField": d.image_field, "captionField": d.caption_field})
        if not isinstance(ds.features[d.image_field], ImageFeature):
            ds = ds.cast_column(d.image_field, ImageFeature())  # paths or bytes

        def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            captions = [str(c) for c in batch[d.caption_field]]
            out: dict[str, list[Any]] = {}
            for part, tokenizer in tokenizers.items():
                enc = tokenizer(
                    captions,
                    truncation=True,
                    max_length=tokenizer.model_max_length,
                    padding="max_length",
                )
                suffix = part.removeprefix("tokenizer")  # "" or "_2"
                out[f"input_ids{suffix}"] = enc["input_ids"]
                if not suffix:
                    out["attention_mask"] = enc["attention_mask"]
            return out

        ds = ds.select_columns([d.image_field, d.caption_field])
        ds = ds.map(encode, batched=True)
        names = {d.image_field: IMAGE, d.caption_field: CAPTION}
        return ds.rename_columns({old: new for old, new in names.items() if old != new})

    def load_model(self, data: TaskData, device: torch.device) -> torch.nn.Module:

        # The frozen parts at the compute precision (training.precision), as diffusers' LoRA
        # script casts them to its weight_dtype: half the memory of fp32 in bf16 or fp16.
        pipeline = self.pipeline
        dtype = modeling.weights_dtype(self.spec.training.precision, self.spec.peft.method)
        unet = self._from_pretrained(UNet2DConditionModel, "unet", torch_dtype=dtype)
        vae = self._vae(dtype)
        encoders = [self._part(part, dtype=dtype) for part in pipeline.text_encoders]
        # The pipeline's own scheduler config (SDXL's is Euler's) read as DDPM's, the training
        # noise schedule, as both of diffusers' scripts read it.
        scheduler = self._from_pretrained(DDPMScheduler, "scheduler")
        if self.spec.training.prediction_type is not None:
            scheduler.register_to_config(prediction_type=self.spec.training.prediction_type)
        for part in (unet, vae, *encoders):
            part.requires_grad_(False)
        unet.add_adapter(self._lora(self.spec.peft.target_modules or DEFAULT_TARGET_MODULES))
        modeling.trainable_in_fp32(unet)  # peft made LoRA's weights in the UNet's dtype
        if self.spec.training.train_text_encoder:
            for encoder, config in zip(encoders, self._text_encoder_loras(encoders), strict=True):
                encoder.add_adapter(config)
                modeling.trainable_in_fp32(encoder)
        if modeling.gradient_checkpointing(self.spec):
            # The UNet's activations are most of a step's memory (diffusers' LoRA script offers
            # the same switch); the VAE and text encoder run without gradients anyway.
            unet.enable_gradient_checkpointing()
            if self.spec.training.train_text_encoder:
                for encoder in encoders:
                    encoder.gradient_checkpointing_enable({"use_reentrant": False})
        text_encoder_2 = encoders[1] if len(encoders) > 1 else None
        return DiffusionModel(
            unet, vae, encoders[0], scheduler, text_encoder_2, self.spec.training.noise_offset
        )

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        prediction, target, timesteps = model(**_inputs(batch))
        inner = _inner(model)
        return denoising_loss(
            prediction,
            target,
            timesteps,
            inner.alphas_cumprod,
            inner.prediction_type,
            self.spec.training.snr_gamma,
        ).mean()

    def evaluate(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        batches: Iterable[Batch],
        timed: Timed = untimed,
    ) -> dict[str, float]:
        total, count = 0.0, 0
        inner = _inner(model)
        with evaluating(model):
            for batch in batches:
                prediction, target, timesteps = model(
                    **_inputs(batch),
                    noise_seeds=batch["noise_seeds"],
                    timesteps=batch["timesteps"],
                )
                # Unweighted, whatever snrGamma: the score compares runs with different weights.
                errors = denoising_loss(
                    prediction, target, timesteps, inner.alphas_cumprod, "epsilon", None
                )
                errors = accelerator.gather_for_metrics(errors)
                total += float(errors.double().sum())
                count += int(errors.numel())
        return scores_from_main(accelerator, lambda: self._scores(total, count))

    def _scores(self, total: float, count: int) -> dict[str, float]:
        scores: dict[str, float] = {}
        for name in self.metrics:
            if name != "denoising_loss":
                raise ScorerUnavailable(name, "text-to-image computes denoising_loss only")
            scores[name] = total / count if count else math.nan
        return scores

    def _lora(self, target_modules: Iterable[str], **which_layers: Any) -> Any:
        """A LoRA at peft.r, alpha and dropout, gaussian init as the recipes give it: B is zero,
        so the first step starts from the base."""
        from peft import LoraConfig

        p = self.spec.peft
        return LoraConfig(
            r=p.r,
            lora_alpha=p.alpha,
            lora_dropout=p.dropout,
            init_lora_weights="gaussian",
            target_modules=list(target_modules),
            **which_layers,
        )

    def _text_encoder_loras(self, encoders: list[Any]) -> list[Any]:
        """Per text encoder, the LoRA diffusers' --train_text_encoder gives it: its attention
        projections. SDXL reads its first encoder's penultimate hidden states, so that encoder's
        last layer adds nothing to the loss: it gets no LoRA, whose weights DDP would wait on for
        gradients that never come."""
        out = []
        for i, encoder in enumerate(encoders):
            read = range(encoder.config.num_hidden_layers - 1)
            unread = not reads_last_layer(i, len(encoders))
            which = {"layers_to_transform": list(read), "layers_pattern": "layers"}
            out.append(self._lora(TEXT_ENCODER_TARGET_MODULES, **(which if unread else {})))
        return out

    def save(self, model: torch.nn.Module, data: TaskData, out: Path) -> Artifact:
        """The LoRA as diffusers saves it (the UNet's, and the text encoders' when they train),
        and the sample images."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        assert isinstance(model, DiffusionModel)

        def layers(part: torch.nn.Module) -> dict[str, torch.Tensor]:
            return convert_state_dict_to_diffusers(get_peft_model_state_dict(part))

        encoders = {}
        if model.trained_text_encoders:  # text_encoder_lora_layers, text_encoder_2_lora_layers
            named = zip(self.pipeline.text_encoders, model.text_encoders, strict=True)
            encoders = {f"{name}_lora_layers": layers(part) for name, part in named}
        self.pipeline.load_class().save_lora_weights(
            save_directory=out,
            unet_lora_layers=layers(model.unet),
            safe_serialization=True,
            **encoders,
        )
        self._samples(model, data, out)
        return "adapter"

    def _samples(self, model: DiffusionModel, data: TaskData, out: Path) -> None:
        """`evaluation.imageSamples.count` images of the fine-tuned pipeline, at seeds seed + i."""
        samples = self.sample_spec
        prompts = list(samples.prompts) or _distinct(data.evaluation[CAPTION])
        if samples.count == 0 or not prompts:
            return
        # The pipeline's own inference scheduler (its model_index), the trained parts in place.
        scheduler = self._part("scheduler")
        if self.spec.training.prediction_type is not None:
            scheduler = type(scheduler).from_config(
                scheduler.config, prediction_type=self.spec.training.prediction_type
            )
        kind = self.pipeline
        encoders = dict(zip(kind.text_encoders, model.text_encoders, strict=True))
        parts = {"unet": model.unet, "vae": model.vae, "scheduler": scheduler}
        pipeline = kind.assemble(self.model_index, {**parts, **encoders, **data.processor})
        pipeline.set_progress_bar_config(disable=True)
        model.eval()
        folder = out / SAMPLES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        resolution = data.collate.resolution  # type: ignore[attr-defined]
        index = []
        device = next(model.unet.parameters()).device
        # An SDXL VAE kept in fp32 beside a half-precision UNet (load_model) decodes half
        # latents only under autocast, as diffusers' SDXL script makes its validation images.
        mixed = model.vae.dtype != model.unet.dtype
        for i in range(samples.count):
            prompt, seed = prompts[i % len(prompts)], self.spec.training.seed + i
            autocast = torch.autocast(device.type, dtype=model.unet.dtype, enabled=mixed)
            with torch.no_grad(), autocast:
                image = pipeline(
                    prompt,
                    num_inference_steps=samples.inference_steps,
                    guidance_scale=self.guidance_scale,
                    height=resolution,
                    width=resolution,
                    generator=torch.Generator(device).manual_seed(seed),
                ).images[0]
            name = f"{SAMPLES_DIR}/{i:02d}.png"
            image.save(out / name)
            index.append({"file": name, "prompt": prompt, "seed": seed})
        (folder / SAMPLES_INDEX).write_text("".join(json.dumps(r) + "\n" for r in index))

    def card(self, artifact: Artifact, repo: str) -> CardInfo:
        t = self.spec.training
        return CardInfo(
            pipeline_tag="text-to-image",
            task_name="Text-to-Image",
            library_name="diffusers",
            usage=_usage(
                self.pipeline.class_name,
                source_id(self.spec.model.source),
                repo,
                self.spec.model.vae.source if self.spec.model.vae else None,
            ),
            settings=(
                ("Resolution", t.resolution or "the pipeline's"),
                ("Crop", "centre" if t.crops_centre else "random"),
                ("Random flip", "yes" if t.random_flip else "no"),
                ("Prediction type", t.prediction_type or "the scheduler's"),
                ("SNR gamma", t.snr_gamma if t.snr_gamma is not None else "none (plain MSE)"),
                ("Noise offset", t.noise_offset or "none"),
                ("Text encoder", "LoRA trained" if t.train_text_encoder else "frozen"),
            ),
            tags=("diffusers", "diffusers-training", *self.pipeline.tags),
        )

    def card_extras(self, artifact_dir: Path) -> tuple[dict[str, object], list[str]]:
        """The samples: the Hub's widget entries, and a Samples section with each image."""
        index = artifact_dir / SAMPLES_DIR / SAMPLES_INDEX
        if not index.is_file():
            return {}, []
        rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
        widget = [{"text": r["prompt"], "output": {"url": r["file"]}} for r in rows]
        lines = [
            "## Samples",
            "",
            "Generated by the fine-tuned pipeline after training "
            f"({self.sample_spec.inference_steps} steps, guidance scale "
            f"{self.guidance_scale:g}):",
            "",
            "| Prompt | Seed | Image |",
            "|---|---|---|",
            *(
                f"| {_cell(r['prompt'])} | {r['seed']} | ![{r['file']}]({r['file']}) |"
                for r in rows
            ),
        ]
        return {"widget": widget}, lines


def _inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The batch's tensors that DiffusionModel.forward takes, as a training step passes them."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def _inner(model: torch.nn.Module) -> DiffusionModel:
    """The DiffusionModel inside a prepared (DDP-wrapped) one."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, DiffusionModel):
        raise TypeError(f"expected a DiffusionModel, got {type(inner).__name__}")
    return inner


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _distinct(captions: Iterable[Any]) -> list[str]:
    return list(dict.fromkeys(str(c) for c in captions))


def _usage(pipeline_class: str, base_id: str | None, repo: str, vae: str | None = None) -> str:
    """How to draw with the LoRA; `vae` is model.vae's source, which the pipeline loads with."""
    load, imported, vae_lines = f'"{base_id or "<base pipeline>"}"', pipeline_class, []
    if vae is not None:
        load, imported = f"{load}, vae=vae", f"AutoencoderKL, {pipeline_class}"
        vae_lines = [f'vae = AutoencoderKL.from_pretrained("{modeling.source_location(vae)}")']
    return "\n".join(
        [
            "import torch",
            f"from diffusers import {imported}",
            "",
            *vae_lines,
            f"pipeline = {pipeline_class}.from_pretrained({load})",
            f'pipeline.load_lora_weights("{repo}")',
            'image = pipeline("<prompt>").images[0]',
        ]
    )
