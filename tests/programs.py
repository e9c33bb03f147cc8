"""The one list of external programs (scripts/programs.txt), and how runs are checked against it.

Every program a test or a script runs must be in ``scripts/programs.txt`` with the Debian
package that provides it, and that package must be one the scripts install (scripts/_common.sh:
``BASE_APT_PKGS`` and the arrays each script passes to ``ensure_deps``) or ``Essential: yes``.
A program installed by hand on one machine then fails here instead of on the next machine.

- ``read_list``, ``apt_arrays``, ``script_installs``, ``package_status``: the list and the
  install sets, read by sourcing scripts/_common.sh (never by pattern-matching bash);
- ``shell_commands`` / ``shell_programs``: the command words of a bash script or an
  ``sh -c`` string; ``argv_programs``: what an argv runs (``sh -c``, ``unshare``, ``env``, ...);
- ``ProgramAudit``: a pytest plugin (registered by tests/conftest.py) that records every
  program the test session executes (a ``sys.addaudithook`` hook) and makes the session fail
  when one is not in the list or comes from a package scripts/test does not install.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
LIST = SCRIPTS / "programs.txt"
COMMON = SCRIPTS / "_common.sh"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_DIRS = frozenset(SYSTEM_PATH.split(":"))

# ---------------------------------------------------------------------------------------------
# The list and the install lists


@dataclasses.dataclass(frozen=True)
class Program:
    name: str
    package: str
    line: int


def read_list(path: Path = LIST) -> dict[str, Program]:
    """``PROGRAM PACKAGE [# comment]`` lines. Raises ValueError on a malformed or repeated line."""
    out: dict[str, Program] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2 or "/" in fields[0]:
            raise ValueError(f"{path}:{n}: want 'PROGRAM PACKAGE [# comment]', got {raw!r}")
        if fields[0] in out:
            raise ValueError(f"{path}:{n}: {fields[0]} is listed twice")
        out[fields[0]] = Program(fields[0], fields[1], n)
    return out


def apt_arrays(common: Path = COMMON) -> dict[str, list[str]]:
    """Every ``*_APT_PKGS`` array scripts/_common.sh defines, read by sourcing it."""
    script = (
        'source "$1" >/dev/null\n'
        "for name in $(compgen -A arrayvar); do\n"
        '    [[ $name == *_APT_PKGS ]] || continue\n'
        '    declare -n arr=$name\n'
        '    printf "%s" "$name"; printf " %s" "${arr[@]}"; printf "\\n"\n'
        "    unset -n arr\n"
        "done\n"
    )
    r = subprocess.run(["bash", "-c", script, "bash", str(common)], capture_output=True,
                       text=True, timeout=30, check=False, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"sourcing {common} failed: {r.stderr.strip()}")
    return {name: pkgs for name, *pkgs in (line.split() for line in r.stdout.splitlines())}


def ensure_deps_args(script: Path) -> list[str]:
    """The words every ``ensure_deps`` call in a bash script passes, as written."""
    return [w for cmd in shell_commands(script.read_text()) if cmd.words[:1] == ["ensure_deps"]
            for w in cmd.raw[1:]]


def script_installs(script: Path, arrays: dict[str, list[str]] | None = None) -> set[str]:
    """What running ``script`` installs: BASE_APT_PKGS and what it passes to ``ensure_deps``.

    An argument is a package name or ``"${NAME[@]}"`` of an array scripts/_common.sh defines;
    anything else raises ValueError (the check could not know what it installs).
    """
    arrays = apt_arrays() if arrays is None else arrays
    pkgs = set(arrays.get("BASE_APT_PKGS", ()))
    for raw in ensure_deps_args(script):
        m = re.fullmatch(r'"?\$\{(\w+)\[@\]\}"?', raw)
        if m and m.group(1) in arrays:
            pkgs.update(arrays[m.group(1)])
        elif re.fullmatch(r"[a-z0-9][a-z0-9+.-]*", raw):
            pkgs.add(raw)
        else:
            raise ValueError(f"{script}: ensure_deps {raw}: not a package or a *_APT_PKGS array")
    return pkgs


def all_installs(arrays: dict[str, list[str]] | None = None) -> dict[str, set[str]]:
    """Per script in scripts/ that calls ensure_deps: the packages it installs."""
    arrays = apt_arrays() if arrays is None else arrays
    return {p.name: script_installs(p, arrays) for p in sorted(SCRIPTS.iterdir())
            if p.is_file() and is_shell_script(p) and ensure_deps_args(p)}


def is_shell_script(path: Path) -> bool:
    if path.suffix == ".sh":
        return True
    with open(path, "rb") as f:
        first = f.readline()
    return first.startswith(b"#!") and re.search(rb"\b(ba)?sh\b", first) is not None


@dataclasses.dataclass(frozen=True)
class PackageStatus:
    installed: bool
    essential: bool


def package_status(packages: Iterable[str]) -> dict[str, PackageStatus]:
    """dpkg's view of each package (a package dpkg does not know is neither)."""
    pkgs = sorted(set(packages))
    out = {p: PackageStatus(False, False) for p in pkgs}
    if not pkgs:
        return out
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}\t${Essential}\t${db:Status-Abbrev}\n", *pkgs],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )
    for line in r.stdout.splitlines():
        name, essential, status = (line.split("\t") + ["", ""])[:3]
        if name in out:
            out[name] = PackageStatus(status.startswith("ii"), essential == "yes")
    return out


