"""``python -m freezetune``."""

from freezetune.cli import main

main()
