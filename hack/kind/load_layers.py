#!/usr/bin/env python3
"""Load a local Docker image into kind nodes that already hold most of its layers.

    load_layers.py DOCKER REF NODE...      exit 0: loaded; 3: not a case for this, nothing done

`kind load docker-image` (and cluster.sh's streamed import) sends the whole `docker save` tar,
and containerd reads and stores every layer in it, even layers it has: for the 6 GB trainer image
after a code-only rebuild that is ~150 s for one changed layer of a few hundred KB. This gives
each node an OCI archive of the manifest, the config and only the layers it lacks (containerd
keeps `kind load`'s uncompressed layers under their diff IDs).

Those layers come from Docker's own layer store where it can be read (a local daemon on the
overlay2 driver, and the permission to read its data root): each layer's tar is put together
from its files and its tar-split record, as `docker save` itself does, and checked against its
diff ID. That reads only the layers sent: under a second for a code layer, where `docker save`
reads all 6 GB (48 s). Otherwise, or when a layer does not come out as its diff ID, it reads
`docker save` once. Which layer a file in `docker save` holds is only known once it is hashed:
a file whose size is that of a layer every node has is taken to be that layer and only hashed;
any other is kept in memory.

Exit 3 (the caller then loads the whole image) when the layers a node lacks come to more than
fits in memory (a fresh node, a changed dependency layer), or a hash breaks the size's promise.
Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 20
IN_MEMORY_MAX = 1 << 30
NOT_APPLICABLE = 3
CONTENT_DIR = "/var/lib/containerd/io.containerd.content.v1.content/blobs/sha256"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
# tar-split's record types (github.com/vbatts/tar-split, tar/storage/entry.go): a file's
# contents, read from the layer's folder, or raw bytes of the stream (headers, padding).
TAR_SPLIT_FILE, TAR_SPLIT_SEGMENT = 1, 2


class NotApplicable(Exception):
    pass


def node_ref(ref: str) -> str:
    """containerd's name for a Docker ref: finetune-trainer:0.1.0 -> docker.io/library/..."""
    first = ref.split("/", 1)[0]
    if "/" not in ref:
        return f"docker.io/library/{ref}"
    if "." in first or ":" in first or first == "localhost":
        return ref
    return f"docker.io/{ref}"


def node_layers(docker: str, node: str, digests: Iterable[str]) -> dict[str, int]:
    """{digest: size} of the given blobs that the node's k8s.io content store holds."""
    wanted = " ".join(d.removeprefix("sha256:") for d in digests)
    script = (
        f"have=$(ctr --namespace=k8s.io content ls -q); for d in {wanted}; do "
        f'case "$have" in *"sha256:$d"*) stat -c "sha256:%n %s" "{CONTENT_DIR}/$d" ;; esac; done'
    )
    out = subprocess.run(
        [docker, "exec", node, "sh", "-c", script], check=True, capture_output=True, text=True
    ).stdout
    sizes = {}
    for line in out.splitlines():
        path, size = line.split()
        sizes["sha256:" + path.rsplit("/", 1)[1]] = int(size)
    return sizes


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The layers' chain IDs (OCI image spec): the first diff ID, then each one's
    sha256("<parent's chain ID> <diff ID>"); Docker's layer store is keyed by them."""
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append(sha256(f"{chain[-1]} {diff_id}".encode()) if chain else diff_id)
    return chain


def store_root(docker: str) -> Path | None:
    """Docker's overlay2 image store, where this process can read it; None otherwise (another
    storage driver or the containerd image store, a remote or rootless daemon)."""
    info = subprocess.run(
        [docker, "info", "-f", "{{.Driver}} {{.DockerRootDir}}"], capture_output=True, text=True
    ).stdout.split()
    if len(info) != 2 or info[0] != "overlay2":
        return None
    root = Path(info[1])
    try:
        (root / "image" / "overlay2" / "layerdb").stat()
    except OSError:
        return None
    return root


def assemble_layer(layer_dir: Path, files: Path) -> bytes:
    """A layer's tar as Docker recorded it: its tar-split record's raw segments, with each file's
    contents read from the layer's folder (overlay2's diff/)."""
    out = bytearray()
    with gzip.open(layer_dir / "tar-split.json.gz", "rt") as records:
        for line in records:
            entry = json.loads(line)
            if entry["type"] == TAR_SPLIT_SEGMENT:
                out += base64.b64decode(entry.get("payload") or "")
            elif entry["type"] == TAR_SPLIT_FILE and entry.get("size"):
                raw = entry.get("name_raw")
                name = base64.b64decode(raw) if raw else entry["name"].encode()
                out += (files / name.decode("utf-8", "surrogateescape")).read_bytes()
    return bytes(out)


def read_store(
    root: Path, config_digest: str, diff_ids: list[str], wanted: set[str]
) -> dict[str, bytes] | None:
    """The config and the `wanted` layers from Docker's layer store, each checked against its
    digest; None when one cannot be read or does not come out as its digest."""
    image = root / "image" / "overlay2"
    try:
        configs = image / "imagedb" / "content" / "sha256"
        blobs = {config_digest: (configs / config_digest.removeprefix("sha256:")).read_bytes()}
        for diff_id, chain_id in zip(diff_ids, chain_ids(diff_ids), strict=True):
            if diff_id not in wanted or diff_id in blobs:
                continue
            layer_dir = image / "layerdb" / "sha256" / chain_id.removeprefix("sha256:")
            cache_id = (layer_dir / "cache-id").read_text().strip()
            blobs[diff_id] = assemble_layer(layer_dir, root / "overlay2" / cache_id / "diff")
    except OSError as exc:
        print(f"Docker's layer store: {exc}; reading docker save instead", file=sys.stderr)
        return None
    wrong = [digest for digest, data in blobs.items() if sha256(data) != digest]
    if wrong:
        print(f"Docker's layer store: {wrong} differ; reading docker save instead", file=sys.stderr)
        return None
    return blobs