# ---------------------------------------------------------------------------------------------
# Program names


def program_name(word: str) -> str | None:
    """The program an argv[0] names: a bare name, or the base name of a path in a system bin
    directory (``/bin/busybox``). None for any other path: a file of the project or one a test
    wrote (the venv's python, a wrapper script in a temp dir)."""
    if "$" in word:  # known only at run time
        return None
    if "/" not in word:
        return word or None
    head, base = os.path.split(os.path.normpath(word))
    return base if head in SYSTEM_DIRS else None


SHELLS = frozenset({"sh", "bash", "dash"})
# Programs that run the rest of their argv as a command on the same root, and their options
# that take a separate value. ("chroot", "nsenter" and "podman run" run their command from
# another root: not a host program.)
PASS_THROUGH: dict[str, frozenset[str]] = {
    "unshare": frozenset({"-S", "--setuid", "-G", "--setgid", "-R", "--root", "-w", "--wd",
                          "--propagation", "--map-user", "--map-group", "--map-users",
                          "--map-groups"}),
    "env": frozenset({"-u", "--unset", "-C", "--chdir", "-S", "--split-string"}),
    "setsid": frozenset(),
    "nohup": frozenset(),
    "nice": frozenset({"-n", "--adjustment"}),
    "timeout": frozenset({"-s", "--signal", "-k", "--kill-after"}),
    "xargs": frozenset({"-a", "--arg-file", "-d", "--delimiter", "-E", "-I", "-L", "-n",
                        "--max-args", "-P", "--max-procs", "-s", "--max-chars"}),
}


def _wrapped_at(base: str, argv: Sequence[str | None]) -> int | None:
    """Where the command a PASS_THROUGH program runs starts in argv (None: unknown, or not
    a host program)."""
    takes_value = PASS_THROUGH[base]
    j = 1
    while j < len(argv):
        a = argv[j]
        if a is None:
            return None
        if a == "--":
            j += 1
            break
        if base == "unshare" and (a in ("-R", "--root") or a.startswith("--root=")):
            return None
        if base == "env" and "=" in a and not a.startswith("-"):
            j += 1
        elif a.startswith("-") and a != "-":
            j += 2 if a in takes_value else 1
        else:
            break
    if base == "timeout":
        j += 1  # the duration
    return j if j < len(argv) else None


def argv_programs(argv: Sequence[str | None]) -> list[str]:
    """The programs an argv runs, as written (argv[0] first): the words of an ``sh -c``
    script, and the command of ``unshare``/``env``/... too. None stands for a word only known
    at run time."""
    if not argv or argv[0] is None:
        return []
    out = [argv[0]]
    base = os.path.basename(argv[0])
    if base in SHELLS:
        for k in range(1, len(argv)):
            a = argv[k]
            if a is None or not a.startswith(("-", "+")) or a.startswith("--"):
                break
            if "c" in a[1:]:
                script = argv[k + 1] if k + 1 < len(argv) else None
                if script is not None:
                    out += [p for p, _ in shell_programs(script)]
                break
    elif base in PASS_THROUGH:
        j = _wrapped_at(base, argv)
        if j is not None:
            out += argv_programs(argv[j:])
    return out


