"""``python -m promptbatch``."""

from promptbatch.cli import main

main()
