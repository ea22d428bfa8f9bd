"""The ``hearth`` command line: one entry point for operators and developers.

Subcommands live with the code they drive and are registered here: ``holder`` (a sample session
holder), ``fanout`` (watch revocation fan-out), ``admin`` (operator commands), ``run`` (the local
stack, same as ``make run``).
"""

from __future__ import annotations

import importlib

import click


@click.group()
@click.option("--env-file", default=None, metavar="PATH",
              help="settings of the stack to talk to; default: HEARTH_ENV_FILE, else .run/hearth.env. "
                   "Values already in the environment win.")
def main(env_file: str | None) -> None:
    """Hearth: accounts, device linking and revocation fan-out for self-hosted media.

    Every subcommand that talks to a running stack reads its settings from the environment, then
    from the stack's env file (written by the launcher: .run/hearth.env) for whatever is missing.
    """
    from shared import stackenv

    try:
        stackenv.load(env_file)
    except stackenv.EnvFileError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--run-dir", default=".run", show_default=True)
def run(run_dir: str) -> None:
    """Run infrastructure and every service in the foreground (Ctrl-C stops everything)."""
    from deploy import launcher

    raise SystemExit(launcher.main(["run", "--run-dir", run_dir]))


# Each subcommand lives with the code it drives; its module exposes a click command named ``command``.
for _module in ("services.holder.cli", "services.fanout.cli", "services.auth.admin"):
    main.add_command(importlib.import_module(_module).command)


if __name__ == "__main__":
    main()
