"""The ``imagebatch`` command line: the commands that start a batch (``worker.cli.batch``), the
ones about a batch that exists (``worker.cli.lookup``) and the long-running services
(``worker.cli.services``) under one group.

Exit status: 0 every line succeeded; 1 some lines failed or were rejected; 2 usage,
configuration or infrastructure trouble found before spending (one line naming the setting
and the fix; ``--debug`` shows the traceback); 130/143 interrupted (the same command resumes).
"""

from __future__ import annotations

import click

from jobs.registry import REGISTRY
from worker.cli import batch, lookup, services


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=f"Providers (--provider): {', '.join(REGISTRY)}.",
)
def main() -> None:
    """Generate images in bulk through paid image APIs."""


for _command in (*batch.COMMANDS, *lookup.COMMANDS, *services.COMMANDS):
    main.add_command(_command)
