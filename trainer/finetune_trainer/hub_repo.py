"""The output repo as the spec asks for it: created if missing, and private when it must be.

`create_repo(private=...)` only applies to a new repo: on one that exists the Hub keeps its
visibility, so a job with `output.hub.private: true` would push its weights into a public repo
without a word. `ensure_repo` makes such a repo private (huggingface_hub's
`update_repo_settings`, which needs a token that may change the repo's settings), says so in the
log, and refuses to go on when it cannot: nothing is uploaded to a repo that is more public than
the spec allows. It never makes a repo public: with `private: false` an existing private repo
stays private. The final push (publish.py) and the checkpoint mirror both go through here.
`ensure_branch` creates the branch the final push commits to (output.hub.branch): the Hub takes
commits to existing branches only.

huggingface_hub is imported inside functions, as in publish.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from finetune_api.result import scrub
from finetune_trainer.hub_retry import failure_class

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["VisibilityError", "ensure_branch", "ensure_repo"]

log = logging.getLogger(__name__)


class VisibilityError(RuntimeError):
    """output.hub.private is true, the repo is public, and the token may not make it private.
    Permanent: the same token and spec would be refused again."""


def ensure_repo(api: HfApi, repo: str, private: bool, where: str) -> str | None:
    """Create `repo` (a model repo) if missing, as private as `private` says; with `private`,
    make an existing public repo private. Returns a note when it changed the visibility, None
    otherwise. `where` names the repo in messages (endpoint and id).

    Raises VisibilityError when the repo is public and the Hub refuses to make it private;
    other Hub errors propagate, for the caller's retry policy.
    """
    from huggingface_hub.errors import HfHubHTTPError

    api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    if not private or api.repo_info(repo, repo_type="model").private:
        return None
    try:
        api.update_repo_settings(repo, private=True, repo_type="model")
    except HfHubHTTPError as exc:
        if failure_class(exc) != "permanent":
            raise
        status = exc.response.status_code if exc.response is not None else "refused"
        raise VisibilityError(
            f"output.hub.private is true, but {where} is public and the Hub refused to make it "
            f"private ({status}: {scrub(str(exc)).splitlines()[0][:200]}); nothing was "
            "uploaded to it. Make the repo private (or use a token that may change its "
            "settings), or set output.hub.private: false to push to it as it is."
        ) from exc
    note = f"{where} was public; made it private, as output.hub.private asks"
    log.warning("%s", note)
    return note


def ensure_branch(api: HfApi, repo: str, branch: str) -> None:
    """Create `branch` of the model repo `repo` from main's head if it does not exist yet; an
    existing branch is left as it is (commits go on top of it). Hub errors propagate, for the
    caller's retry policy."""
    api.create_branch(repo, branch=branch, exist_ok=True, repo_type="model")
