"""``push`` and ``card``: publish a corrected model with its model card."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _push_command(args: argparse.Namespace) -> int:
    from hf_lrp_surgery.hub import push_to_hub

    commit = push_to_hub(
        args.directory,
        args.repo_id,
        private=args.private or None,
        commit_message=args.commit_message,
        revision=args.revision,
        create_pr=args.create_pr,
        token=args.token,
        endpoint=args.endpoint,
        base_model=args.base_model,
        license=args.license,
        card=not args.no_card,
    )
    print(
        f"pushed {args.directory} to {commit.repo_url}: commit {commit.oid}"
        + (f", pull request {commit.pr_url}" if commit.pr_url else "")
    )
    return 0


def _card_command(args: argparse.Namespace) -> int:
    from hf_lrp_surgery.modelcard import card_from_recipe, write_card

    directory = Path(args.directory)
    if (directory / "report.json").is_file():
        repo_ids = {k: v for k, v in (("baked", args.baked_repo_id), ("adapter", args.adapter_repo_id)) if v}
        written = card_from_recipe(directory, base_model=args.base_model, repo_ids=repo_ids, license=args.license)
        paths = list(written.values())
    else:
        paths = [write_card(directory, repo_id=args.repo_id, base_model=args.base_model, license=args.license)]
    for path in paths:
        print(f"wrote {path}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``push`` and ``card`` subcommands to the ``hf-lrp-surgery`` parser.

    Args:
        subparsers: The object returned by ``parser.add_subparsers()``; each subcommand sets
            ``handler`` (a function of the parsed arguments returning the exit status).
    """
    push = subparsers.add_parser(
        "push",
        help="push a corrected model with its mask manifest and model card to the Hub",
        description="Push a saved corrected model directory (adapter or baked, with surgery/) to a Hub repo: create "
        "the repo if needed, write the model card, upload. The endpoint and token come from HF_ENDPOINT "
        "and HF_TOKEN (or --endpoint / --token). A failed push keeps the local copy and prints the "
        "command that retries it.",
    )
    push.add_argument("directory", help="a directory written by a recipe, `correct` or `apply` (adapter/ or baked/)")
    push.add_argument("repo_id", help="namespace/name of the Hub repo")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--commit-message", help="commit summary")
    push.add_argument("--revision", help="branch to push to (main)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument(
        "--base-model", help="Hub id of the base model (card; written into an adapter saved with a local base path)"
    )
    push.add_argument("--license", help="license on the card (usually the base model's)")
    push.add_argument("--no-card", action="store_true", help="upload the directory's README.md as it is")
    push.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    push.add_argument("--token", help="write token (default: HF_TOKEN or the saved login)")
    push.set_defaults(handler=_push_command)

    card = subparsers.add_parser(
        "card",
        help="write model cards (README.md) for a recipe's output or a saved corrected model",
        description="Given a recipe output directory (report.json, baked/, adapter/), write a card into each model "
        "with the held-out results, the plots, the per-layer mask table and how to load and reproduce "
        "it; given a single saved corrected model, write its card.",
    )
    card.add_argument("directory", help="a recipe output directory or a saved corrected model")
    card.add_argument("--base-model", help="Hub id of the base model")
    card.add_argument("--repo-id", help="for a single model: the repo it will be pushed to")
    card.add_argument("--baked-repo-id", help="for a recipe: the repo of baked/")
    card.add_argument("--adapter-repo-id", help="for a recipe: the repo of adapter/")
    card.add_argument("--license", help="license (usually the base model's)")
    card.set_defaults(handler=_card_command)