def read_save(
    docker: str, ref: str, config_digest: str, diff_ids: list[str], known: dict[int, str]
) -> tuple[dict[str, bytes], dict[str, int]]:
    """Stream `docker save` once: returns the blobs worth keeping (the config, and every layer
    not presumed present by its size) and every blob's size, keyed by digest."""
    kept: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    with subprocess.Popen([docker, "save", ref], stdout=subprocess.PIPE) as save:
        assert save.stdout is not None
        with tarfile.open(fileobj=save.stdout, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue  # directories, a duplicate layer's symlink
                presumed = known.get(member.size)
                if presumed is None and member.size > IN_MEMORY_MAX:
                    raise NotApplicable(f"{member.name}: {member.size} bytes, not on the nodes")
                source = tar.extractfile(member)
                assert source is not None
                digest, data = hashlib.sha256(), bytearray()
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    if presumed is None:
                        data += chunk
                got = f"sha256:{digest.hexdigest()}"
                if presumed is not None and got != presumed:
                    raise NotApplicable(f"{member.name} has the size of {presumed} but is {got}")
                sizes[got] = member.size
                if presumed is None and (got == config_digest or got in diff_ids):
                    kept[got] = bytes(data)
        if save.wait() != 0:
            raise SystemExit(f"docker save {ref} failed")
    return kept, sizes


def archive(ref: str, blobs: dict[str, bytes], manifest: bytes) -> bytes:
    """An OCI image layout as one tar: the index naming `ref`, the manifest, the given blobs."""
    manifest_digest = sha256(manifest)
    name = node_ref(ref)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
                },
            }
        ],
    }
    files = {
        "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
        **{"blobs/sha256/" + d.removeprefix("sha256:"): data for d, data in blobs.items()},
        "blobs/sha256/" + manifest_digest.removeprefix("sha256:"): manifest,
        "index.json": json.dumps(index).encode(),
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def import_into(docker: str, node: str, data: bytes, errors: list[str]) -> None:
    command = [docker, "exec", "-i", node, "ctr", "--namespace=k8s.io", "images", "import"]
    command += ["--all-platforms", "--digests", "--snapshotter=overlayfs", "-"]
    done = subprocess.run(command, input=data, capture_output=True)
    if done.returncode != 0:
        errors.append(f"{node}: {done.stderr.decode(errors='replace')[-500:]}")


def load(docker: str, ref: str, nodes: list[str]) -> None:
    (image,) = json.loads(
        subprocess.run(
            [docker, "image", "inspect", ref], check=True, capture_output=True, text=True
        ).stdout
    )
    config_digest, diff_ids = image["Id"], list(image["RootFS"]["Layers"])
    present = {node: node_layers(docker, node, set(diff_ids)) for node in nodes}
    # Decided before reading: a fresh node, or a changed dependency layer, is a whole load.
    to_send = image["Size"] - min(sum(have.values()) for have in present.values())
    if to_send > IN_MEMORY_MAX:
        raise NotApplicable(f"about {to_send >> 20} MiB of layers to send")
    everywhere = set.intersection(*(set(have) for have in present.values()))
    root = store_root(docker)
    wanted = set(diff_ids) - everywhere
    from_store = read_store(root, config_digest, diff_ids, wanted) if root else None
    if from_store:
        kept = from_store
        sizes = {d: present[nodes[0]][d] for d in everywhere}
        sizes |= {digest: len(data) for digest, data in kept.items()}
    else:
        sizes_present = {present[nodes[0]][d]: d for d in everywhere}
        kept, sizes = read_save(docker, ref, config_digest, diff_ids, sizes_present)
    if config_digest not in kept or any(d not in sizes for d in diff_ids):
        raise NotApplicable("docker save did not hold the config and every layer")
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": config_digest,
                "size": sizes[config_digest],
            },
            "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": sizes[d]} for d in diff_ids],
        }
    ).encode()
    errors: list[str] = []
    threads = []
    for node in nodes:
        send = [d for d in dict.fromkeys(diff_ids) if d not in present[node]]
        if any(d not in kept for d in send):
            raise NotApplicable(f"{node} lacks a layer that was only hashed")
        blobs = {config_digest: kept[config_digest], **{d: kept[d] for d in send}}
        mib = sum(len(b) for b in blobs.values()) / (1 << 20)
        source = "Docker's layer store" if from_store else "docker save"
        print(
            f"{node}: sending {len(send)} of {len(diff_ids)} layers ({mib:.1f} MiB, from {source})",
            flush=True,
        )
        thread = threading.Thread(
            target=import_into, args=(docker, node, archive(ref, blobs, manifest), errors)
        )
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit("ctr import failed: " + "; ".join(errors))


def main(argv: list[str]) -> int:
    docker, ref, *nodes = argv
    try:
        load(docker, ref, nodes)
    except NotApplicable as exc:
        print(f"not a layer-only load: {exc}", file=sys.stderr)
        return NOT_APPLICABLE
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
