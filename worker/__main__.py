"""``python -m worker`` is ``imagebatch``."""

from worker.cli import main

main()
