"""Check, without running them, that bench scripts accept the arguments of a list of commands.

    DRY=1 STAGES="check attention mfu-b" bash bench/gpu_run.sh     # lists the stages' commands, then runs this
    python bench/check_commands.py commands.txt                     # one `python3` argument list per line

Each line `bench/X.py ARGS` or `-m bench.X ARGS` runs its script in this process until its argparse
or tyro parser has read ARGS, then stops: a wrong flag or value fails here in seconds instead of
on a device. `-c ...`, `-m pytest ...` and scripts that parse no arguments are listed as not checked.
Exit status 1 if any command's arguments are refused.
"""
import argparse
import runpy
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Parsed(BaseException):
    """Raised by the patched parsers: the arguments were accepted (not an Exception: scripts' handlers miss it)."""


def _stop_after_parsing():
    parse_args = argparse.ArgumentParser.parse_args

    def parse(self, *a, **kw):
        raise Parsed(parse_args(self, *a, **kw))
    argparse.ArgumentParser.parse_args = parse
    import tyro
    cli = tyro.cli
    tyro.cli = lambda *a, **kw: (_ for _ in ()).throw(Parsed(cli(*a, **kw)))


def check(argv: list[str]) -> str:
    """'ok', 'not checked: ...' or 'refused: ...' for one `python3` argument list."""
    if argv[:1] == ["-c"] or argv[:2] == ["-m", "pytest"]:
        return "not checked: not a bench script"
    module = argv[0] == "-m"
    target, args = (argv[1], argv[2:]) if module else (argv[0], argv[1:])
    sys.argv = [target, *args]
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(ROOT / target), run_name="__main__")
    except Parsed:
        return "ok"
    except SystemExit as e:  # argparse's and tyro's way of refusing arguments
        return f"refused (exit {e.code})"
    except Exception as e:  # the script got past no parser: it needs the device to go further
        return f"not checked: {type(e).__name__} before any parser ({str(e).splitlines()[0][:80]})"
    return "not checked: the script parses no arguments"


def main():
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        sys.exit("usage: python bench/check_commands.py COMMANDS_FILE (one python3 argument list per line)")
    _stop_after_parsing()
    lines = [shlex.split(s) for s in Path(sys.argv[1]).read_text().splitlines() if s.strip()]
    refused = 0
    for argv in lines:
        verdict = check(argv)
        refused += verdict.startswith("refused")
        print(f"ok: {shlex.join(argv)}" if verdict == "ok" else f"{verdict}: {shlex.join(argv)}")
    print(f"{len(lines)} commands: {refused} refused")
    sys.exit(1 if refused else 0)


if __name__ == "__main__":
    main()
