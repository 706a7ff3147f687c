"""The `finetune` command's local side: help and version, validate, render, example, demo.

No cluster and no training: what `finetune` imports, what it prints and how it exits.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api import parse_manifest
from finetune_api.pod import ExitCode
from finetune_api.version import version
from finetune_cli.exits import Exit
from finetune_cli.local import for_ranks
from finetune_cli.main import main
from finetune_cli.render import merge_values

COMMANDS = ("validate", "run", "train", "render", "example", "demo")
CLUSTER_COMMANDS = ("submit", "status", "logs", "wait")


def job_doc(name: str = "demo", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "hf://org/model"},
            "dataset": {"source": "hf://org/data"},
            **spec,
        },
    }


def write(path: Path, *docs: Any) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def finetune(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finetune_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


# ---- help, version, exit codes ------------------------------------------------------------------


def test_help_lists_every_command_and_the_exit_codes() -> None:
    done = finetune("--help")
    assert done.returncode == 0, done.stderr
    for command in COMMANDS + CLUSTER_COMMANDS:
        assert f"\n    {command} " in done.stdout, command
    assert "SUPPRESS" not in done.stdout and "\n    rank " not in done.stdout
    for code in (0, 1, 2, 3, 4, 5, 124):
        assert f"\n  {code} " in done.stdout, code
    wait = finetune("wait", "--help").stdout
    assert "0 Succeeded, 1 Failed, 124" in " ".join(wait.split())


def test_version_is_the_projects_one_version() -> None:
    done = finetune("--version")
    assert done.returncode == 0
    # finetune_api.version: pyproject.toml's, as tests/unit/test_packaging.py checks.
    assert done.stdout == f"finetune {version()}\n"


def test_exit_codes_agree_with_the_pod_contract() -> None:
    assert Exit.FAILED == ExitCode.RETRYABLE
    assert Exit.INVALID == ExitCode.INVALID_SPEC
    assert Exit.GATE_FAILED == ExitCode.GATE_FAILED
    assert len(set(Exit)) == len(Exit.__members__)  # every code means one thing


def test_validate_and_train_import_no_torch_client_or_operator(tmp_path: Path) -> None:
    """validate must stay fast, and train runs in the trainer image, which has no client."""
    good = write(tmp_path / "good.yaml", job_doc())
    bad = write(tmp_path / "bad.yaml", job_doc(model={"source": "file:///nonexistent/m"}))
    code = f"""
