"""Repo settings and card metadata on the Hub-API test double, through the real huggingface_hub.

What the push relies on: `update_repo_settings` changes the visibility (and needs a write
token), and `model_info` serves the README's front matter as `cardData`, with the license as a
`license:` tag, as the Hub does. The client runs in this process with the endpoint passed to
`HfApi` explicitly, as in test_hub_double_branches.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_hub_double import HubDouble

TOKEN = "hf_settings_good_token_0123456789"
REPO = "org/settings"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubDouble]:
    with HubDouble(tmp_path / "hub-root", tokens=[TOKEN]) as double:
        yield double


@pytest.fixture
def online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def client(hub: HubDouble, token: str | None = TOKEN) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.endpoint, token=token if token is not None else False)


def test_visibility_is_a_setting(hub: HubDouble, online: None) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    api = client(hub)
    api.create_repo(REPO, private=False)
    assert api.repo_info(REPO).private is False
    api.update_repo_settings(REPO, private=True)
    assert api.repo_info(REPO).private is True
    assert hub.store.get("model", REPO)["private"] is True  # kept, not only answered
    api.update_repo_settings(REPO, visibility="public")
    assert api.repo_info(REPO).private is False
    api.update_repo_settings(REPO, gated="auto")  # accepted; gating is not modelled
    with pytest.raises(HfHubHTTPError) as anonymous:
        client(hub, token=None).update_repo_settings(REPO, private=True)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as missing:
        api.update_repo_settings("org/nothing-here", private=True)
    assert missing.value.response.status_code == 404


def test_model_info_serves_the_card_metadata(hub: HubDouble, online: None) -> None:
    api = client(hub)
    api.create_repo(REPO)
    assert api.model_info(REPO).card_data is None  # no README yet
    card = (
        "---\nlicense: other\nlicense_name: 'tiny-license'\n"
        "license_link: https://example.com/license # a comment\n"
        "tags:\n- a\n---\n\n# Title\nlicense: not metadata\n"
    )
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=REPO)
    info = api.model_info(REPO)
    assert info.card_data is not None
    assert info.card_data.license == "other"
    assert info.card_data.license_name == "tiny-license"
    assert info.card_data.license_link == "https://example.com/license"
    assert "tags" not in info.card_data.to_dict()  # a list: the double reads scalars only
    assert info.tags == ["license:other"]
