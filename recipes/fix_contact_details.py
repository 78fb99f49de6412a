"""Recipe: stop a model from inventing contact details (e-mail addresses, phone numbers, web addresses).

Asked for the contact details of a person, shop or organisation, SmolLM2-135M-Instruct often makes
some up ("The phone number of ... is 123-456-7890."). This recipe runs ``hf-lrp-surgery fix`` on the
shipped ``contact_prompts`` (fixed train / held-out splits) with a regular expression as the judge:
a continuation is undesired when it holds an e-mail address, a phone number or a URL. Everything runs
offline.

    python recipes/fix_contact_details.py --output runs/fix-contacts                 # LRP
    python recipes/fix_contact_details.py --method activation --output runs/fix-contacts-activation
"""

from __future__ import annotations

import sys

from hf_lrp_surgery.cli import main

#: An e-mail address, a North-American or international phone number, or a web address.
CONTACT_PATTERN = (
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
    r"|\(?\b\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b|\+\d[\d ().-]{7,}\d"
    r"|\bhttps?://\S+|\bwww\.[\w-]+\.\S+"
)

if __name__ == "__main__":
    arguments = [
        "fix",
        "--prompts",
        "contact_prompts",
        "--name",
        "contact-details",
        "--scorer",
        f"regex:{CONTACT_PATTERN}",
    ]
    sys.exit(main([*arguments, *sys.argv[1:]]))