import json, sys
from finetune_cli.main import main
codes = [main(["validate", {str(good)!r}]), main(["train", {str(bad)!r}])]
heavy = ("torch", "transformers", "kubernetes", "finetune_operator", "finetune_hub_double")
print(json.dumps({{"codes": codes, "loaded": sorted(m for m in heavy if m in sys.modules)}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**_env(), "FINETUNE_RESULT_FILE": str(tmp_path / "result.json")},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"codes": [0, 3], "loaded": []}


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


# ---- validate ---------------------------------------------------------------------------------


def test_validate_reads_files_stdin_and_every_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = write(tmp_path / "good.yaml", job_doc("one"))
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf"}}
    broken = job_doc("two", peft={"r": 0}, training={"epochs": 0})
    multi = write(tmp_path / "multi.yaml", secret, broken, job_doc("three"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(yaml.safe_dump(job_doc("four"))))

    assert main(["validate", str(good), str(multi), "-"]) == Exit.INVALID
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{good}: FineTuneJob one is valid",
        f"{multi}#3: FineTuneJob three is valid",
        "<stdin>: FineTuneJob four is valid",
    ]
    errors = err.splitlines()
    assert any(e.startswith(f"{multi}#2: spec.peft.r: ") for e in errors), errors
    assert any(e.startswith(f"{multi}#2: spec.training.epochs: ") for e in errors), errors
    assert "1 of 4 documents invalid" in errors


def test_validate_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path / "good.yaml", job_doc("one"))
    bad = write(tmp_path / "bad.yaml", job_doc("two", peft={"r": 0}))
    assert main(["validate", "-o", "json", str(good), str(bad)]) == Exit.INVALID
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False
    assert [(d["source"], d["name"], d["valid"]) for d in report["documents"]] == [
        (str(good), "one", True),
        (str(bad), "two", False),
    ]
    assert report["documents"][1]["errors"][0]["path"] == "spec.peft.r"
    assert main(["validate", "-o", "json", str(good)]) == Exit.OK
    assert json.loads(capsys.readouterr().out)["valid"] is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [unclosed", "not valid YAML"),
        ("", "holds no document"),
        ("kind: Secret\n---\nkind: ConfigMap\n", "holds no FineTuneJob document"),
        ("kind: Secret\nmetadata: {name: x}\n", "kind: "),  # one document: say what is wrong
    ],
)
def test_validate_names_what_is_not_a_finetunejob(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == Exit.INVALID
    assert f"{path}: {message}" in capsys.readouterr().err


def test_validate_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == Exit.INVALID
    assert "nope.yaml: cannot read: No such file or directory" in capsys.readouterr().err


# ---- render -------------------------------------------------------------------------------------


def _render(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["render", *args]) == Exit.OK
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    # A one-node job's checkpoints get a claim of their own (a default StorageClass is assumed).
    kinds = [d["kind"] for d in docs]
    assert kinds == ["ConfigMap", "Service", "Service", "PersistentVolumeClaim", "Job"]
    return docs[-1]["spec"]["template"]["spec"]["containers"][0]


def test_render_runs_what_the_chart_defaults_configure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write(tmp_path / "job.yaml", job_doc())
    container = _render([str(job)], capsys)
    # The chart's default trainer image, registry included (the operator's built-in default is
    # the same image: tests/unit/test_settings_chart.py holds them together).
    assert container["image"] == "ghcr.io/finetune-operator/trainer:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    # No CPU or memory defaults in the chart: only the cache's local storage (template.cacheSize).
    assert container["resources"] == {"requests": {"ephemeral-storage": "20Gi"}}


def test_render_merges_values_files_like_helm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write(tmp_path / "job.yaml", job_doc())
    first = write(
        tmp_path / "a.yaml",
        {
            "trainer": {
                "image": {
                    "registry": "reg.example",
                    "repository": "trainer",
                    "tag": "2.0",
                    "pullPolicy": "Always",
                },
                "defaultResources": {"requests": {"cpu": "2", "memory": "8Gi"}},
            }
        },
    )
    second = write(tmp_path / "b.yaml", {"trainer": {"image": {"tag": "2.1"}}})
    container = _render([str(job), "--values", str(first), "-f", str(second)], capsys)
    assert container["image"] == "reg.example/trainer:2.1"  # the later file wins, key by key
    assert container["imagePullPolicy"] == "Always"
    assert container["resources"]["requests"] == {
        "cpu": "2",
        "ephemeral-storage": "20Gi",
        "memory": "8Gi",
    }


def test_render_refuses_values_the_chart_schema_rejects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write(tmp_path / "job.yaml", job_doc())
    typo = write(tmp_path / "v.yaml", {"trainer": {"imagee": {"tag": "x"}}, "replicas": 2})
    assert main(["render", str(job), "-f", str(typo)]) == Exit.USAGE
    err = capsys.readouterr().err
    assert "trainer.imagee" in err and "replicas" in err


def test_render_without_a_chart_says_where_to_point(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write(tmp_path / "job.yaml", job_doc())
    assert main(["render", str(job), "--chart", str(tmp_path)]) == Exit.USAGE
    assert "--chart" in capsys.readouterr().err


def test_render_refuses_an_invalid_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write(tmp_path / "job.yaml", job_doc(peft={"r": 0}))
    assert main(["render", str(job)]) == Exit.INVALID
    assert "spec.peft.r" in capsys.readouterr().err


def test_merge_values_maps_merge_lists_replace_null_deletes() -> None:
    base = {"a": {"b": 1, "c": 2}, "l": [1, 2], "gone": {"x": 1}, "keep": "k"}
    over = {"a": {"c": 3, "d": 4}, "l": [9], "gone": None, "new": {"n": 1}}
    assert merge_values(base, over) == {
        "a": {"b": 1, "c": 3, "d": 4},
        "l": [9],
        "keep": "k",
        "new": {"n": 1},
    }
    assert base["a"] == {"b": 1, "c": 2}  # the chart's defaults are not modified


# ---- example, demo, the rank entry --------------------------------------------------------------


def test_unknown_example_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["example", "nope"]) == Exit.USAGE
    assert "minilm-sentiment" in capsys.readouterr().err


def test_code_search_example_is_a_valid_sentence_embedding_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["example", "minilm-code-search", "--data-dir", str(tmp_path / "data")]) == 0
    job = parse_manifest(yaml.safe_load(capsys.readouterr().out))
    assert job.spec.model.task == "sentence-embedding"
    assert (job.spec.dataset.anchor_field, job.spec.dataset.positive_field) == ("query", "document")
    assert Path(job.spec.model.source.removeprefix("file://"), "modules.json").is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["test.jsonl", "train.jsonl"]