# ---------------------------------------------------------------------------------------------
# A small bash reader: enough to find the command words of scripts/* and of sh -c strings.
# It knows quotes, $(...) and `...` (read as scripts of their own), heredocs (skipped),
# redirections, [[ ]], (( )), case patterns, for-lists, functions and assignments.


@dataclasses.dataclass
class _Tok:
    kind: str  # "word" or "op"
    text: str
    line: int
    subs: list[list[_Tok]] = dataclasses.field(default_factory=list)


_OPS = (";;&", "&>>", "<<<", "<<-", ";;", ";&", "&&", "||", "|&", "&>", "<<", "<>", ">>", ">|",
        ">&", "<&", ";", "&", "|", "(", ")", "<", ">")
_REDIRS = frozenset({"&>>", "<<<", "<<-", "&>", "<<", "<>", ">>", ">|", ">&", "<&", "<", ">"})
_WORD_END = frozenset(" \t\n;&|()<>")
_ASSIGN = re.compile(r"[A-Za-z_]\w*(\[[^]]*\])?\+?=")
_ARITH_BEFORE = frozenset({"if", "while", "until", "then", "do", "else", "elif", "!", "{"})


class _Lexer:
    def __init__(self, text: str, line: int = 1) -> None:
        self.s = text
        self.i = 0
        self.line = line
        self.heredocs: list[tuple[str, bool]] = []
        self.want_delim: bool | None = None  # after << or <<-: strip tabs?

    def tokens(self, closing: str = "") -> list[_Tok]:
        s, out, depth = self.s, [], 0
        while self.i < len(s):
            c = s[self.i]
            if c in " \t":
                self.i += 1
            elif s.startswith("\\\n", self.i):
                self.i += 2
                self.line += 1
            elif c == "#":
                end = s.find("\n", self.i)
                self.i = len(s) if end < 0 else end
            elif c == "\n":
                out.append(_Tok("op", "\n", self.line))
                self.i += 1
                self.line += 1
                self._skip_heredocs()
            elif closing and c == closing and depth == 0:
                self.i += 1
                return out
            elif s.startswith("((", self.i) and (
                not out or out[-1].kind == "op" and out[-1].text not in _REDIRS
                or out[-1].text in _ARITH_BEFORE
            ):
                self.i = self._balanced(self.i, "(", ")")
                out.append(_Tok("word", "((arith))", self.line))
            else:
                op = next((o for o in _OPS if s.startswith(o, self.i)), None)
                if op is not None:
                    depth += {"(": 1, ")": -1}.get(op, 0)
                    out.append(_Tok("op", op, self.line))
                    self.i += len(op)
                    if op in ("<<", "<<-"):
                        self.want_delim = op == "<<-"
                    continue
                word = self._word()
                if self.want_delim is not None:
                    self.heredocs.append((unquote(word.text) or word.text, self.want_delim))
                    self.want_delim = None
                if word.text.isdigit() and self.i < len(s) and s[self.i] in "<>":
                    continue  # an IO number: part of the redirection that follows
                out.append(word)
        return out

    def _skip_heredocs(self) -> None:
        for delim, strip in self.heredocs:
            while self.i < len(self.s):
                end = self.s.find("\n", self.i)
                end = len(self.s) if end < 0 else end
                line = self.s[self.i:end]
                self.i = end + 1
                self.line += 1
                if (line.lstrip("\t") if strip else line) == delim:
                    break
        self.heredocs = []

    def _balanced(self, i: int, open_: str, close: str) -> int:
        """Index after the bracket matching s[i] (quotes respected, nothing else)."""
        depth, s = 0, self.s
        while i < len(s):
            c = s[i]
            if c == "\\":
                i += 1
            elif c in "'\"":
                end = s.find(c, i + 1)
                i = len(s) if end < 0 else end
            elif c == open_:
                depth += 1
            elif c == close:
                depth -= 1
                if depth == 0:
                    return i + 1
            if c == "\n":
                self.line += 1
            i += 1
        return i

    def _sub(self, closing: str) -> list[_Tok]:
        if closing == "`":
            end = self.s.find("`", self.i)
            end = len(self.s) if end < 0 else end
            inner = _Lexer(self.s[self.i:end], self.line)
            toks = inner.tokens()
            self.line = inner.line
            self.i = end + 1
            return toks
        return self.tokens(closing)

    def _word(self) -> _Tok:
        s, tok = self.s, _Tok("word", "", self.line)
        buf: list[str] = []
        while self.i < len(s):
            c = s[self.i]
            if c in _WORD_END:
                if c == "(" and _ASSIGN.fullmatch("".join(buf)):  # NAME=(a b c)
                    end = self._balanced(self.i, "(", ")")
                    buf.append(s[self.i:end])
                    self.i = end
                    continue
                break
            if c == "\\":
                buf.append(s[self.i:self.i + 2])
                self.i += 2
            elif c == "'":
                end = s.find("'", self.i + 1)
                end = len(s) if end < 0 else end
                buf.append(s[self.i:end + 1])
                self.line += s.count("\n", self.i, end)
                self.i = end + 1
            elif c == '"':
                buf.append('"')
                self.i += 1
                while self.i < len(s) and s[self.i] != '"':
                    if s[self.i] == "\\":
                        buf.append(s[self.i:self.i + 2])
                        self.i += 2
                    elif s[self.i] in "$`":
                        self._dollar(buf, tok)
                    else:
                        self.line += s[self.i] == "\n"
                        buf.append(s[self.i])
                        self.i += 1
                buf.append('"')
                self.i += 1
            elif c in "$`":
                self._dollar(buf, tok)
            else:
                buf.append(c)
                self.i += 1
        tok.text = "".join(buf)
        return tok

    def _dollar(self, buf: list[str], tok: _Tok) -> None:
        s = self.s
        if s.startswith("$((", self.i):
            self.i = self._balanced(self.i + 1, "(", ")")
            buf.append("$((arith))")
        elif s.startswith("$(", self.i):
            self.i += 2
            tok.subs.append(self._sub(")"))
            buf.append("$(...)")
        elif s[self.i] == "`":
            self.i += 1
            tok.subs.append(self._sub("`"))
            buf.append("$(...)")
        elif s.startswith("${", self.i):
            end = self._balanced(self.i + 1, "{", "}")
            buf.append(s[self.i:end])
            self.i = end
        else:
            buf.append("$")
            self.i += 1


