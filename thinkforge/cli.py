"""The `thinkforge` command line.

Commands live beside their stage in `thinkforge/commands/<stage>.py`, each module exporting
`COMMANDS = {"name": function}`; heavy imports happen inside the functions so `--help` stays fast.
User mistakes raise `ThinkforgeError` and become one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import typer

from thinkforge.errors import ThinkforgeError

# Our own progress bars (rich) replace the per-file download/load bars of the HF libraries.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

app = typer.Typer(
    name="thinkforge",
    help="Build small reasoning LMs the MiMo / Sky-T1 way: distill, pretrain (+MTP), SFT, RL, eval, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _options(
    sandbox: str = typer.Option(
        "", "--sandbox", metavar="auto|unsafe",
        help="Code sandbox: auto (isolate, or refuse when no isolation can be set up; the default) or unsafe "
             "(run untrusted code WITHOUT isolation: an explicit opt-in). Same as THINKFORGE_SANDBOX."),
    numerics: str = typer.Option(
        "", "--numerics", metavar="native|portable",
        help="CPU kernels: native (this CPU's fastest) or portable (the same bits on any x86 CPU with AVX2). "
             "`speedrun` defaults to portable, every other command to native."),
) -> None:
    if sandbox:
        from thinkforge.verify.sandbox import MODES

        if sandbox not in MODES:
            raise ThinkforgeError(f"--sandbox must be one of {', '.join(MODES)}, got {sandbox!r}")
        os.environ["THINKFORGE_SANDBOX"] = sandbox  # also reaches reward workers and other child processes
    if numerics:
        from thinkforge.numerics import pin

        note = pin(numerics)  # torch is not imported yet: commands import it inside their functions
        if note:
            print(f"note: {note}", file=sys.stderr)


def _register() -> None:
    import thinkforge.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"thinkforge.commands.{info.name}")
        for name, fn in getattr(module, "COMMANDS", {}).items():
            app.command(name)(fn)


_register()


def main() -> None:
    try:
        app()
    except ThinkforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
