"""A tiny, random SDXL pipeline, for tests of the mechanics of text-to-image on SDXL.

It is built as diffusers' SDXL tests build theirs: the Stable Diffusion pipeline's tokenizer, VAE
and first text encoder (testing/diffusion.py's `tiny_components`, random), a second text encoder
with a projection, whose pooled embedding the UNet takes with the six time ids, a UNet with SDXL's
`text_time` added conditioning, and SDXL's Euler scheduler (epsilon). Nothing in it is taught:
that LoRA learns to draw captions is shown on Stable Diffusion.

A module of its own, so that testing/diffusion.py, whose bytes key the cached Stable Diffusion
pipeline (`cached_tiny_pipeline`), changes only when that pipeline does.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["save_tiny_xl_pipeline"]


def save_tiny_xl_pipeline(out: Path, *, seed: int = 0) -> Path:
    """A tiny, random StableDiffusionXLPipeline saved to `out`, loadable with
    `from_pretrained(out)`; the same seed gives the same pipeline."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    from finetune_trainer.testing.diffusion import tiny_components

    parts = tiny_components(seed)
    unet_sd = parts["unet"].config
    text = parts["text_encoder"].config
    time_dim, projection = 8, text.hidden_size
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=unet_sd.block_out_channels,
        layers_per_block=unet_sd.layers_per_block,
        sample_size=unet_sd.sample_size,
        down_block_types=unet_sd.down_block_types,
        up_block_types=unet_sd.up_block_types,
        norm_num_groups=unet_sd.norm_num_groups,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # Six time ids and the second encoder's pooled embedding.
        projection_class_embeddings_input_dim=6 * time_dim + projection,
        # The two encoders' hidden states side by side.
        cross_attention_dim=2 * text.hidden_size,
    )
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(
        type(text).from_dict({**text.to_dict(), "projection_dim": projection})
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipeline = StableDiffusionXLPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        text_encoder_2=text_encoder_2,
        tokenizer=parts["tokenizer"],
        tokenizer_2=parts["tokenizer"],
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipeline.save_pretrained(out)
    return out