def unquote(raw: str) -> str | None:
    """A word's value, or None when it holds an expansion ($x, $(...), `...`, a glob)."""
    out, i, quote = [], 0, ""
    while i < len(raw):
        c = raw[i]
        if quote == "'":
            if c == "'":
                quote = ""
            else:
                out.append(c)
        elif c == "\\":
            i += 1
            out.append(raw[i:i + 1])
        elif c == "'" and not quote:
            quote = "'"
        elif c == '"':
            quote = "" if quote == '"' else '"'
        elif c in "$`" or (not quote and c in "*?["):
            return None
        else:
            out.append(c)
        i += 1
    return "".join(out)


@dataclasses.dataclass
class ShellCommand:
    raw: list[str]  # the words as written, from the command word on (assignments dropped)
    words: list[str | None]  # their values (None: known only at run time)
    line: int
    function: str | None  # the function whose body holds it


_RESERVED_PREFIX = frozenset({"!", "then", "do", "else", "elif", "if", "while", "until", "fi",
                              "done", "time"})
BUILTINS = frozenset({
    ":", ".", "[", "[[", "]]", "alias", "bg", "bind", "break", "builtin", "caller", "cd",
    "command", "compgen", "complete", "compopt", "continue", "declare", "dirs", "disown", "echo",
    "enable", "eval", "exec", "exit", "export", "false", "fc", "fg", "getopts", "hash", "help",
    "history", "jobs", "kill", "let", "local", "logout", "mapfile", "popd", "printf", "pushd",
    "pwd", "read", "readarray", "readonly", "return", "set", "shift", "shopt", "source",
    "suspend", "test", "times", "trap", "true", "type", "typeset", "ulimit", "umask", "unalias",
    "unset", "wait", "((arith))",
})


def shell_commands(text: str) -> list[ShellCommand]:
    """The simple commands of a bash script, with the function each is in."""
    cmds: list[ShellCommand] = []
    _parse(_Lexer(text).tokens(), cmds, [])
    return cmds


