"""``python -m hf_lrp_surgery.cli``: the same as the ``hf-lrp-surgery`` command."""

import sys

from hf_lrp_surgery.cli import main

if __name__ == "__main__":
    sys.exit(main())
