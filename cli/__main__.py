"""`python -m xmerge.cli` (what `accelerate launch -m xmerge.cli ...` runs)."""

from xmerge.cli.app import main

main()