def _parse(toks: list[_Tok], cmds: list[ShellCommand], funcs: list[tuple[str, int]]) -> None:
    cur: list[_Tok] = []
    case_depth, expect_pattern, in_dbracket, braces = 0, False, False, 0
    pending_func: str | None = None

    def flush() -> None:
        words = list(cur)
        cur.clear()
        while words and _ASSIGN.match(words[0].text):
            words.pop(0)
        if words:
            cmds.append(ShellCommand([w.text for w in words], [unquote(w.text) for w in words],
                                     words[0].line, funcs[-1][0] if funcs else None))

    i = 0
    while i < len(toks):
        t = toks[i]
        i += 1
        for sub in t.subs:
            _parse(sub, cmds, funcs)
        if expect_pattern:  # case patterns, up to the ")" that ends them
            if t.kind == "word" and t.text == "esac":
                case_depth -= 1
                expect_pattern = False
            elif t.kind == "op" and t.text == ")":
                expect_pattern = False
            continue
        if in_dbracket:
            cur.append(t)
            in_dbracket = t.text != "]]"
            continue
        if t.kind == "op":
            if t.text in _REDIRS:
                if i < len(toks) and toks[i].kind == "word":
                    for sub in toks[i].subs:
                        _parse(sub, cmds, funcs)
                    i += 1
                continue
            if t.text == "(" and len(cur) == 1 and i < len(toks) and toks[i].text == ")":
                pending_func = cur[0].text  # NAME() { ...; }
                cur.clear()
                i += 1
                continue
            flush()
            if t.text in (";;", ";&", ";;&") and case_depth:
                expect_pattern = True
            continue
        if not cur:  # the command position
            w = t.text
            if w == "[[":
                in_dbracket = True
            elif w == "{":
                braces += 1
                if pending_func is not None:
                    funcs.append((pending_func, braces))
                    pending_func = None
                continue
            elif w == "}":
                if funcs and funcs[-1][1] == braces:
                    funcs.pop()
                braces -= 1
                continue
            elif w in _RESERVED_PREFIX:
                continue
            elif w == "function":
                if i < len(toks):
                    pending_func = toks[i].text
                    i += 1
                if i + 1 < len(toks) and toks[i].text == "(" and toks[i + 1].text == ")":
                    i += 2
                continue
            elif w == "esac":
                case_depth -= 1
                continue
            elif w in ("for", "select", "case"):
                while i < len(toks) and not (
                    toks[i].kind == "op" and toks[i].text in (";", "\n")
                    or w == "case" and toks[i].text == "in"
                ):
                    i += 1
                if w == "case":
                    case_depth += 1
                    expect_pattern = True
                i += 1
                continue
        cur.append(t)
    flush()


def shell_programs(text: str, funcs: frozenset[str] = frozenset(),
                   runners: frozenset[str] = frozenset()) -> list[tuple[str, int]]:
    """(program word as written, line) for every program a bash script runs by name:
    builtins and the script's own functions are not programs; the arguments of a function
    that runs ``"$@"`` (``run getfattr ...``), and what ``exec``, ``command``, ``eval``,
    ``trap`` and the PASS_THROUGH programs run, are."""
    own, own_runners = shell_functions(text)
    defined, runners = funcs | own, runners | own_runners
    out: list[tuple[str, int]] = []
    cmds = shell_commands(text)
    for c in cmds:
        out += [(p, c.line) for p in _command_programs(c.words, defined, runners)]
    return out


