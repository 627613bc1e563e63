"""Check, without running them, that bench scripts accept the arguments of a list of commands.

    DRY=1 STAGES="check attention mfu-b" bash bench/gpu_run.sh     # lists the stages' commands, then runs this
    python bench/check_commands.py commands.txt                     # one `python3` argument list per line

Each line `bench/X.py ARGS` or `-m bench.X ARGS` runs its script in this process until its argparse
parser has read ARGS, then stops: a wrong flag or value fails here in seconds instead of on a
device. `-m pytest ARGS` collects (without running) what ARGS select, in a subprocess, and is
refused if that is nothing (a -k expression that matches no test); pytest-xdist's `-n N` is left
out there (the device image has xdist, this machine need not). Both run with the packages the
device image lacks hidden (NOT_ON_THE_DEVICE): a script or test that imports one is refused.
`-c ...` and scripts that parse no arguments are listed as not checked. Exit status 1 if any
command is refused.
"""
import argparse
import importlib.abc
import re
import runpy
import shlex
import subprocess
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


# Packages of this project that the device image lacks (/work/.library/device/KINDS.md, the image's
# package list as read on 2026-11-17): a script or test a stage runs there must not import them.
NOT_ON_THE_DEVICE = ("tyro", "wandb", "nibabel", "diffusers")


class _NotOnTheDevice(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in NOT_ON_THE_DEVICE:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the device image)", name=name)
        return None


def hide_what_the_device_lacks():
    for name in [m for m in sys.modules if m.split(".")[0] in NOT_ON_THE_DEVICE]:
        del sys.modules[name]
    sys.meta_path.insert(0, _NotOnTheDevice())


def check_pytest(args: list[str]) -> str:
    """'ok (N tests)' or 'refused ...' for pytest ARGS, by collecting what they select."""
    kept, rest = [], iter(args)
    for a in rest:
        if a == "-n":
            next(rest, None)  # and its worker count
        elif a not in ("-v", "-x", "-q", "-rA"):
            kept.append(a)
    boot = ("import sys; sys.path.insert(0, 'bench'); import check_commands, pytest; "
            "check_commands.hide_what_the_device_lacks(); sys.exit(pytest.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", boot, "--collect-only", "-q", *kept], cwd=ROOT,
                       capture_output=True, text=True)
    counts = re.findall(r"(\d+)(?:/\d+)? tests? collected|^[^:\s]+\.py: (\d+)$", r.stdout, re.M)
    n = sum(int(a or b) for a, b in counts)
    if r.returncode not in (0, 5) or n == 0:
        last = (r.stdout.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        return f"refused (selects no test: {last[:100]})"
    return f"ok ({n} tests)"


def _hidden_import(e: BaseException | None) -> str | None:
    """The hidden package an exception or its cause failed to import (runpy wraps it in ImportError)."""
    while e is not None:
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in NOT_ON_THE_DEVICE:
            return e.name
        e = e.__cause__ or e.__context__
    return None


def check(argv: list[str]) -> str:
    """'ok', 'not checked: ...' or 'refused ...' for one `python3` argument list."""
    if argv[:2] == ["-m", "pytest"]:
        return check_pytest(argv[2:])
    if argv[:1] == ["-c"]:
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
    except SystemExit as e:  # argparse's way of refusing arguments
        return f"refused (exit {e.code})"
    except Exception as e:  # the script got past no parser: it needs the device to go further
        missing = _hidden_import(e)
        if missing:
            return f"refused (imports {missing}, which the device image lacks)"
        return f"not checked: {type(e).__name__} before any parser ({str(e).splitlines()[0][:80]})"
    return "not checked: the script parses no arguments"


def main():
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        sys.exit("usage: python bench/check_commands.py COMMANDS_FILE (one python3 argument list per line)")
    sys.path.insert(0, str(ROOT))  # as `python3 -m bench.X` run from the repo root has it
    _stop_after_parsing()
    hide_what_the_device_lacks()
    lines = [shlex.split(s) for s in Path(sys.argv[1]).read_text().splitlines() if s.strip()]
    refused = 0
    for argv in lines:
        verdict = check(argv)
        refused += verdict.startswith("refused")
        print(f"{verdict}: {shlex.join(argv)}")
    print(f"{len(lines)} commands: {refused} refused")
    sys.exit(1 if refused else 0)


if __name__ == "__main__":
    main()
