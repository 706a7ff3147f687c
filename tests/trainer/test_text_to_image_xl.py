"""text-to-image on an SDXL pipeline, end to end: two real ranks (one pod) fetch a tiny SDXL
pipeline from the Hub double, train its UNet's LoRA with SDXL's conditioning (both text encoders,
the pooled embedding, the time ids), and push a LoRA that diffusers' StableDiffusionXLPipeline
loads. It crops and mirrors its images at random, as diffusers' SDXL recipe does, and a run
resumed from a checkpoint draws the same crops and mirrors. As that recipe gives SDXL the
fp16-fix VAE, the job names a VAE repo of its own (model.vae), fetched once beside the pipeline,
which encodes the images and decodes the samples. Its text encoders train a LoRA too
(training.trainTextEncoder), which the pushed file holds beside the UNet's.

The pipeline is random (testing/diffusion_xl.py), so this proves the mechanics on real parts.
That LoRA learns to draw captions is test_text_to_image_training's, on Stable Diffusion, across
two pods. The repo also holds what a real SDXL repo holds besides its parts (a single-file
checkpoint at the root, a second VAE folder), which the fetch must leave on the Hub.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from trainer_helpers import Gang, deep_update

from finetune_hub_double import HubDouble
from finetune_trainer.testing.diffusion import (
    SIZE,
    save_shapes_dataset,
    text_to_image_job,
)
from finetune_trainer.testing.diffusion_xl import save_tiny_xl_pipeline

pytestmark = pytest.mark.slow
TOKEN = "hf_sdxltesttoken0123456789abcdef"
BASE, REPO, VAE = "tests/tiny-sdxl", "tests/tiny-sdxl-lora", "tests/tiny-sdxl-vae"
# Files of a real SDXL repo that from_pretrained never reads (fetch.model_files_to_fetch).
UNREAD = ("sd_xl_base_1.0.safetensors", "vae_1_0/diffusion_pytorch_model.safetensors")
SAMPLES = {
    "prompts": ["a red circle", "a blue square"],
    "count": 2,
    "inferenceSteps": 2,
    "guidanceScale": 7.5,
}


@pytest.fixture(scope="module")
def pushed(
    tmp_path_factory: pytest.TempPathFactory, base_env: dict[str, str]
) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("t2i-xl")
    base = save_tiny_xl_pipeline(workdir / "base")
    seeded = shutil.copytree(base, workdir / "seeded")
    for name in UNREAD:
        (seeded / name).parent.mkdir(parents=True, exist_ok=True)
        (seeded / name).write_bytes(b"\0" * 1024)
    data = save_shapes_dataset(workdir / "data", train=16, test=8)
    vae = _another_vae(base / "vae", workdir / "vae")
    with HubDouble(workdir / "hub", tokens=[TOKEN]) as hub:
        commit = hub.seed(BASE, seeded)
        vae_commit = hub.seed(VAE, vae)
        doc = deep_update(
            text_to_image_job(base, data, name="tiny-sdxl", max_steps=6, checkpoint_every=3),
            {
                "spec": {
                    "model": {"source": f"hf://{BASE}", "vae": {"source": f"hf://{VAE}"}},
                    # diffusers' SDXL recipe: a random crop, mirrored at random, and its
                    # --train_text_encoder (a LoRA on both text encoders too).
                    "training": {
                        "batchSizePerDevice": 4,
                        "centerCrop": False,
                        "randomFlip": True,
                        "trainTextEncoder": True,
                    },
                    "evaluation": {"imageSamples": SAMPLES},
                    "output": {"hub": {"repo": REPO, "endpoint": hub.endpoint}},
                    "resources": {"nodes": 1, "processesPerNode": 2},
                }
            },
        )
        manifest = workdir / "job.yaml"
        manifest.write_text(yaml.safe_dump(doc))
        online = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN}
        # One pod of two ranks: test_text_to_image_training runs the task across pods.
        gang = Gang(manifest, workdir, {**base_env, **online}, nodes=1, nproc_per_node=2).start()
        codes = gang.wait(timeout=600)
        assert codes == [0], gang.log_text()[-4000:]
        result = gang.result(0)
        # The pushed commit's files, as the double stores them (this process is offline).
        local = workdir / "pushed"
        repo = hub.store.get("model", REPO)
        for name, entry in repo["commits"][result["revision"]]["files"].items():
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_bytes(hub.store.blob_path(entry["sha256"]).read_bytes())
        yield {
            "base": base,
            "commit": commit,
            "vae": vae,
            "vae_commit": vae_commit,
            "gang": gang,
            "workdir": workdir,
            "result": result,
            "requests": list(hub.requests),
            "local": local,
        }


def _another_vae(pipelines: Path, out: Path) -> Path:
    """A VAE of the pipeline's shape with other weights, as the fp16-fix VAE is SDXL's."""
    from diffusers import AutoencoderKL

    torch.manual_seed(7)
    AutoencoderKL.from_config(AutoencoderKL.load_config(pipelines)).save_pretrained(out)
    return out


def test_two_ranks_train_the_same_sdxl_lora_and_push_it(pushed: dict[str, Any]) -> None:
    result = pushed["result"]
    assert (result["status"], result["reason"], result["steps"]) == (
        "Succeeded",
        "PushedToHub",
        6,
    )
    assert result["modelRevision"] == pushed["commit"]
    assert result["vaeRevision"] == pushed["vae_commit"]
    workdir = pushed["workdir"]
    assert len({(workdir / f"params-{r}.sha256").read_text() for r in range(2)}) == 1
    assert TOKEN not in pushed["gang"].log_text()


def test_the_fetch_takes_the_parts_that_model_index_names_and_nothing_else(
    pushed: dict[str, Any],
) -> None:
    fetched = {
        path.split("/resolve/", 1)[1].split("/", 1)[1]
        for method, path, _ in pushed["requests"]
        if method == "GET" and f"/{BASE}/resolve/" in path
    }
    # (A file whose bytes another fetched file has, such as tokenizer_2's, comes from the cache's
    # blob without a GET.)
    parts = {"unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"}
    assert {"model_index.json", *parts} <= fetched
    assert not fetched & set(UNREAD)
    # The VAE's weights, once for both ranks.
    vae_weights = [
        path
        for method, path, _ in pushed["requests"]
        if method == "GET"
        and path.startswith(f"/{VAE}/resolve/")
        and path.endswith("/diffusion_pytorch_model.safetensors")
    ]
    assert len(vae_weights) == 1, vae_weights


def test_sdxl_loads_the_pushed_lora_and_redraws_its_samples(pushed: dict[str, Any]) -> None:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    local = pushed["local"]
    rows = [json.loads(line) for line in (local / "samples" / "samples.jsonl").open()]
    assert [r["prompt"] for r in rows] == SAMPLES["prompts"]

    def largest_difference(vae: AutoencoderKL | None) -> list[int]:
        """Per sample, the largest pixel difference of the redrawn from the pushed one."""
        given = {} if vae is None else {"vae": vae}
        pipeline = StableDiffusionXLPipeline.from_pretrained(str(pushed["base"]), **given)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.load_lora_weights(str(local))
        found = []
        for row in rows:
            again = pipeline(
                row["prompt"],
                num_inference_steps=SAMPLES["inferenceSteps"],
                guidance_scale=SAMPLES["guidanceScale"],
                height=SIZE,
                width=SIZE,
                generator=torch.Generator().manual_seed(row["seed"]),
            ).images[0]
            saved = np.asarray(Image.open(local / row["file"]), dtype=np.int16)
            found.append(int(np.abs(np.asarray(again, dtype=np.int16) - saved).max()))
        return found

    # The UNet's LoRA and both text encoders', as diffusers' SDXL script saves them.
    from safetensors.torch import load_file

    parts = {key.split(".", 1)[0] for key in load_file(local / "pytorch_lora_weights.safetensors")}
    assert parts == {"unet", "text_encoder", "text_encoder_2"}
    # Drawn with model.vae: the pipeline given that VAE redraws them, its own VAE does not.
    assert max(largest_difference(AutoencoderKL.from_pretrained(pushed["vae"]))) <= 2
    assert max(largest_difference(None)) > 2

    card = (local / "README.md").read_text()
    assert "- stable-diffusion-xl" in card and "- diffusers-training" in card
    assert f'StableDiffusionXLPipeline.from_pretrained("{BASE}", vae=vae)' in card
    assert f'vae = AutoencoderKL.from_pretrained("{VAE}")' in card
    assert f"with the VAE [{VAE}](https://huggingface.co/{VAE}) at commit" in card


def test_a_resumed_run_draws_the_same_crops_and_mirrors_and_ends_with_the_same_lora(
    pushed: dict[str, Any],
) -> None:
    """The crops and mirrors come from each rank's Python RNG, which a checkpoint keeps: resumed
    from step 3's checkpoint, the run trains steps 4 to 6 on the same pixels. (Last in the module:
    it trains again in the same folder.)"""
    workdir, gang = pushed["workdir"], pushed["gang"]
    first = [(workdir / f"params-{r}.sha256").read_text() for r in range(2)]
    gang.lose_the_newest_checkpoint()
    assert gang.start().wait(timeout=600) == [0], gang.log_text()[-4000:]
    assert gang.result(0)["resumedFromStep"] == 3
    assert [(workdir / f"params-{r}.sha256").read_text() for r in range(2)] == first
