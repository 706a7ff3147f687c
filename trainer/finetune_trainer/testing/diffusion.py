"""A tiny Stable Diffusion pipeline and captioned coloured shapes, for tests and the example.

No diffusion weights exist on PyPI, so the pipeline is built from config the way diffusers' own
tests build theirs (`get_dummy_components`): a `UNet2DConditionModel`, an `AutoencoderKL` and a
tiny `CLIPTextModel`, with a CLIP tokenizer whose vocabulary is written here. Everything is seeded,
so a given seed always gives the same pipeline.

The UNet is random: it is what LoRA fine-tunes. The VAE is the one part taught here, for a few
hundred steps to reconstruct the shapes: a random autoencoder decodes a latent into noise whatever
the UNet learns, and the colour of a sample would then say nothing about the UNet. (A real base
model's VAE is pretrained too.)

The data is an imagefolder (`train/` and `test/`, each with PNGs and a `metadata.jsonl` of
`{"file_name", "text"}`), which `datasets` loads as an `image` and a `text` column: a filled
circle or square of one colour on a dark background, captioned "a red circle". Whether a sample
matches its caption is measured by `colour_distance`: the distance between the sample's mean
colour and the mean colour of that caption's images.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "COLOURS",
    "SHAPES",
    "cached_tiny_pipeline",
    "caption_colour",
    "colour_distance",
    "mean_colour",
    "reference_colours",
    "save_shapes_dataset",
    "save_tiny_pipeline",
    "shape_image",
    "text_to_image_job",
]

# Primary and secondary colours, far apart in RGB, so a mean colour tells them apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 50, 220),
    "yellow": (230, 220, 40),
}
SHAPES = ("circle", "square")
BACKGROUND = (20, 20, 20)
SIZE = 16
# The CLIP tokenizer's special tokens, as CLIP names them.
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 16


def shape_image(colour: str, shape: str, rng: random.Random, size: int = SIZE) -> Image.Image:
    """A filled `shape` of `colour` on a dark background, at a random place and scale."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.28, 0.4) * size
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def _captions() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def save_shapes_dataset(out: Path, *, train: int = 256, test: int = 32, seed: int = 0) -> Path:
    """An imagefolder of captioned shapes: `train` and `test` images, the captions balanced."""
    rng = random.Random(seed)
    pairs = _captions()
    for split, n in (("train", train), ("test", test)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            colour, shape = pairs[i % len(pairs)]
            name = f"{i:05d}.png"
            shape_image(colour, shape, rng).save(folder / name)
            rows.append({"file_name": name, "text": f"a {colour} {shape}"})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def mean_colour(image: Image.Image) -> tuple[float, float, float]:
    """The mean RGB of an image, each channel in 0..1."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    r, g, b = pixels.reshape(-1, 3).mean(axis=0)
    return float(r), float(g), float(b)


def reference_colours(n: int = 64, seed: int = 1) -> dict[str, tuple[float, float, float]]:
    """Per colour name, the mean colour of `n` of its shape images: what a sample captioned with
    that colour should average to (the background included)."""
    rng = random.Random(seed)
    out = {}
    for colour in COLOURS:
        means = [mean_colour(shape_image(colour, SHAPES[i % 2], rng)) for i in range(n)]
        out[colour] = tuple(sum(m[c] for m in means) / n for c in range(3))
    return out  # type: ignore[return-value]


def caption_colour(caption: str) -> str:
    """The colour a caption names ("a red circle" -> red)."""
    for word in caption.lower().split():
        if word in COLOURS:
            return word
    raise ValueError(f"no colour of {sorted(COLOURS)} in {caption!r}")


def colour_distance(
    image: Image.Image, caption: str, references: dict[str, tuple[float, float, float]]
) -> float:
    """Euclidean distance (RGB in 0..1) between an image's mean colour and its caption's."""
    return math.dist(mean_colour(image), references[caption_colour(caption)])


# ---- the pipeline ---------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE stands bytes in for (GPT-2's and CLIP's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def _bpe(parts: list[str], merges: list[tuple[str, str]]) -> list[str]:
    rank = {pair: i for i, pair in enumerate(merges)}
    while True:
        pairs = [(rank[p], i) for i, p in enumerate(itertools.pairwise(parts)) if p in rank]
        if not pairs:
            return parts
        _, i = min(pairs)
        parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]


def _clip_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and merges in which each of `words` is one token, and any other
    lower-case word still tokenises (letter by letter)."""
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    add(BOS)
    add(EOS)
    for ch in _byte_alphabet():
        add(ch)
        add(ch + "</w>")
    for word in words:
        # Segment the word with the merges so far (BPE: the lowest-ranked pair first), then
        # merge what is left left to right. Later merges rank lower, so no earlier word's
        # segmentation changes.
        parts = _bpe([*word[:-1], word[-1] + "</w>"], merges)
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            add(parts[0] + parts[1])
            parts = [parts[0] + parts[1], *parts[2:]]
    return vocab, merges


def tiny_components(seed: int = 0) -> dict[str, Any]:
    """The pipeline's parts, random and seeded (as diffusers' get_dummy_components)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    words = ["a", *COLOURS, *SHAPES]
    vocab, merges = _clip_vocab(words)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
            hidden_size=32,
            intermediate_size=64,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            max_position_embeddings=MAX_TOKENS,
        )
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        # As Stable Diffusion 2: at high noise the target is about the clean image, so the loss
        # there says what the caption's colour is (the noise, epsilon's target, says little).
        prediction_type="v_prediction",
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def _teach_vae(vae: Any, steps: int, seed: int) -> None:
    """A few hundred steps of reconstruction (plus a small KL term) on shapes: enough for the
    decoder to give back a latent's colours."""
    import numpy as np
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    pairs = _captions()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    vae.train()
    for _ in range(steps):
        images = [shape_image(*pairs[rng.randrange(len(pairs))], rng) for _ in range(16)]
        x = torch.tensor(np.stack([np.asarray(i) for i in images]), dtype=torch.float32)
        x = x.permute(0, 3, 1, 2) / 127.5 - 1.0
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()
    # Latents of unit scale, as Stable Diffusion's scaling factor makes them.
    with torch.no_grad():
        images = [shape_image(*pairs[i % len(pairs)], rng) for i in range(64)]
        x = torch.tensor(np.stack([np.asarray(i) for i in images]), dtype=torch.float32)
        latents = vae.encode(x.permute(0, 3, 1, 2) / 127.5 - 1.0).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


def _teach_unet(parts: dict[str, Any], steps: int, seed: int) -> None:
    """Full training of the UNet on shapes captioned without their colour ("a circle"): the base
    then draws shapes, of whatever colour, and binding a colour word to its colour is left to the
    fine-tuning, as a new concept is left to it on a real base model."""
    import numpy as np
    import torch

    if steps == 0:
        return
    unet, vae, text_encoder, tokenizer = (
        parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer")
    )
    scheduler = parts["scheduler"]
    rng = random.Random(seed + 1)
    torch.manual_seed(seed + 1)
    pairs = [_captions()[rng.randrange(len(_captions()))] for _ in range(256)]
    images = [shape_image(c, s, rng) for c, s in pairs]
    ids = tokenizer(
        [f"a {s}" for _, s in pairs], padding="max_length", max_length=MAX_TOKENS,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    with torch.no_grad():
        x = torch.tensor(np.stack([np.asarray(i) for i in images]), dtype=torch.float32)
        latents = vae.encode(x.permute(0, 3, 1, 2) / 127.5 - 1.0).latent_dist.mode()
        latents = latents * vae.config.scaling_factor
        states = text_encoder(ids)[0]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    unet.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (16,))
        noise = torch.randn_like(latents[idx])
        t = torch.randint(0, scheduler.config.num_train_timesteps, (16,))
        noisy = scheduler.add_noise(latents[idx], noise, t)
        target = scheduler.get_velocity(latents[idx], noise, t)
        loss = torch.nn.functional.mse_loss(unet(noisy, t, states[idx]).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()


def save_tiny_pipeline(
    out: Path, *, seed: int = 0, vae_steps: int = 200, unet_steps: int = 200
) -> Path:
    """A tiny StableDiffusionPipeline saved to `out`, loadable with `from_pretrained(out)`.
    `vae_steps` and `unet_steps` teach the VAE to reconstruct shapes and the UNet to draw them
    (colour-blind); 0 leaves a part random, which is enough for tests of the mechanics."""
    import torch
    from diffusers import StableDiffusionPipeline

    parts = tiny_components(seed)
    with torch.enable_grad():
        if vae_steps:
            _teach_vae(parts["vae"], vae_steps, seed)
        _teach_unet(parts, unet_steps, seed)
    pipeline = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.save_pretrained(out)
    return out


def cached_tiny_pipeline(cache_root: Path, *, seed: int = 0) -> Path:
    """`save_tiny_pipeline` once per machine (it takes minutes of CPU): kept under `cache_root`,
    keyed by this module's source and the torch and diffusers versions, which decide its bytes."""
    import hashlib
    import os
    import shutil
    import uuid

    import diffusers
    import torch

    key = (
        f"{torch.__version__} {diffusers.__version__} {seed}".encode() + Path(__file__).read_bytes()
    )
    target = cache_root / f"tiny-sd-{hashlib.sha256(key).hexdigest()[:12]}"
    if (target / "model_index.json").is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    scratch = cache_root / f".{target.name}-{uuid.uuid4().hex}"
    save_tiny_pipeline(scratch, seed=seed)
    try:
        os.rename(scratch, target)
    except OSError:  # another process built it meanwhile: theirs is the same
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def text_to_image_job(
    pipeline_dir: Path,
    data_dir: Path,
    *,
    name: str = "tiny-t2i",
    namespace: str = "tests",
    max_steps: int = 200,
    checkpoint_every: int = 100,
) -> dict[str, Any]:
    """A valid 2-node LoRA text-to-image FineTuneJob for `save_tiny_pipeline` and
    `save_shapes_dataset`."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": f"file://{pipeline_dir}", "task": "text-to-image"},
            "dataset": {"source": f"file://{data_dir}", "imageField": "image"},
            "peft": {"method": "lora", "r": 8, "alpha": 8, "dropout": 0.0},
            "training": {
                "maxSteps": max_steps,
                "learningRate": 5.0e-3,
                "batchSizePerDevice": 8,
                "checkpointEverySteps": checkpoint_every,
                "seed": 7,
            },
            "evaluation": {
                "metrics": ["denoising_loss"],
                "imageSamples": {
                    "prompts": [f"a {c} {s}" for s in SHAPES for c in COLOURS],
                    "count": 8,
                    "inferenceSteps": 20,
                    "guidanceScale": 4.0,
                },
            },
            "resources": {"nodes": 2, "processesPerNode": 1},
        },
    }
