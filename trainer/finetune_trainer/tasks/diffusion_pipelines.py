"""The Stable Diffusion pipelines that text-to-image fine-tunes, and what differs between them.

- Stable Diffusion 1.x and 2.x (`StableDiffusionPipeline`) have one CLIP text encoder, and the
  UNet cross-attends to its last hidden states.
- SDXL (`StableDiffusionXLPipeline`) has two: a `CLIPTextModel` and a
  `CLIPTextModelWithProjection`. The UNet cross-attends to their penultimate hidden states, laid
  side by side. It is also conditioned on the second encoder's pooled, projected embedding and on
  six numbers per image: the image's original size, the top-left corner of its crop, and the
  target size. These are SDXL's "micro-conditioning" `time_ids`.

Both are trained the way diffusers' examples train them (train_text_to_image_lora.py and
train_text_to_image_lora_sdxl.py). A pipeline is recognised by `_class_name` in its
`model_index.json`, which also names each part's class, as `DiffusionPipeline.from_pretrained`
reads it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune_api.validation import FieldError, ManifestError

if TYPE_CHECKING:
    import torch

__all__ = [
    "PIPELINES",
    "STABLE_DIFFUSION",
    "STABLE_DIFFUSION_XL",
    "Pipeline",
    "encode_prompt",
    "part_class",
    "pipeline_of",
    "reads_last_layer",
    "time_ids",
]


@dataclass(frozen=True)
class Pipeline:
    """One pipeline class that text-to-image trains."""

    # diffusers' class, as model_index.json's _class_name names it.
    class_name: str
    # The text encoders' subfolders and their tokenizers', in the order the UNet takes them.
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    # The Hub tags of a LoRA for this pipeline, as diffusers' training scripts tag them.
    tags: tuple[str, ...]
    # What the pipeline for samples is built with in place of parts that a training image has
    # no use for (SD's safety checker, SDXL's invisible watermark).
    sampling_kwargs: tuple[tuple[str, Any], ...]
    # The pipeline's own default guidance_scale, for samples whose spec leaves it unset.
    guidance_scale: float
    # Whether the VAE stays fp32 when the rest loads in fp16: SDXL's overflows in fp16, and
    # diffusers' SDXL script keeps it fp32 for that reason (bf16 has fp32's range).
    vae_in_fp32: bool = False

    @property
    def micro_conditioned(self) -> bool:
        """Whether the UNet takes SDXL's pooled text embeds and time ids."""
        return len(self.text_encoders) > 1

    def load_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.class_name)

    def assemble(self, model_index: Mapping[str, Any], parts: Mapping[str, Any]) -> Any:
        """The pipeline made of parts already loaded (the trained UNet among them), with the
        settings its model_index.json holds (SDXL's force_zeros_for_empty_prompt) and
        `sampling_kwargs`. Built, not loaded with from_pretrained, which would check the whole
        repo's snapshot, including the files the fetch left on the Hub."""
        cls = self.load_class()
        accepted = inspect.signature(cls.__init__).parameters
        settings = {
            k: v for k, v in model_index.items() if k in accepted and not isinstance(v, list)
        }
        return cls(**{**settings, **dict(self.sampling_kwargs), **parts})


STABLE_DIFFUSION = Pipeline(
    class_name="StableDiffusionPipeline",
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    tags=("stable-diffusion",),
    sampling_kwargs=(
        ("safety_checker", None),
        ("feature_extractor", None),
        ("requires_safety_checker", False),
    ),
    guidance_scale=7.5,
)
STABLE_DIFFUSION_XL = Pipeline(
    class_name="StableDiffusionXLPipeline",
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    tags=("stable-diffusion-xl", "stable-diffusion-xl-diffusers"),
    sampling_kwargs=(("add_watermarker", False),),
    guidance_scale=5.0,
    vae_in_fp32=True,
)
PIPELINES: dict[str, Pipeline] = {p.class_name: p for p in (STABLE_DIFFUSION, STABLE_DIFFUSION_XL)}


def pipeline_of(model_index: Mapping[str, Any], source: str) -> Pipeline:
    """The pipeline a model_index.json describes. Any other class is the spec's to fix: the
    source is not a pipeline this task trains, and no other attempt would change that."""
    name = model_index.get("_class_name")
    if name in PIPELINES:
        return PIPELINES[str(name)]
    known = " or ".join(PIPELINES)
    raise ManifestError(
        [
            FieldError(
                "model.source",
                f"{source} is a {name or 'folder without a pipeline class'}; text-to-image "
                f"fine-tunes a {known}",
            )
        ]
    )


def part_class(model_index: Mapping[str, Any], part: str) -> Any:
    """The class of one part, as model_index.json names it: ["transformers", "CLIPTextModel"]."""
    library, name = model_index[part]
    return getattr(importlib.import_module(library), name)


def encode_prompt(
    text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The UNet's cross-attention states for captions' token ids, one tensor of ids per encoder,
    and the pooled embedding of SDXL's last encoder (None with one encoder), as each pipeline's
    encode_prompt computes them without clip skip."""
    import torch

    if len(text_encoders) == 1:
        return text_encoders[0](input_ids[0], return_dict=False)[0], None
    states, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids, strict=True):
        out = encoder(ids, output_hidden_states=True)
        # The projected pooled output of CLIPTextModelWithProjection (text_embeds); the last
        # encoder's is the one the UNet takes.
        pooled = out[0]
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), pooled


def reads_last_layer(index: int, count: int) -> bool:
    """Whether encode_prompt reads the last layer of text encoder `index` of `count`: not that of
    every encoder but SDXL's last, whose penultimate hidden states it takes."""
    return count == 1 or index == count - 1


def time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], resolution: int
) -> list[int]:
    """SDXL's micro-conditioning of one image: its original (height, width), the (top, left) of
    its crop in the resized image, and the target (height, width), as the SDXL pipeline's
    _get_add_time_ids lays them out."""
    return [*original_size, *crop_top_left, resolution, resolution]
