"""Check, without running them, that bench scripts accept the arguments of a list of commands.

    DRY=1 STAGES="check attention mfu-b" bash bench/gpu_run.sh     # lists the stages' commands, then runs this
    python bench/check_commands.py commands.txt                     # one `python3` argument list per line
    python bench/check_commands.py --wheels .whl commands.txt       # packages carried as wheels count as there

Each line `bench/X.py ARGS` or `-m bench.X ARGS` runs its script in this process until its argparse
parser has read ARGS, then stops: a wrong flag or value fails here in seconds instead of on a
device. `-m pytest ARGS` collects (without running) what ARGS select, in a subprocess, and is
refused if that is nothing (a -k expression that matches no test); pytest-xdist's `-n N` is left
out there (the device image has xdist, this machine need not). Both run with the packages the
device image lacks hidden (NOT_ON_THE_DEVICE), less those with a wheel in --wheels (the call
carries them: bench/device_wheels.sh): a script or test that imports a hidden one is refused.
`train.py ARGS` is parsed by train.py's own tyro parser, stopped the same way. `-c ...` and
scripts that parse no arguments are listed as not checked. Exit status 1 if any command is refused.
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
    try:  # train.py's parser (fastmf.config) looks tyro.cli up when it parses
        import tyro
    except ImportError:
        return
    cli = tyro.cli

    def parse_cli(*a, **kw):
        raise Parsed(cli(*a, **kw))
    tyro.cli = parse_cli


# Packages of this project that the device image lacks (/work/.library/device/KINDS.md, the image's
# package list as read on 2026-11-17): a script or test a stage runs there must not import them.
NOT_ON_THE_DEVICE = ("tyro", "wandb", "nibabel", "diffusers")


def carried_packages(wheels: str | None) -> list[str]:
    """The packages of NOT_ON_THE_DEVICE with a wheel in the folder `wheels` (NAME-VERSION-...whl)."""
    names = {w.name.split("-")[0].lower() for w in Path(wheels).glob("*.whl")} if wheels else set()
    return [n for n in NOT_ON_THE_DEVICE if n in names]


class _NotOnTheDevice(importlib.abc.MetaPathFinder):
    def __init__(self, hidden: set[str]):
        self.hidden = hidden

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.hidden:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the device image)", name=name)
        return None


def hide_what_the_device_lacks(carried: list[str] = ()):
    hidden = set(NOT_ON_THE_DEVICE) - set(carried)
    for name in [m for m in sys.modules if m.split(".")[0] in hidden]:
        del sys.modules[name]
    sys.meta_path.insert(0, _NotOnTheDevice(hidden))


def check_pytest(args: list[str], carried: list[str]) -> str:
    """'ok (N tests)' or 'refused ...' for pytest ARGS, by collecting what they select."""
    kept, rest = [], iter(args)
    for a in rest:
        if a == "-n":
            next(rest, None)  # and its worker count
        elif a not in ("-v", "-x", "-q", "-rA"):
            kept.append(a)
    boot = ("import sys; sys.path.insert(0, 'bench'); import check_commands, pytest; "
            f"check_commands.hide_what_the_device_lacks({carried!r}); sys.exit(pytest.main(sys.argv[1:]))")
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


def check(argv: list[str], carried: list[str]) -> str:
    """'ok', 'not checked: ...' or 'refused ...' for one `python3` argument list."""
    if argv[:2] == ["-m", "pytest"]:
        return check_pytest(argv[2:], carried)
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
    except SystemExit as e:  # argparse's and tyro's way of refusing arguments
        return f"refused (exit {e.code})"
    except Exception as e:  # the script got past no parser: it needs the device to go further
        missing = _hidden_import(e)
        if missing:
            return f"refused (imports {missing}, which the device image lacks)"
        return f"not checked: {type(e).__name__} before any parser ({str(e).splitlines()[0][:80]})"
    return "not checked: the script parses no arguments"


def main():
    p = argparse.ArgumentParser(description="Check that bench scripts accept the arguments of a list of commands.")
    p.add_argument("commands", help="a file of python3 argument lists, one per line")
    p.add_argument("--wheels", help="a folder of wheels the device call carries (bench/device_wheels.sh)")
    args = p.parse_args()
    if not Path(args.commands).is_file():
        sys.exit(f"error: no file {args.commands}")
    sys.path.insert(0, str(ROOT))  # as `python3 -m bench.X` run from the repo root has it
    _stop_after_parsing()
    with_wheels = carried_packages(args.wheels)
    hide_what_the_device_lacks(with_wheels)
    if with_wheels:
        print(f"carried as wheels, so taken as on the device: {', '.join(with_wheels)}")
    lines = [shlex.split(s) for s in Path(args.commands).read_text().splitlines() if s.strip()]
    refused = 0
    for argv in lines:
        verdict = check(argv, with_wheels)
        refused += verdict.startswith("refused")
        print(f"{verdict}: {shlex.join(argv)}")
    print(f"{len(lines)} commands: {refused} refused")
    sys.exit(1 if refused else 0)


if __name__ == "__main__":
    main()
