"""``hf-lrp-surgery fix``: correct any behaviour you can score, from your prompts and your scorer."""

from __future__ import annotations

import argparse
from typing import Any

from hf_lrp_surgery.cli.recipes import recipe_parser

__all__ = ["register"]

_FORMS = r"""
prompts (--prompts):
  a .txt (one prompt per line), .json or .jsonl file, split here into train and held-out with a fixed
  seed; a .json object with "train" and "heldout" lists (your own splits); or a shipped set's name
  (contact_prompts).

scorer (--scorer), texts -> scores in [0, 1]:
  a Python function, module:function      --scorer mypkg.judge:score
  a regular expression (1 where it matches) --scorer regex:'\b[\w.]+@\w+\.\w+\b'
  a word list, one word per line (1 if any) --scorer words:words.txt
  a local text-classification model + label --scorer ./my-classifier --label toxic

The scorer is tried on two short texts, and the prompts are split, before the model is loaded.
A continuation is undesired when its score is >= --threshold (--direction lower: <=).

example:
  hf-lrp-surgery fix --prompts contact_prompts --name contact-details \
      --scorer regex:'[\w.+-]+@[\w-]+(\.[\w-]+)+' --output runs/fix-contacts
"""


def register(subparsers: Any) -> None:
    """Add the ``fix`` command (the recipe of :func:`~hf_lrp_surgery.correction.user_behaviour`).

    Args:
        subparsers: What ``ArgumentParser.add_subparsers()`` returned.
    """
    from hf_lrp_surgery.correction import BEHAVIOURS

    parser = recipe_parser(
        subparsers, BEHAVIOURS["user"], epilog=_FORMS, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for action in parser._actions:  # the behaviour's two parts have no default: the command needs both
        if action.dest in ("prompts", "scorer"):
            action.required = True
