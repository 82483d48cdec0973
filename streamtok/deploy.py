"""``streamtok install-systemd``: put the systemd units and the example config into place.

What goes where (under ``--root``, ``/`` by default; a package build passes its staging folder):

    systemd/streamtok.service       -> etc/systemd/system/streamtok.service      0644, replaced
    systemd/streamtok@.service      -> etc/systemd/system/streamtok@.service     0644, replaced
    systemd/streamtok.socket        -> etc/systemd/system/streamtok.socket       0644, replaced
    docs/streamtok.example.toml     -> etc/streamtok/streamtok.toml              0644, kept if present
    systemd/streamtok.env           -> etc/streamtok/streamtok.env               0600, kept if present

The units' ``ExecStart=/usr/local/bin/streamtok ...`` is rewritten to the ``streamtok`` script
of the environment running the installer, so the service runs the same install (venv or not).
The config must stay world-readable: under ``DynamicUser=yes`` the service has no fixed user to
own it. The env file is read by systemd as root, so it keeps secrets at mode 0600.

Only the standard library: the CLI imports this module without loading torch.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from streamtok.errors import StreamtokError

UNIT_DIR = Path("etc/systemd/system")
CONFIG_DIR = Path("etc/streamtok")
UNIT_EXECUTABLE = "/usr/local/bin/streamtok"  # what the unit files in the source tree say
# Paths the hardened units cannot see (ProtectHome=yes, PrivateTmp=yes).
HIDDEN_PREFIXES = ("/home/", "/root/", "/run/user/", "/tmp/", "/var/tmp/")


class DeployError(StreamtokError):
    """The files to install are missing, or the target cannot be written."""


@dataclass(frozen=True)
class InstallFile:
    """One file to put in place: ``source`` (relative to the source tree) to ``target``
    (relative to the root), with its mode; ``replace`` says whether an existing target is
    overwritten (units) or kept (configuration the administrator edits)."""

    source: str
    target: Path
    mode: int
    replace: bool
    is_unit: bool = False


FILES = (
    InstallFile("systemd/streamtok.service", UNIT_DIR / "streamtok.service", 0o644, True, True),
    InstallFile("systemd/streamtok@.service", UNIT_DIR / "streamtok@.service", 0o644, True, True),
    InstallFile("systemd/streamtok.socket", UNIT_DIR / "streamtok.socket", 0o644, True, True),
    InstallFile("docs/streamtok.example.toml", CONFIG_DIR / "streamtok.toml", 0o644, False),
    InstallFile("systemd/streamtok.env", CONFIG_DIR / "streamtok.env", 0o600, False),
)

Action = Literal["create", "replace", "unchanged", "keep"]


@dataclass(frozen=True)
class Step:
    """What the installer does (or, in a dry run, would do) with one file."""

    file: InstallFile
    path: Path  # the target under the root
    action: Action
    content: str


def source_tree() -> Path:
    """The folder holding ``systemd/`` and ``docs/``: the checkout this package runs from."""
    return Path(__file__).resolve().parent.parent


def default_executable() -> str:
    """The ``streamtok`` script of this environment (the venv's, when run from one), else the
    one on ``PATH``, else ``python -m streamtok.cli`` with this interpreter."""
    beside = Path(sys.executable).parent / "streamtok"
    if beside.is_file():
        return str(beside)
    found = shutil.which("streamtok")
    if found:
        return found
    return f"{shlex.quote(sys.executable)} -m streamtok.cli"


def hidden_paths(executable: str) -> list[str]:
    """What the service needs to run ``executable`` but cannot see under its hardening: the
    command itself, the interpreter its ``#!`` line names (a venv's python links to the Python
    it was made from, often under /root or /home) and, when it is this environment, the
    streamtok package."""
    command = shlex.split(executable)[0]
    needed = [command]
    try:
        with open(command, "rb") as f:
            first = f.readline(4096)
        if first.startswith(b"#!"):
            needed.append(str(Path(first[2:].decode().split()[0]).resolve()))
    except (OSError, UnicodeDecodeError, IndexError):
        pass
    if command in (default_executable(), sys.executable):
        needed.append(str(Path(__file__).resolve().parent))
    return [p for p in dict.fromkeys(needed) if (p.rstrip("/") + "/").startswith(HIDDEN_PREFIXES)]


def render_unit(text: str, executable: str) -> str:
    """``text`` with each ``ExecStart=/usr/local/bin/streamtok`` made to run ``executable``.

    >>> render_unit("ExecStart=/usr/local/bin/streamtok serve --port %i\\n", "/opt/st/bin/streamtok")
    'ExecStart=/opt/st/bin/streamtok serve --port %i\\n'
    """
    pattern = re.compile(rf"^(ExecStart=){re.escape(UNIT_EXECUTABLE)}(?=\s|$)", re.MULTILINE)
    command = executable.replace("%", "%%")  # % starts a systemd specifier (%i, %h, ...)
    return pattern.sub(lambda m: m.group(1) + command, text)


def plan(root: Path, executable: str, source: Path | None = None,
         force: bool = False) -> list[Step]:
    """The steps to install every file under ``root``; reads the sources, writes nothing."""
    source = source or source_tree()
    steps = []
    for f in FILES:
        src = source / f.source
        try:
            content = src.read_text()
        except OSError as e:
            raise DeployError(f"cannot read {src}: {e}. install-systemd needs the systemd/ and "
                              "docs/ folders of a source checkout (or --source DIR)") from e
        if f.is_unit:
            content = render_unit(content, executable)
        path = root / f.target
        if not path.exists():
            action: Action = "create"
        elif path.read_text() == content:
            action = "unchanged"
        elif f.replace or force:
            action = "replace"
        else:
            action = "keep"
        steps.append(Step(f, path, action, content))
    return steps


def apply(steps: list[Step]) -> None:
    """Write the files the steps say to, with their modes."""
    for step in steps:
        if step.action not in ("create", "replace"):
            continue
        try:
            step.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = step.path.with_name(step.path.name + ".tmp")
            tmp.write_text(step.content)
            tmp.chmod(step.file.mode)
            tmp.replace(step.path)  # atomic: systemd never reads half a unit
        except OSError as e:
            raise DeployError(f"cannot write {step.path}: {e}") from e


def next_steps(root: Path) -> list[str]:
    """The commands an administrator runs after installing."""
    lines = []
    if root.resolve() != Path("/"):
        lines.append(f"# files staged under {root}; run these on the system they are for")
    lines += [
        "systemctl daemon-reload",
        "systemctl enable --now streamtok.service     # one daemon on the config's host:port",
        "#   or: systemctl enable --now streamtok.socket     # systemd holds the port (socket activation)",
        "#   or: systemctl enable --now streamtok@8765.service streamtok@8766.service   # one per port, behind nginx",
        "systemctl status streamtok.service",
        "journalctl -u streamtok.service -f",
        "curl -fsS http://127.0.0.1:8765/readyz",
    ]
    return lines


def install_systemd(root: str | Path = "/", *, dry_run: bool = False,
                    executable: str | None = None, source: str | Path | None = None,
                    force: bool = False, out: Callable[[str], None] = print) -> list[Step]:
    """Install the units and example config under ``root`` (or only say what would be done,
    with ``dry_run``), then print the ``systemctl`` steps. Returns the steps taken."""
    root = Path(root)
    executable = executable or default_executable()
    steps = plan(root, executable, Path(source) if source else None, force)
    if not dry_run:
        apply(steps)
    verb = {"create": "create", "replace": "replace", "unchanged": "unchanged",
            "keep": "keep (exists; --force replaces)"}
    prefix = "would " if dry_run else ""
    for s in steps:
        done = verb[s.action] if s.action in ("unchanged", "keep") else prefix + verb[s.action]
        out(f"{done:34s} {s.path} ({s.file.mode:o})")
    out(f"ExecStart runs: {executable}")
    for path in hidden_paths(executable):
        out(f"warning: {path} is under a folder the service cannot see (ProtectHome=yes, "
            "PrivateTmp=yes); install Python and streamtok under /opt or /usr/local (e.g. "
            "python3 -m venv /opt/streamtok), or relax the unit")
    out("")
    out("next steps:" if not dry_run else "then:")
    for line in next_steps(root):
        out("  " + line)
    return steps


# -- command line ---------------------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``streamtok install-systemd`` on the CLI's subcommands."""
    p = sub.add_parser("install-systemd",
                       help="install the systemd units and example config, print the systemctl steps")
    p.add_argument("--root", default="/", help="install under this folder (default /; a package "
                   "build passes its staging root)")
    p.add_argument("--dry-run", action="store_true", help="say what would be done; change nothing")
    p.add_argument("--executable", help="command for ExecStart (default: this environment's "
                   "streamtok script)")
    p.add_argument("--source", help="folder holding systemd/ and docs/ (default: this checkout)")
    p.add_argument("--force", action="store_true",
                   help="also replace an existing streamtok.toml and streamtok.env")
    p.set_defaults(func=_cmd_install_systemd)
    return p


def _cmd_install_systemd(args: argparse.Namespace) -> int:
    install_systemd(args.root, dry_run=args.dry_run, executable=args.executable,
                    source=args.source, force=args.force)
    return 0
