"""hack/kind/load_layers.py reads the layers the kind nodes lack from Docker's own layer store,
byte for byte what `docker save` gives, and falls back to `docker save` when a layer does not
come out as its diff ID.

    pytest -m kind tests/kind/test_load_layers.py      # the `images` fixture builds the images

On the Hub-double image (four layers, ~200 MB): every layer put together from its files and its
tar-split record equals the layer in `docker save`; a copy of the store whose top layer has one
byte changed in one file is refused, as is a store that is not there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from kind_tools import DOCKER, run

from hack_scripts import hack_script

pytestmark = [pytest.mark.kind]

load_layers = hack_script("kind/load_layers.py")


@pytest.fixture(scope="module")
def image(images: dict[str, str]) -> dict[str, Any]:
    return json.loads(run([DOCKER, "image", "inspect", images["hub-double"]], timeout=60))[0]


@pytest.fixture(scope="module")
def store() -> Path:
    root = load_layers.store_root(DOCKER)
    assert root is not None, "this machine's Docker runs on overlay2 with a readable data root"
    return root


def saved_blobs(ref: str) -> dict[str, bytes]:
    """Every file of `docker save REF`, keyed by its digest."""
    blobs = {}
    with subprocess.Popen([DOCKER, "save", ref], stdout=subprocess.PIPE) as save:
        assert save.stdout is not None
        with tarfile.open(fileobj=save.stdout, mode="r|") as tar:
            for member in tar:
                source = tar.extractfile(member) if member.isfile() else None
                if source is not None:
                    data = source.read()
                    blobs[load_layers.sha256(data)] = data
    assert save.returncode == 0
    return blobs


def test_each_layer_from_the_store_is_the_one_docker_save_gives(
    image: dict[str, Any], store: Path
) -> None:
    diff_ids = image["RootFS"]["Layers"]
    from_store = load_layers.read_store(store, image["Id"], diff_ids, set(diff_ids))
    assert from_store is not None
    saved = saved_blobs(image["RepoTags"][0])
    assert set(from_store) == {image["Id"], *diff_ids}
    for digest, data in from_store.items():
        assert data == saved[digest], digest


def test_a_layer_that_does_not_match_its_diff_id_is_refused(
    image: dict[str, Any], store: Path, tmp_path: Path
) -> None:
    # A copy of the store holding the config and the top layer: read as it is, then with one
    # byte of one file changed (same size, so the tar-split record still fits around it).
    diff_ids = image["RootFS"]["Layers"]
    top, chain = diff_ids[-1], load_layers.chain_ids(diff_ids)[-1]
    source = store / "image" / "overlay2"
    copy = tmp_path / "image" / "overlay2"
    config = Path("imagedb/content/sha256") / image["Id"].removeprefix("sha256:")
    layer = Path("layerdb/sha256") / chain.removeprefix("sha256:")
    (copy / config).parent.mkdir(parents=True)
    shutil.copy(source / config, copy / config)
    shutil.copytree(source / layer, copy / layer)
    cache_id = (source / layer / "cache-id").read_text().strip()
    files = tmp_path / "overlay2" / cache_id / "diff"
    shutil.copytree(store / "overlay2" / cache_id / "diff", files, symlinks=True)
    assert load_layers.read_store(tmp_path, image["Id"], diff_ids, {top}) is not None

    edited = next(p for p in sorted(files.rglob("*.py")) if p.is_file() and p.stat().st_size)
    data = bytearray(edited.read_bytes())
    data[0] ^= 0x01
    edited.write_bytes(bytes(data))
    assert load_layers.read_store(tmp_path, image["Id"], diff_ids, {top}) is None
    assert load_layers.read_store(tmp_path / "absent", image["Id"], diff_ids, {top}) is None