def shell_functions(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """The functions a bash script defines, and those of them that run their arguments."""
    cmds = shell_commands(text)
    runners = {c.function for c in cmds if c.function and c.raw[0] in ('"$@"', "$@", '"${@}"')}
    defined = _defined_functions(text) | {c.function for c in cmds if c.function}
    return frozenset(defined), frozenset(r for r in runners if r)


def _defined_functions(text: str) -> set[str]:
    return set(re.findall(r"^\s*(?:function\s+)?([A-Za-z_][\w-]*)\s*\(\s*\)", text, re.MULTILINE))


def _command_programs(words: list[str | None], funcs: frozenset[str],
                      runners: frozenset[str]) -> list[str]:
    if not words or words[0] is None:
        return []
    w = words[0]
    if w in funcs:
        return _command_programs(words[1:], funcs, runners) if w in runners else []
    if w == "exec" or w == "command":
        rest = words[1:]
        if w == "command" and rest and rest[0] in ("-v", "-V"):
            return [n for n in rest[1:2] if n is not None]  # a lookup, like shutil.which
        while rest and rest[0] is not None and rest[0].startswith("-"):
            rest = rest[2:] if rest[0] == "-a" else rest[1:]
        return _command_programs(rest, funcs, runners)
    if w in ("eval", "trap"):
        script = words[1] if len(words) > 1 else None
        return [p for p, _ in shell_programs(script, funcs, runners)] if script else []
    if w in BUILTINS:
        return []
    return argv_programs(words)


# ---------------------------------------------------------------------------------------------
# The audit hook and the plugin

_EVENTS = frozenset({"subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                     "pty.spawn"})
_recorder: ProgramAudit | None = None
_hook_installed = False
OUTSIDE = "(outside any test)"


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event in _EVENTS and _recorder is not None:
        _recorder.note(event, args)


@dataclasses.dataclass(frozen=True)
class Problem:
    program: str
    tests: tuple[str, ...]
    why: str

    def __str__(self) -> str:
        more = f" (and {len(self.tests) - 1} more)" if len(self.tests) > 1 else ""
        return f"{self.program}, run by {self.tests[0]}{more}: {self.why}"


class ProgramAudit:
    """Records what the session executes; at its end, fails it for a program outside the list.

    The hook only stores the argv (deduplicated per test); names are worked out at the end.
    """

    def __init__(self, list_path: Path = LIST) -> None:
        self.list_path = list_path
        self.current = OUTSIDE
        self.runs: set[tuple[str, tuple[str, ...]]] = set()
        self.problems: list[Problem] = []
        self.ran: dict[str, set[str]] = {}
        global _recorder, _hook_installed
        _recorder = self
        if not _hook_installed:
            sys.addaudithook(_audit)
            _hook_installed = True

    def note(self, event: str, args: tuple[Any, ...]) -> None:
        """Called by the audit hook: keep (test, argv) with the executable as argv[0]."""
        try:
            if event == "os.system":
                argv = ["/bin/sh", "-c", args[0]]
            elif event == "pty.spawn":
                argv = [args[0]] if isinstance(args[0], (str, bytes)) else list(args[0])
            else:
                exe, rest = (args[1], args[2]) if event == "os.spawn" else (args[0], args[1])
                argv = [exe, *(rest[1:] if isinstance(rest, (list, tuple)) else ())]
            self.runs.add((self.current, tuple(os.fsdecode(a) for a in argv[:16])))
        except (TypeError, ValueError, IndexError) as e:  # never break the call it watches
            self.runs.add((self.current, (f"(unreadable {event}: {e!r})",)))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Iterator[None]:
        self.current = item.nodeid
        try:
            return (yield)
        finally:
            self.current = OUTSIDE

    def check(self) -> list[Problem]:
        """Every program run so far, by name, with the tests that ran it; what is wrong."""
        python = os.path.realpath(sys.executable)
        ran: dict[str, set[str]] = {}
        for test, argv in self.runs:
            for word in argv_programs(list(argv)):
                if os.path.realpath(word) == python and "/" in word:
                    continue
                name = program_name(word)
                if name is not None:
                    ran.setdefault(name, set()).add(test)
        self.ran = ran
        if not ran:
            return []
        try:
            listed = read_list(self.list_path)
            installs = script_installs(SCRIPTS / "test")
        except (OSError, ValueError, RuntimeError) as e:
            return [Problem("(the list)", (OUTSIDE,), str(e))]
        status = package_status(listed[n].package for n in ran if n in listed)
        problems = []
        for name, tests in sorted(ran.items()):
            if name not in listed:
                shown = (self.list_path.relative_to(REPO) if self.list_path.is_relative_to(REPO)
                         else self.list_path)
                why = (f"not in {shown}: add '{name} PACKAGE' there, "
                       "and PACKAGE to the packages scripts/test installs")
            else:
                pkg = listed[name].package
                if pkg in installs or status[pkg].essential:
                    continue
                why = (f"its package {pkg} is neither installed by scripts/test "
                       "(scripts/_common.sh) nor Essential")
            problems.append(Problem(name, tuple(sorted(tests)), why))
        return problems

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.problems = self.check()
        if self.problems and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        tr = terminalreporter
        if self.problems:
            tr.section("programs the scripts do not install", sep="=", red=True, bold=True)
            for p in self.problems:
                tr.line(str(p), red=True)
        if tr.config.get_verbosity() > 0 and self.ran:
            tr.section("programs run", sep="-")
            tr.line(", ".join(f"{n} ({len(t)})" for n, t in sorted(self.ran.items())))