def test_demo_without_the_hub_double_says_how_to_install_it() -> None:
    # None in sys.modules makes the import fail as if the distribution were not installed.
    code = (
        "import sys; sys.modules['finetune_hub_double'] = None\n"
        "from finetune_cli.main import main; sys.exit(main(['demo']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == Exit.FAILED, done.stderr
    assert "pip install -e hub-double" in done.stderr
    assert "Traceback" not in done.stderr


def test_rank_module_is_the_ranks_entry(tmp_path: Path) -> None:
    """What launch.py starts per rank; a hidden CLI subcommand no more."""
    usage = subprocess.run(
        [sys.executable, "-m", "finetune_trainer.rank"], capture_output=True, text=True
    )
    assert usage.returncode == 2 and "finetune_trainer.rank MANIFEST" in usage.stderr
    bad = write(tmp_path / "bad.yaml", job_doc(peft={"r": 0}))
    done = subprocess.run(
        [sys.executable, "-m", "finetune_trainer.rank", str(bad)], capture_output=True, text=True
    )
    assert done.returncode == ExitCode.INVALID_SPEC and "spec.peft.r" in done.stderr
    from finetune_trainer.launch import rank_command

    assert rank_command(bad)[1:] == ["-m", "finetune_trainer.rank", str(bad)]


def test_the_ranks_read_the_manifest_through_the_configmap_volumes_symlinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the kubelet lays out a ConfigMap volume, and replaces it when the ConfigMap changes:
    job.yaml -> ..data/job.yaml, ..data -> a timestamped folder, deleted after the swap. A rank
    that starts (or rejoins) after a swap reads the new folder's copy."""
    volume = tmp_path / "etc-finetune"
    volume.mkdir()
    first = volume / "..2026_12_06_13_41_00.1"
    first.mkdir()
    (first / "job.yaml").write_text("suspend: true\n")
    (volume / "..data").symlink_to(first.name)
    (volume / "job.yaml").symlink_to("..data/job.yaml")
    monkeypatch.chdir(volume)
    path = for_ranks(Path("job.yaml"))
    assert path.is_absolute()
    # The ConfigMap changed: a new folder, ..data swapped to it, the old folder deleted.
    second = volume / "..2026_12_06_13_42_40.2"
    second.mkdir()
    (second / "job.yaml").write_text("suspend: false\n")
    (volume / "..data_tmp").symlink_to(second.name)
    (volume / "..data_tmp").replace(volume / "..data")
    (first / "job.yaml").unlink()
    first.rmdir()
    assert path.read_text() == "suspend: false\n"
