"""text-to-image: its schema fields and rules, and the task's parts on a tiny diffusers pipeline
(built from config, untrained): the data, the loss and its SNR weighting, the fixed-seed
evaluation, the saved LoRA and samples, and the card."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_api import FineTuneJob, ManifestError, parse_manifest
from finetune_api.metrics import DEFAULT_METRICS, effective_metrics, lower_is_better
from finetune_api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.sources import missing_local
from finetune_trainer.tasks.text_to_image import training_noise
from finetune_trainer.testing.diffusion import (
    COLOURS,
    SIZE,
    caption_colour,
    colour_distance,
    reference_colours,
    save_shapes_dataset,
    save_tiny_pipeline,
    shape_image,
    text_to_image_job,
)
from finetune_trainer.testing.diffusion_xl import save_tiny_xl_pipeline
from finetune_trainer.testing.gradients import assert_same_gradients


def _job(changes: dict[str, Any] | None = None, task: str = "text-to-image") -> dict[str, Any]:
    doc = text_to_image_job(Path("/models/pipe"), Path("/data/shapes"))
    doc["spec"]["model"]["task"] = task
    for section, values in (changes or {}).items():
        doc["spec"][section] = {**doc["spec"].get(section, {}), **values}
    return doc


def _errors(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(doc)
    return {e.path: e.message for e in caught.value.errors}


# ---- schema -----------------------------------------------------------------------------------


def test_text_to_image_defaults() -> None:
    doc = _job()
    del doc["spec"]["evaluation"]
    spec = parse_manifest(doc).spec
    assert spec.dataset.image_field == "image" and spec.dataset.caption_field == "text"
    assert spec.training.resolution is None and spec.training.prediction_type is None
    assert spec.training.snr_gamma is None and spec.evaluation.image_samples is None
    assert spec.training.center_crop is None and spec.training.random_flip is None
    assert spec.training.noise_offset is None
    assert effective_metrics(spec.model.task, spec.evaluation.metrics) == ["denoising_loss"]
    assert DEFAULT_METRICS["text-to-image"] == ["denoising_loss"]
    assert lower_is_better("denoising_loss")


def test_text_to_image_fields_and_gate_parse() -> None:
    spec = parse_manifest(
        _job(
            {
                "training": {"resolution": 64, "predictionType": "v_prediction", "snrGamma": 5.0},
                "evaluation": {
                    "metrics": ["denoising_loss"],
                    "gates": {"denoising_loss": 0.5},
                    "imageSamples": {"prompts": ["a red circle"], "count": 2, "guidanceScale": 1.0},
                },
            }
        )
    ).spec
    assert spec.training.prediction_type == "v_prediction"
    assert spec.evaluation.image_samples is not None and spec.evaluation.image_samples.count == 2


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("training", "resolution", 64),
        ("training", "predictionType", "epsilon"),
        ("training", "snrGamma", 5.0),
        ("training", "noiseOffset", 0.1),
        ("model", "vae", {"source": "hf://madebyollin/sdxl-vae-fp16-fix"}),
        ("training", "trainTextEncoder", True),
        ("training", "centerCrop", False),
        ("training", "randomFlip", True),
        ("evaluation", "imageSamples", {"count": 1}),
    ],
)
def test_text_to_image_fields_are_refused_for_other_tasks(
    section: str, field: str, value: object
) -> None:
    doc = _job({section: {field: value}}, task="causal-lm")
    doc["spec"]["evaluation"].pop("metrics")
    if field != "imageSamples":
        doc["spec"]["evaluation"].pop("imageSamples")
    errors = _errors(doc)
    assert errors == {f"spec.{section}.{field}": f"{section}.{field} is only for model.task "
                      "text-to-image"}  # fmt: skip


def test_text_to_image_refuses_other_peft_merge_and_foreign_metrics() -> None:
    assert "spec.peft.method" in _errors(_job({"peft": {"method": "none"}}))
    hub = {"hub": {"repo": "me/x", "endpoint": "http://127.0.0.1:1", "merge": True}}
    assert "spec.output.hub.merge" in _errors(_job({"output": hub}))
    # Another task's metric, or any other name: the UNet's loss is all it computes.
    for name in ("perplexity", "clip_score"):
        errors = _errors(_job({"evaluation": {"metrics": [name]}}))
        assert "text-to-image computes only denoising_loss" in errors["spec.evaluation.metrics"]
    causal = _job(task="causal-lm")
    causal["spec"]["evaluation"] = {"metrics": ["denoising_loss"]}
    assert "spec.evaluation.metrics" in _errors(causal)
    gated = _job({"evaluation": {"metrics": [], "gates": {"accuracy": 0.5}}})
    assert "spec.evaluation.gates" in _errors(gated)


def test_the_crd_rules_name_the_new_task() -> None:
    from finetune_api.crd import build_crd

    text = json.dumps(build_crd())
    assert "text-to-image" in text and "denoising_loss" in text


# ---- the data and the colour measure ------------------------------------------------------------


def test_shapes_dataset_is_an_imagefolder_with_captions(tmp_path: Path) -> None:
    from datasets import load_dataset

    save_shapes_dataset(tmp_path, train=16, test=8)
    ds = load_dataset(str(tmp_path))
    assert set(ds) == {"train", "test"} and len(ds["train"]) == 16
    row = ds["train"][0]
    assert row["image"].size == (SIZE, SIZE) and row["text"] == "a red circle"


def test_colour_distance_tells_the_caption_colours_apart() -> None:
    references = reference_colours()
    rng = random.Random(3)
    for colour in COLOURS:
        image = shape_image(colour, "square", rng)
        own = colour_distance(image, f"a {colour} square", references)
        others = [colour_distance(image, f"a {c} square", references) for c in COLOURS]
        assert own == min(others) and own < 0.1
    assert caption_colour("A Blue circle") == "blue"


# ---- the task on a tiny pipeline ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("t2i")
    # Untrained parts are enough for the mechanics; the trainer suite measures learning.
    pipeline = save_tiny_pipeline(root / "pipe", vae_steps=0, unet_steps=0)
    return pipeline, save_shapes_dataset(root / "data", train=16, test=6)


def _spec(tiny: tuple[Path, Path], **changes: Any) -> FineTuneJobSpec:
    doc = text_to_image_job(*tiny)
    for section, values in changes.items():
        doc["spec"][section] = {**doc["spec"].get(section, {}), **values}
    return parse_manifest(doc).spec


def _task_and_data(spec: FineTuneJobSpec) -> tuple[Any, Any]:
    from datasets import load_dataset

    from finetune_trainer.tasks import task_for

    task = task_for(spec)
    raw = load_dataset(spec.dataset.source.removeprefix("file://"))
    return task, task.build_data(raw["train"], raw["test"])


def test_pixel_values_resize_crop_and_scale() -> None:
    from finetune_trainer.tasks.text_to_image import pixel_values

    image = Image.new("RGB", (64, 32), (255, 0, 0))
    values = pixel_values(image, 16)
    assert values.shape == (3, 16, 16)
    assert torch.allclose(values[0], torch.ones(16, 16))
    assert torch.allclose(values[1], -torch.ones(16, 16))


def _columns(image: Image.Image) -> Image.Image:
    """An image whose red channel is 5 x its column, so that a crop shows where it starts and
    whether it was mirrored."""
    width, height = image.size
    red = np.tile(np.arange(width, dtype=np.uint8) * 5, (height, 1))
    return Image.fromarray(np.stack([red, red * 0, red * 0], axis=-1))


def _first_column_and_mirrored(values: torch.Tensor) -> tuple[int, bool]:
    """Back from pixel values in -1..1 to the source column of the square's first column, and
    whether its columns run backwards."""
    columns = [round((float(v) + 1) * 127.5 / 5) for v in values[0, 0]]
    return columns[0], columns[1] < columns[0]


def test_crops_and_mirrors_are_drawn_for_training_and_never_for_evaluation() -> None:
    import random

    from finetune_trainer.tasks.text_to_image import Collator

    image = _columns(Image.new("RGB", (48, 16)))  # resized as it is: its shorter side is 16
    row = {"image": image, "input_ids": [1, 2]}
    collate = Collator(16, micro_conditioned=True, center_crop=False, random_flip=True)
    random.seed(3)
    batch = collate([row] * 12)
    # Drawn from Python's RNG, which a checkpoint keeps: the same state draws the same crops.
    random.seed(3)
    assert torch.equal(collate([row] * 12)["pixel_values"], batch["pixel_values"])
    seen = set()
    for values, conditions in zip(batch["pixel_values"], batch["time_ids"].tolist(), strict=True):
        first, mirrored = _first_column_and_mirrored(values)
        # SDXL's crop (top, left) is where the square starts in the resized image as the UNet
        # sees it: in a mirrored one, the square's first column was source column 47 - left.
        left = 47 - first if mirrored else first
        assert conditions == [16, 48, 0, left, 16, 16]
        seen.add((left, mirrored))
    assert {m for _, m in seen} == {True, False} and len({lf for lf, _ in seen}) > 3

    # Evaluation rows keep their centre square, unmirrored, and draw nothing.
    scored = {**row, "noise_seed": 1, "timestep": 10}
    state = random.getstate()
    evaluated = collate([scored] * 4)
    assert random.getstate() == state
    for values in evaluated["pixel_values"]:
        assert _first_column_and_mirrored(values) == (16, False)
    # The defaults (centre, no mirror) draw nothing either: runs without them train as before.
    plain = Collator(16, micro_conditioned=True)([row] * 4)
    assert random.getstate() == state
    assert plain["time_ids"].tolist() == [[16, 48, 0, 16, 16, 16]] * 4


def test_the_spec_sets_the_crop_and_the_mirror_and_the_card_says_so(
    tiny: tuple[Path, Path],
) -> None:
    for training, collator, card in (
        ({"centerCrop": False, "randomFlip": True}, (False, True), ("random", "yes")),
        ({}, (True, False), ("centre", "no")),
    ):
        task, data = _task_and_data(_spec(tiny, training=training))
        assert (data.collate.center_crop, data.collate.random_flip) == collator
        settings = dict(task.card("adapter", "me/shapes-lora").settings)
        assert (settings["Crop"], settings["Random flip"]) == card


def test_eval_schedule_spreads_timesteps_and_fixes_seeds() -> None:
    from finetune_trainer.tasks.text_to_image import eval_schedule

    seeds, timesteps = eval_schedule(4, 1000, seed=7)
    assert timesteps == [125, 375, 625, 875]
    assert len(set(seeds)) == 4 and eval_schedule(4, 1000, seed=7)[0] == seeds


def test_snr_weighting_follows_min_snr() -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from finetune_trainer.tasks.text_to_image import denoising_loss

    scheduler = DDPMScheduler()
    timesteps = torch.tensor([10, 500, 990])
    prediction, target = torch.ones(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    plain = denoising_loss(prediction, target, timesteps, scheduler.alphas_cumprod, "epsilon", None)
    assert plain.tolist() == [1.0, 1.0, 1.0]
    snr = compute_snr(scheduler, timesteps)
    eps = denoising_loss(prediction, target, timesteps, scheduler.alphas_cumprod, "epsilon", 5.0)
    assert torch.allclose(eps, torch.clamp(snr, max=5.0) / snr)
    v = denoising_loss(prediction, target, timesteps, scheduler.alphas_cumprod, "v_prediction", 5.0)
    assert torch.allclose(v, torch.clamp(snr, max=5.0) / (snr + 1))
    # Low-noise timesteps (huge SNR) are damped; the noisiest keep their full weight.
    assert eps[0] < 0.05 and eps[2] == pytest.approx(1.0)


def test_data_rows_collate_to_pixels_and_padded_captions(tiny: tuple[Path, Path]) -> None:
    _, data = _task_and_data(_spec(tiny))
    assert len(data.train) == 16 and len(data.evaluation) == 6
    batch = data.collate([data.evaluation[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    assert batch["input_ids"].shape == (3, data.processor["tokenizer"].model_max_length)
    # "a red circle": bos, three words, eos; the rest is padding.
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 5, 5]
    assert batch["timesteps"].tolist() == data.evaluation["timestep"][:3]
    assert "noise_seeds" not in data.collate([data.train[0]])


def test_only_the_unet_attention_lora_trains(tiny: tuple[Path, Path]) -> None:
    task, data = _task_and_data(_spec(tiny))
    model = task.load_model(data, torch.device("cpu"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("unet.") and "lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {
        "to_q",
        "to_k",
        "to_v",
        "0",
    }
    torch.manual_seed(0)
    batch = data.collate([data.train[i] for i in range(4)])
    loss = task.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tiny: tuple[Path, Path]) -> None:
    grads = []
    for checkpointing in (False, True):
        task, data = _task_and_data(_spec(tiny, training={"gradientCheckpointing": checkpointing}))
        torch.manual_seed(0)  # LoRA's gaussian A matrices
        model = task.load_model(data, torch.device("cpu"))
        assert model.unet.is_gradient_checkpointing is checkpointing
        model.train()
        torch.manual_seed(1)  # the step's noise and timesteps
        task.loss(model, data.collate([data.train[i] for i in range(4)])).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert_same_gradients(plain, checkpointed)
    assert any(float(g.abs().sum()) > 0 for g in checkpointed.values())


def test_bf16_loads_the_frozen_parts_at_half_the_bytes_and_keeps_lora_fp32(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    models = {}
    for precision in ("fp32", "bf16"):
        task, data = _task_and_data(_spec(tiny, training={"precision": precision}))
        models[precision] = task.load_model(data, torch.device("cpu"))
    fp32, bf16 = models["fp32"], models["bf16"]
    frozen = {n: p for n, p in bf16.named_parameters() if not p.requires_grad}
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.float32}

    def frozen_bytes(model: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)

    assert frozen_bytes(bf16) * 2 == frozen_bytes(fp32)
    # A step under autocast, as accelerate's bf16 runs it, gives fp32 gradients to LoRA only.
    batch = data.collate([data.train[i] for i in range(4)])
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.loss(bf16, batch)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in bf16.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    # The samples come from the bf16 pipeline too, outside autocast.
    samples = {"imageSamples": {"prompts": ["a red circle"], "count": 1, "inferenceSteps": 2}}
    task, data = _task_and_data(_spec(tiny, training={"precision": "bf16"}, evaluation=samples))
    assert task.save(bf16, data, tmp_path) == "adapter"
    assert Image.open(tmp_path / "samples" / "00.png").size == (SIZE, SIZE)


def test_offset_noise_is_diffusers_formula_and_only_in_training(tiny: tuple[Path, Path]) -> None:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    latents = torch.zeros(3, 4, 8, 8)
    torch.manual_seed(3)
    # diffusers' train_text_to_image_lora.py (and _sdxl.py) for --noise_offset 0.1, as written:
    expected = torch.randn_like(latents)
    expected += 0.1 * torch.randn((latents.shape[0], latents.shape[1], 1, 1))
    torch.manual_seed(3)
    assert torch.equal(training_noise(latents, 0.1), expected)
    torch.manual_seed(3)
    plain = torch.randn_like(latents)
    torch.manual_seed(3)
    assert torch.equal(training_noise(latents, None), plain)  # unset: the same draws as before
    # The offset is one value per example and channel: constant over the image.
    shift = expected - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))
    assert float(shift.abs().max()) > 0

    losses, scores = [], []
    for offset in (None, 0.5):
        training = {} if offset is None else {"noiseOffset": offset}
        task, data = _task_and_data(_spec(tiny, training=training))
        torch.manual_seed(0)
        model = task.load_model(data, torch.device("cpu"))
        assert model.noise_offset == offset
        torch.manual_seed(1)
        losses.append(float(task.loss(model, data.collate([data.train[i] for i in range(4)]))))
        loader = DataLoader(data.evaluation, batch_size=4, collate_fn=data.collate)
        scores.append(task.evaluate(Accelerator(cpu=True), model, loader))
        settings = dict(task.card("adapter", "me/shapes-lora").settings)
        assert settings["Noise offset"] == (offset or "none")
    assert losses[0] != pytest.approx(losses[1])  # the same seed, other noise
    assert scores[0] == scores[1]  # evaluation noise stays plain: before and after compare alike


def test_evaluation_is_the_same_at_fixed_seeds(tiny: tuple[Path, Path]) -> None:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    task, data = _task_and_data(_spec(tiny))
    model = task.load_model(data, torch.device("cpu"))
    loader = DataLoader(data.evaluation, batch_size=4, collate_fn=data.collate)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(1)
    first = task.evaluate(accelerator, model, loader)
    torch.manual_seed(2)  # the global generator plays no part
    assert task.evaluate(accelerator, model, loader) == first
    assert set(first) == {"denoising_loss"} and first["denoising_loss"] > 0


def test_save_writes_diffusers_lora_samples_and_card(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    from finetune_trainer.model_card import render_model_card

    spec = _spec(tiny, evaluation={"imageSamples": {"prompts": ["a red circle", "a blue square"],
                                               "count": 3, "inferenceSteps": 2}})  # fmt: skip
    task, data = _task_and_data(spec)
    model = task.load_model(data, torch.device("cpu"))
    with torch.no_grad():  # a LoRA that changes the output, as a trained one would
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    assert task.save(model, data, tmp_path) == "adapter"
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    index = [json.loads(line) for line in (tmp_path / "samples" / "samples.jsonl").open()]
    assert [r["prompt"] for r in index] == ["a red circle", "a blue square", "a red circle"]
    assert [r["seed"] for r in index] == [7, 8, 9]
    saved = Image.open(tmp_path / "samples" / "00.png")
    assert saved.size == (SIZE, SIZE)

    # diffusers loads the LoRA back onto the base, and reproduces sample 0 from its seed.
    pipeline = StableDiffusionPipeline.from_pretrained(str(tiny[0]), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(str(tmp_path))
    again = pipeline(
        "a red circle", num_inference_steps=2, height=SIZE, width=SIZE,
        generator=torch.Generator().manual_seed(7),
    ).images[0]  # fmt: skip
    diff = np.asarray(again, dtype=np.int16) - np.asarray(saved, dtype=np.int16)
    assert np.abs(diff).max() <= 2

    from finetune_api import FineTuneJob

    doc = text_to_image_job(*tiny)
    doc["spec"] = spec.model_dump(by_alias=True, exclude_none=True)
    doc["spec"]["output"] = {"hub": {"repo": "me/shapes-lora", "endpoint": "http://127.0.0.1:1"}}
    job = FineTuneJob.model_validate(doc)
    card = render_model_card(job, {"denoising_loss": {"before": 1.1, "after": 0.4}}, "adapter",
                             artifact_dir=tmp_path)  # fmt: skip
    from huggingface_hub import ModelCard

    meta = ModelCard(card).data.to_dict()
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"text-to-image", "lora", "diffusers", "diffusers-training"} <= set(meta["tags"])
    assert meta["widget"][0] == {"text": "a red circle", "output": {"url": "samples/00.png"}}
    assert "![samples/02.png](samples/02.png)" in card
    assert 'pipeline.load_lora_weights("me/shapes-lora")' in card


def test_the_unet_lora_resumes_by_name(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """What a checkpoint keeps (modeling.trainable_state) and train._resume copies back by name
    restores the UNet's LoRA, in a freshly loaded model as a new attempt loads it."""
    from finetune_trainer import checkpoint, modeling

    task, data = _task_and_data(_spec(tiny))
    trained = task.load_model(data, torch.device("cpu"))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p))
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad])
    saved = checkpoint.Checkpoint(
        state=checkpoint.TrainerState(step=3, epoch=0, batches_in_epoch=3, world_size=2),
        trainable=modeling.trainable_state(trained),
        optimizer=optimizer.state_dict(),
        scheduler={},
        rng=[checkpoint.capture_rng()],
    )
    folder = checkpoint.save(tmp_path, saved, keep=1)
    state = checkpoint.load(folder).trainable
    fresh = task.load_model(data, torch.device("cpu"))
    params = dict(fresh.named_parameters())
    assert set(state) == {n for n, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    batch = data.collate([data.evaluation[i] for i in range(2)])
    with torch.no_grad():
        a = trained(**{k: v for k, v in batch.items() if k != "attention_mask"})[0]
        b = fresh(**{k: v for k, v in batch.items() if k != "attention_mask"})[0]
    assert torch.equal(a, b)


def test_the_example_manifest_is_a_valid_text_to_image_job() -> None:
    import yaml

    from finetune_trainer import example_data

    assert "shapes-text-to-image" in example_data.EXAMPLES
    template = Path(example_data.__file__).parent / "examples" / "shapes-text-to-image.yaml"
    job = parse_manifest(yaml.safe_load(template.read_text()))
    assert job.spec.model.task == "text-to-image"
    assert (
        job.spec.evaluation.image_samples is not None
        and job.spec.evaluation.image_samples.count == 4
    )


# ---- SDXL -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory: pytest.TempPathFactory, tiny: tuple[Path, Path]) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("t2i-xl")
    return save_tiny_xl_pipeline(root / "pipe"), tiny[1]


def test_sdxl_rows_carry_both_tokenizers_ids_and_each_images_time_ids(
    tiny_xl: tuple[Path, Path], tiny: tuple[Path, Path]
) -> None:
    task, data = _task_and_data(_spec(tiny_xl))
    assert task.pipeline.class_name == "StableDiffusionXLPipeline"
    assert set(data.processor) == {"tokenizer", "tokenizer_2"}
    batch = data.collate([data.evaluation[i] for i in range(3)])
    assert batch["input_ids_2"].shape == batch["input_ids"].shape == (3, 16)
    # (original height, width, crop top, left, target height, width): the shapes are squares.
    assert batch["time_ids"].tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 3
    # A wide image is resized to 32x16 and its middle 16 kept: the crop starts 8 pixels in.
    wide = {**data.train[0], "image": Image.new("RGB", (64, 32), (255, 0, 0))}
    assert data.collate([wide])["time_ids"].tolist() == [[32, 64, 0, 8, SIZE, SIZE]]
    # Stable Diffusion's UNet takes neither.
    _, sd = _task_and_data(_spec(tiny))
    assert not {"input_ids_2", "time_ids"} & set(sd.collate([sd.train[0]]))


def test_the_sdxl_unet_lora_trains_on_both_encoders_pooled_text_and_time_ids(
    tiny_xl: tuple[Path, Path],
) -> None:
    task, data = _task_and_data(_spec(tiny_xl))
    model = task.load_model(data, torch.device("cpu"))
    assert type(model.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("unet.") and "lora_" in n for n in trainable)
    torch.manual_seed(0)
    loss = task.loss(model, data.collate([data.train[i] for i in range(4)]))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    # Each conditioning reaches the UNet: at fixed noise, changing one changes the prediction.
    batch = data.collate([data.evaluation[i] for i in range(2)])
    with torch.no_grad():

        def predict(**changes: torch.Tensor) -> torch.Tensor:
            return model(**{**batch, **changes})[0]

        plain = predict()
        assert torch.equal(plain, predict())
        assert not torch.allclose(plain, predict(time_ids=batch["time_ids"] * 4))
        other = data.collate([data.evaluation[i] for i in (3, 4)])  # other captions
        assert not torch.allclose(plain, predict(input_ids_2=other["input_ids_2"]))
        assert not torch.allclose(plain, predict(input_ids=other["input_ids"]))


def test_sdxl_saves_a_lora_its_pipeline_loads_and_a_card_that_names_it(
    tiny_xl: tuple[Path, Path], tmp_path: Path
) -> None:
    from diffusers import StableDiffusionXLPipeline

    spec = _spec(tiny_xl, evaluation={"imageSamples": {"prompts": ["a red circle"], "count": 2,
                                                  "inferenceSteps": 2}})  # fmt: skip
    task, data = _task_and_data(spec)
    model = task.load_model(data, torch.device("cpu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    assert task.save(model, data, tmp_path) == "adapter"
    saved = Image.open(tmp_path / "samples" / "00.png")

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(tiny_xl[0]))
    pipeline.set_progress_bar_config(disable=True)

    def sample() -> Image.Image:
        # At SDXL's own default guidance scale (5), which an unset guidanceScale takes.
        return pipeline("a red circle", num_inference_steps=2, height=SIZE, width=SIZE,
                        generator=torch.Generator().manual_seed(7)).images[0]  # fmt: skip

    base = sample()
    pipeline.load_lora_weights(str(tmp_path))
    again = sample()

    def distance(a: Image.Image, b: Image.Image) -> int:
        return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())

    # The pushed LoRA redraws sample 0 from its seed; without it the base draws another image.
    assert distance(again, saved) <= 2 and distance(base, saved) > 2

    card = task.card("adapter", "me/xl-lora")
    assert {"stable-diffusion-xl", "stable-diffusion-xl-diffusers"} <= set(card.tags)
    assert "StableDiffusionXLPipeline.from_pretrained(" in card.usage


def test_an_sdxl_vae_kept_in_fp32_beside_a_half_unet_still_draws_samples(
    tiny_xl: tuple[Path, Path], tmp_path: Path
) -> None:
    """SDXL's VAE stays fp32 under fp16 (it overflows in half precision), a GPU-only setting; the
    same mix on the CPU in bf16 goes through the sampling's autocast."""
    samples = {"imageSamples": {"prompts": ["a red circle"], "count": 1, "inferenceSteps": 2}}
    task, data = _task_and_data(_spec(tiny_xl, evaluation=samples))
    model = task.load_model(data, torch.device("cpu"))
    for part in (model.unet, *model.text_encoders):
        part.to(torch.bfloat16)
    assert model.vae.dtype == torch.float32
    task.save(model, data, tmp_path)
    assert Image.open(tmp_path / "samples" / "00.png").size == (SIZE, SIZE)


def test_a_vae_of_its_own_replaces_the_pipelines_at_the_other_parts_precision(
    tiny_xl: tuple[Path, Path], tmp_path: Path
) -> None:
    """model.vae, as diffusers' --pretrained_vae_model_name_or_path: SDXL's fp16-fix VAE runs in
    fp16, where the pipeline's own is kept in fp32."""
    from diffusers import AutoencoderKL

    own = AutoencoderKL.from_pretrained(tiny_xl[0] / "vae")
    with torch.no_grad():  # another VAE of the same shape
        for param in own.parameters():
            param.mul_(1.5)
    own.save_pretrained(tmp_path / "vae")
    given = {"vae": {"source": f"file://{tmp_path / 'vae'}"}}
    for model_changes, vae_dtype in (({}, torch.float32), (given, torch.float16)):
        spec = _spec(tiny_xl, model=model_changes, training={"precision": "fp16"})
        task, data = _task_and_data(spec)
        model = task.load_model(data, torch.device("cpu"))
        assert (model.unet.dtype, model.vae.dtype) == (torch.float16, vae_dtype)

    task, data = _task_and_data(_spec(tiny_xl, model=given))
    model = task.load_model(data, torch.device("cpu"))
    theirs = own.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.vae.state_dict().items())
    card = task.card("adapter", "me/xl-lora")
    assert f'vae = AutoencoderKL.from_pretrained("{tmp_path / "vae"}")' in card.usage
    assert '.from_pretrained("<base pipeline>", vae=vae)' in card.usage
    # A VAE that is not there fails before anything loads, naming its field.
    doc = text_to_image_job(*tiny_xl)
    doc["spec"]["model"]["vae"] = {"source": "file:///no/such/vae"}
    missing = missing_local(FineTuneJob.model_validate(doc))
    assert missing is not None and missing.field == "spec.model.vae.source"


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_a_text_encoder_lora_trains_every_read_layer_and_the_pipeline_loads_it(
    tiny: tuple[Path, Path], tiny_xl: tuple[Path, Path], tmp_path: Path, xl: bool
) -> None:
    """training.trainTextEncoder, as diffusers' --train_text_encoder: a LoRA on each encoder's
    attention, saved beside the UNet's in the one file load_lora_weights reads."""
    from diffusers import DiffusionPipeline

    base = tiny_xl if xl else tiny
    task, data = _task_and_data(_spec(base, training={"trainTextEncoder": True}))
    model = task.load_model(data, torch.device("cpu"))
    model.train()
    assert all(e.training for e in model.text_encoders) and not model.vae.training
    task.loss(model, data.collate([data.train[i] for i in range(4)])).backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # Every LoRA weight gets a gradient (DDP waits for each): none on a layer nothing reads.
    assert all(p.grad is not None for p in trained.values())
    for i, encoder in enumerate(model.text_encoders):
        last = encoder.config.num_hidden_layers - 1
        lora = [n for n in trained if n.startswith(("text_encoder.", "text_encoder_2.")[i])]
        projections = ("q_proj", "k_proj", "v_proj", "out_proj")
        assert lora and all(n.split(".lora_")[0].endswith(projections) for n in lora)
        on_last = any(f"layers.{last}." in n for n in lora)
        assert on_last is (not xl or i == 1)  # SDXL's first encoder: its penultimate layer read
    assert dict(task.card("adapter", "me/x").settings)["Text encoder"] == "LoRA trained"

    with torch.no_grad():  # a LoRA that changes the encoders' output, as a trained one would
        for name, p in trained.items():
            if "lora_B" in name and name.startswith("text_encoder"):
                p.normal_(std=0.5)
    task.save(model, data, tmp_path)
    pipeline = DiffusionPipeline.from_pretrained(str(base[0]))
    ids = data.collate([data.train[0]])["input_ids"]
    encoders = [pipeline.text_encoder, *([pipeline.text_encoder_2] if xl else [])]
    with torch.no_grad():
        before = [e(ids)[0] for e in encoders]
    pipeline.load_lora_weights(str(tmp_path))
    model.eval()
    with torch.no_grad():
        for loaded, trained, base_out in zip(encoders, model.text_encoders, before, strict=True):
            assert torch.allclose(loaded(ids)[0], trained(ids)[0], atol=1e-5)
            assert not torch.allclose(base_out, trained(ids)[0], atol=1e-3)


def test_a_pipeline_other_than_stable_diffusion_or_sdxl_is_refused_by_name(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    index = json.loads((tiny[0] / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    task, _ = _task_and_data(_spec(tiny))
    task = type(task)(_spec((tmp_path, tiny[1])))
    with pytest.raises(ManifestError) as caught:
        task.pipeline  # noqa: B018
    assert str(caught.value) == (
        f"model.source: file://{tmp_path} is a FluxPipeline; text-to-image fine-tunes a "
        "StableDiffusionPipeline or StableDiffusionXLPipeline"
    )
