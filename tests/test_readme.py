"""The README's table of loss terms is the registry's (a term added to mokd_scale/method/terms.py without
its README row fails here), and its two commands are the Makefile's."""
from pathlib import Path

from mokd_scale.method.terms import TERMS, terms_table

REPO = Path(__file__).resolve().parent.parent


def test_readme_lists_the_registrys_terms():
    readme = (REPO / "README.md").read_text()
    assert terms_table() in readme, "README.md's loss-term table differs from mokd_scale.method.terms.terms_table()"
    assert all(f"| `{name}` |" in terms_table() for name in TERMS)
