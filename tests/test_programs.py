"""Every external program the tests and scripts run comes from a package the scripts install.

The list is scripts/programs.txt (``PROGRAM PACKAGE``); the install lists are the
``*_APT_PKGS`` arrays of scripts/_common.sh, read by sourcing it. Checked here, without a
mount:

- static: the programs the Python files (``ast``: subprocess, os.exec*/posix_spawn,
  shutil.which, and the project's own wrappers around them) and the bash scripts name are all
  in the list, and each one's package is installed by the script that runs it (scripts/test
  for tests/) or is Essential;
- the list against this machine: each program resolves on PATH, dpkg says the listed package
  owns it, and some script installs that package (or it is Essential);
- the dynamic check (tests/programs.py, ProgramAudit) fails a session that ran an unlisted
  program: a child pytest session shows it.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import programs
from programs import REPO, SCRIPTS, SYSTEM_PATH

# ---------------------------------------------------------------------------------------------
# What the Python files run


class _Py:
    def __repr__(self) -> str:
        return "sys.executable"


class _Unknown:
    def __repr__(self) -> str:
        return "?"


PY, UNKNOWN = _Py(), _Unknown()


@dataclasses.dataclass(frozen=True)
class Param:
    name: str


Elem = str | _Py | _Unknown | Param
# qualified name -> (argument position, keyword, kind): kind "argv" (a list, or a string
# with shell=True), "name" (a program name or path), "shell" (a command string)
RUNNERS: dict[str, tuple[int, str | None, str]] = {
    **{f"subprocess.{f}": (0, "args", "argv")
       for f in ("run", "Popen", "call", "check_call", "check_output")},
    "subprocess.getoutput": (0, "cmd", "shell"),
    "subprocess.getstatusoutput": (0, "cmd", "shell"),
    "os.system": (0, "command", "shell"),
    "os.popen": (0, "cmd", "shell"),
    **{f"os.{f}": (0, None, "name")
       for f in ("execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
                 "posix_spawn", "posix_spawnp")},
    **{f"os.{f}": (1, None, "name")
       for f in ("spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe")},
    "shutil.which": (0, "cmd", "name"),
    "pty.spawn": (0, "argv", "argv"),
    "asyncio.create_subprocess_exec": (0, "program", "name"),
    "asyncio.create_subprocess_shell": (0, "cmd", "shell"),
    "trio.run_process": (0, "command", "argv"),
    "trio.lowlevel.open_process": (0, "command", "argv"),
}
_LIMIT = 32  # alternatives kept per expression


@dataclasses.dataclass
class _Scope:
    module: _Module
    func: ast.FunctionDef | ast.AsyncFunctionDef | None
    parent: _Scope | None
    qualname: str
    method: bool = False
    assigns: dict[str, list[ast.expr | tuple[str, ast.expr, int]]] = dataclasses.field(
        default_factory=dict)
    params: list[str] = dataclasses.field(default_factory=list)
    calls: list[ast.Call] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Module:
    path: Path
    name: str
    imports: dict[str, str] = dataclasses.field(default_factory=dict)
    scope: _Scope | None = None


def _collect(scope: _Scope, body: list[ast.stmt]) -> list[_Scope]:
    """Fill scope from body (not descending into nested functions); return those."""
    nested: list[_Scope] = []

    def assign(target: ast.expr, value: ast.expr | tuple[str, ast.expr, int]) -> None:
        if isinstance(target, ast.Name):
            scope.assigns.setdefault(target.id, []).append(value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for k, el in enumerate(target.elts):
                if isinstance(value, ast.Tuple) and len(value.elts) == len(target.elts):
                    assign(el, value.elts[k])
                elif isinstance(value, tuple) or isinstance(el, ast.Starred):
                    continue
                else:
                    assign(el, ("item", value, k))

    def visit(node: ast.AST, cls: str | None) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            q = f"{cls}.{node.name}" if cls else node.name
            sub = _Scope(scope.module, node, scope, f"{scope.module.name}.{q}", method=bool(cls))
            a = node.args
            sub.params = [p.arg for p in (*a.posonlyargs, *a.args)]
            nested.append(sub)
            nested.extend(_collect(sub, node.body))
            for d in node.decorator_list:
                visit(d, cls)
            return
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                visit(stmt, node.name if scope.func is None else None)
            return
        if isinstance(node, ast.Import):
            for al in node.names:
                scope.module.imports[al.asname or al.name.split(".")[0]] = (
                    al.name if al.asname else al.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module:
            for al in node.names:
                scope.module.imports[al.asname or al.name] = f"{node.module}.{al.name}"
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                assign(t, node.value)
        elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
            assign(node.target, node.value)
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            if isinstance(node.target, ast.Name):
                assign(node.target, ("item", node.iter, -1))
            elif isinstance(node.target, (ast.Tuple, ast.List)):
                for k, el in enumerate(node.target.elts):
                    if isinstance(el, ast.Name):
                        scope.assigns.setdefault(el.id, []).append(("each", node.iter, k))
        elif isinstance(node, ast.Call):
            scope.calls.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child, cls)

    for stmt in body:
        visit(stmt, None)
    return nested


class PythonScan:
    """The programs a set of Python files run, resolved as far as the source allows."""

    def __init__(self, files: list[Path]) -> None:
        self.modules: dict[str, _Module] = {}
        self.scopes: list[_Scope] = []
        for f in files:
            key = f.stem if f.stem not in self.modules else ".".join(f.with_suffix("").parts)
            mod = _Module(f, key)
            mod.scope = _Scope(mod, None, None, key)
            self.modules[key] = mod
            self.scopes.append(mod.scope)
            self.scopes += _collect(mod.scope, ast.parse(f.read_text(), str(f)).body)
        self.defs = {s.qualname: s for s in self.scopes if s.func is not None}
        self.wrappers: dict[str, tuple[int, str | None, str]] = {}

    # -- resolution of names and values

    def _callee(self, call: ast.Call, scope: _Scope) -> str | None:
        parts: list[str] = []
        f: ast.expr = call.func
        while isinstance(f, ast.Attribute):
            parts.insert(0, f.attr)
            f = f.value
        if not isinstance(f, ast.Name):
            return None
        mod = scope.module
        if f.id in mod.imports:
            full = ".".join([mod.imports[f.id], *parts])  # subprocess.run, it_support.run
        elif not parts:
            full = f"{mod.name}.{f.id}"  # a function of this module
        elif len(parts) == 1:  # obj.method(...): the one method of that name, if only one
            hits = [q for q, s in self.defs.items() if s.method and q.endswith(f".{parts[0]}")]
            return hits[0] if len(hits) == 1 else None
        else:
            return None
        if full in RUNNERS:
            return full
        head, _, name = full.rpartition(".")  # tests.mounts.tool -> mounts.tool
        short = f"{head.rpartition('.')[2]}.{name}"
        return short if short in self.defs else full

    def _lookup(self, name: str, scope: _Scope, depth: int) -> list[Elem]:
        s: _Scope | None = scope
        while s is not None:
            if name in s.assigns:
                out: list[Elem] = []
                for v in s.assigns[name]:
                    out += self._strs(v, s, depth + 1)
                return out
            if s.func is not None and name in s.params:
                return [Param(name)] if s is scope else [UNKNOWN]
            s = s.parent
        imported = scope.module.imports.get(name)
        if imported:
            mod, _, attr = imported.rpartition(".")
            target = self.modules.get(mod.rpartition(".")[2])
            if target and target.scope and attr in target.scope.assigns:
                return self._lookup(attr, target.scope, depth + 1)
        return [UNKNOWN]

    def _items(self, e: ast.expr | tuple[str, ast.expr, int], scope: _Scope,
               depth: int) -> list[list[ast.expr]] | None:
        """The element lists a sequence expression may be (literals only)."""
        if depth > 12:
            return None
        if isinstance(e, (ast.List, ast.Tuple)):
            return [e.elts]
        if isinstance(e, ast.Name):
            s: _Scope | None = scope
            while s is not None and e.id not in s.assigns:
                s = s.parent
            if s is None:
                return None
            out: list[list[ast.expr]] = []
            for v in s.assigns[e.id]:
                got = self._items(v, s, depth + 1)
                if got is None:
                    return None
                out += got
            return out
        return None

    def _strs(self, e: ast.expr | tuple[str, ast.expr, int], scope: _Scope,
              depth: int = 0) -> list[Elem]:
        """The values a string expression may have ("$__" marks a part known at run time)."""
        if depth > 12:
            return [UNKNOWN]
        if isinstance(e, tuple):  # ("item", SEQ, K): SEQ[K] (K < 0: any element of SEQ);
            how, seq, k = e     # ("each", SEQ, K): X[K] for each X in SEQ (for a, b in SEQ)
            picked: list[ast.expr] = []
            for elts in self._items(seq, scope, depth + 1) or []:
                if how == "item":
                    picked += elts if k < 0 else elts[k:k + 1]
                    continue
                for el in elts:
                    for sub in self._items(el, scope, depth + 1) or []:
                        picked += sub[k:k + 1]
            out: list[Elem] = []
            for el in picked:
                out += self._strs(el, scope, depth + 1)
            return out or [UNKNOWN]
        if isinstance(e, ast.Constant):
            return [e.value] if isinstance(e.value, str) else [UNKNOWN]
        if isinstance(e, ast.Attribute) and e.attr == "executable" and \
                isinstance(e.value, ast.Name) and scope.module.imports.get(e.value.id) == "sys":
            return [PY]
        if isinstance(e, ast.Name):
            return self._lookup(e.id, scope, depth)
        if isinstance(e, ast.IfExp):
            return self._strs(e.body, scope, depth + 1) + self._strs(e.orelse, scope, depth + 1)
        if isinstance(e, ast.JoinedStr):
            parts = [v.value if isinstance(v, ast.Constant) else "$__" for v in e.values]
            return ["".join(str(p) for p in parts)]
        if isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add):
            lefts, rights = self._strs(e.left, scope, depth + 1), self._strs(e.right, scope,
                                                                                depth + 1)
            return [a + b if isinstance(a, str) and isinstance(b, str) else UNKNOWN
                    for a in lefts for b in rights][:_LIMIT]
        if isinstance(e, ast.Call):
            f = e.func
            if isinstance(f, ast.Attribute) and f.attr == "format":
                return self._strs(f.value, scope, depth + 1)
            if isinstance(f, ast.Name) and f.id in ("str", "fspath") and e.args or \
                    isinstance(f, ast.Attribute) and f.attr == "fspath" and e.args:
                return self._strs(e.args[0], scope, depth + 1)
        return [UNKNOWN]

    def _argvs(self, e: ast.expr | tuple[str, ast.expr, int], scope: _Scope,
               depth: int = 0) -> list[tuple[Elem, ...]]:
        """The argvs a command expression may be: tuples of element values; (Param,) with
        a Param at 0 alone when the whole argv is that parameter."""
        if depth > 12:
            return [(UNKNOWN,)]
        if isinstance(e, (ast.List, ast.Tuple)):
            acc: list[tuple[Elem, ...]] = [()]
            for el in e.elts:
                if isinstance(el, ast.Starred):
                    opts = [a for a in self._argvs(el.value, scope, depth + 1)
                            if not (len(a) == 1 and isinstance(a[0], Param))] or [(UNKNOWN,)]
                else:
                    opts = [(v,) for v in self._strs(el, scope, depth + 1)]
                acc = [a + o for a in acc for o in opts][:_LIMIT]
            return acc
        if isinstance(e, ast.Name):
            s: _Scope | None = scope
            while s is not None and e.id not in s.assigns:
                if s.func is not None and e.id in s.params:
                    return [(Param(e.id),)] if s is scope else [(UNKNOWN,)]
                s = s.parent
            if s is None:
                imported = scope.module.imports.get(e.id)
                if imported:
                    mod, _, attr = imported.rpartition(".")
                    target = self.modules.get(mod.rpartition(".")[2])
                    if target and target.scope and attr in target.scope.assigns:
                        return self._argvs(ast.Name(attr), target.scope, depth + 1)
                return [(UNKNOWN,)]
            out: list[tuple[Elem, ...]] = []
            for v in s.assigns[e.id]:
                out += (self._argvs(v, s, depth + 1) if not isinstance(v, tuple)
                        else [(x,) for x in self._strs(v, s, depth + 1)])
            return out[:_LIMIT]
        if isinstance(e, ast.IfExp):
            return self._argvs(e.body, scope, depth + 1) + self._argvs(e.orelse, scope, depth + 1)
        if isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add):
            return [a + b for a in self._argvs(e.left, scope, depth + 1)
                    for b in self._argvs(e.right, scope, depth + 1)][:_LIMIT]
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and \
                e.func.id in ("tuple", "list") and e.args:
            arg = e.args[0]
            if isinstance(arg, (ast.GeneratorExp, ast.ListComp)):
                arg = arg.generators[0].iter
            return self._argvs(arg, scope, depth + 1)
        if isinstance(e, (ast.Constant, ast.JoinedStr, ast.Attribute)):
            return [(v,) for v in self._strs(e, scope, depth + 1)]
        return [(UNKNOWN,)]

    # -- the calls

    def _arg(self, call: ast.Call, pos: int, kw: str | None) -> ast.expr | None:
        for k in call.keywords:
            if k.arg == kw:
                return k.value
        if pos < len(call.args) and not any(isinstance(a, ast.Starred) for a in call.args[:pos]):
            return call.args[pos]
        return None

    def _spec(self, callee: str) -> tuple[int, str | None, str] | None:
        return RUNNERS.get(callee) or self.wrappers.get(callee)

    def _sites(self) -> Iterator[tuple[_Scope, ast.Call, str, str, ast.expr]]:
        for scope in self.scopes:
            for call in scope.calls:
                callee = self._callee(call, scope)
                spec = self._spec(callee) if callee else None
                if spec is None or callee is None:
                    continue
                pos, kw, kind = spec
                arg = self._arg(call, pos, kw)
                if arg is None:
                    continue
                if kind == "argv" and any(k.arg == "shell" and isinstance(k.value, ast.Constant)
                                          and k.value.value is True for k in call.keywords):
                    kind = "shell"
                yield scope, call, callee, kind, arg

    def find_wrappers(self) -> None:
        """Functions that pass one of their parameters on as a command: their callers name
        the program."""
        changed = True
        while changed:
            changed = False
            for scope, _call, _callee, kind, arg in list(self._sites()):
                if scope.func is None:
                    continue
                if kind == "argv":  # the whole argv is a parameter, or its argv[0] is
                    argvs = self._argvs(arg, scope)
                    found = [(a[0], "argv" if len(a) == 1 else "name") for a in argvs
                             if a and isinstance(a[0], Param)]
                else:
                    found = [(h, kind) for h in self._strs(arg, scope) if isinstance(h, Param)]
                for param, how in found:
                    index = scope.params.index(param.name) - (1 if scope.method else 0)
                    spec = (index, param.name, how)
                    if self.wrappers.get(scope.qualname) != spec:
                        self.wrappers[scope.qualname] = spec
                        changed = True

    def programs(self) -> tuple[list[tuple[Path, int, str]], list[tuple[Path, int, str]]]:
        """(file, line, program as written) for every program found, and the call sites
        whose program is only known at run time (the dynamic check covers those)."""
        self.find_wrappers()
        found: list[tuple[Path, int, str]] = []
        unknown: list[tuple[Path, int, str]] = []
        for scope, call, callee, kind, arg in self._sites():
            where = (scope.module.path, call.lineno)
            if kind == "argv":
                for argv in self._argvs(arg, scope):
                    if not argv or isinstance(argv[0], (Param, _Py)):
                        continue
                    got = programs.argv_programs([w if isinstance(w, str) else None
                                                  for w in argv])
                    found += [(*where, p) for p in got]
                    if not any(programs.program_name(p) for p in got):
                        unknown.append((*where, ast.unparse(arg)))
            else:
                for v in self._strs(arg, scope):
                    if isinstance(v, str) and kind == "shell":
                        found += [(*where, p) for p, _ in programs.shell_programs(v)]
                    elif isinstance(v, str) and "$__" not in v:
                        found += [(*where, p) for p in programs.argv_programs([v])]
                    elif not isinstance(v, (Param, _Py)):
                        unknown.append((*where, f"{callee}({ast.unparse(arg)})"))
        return found, unknown


# ---------------------------------------------------------------------------------------------
# What runs, and where its packages must come from


def python_files() -> list[Path]:
    return sorted([*REPO.glob("tests/**/*.py"), *SCRIPTS.glob("*.py"),
                   *REPO.glob("unionfs/**/*.py")])


def shell_files() -> list[Path]:
    return sorted(p for p in SCRIPTS.iterdir() if p.is_file() and programs.is_shell_script(p))


def installers_of(path: Path, imported_by: dict[str, set[Path]]) -> list[Path | None]:
    """The scripts whose install sets must cover a file's programs (None: BASE_APT_PKGS).

    tests/ are run by scripts/test; scripts/NAME.py by scripts/NAME; a module in scripts/
    that the tests or a script's Python import, by what imports it; one that nothing imports
    yet (run on its own, e.g. scripts/debian_base.py) is taken as a helper of the tests.
    """
    rel = path.relative_to(REPO)
    if rel.parts[0] == "tests":
        return [SCRIPTS / "test"]
    if rel.parts[0] == "unionfs" or rel.name == "_common.sh":
        return [None]
    out: list[Path | None] = []
    if rel.parts[0] == "scripts":
        script = SCRIPTS / rel.stem  # scripts/bench.py is run by scripts/bench
        if script.is_file() and programs.ensure_deps_args(script):
            out.append(script)
        for importer in imported_by.get(rel.stem, ()) if rel.suffix == ".py" else ():
            out += [s for s in installers_of(importer, {}) if s not in out]
        if not out and rel.suffix == ".py":
            out.append(SCRIPTS / "test")
    assert out, f"{rel}: which script installs what it runs? (see installers_of)"
    return out


def used_programs() -> tuple[list[tuple[Path, int, str]], dict[str, set[Path]]]:
    """(file, line, program name) for every external program the sources run; and, per
    module, the files that import it."""
    scan = PythonScan(python_files())
    found, _ = scan.programs()
    imported_by: dict[str, set[Path]] = {}
    for mod in scan.modules.values():
        for target in mod.imports.values():
            for part in target.split("."):
                imported_by.setdefault(part, set()).add(mod.path)
    common = (SCRIPTS / "_common.sh").read_text()
    funcs, runners = programs.shell_functions(common)
    for f in shell_files():
        found += [(f, line, p) for p, line in programs.shell_programs(f.read_text(), funcs,
                                                                       runners)]
    out = []
    for f, line, word in found:
        name = programs.program_name(word)
        if name is not None:
            out.append((f, line, name))
    return sorted(set(out)), imported_by


def _where(f: Path, line: int) -> str:
    return f"{f.relative_to(REPO)}:{line}"


def test_every_program_the_sources_run_is_listed_and_installed() -> None:
    listed = programs.read_list()
    arrays = programs.apt_arrays()
    base = set(arrays["BASE_APT_PKGS"])
    used, imported_by = used_programs()
    status = programs.package_status(p.package for p in listed.values())
    installs_of: dict[Path | None, set[str]] = {}
    bad = []
    for f, line, name in used:
        if name not in listed:
            bad.append(f"{_where(f, line)}: runs {name}, which scripts/programs.txt does not list")
            continue
        pkg = listed[name].package
        for script in installers_of(f, imported_by):
            if script not in installs_of:
                installs_of[script] = programs.script_installs(script, arrays) if script else base
            installs = installs_of[script]
            if pkg not in installs and not status[pkg].essential:
                by = script.relative_to(REPO) if script else "BASE_APT_PKGS"
                bad.append(f"{_where(f, line)}: runs {name}, from {pkg}, which {by} does not "
                           "install (scripts/_common.sh) and is not Essential")
    assert not bad, "\n".join(bad)
    # the scan itself works: these are run, by name, in tests/ and scripts/
    names = {name for _, _, name in used}
    assert {"setfacl", "getfacl", "mount", "umount", "fusermount3", "unshare", "sh", "podman",
            "buildah", "runc", "busybox", "tar", "getfattr", "apt-get", "modprobe", "dd",
            "fuse-overlayfs", "rm"} <= names, sorted(names)


def test_every_listed_program_comes_from_its_package_which_a_script_installs() -> None:
    listed = programs.read_list()
    arrays = programs.apt_arrays()
    installed_by: dict[str, list[str]] = {p: ["BASE_APT_PKGS"] for p in arrays["BASE_APT_PKGS"]}
    for script, pkgs in programs.all_installs(arrays).items():
        for p in pkgs:
            installed_by.setdefault(p, []).append(f"scripts/{script}")
    status = programs.package_status(p.package for p in listed.values())
    found = {name: shutil.which(name, path=SYSTEM_PATH) for name in listed}
    candidates = {name: _dpkg_paths(path) for name, path in found.items() if path}
    owners = _dpkg_owners({c for cs in candidates.values() for c in cs})
    bad = []
    for name, prog in sorted(listed.items()):
        where = f"scripts/programs.txt:{prog.line}: {name}"
        if prog.package not in installed_by and not status[prog.package].essential:
            bad.append(f"{where}: no script installs {prog.package}, and it is not Essential")
        if not found[name]:
            bad.append(f"{where}: not found on {SYSTEM_PATH} ({prog.package} not installed?)")
            continue
        got = {o for c in candidates[name] for o in owners.get(c, ())}
        if prog.package not in got:
            bad.append(f"{where}: {found[name]} belongs to {sorted(got) or 'no package'}, "
                       f"not {prog.package}")
    assert not bad, "\n".join(bad)


def _dpkg_paths(path: str) -> list[str]:
    """The names dpkg may know a file by: as found and resolved, each with and without /usr
    (Debian 12 merges /bin into /usr/bin, but dpkg records the path each package ships)."""
    out = []
    for p in dict.fromkeys([os.path.abspath(path), os.path.realpath(path)]):
        out.append(p)
        if p.startswith(("/usr/bin/", "/usr/sbin/", "/usr/lib/")):
            out.append(p[len("/usr"):])
        elif p.startswith(("/bin/", "/sbin/", "/lib/")):
            out.append("/usr" + p)
    return out


def _dpkg_owners(paths: set[str]) -> dict[str, set[str]]:
    """dpkg -S for all the paths at once: path -> packages (diversions left out)."""
    r = subprocess.run(["dpkg", "-S", *sorted(paths)], capture_output=True, text=True,
                       timeout=120, check=False, stdin=subprocess.DEVNULL)
    out: dict[str, set[str]] = {}
    for line in r.stdout.splitlines():
        if line.startswith("diversion by ") or ": " not in line:
            continue
        pkgs, path = line.split(": ", 1)
        out.setdefault(path, set()).update(p.strip().split(":")[0] for p in pkgs.split(","))
    return out


def test_the_list_is_well_formed() -> None:
    listed = programs.read_list()
    assert listed, "scripts/programs.txt is empty"
    for prog in listed.values():
        assert programs.program_name(prog.name) == prog.name, prog


# ---------------------------------------------------------------------------------------------
# The readers themselves

SHELL_SAMPLE = r"""#!/usr/bin/env bash
# setfacl in a comment is not run
. "$(dirname "$0")/_common.sh"
X=(a b
   c) Y=1
run() { printf '$ %s\n' "$*"; "$@"; }
helper() {
    local missing=() pkg
    [[ $(dpkg-query -W "$pkg" 2>/dev/null) == ii* ]] || missing+=("$pkg")
    if ((${#missing[@]})); then note "x"; fi
    case $1 in
        "") echo none ;;
        rm) wc -l ;;
    esac
}
for p in python3 tar; do "$p" --version; done
run getfattr -n user.x "$f"
"$VENV/bin/python" - "$REPO" <<'EOF' 2>/dev/null
import os; os.system("ignored")
EOF
cat <<-END
	unshare -m inside-a-heredoc
	END
FOO=bar setfacl -m u:nobody:r f >/dev/null && exec mountpoint -q /x
sh -c 'mount -t tmpfs none /d; umount /d' || { fusermount3 -u /m 2>&1; }
trap 'rm -f "$tmp"' EXIT
h=$(sha256sum f | cut -c1-16) `uname -r`
command -v modprobe >/dev/null; ./local-script; /sbin/losetup -a
"""


def test_shell_reader_finds_the_command_words() -> None:
    got = [p for p, _ in programs.shell_programs(SHELL_SAMPLE, frozenset({"note"}))]
    assert sorted(set(got)) == sorted({
        "dirname", "dpkg-query", "wc", "getfattr", "setfacl", "mountpoint", "sh", "mount",
        "umount", "fusermount3", "rm", "sha256sum", "cut", "uname", "cat", "modprobe",
        "./local-script", "/sbin/losetup",
    })
    assert [p for p, line in programs.shell_programs(SHELL_SAMPLE) if line == 24] == [
        "setfacl", "mountpoint"]
    assert programs.program_name("/sbin/losetup") == "losetup"
    assert programs.program_name("./local-script") is None


def test_argv_reader_looks_through_shells_and_wrappers() -> None:
    argv = programs.argv_programs
    assert argv(["unshare", "-m", "--propagation", "private", "sh", "-ec", "mount x; exec $__"]) \
        == ["unshare", "sh", "mount"]
    assert argv(["env", "-u", "X", "A=1", "timeout", "-s", "KILL", "10", "getfattr", "f"]) == [
        "env", "timeout", "getfattr"]
    assert argv(["chroot", "/r", "setfacl"]) == ["chroot"]  # runs the root's program
    assert argv(["unshare", "--root", "/r", "setfacl"]) == ["unshare"]
    assert argv([None, "x"]) == []


PYTHON_SAMPLE = '''
import os, shutil, subprocess, sys
from subprocess import run as sprun

PYTHON = sys.executable
BASE = [PYTHON, "-m", "unionfs"]
STEPS = [("podman", "rm"), ("buildah", "rm")]

def run(argv, check=True):
    args = tuple(os.fspath(a) for a in argv)
    return subprocess.Popen(args)

def shell(template, *paths):
    cmd = template.format(*paths)
    return subprocess.run(cmd, shell=True)

class Store:
    def tool(self, *args):
        return run(["skopeo", *args])

def test_x(how, p):
    cmd = ["fusermount3", "-u", p] if how else ["umount", p]
    subprocess.run(cmd)
    run(["unshare", "-m", "sh", "-c", "setfacl -m u:x:r f && " f"exec {p}"])
    sprun([*BASE, "x"])
    shutil.which("getfattr")
    shell("dd if={} of=/dev/null", p)
    for tool, *args in STEPS:
        run([tool, *args])
    prefix = ["umount"] if how else ["fusermount3", "-u"]
    subprocess.check_output([*prefix, p])
    os.execv("/usr/bin/tar", ["tar"])
    subprocess.run([p.path, "x"])
'''


def test_python_reader_follows_wrappers_and_names(tmp_path: Path) -> None:
    src = tmp_path / "sample.py"
    src.write_text(PYTHON_SAMPLE)
    found, unknown = PythonScan([src]).programs()
    assert sorted({p for _, _, p in found}) == sorted({
        "skopeo", "fusermount3", "umount", "unshare", "sh", "setfacl", "getfattr", "dd",
        "podman", "buildah", "/usr/bin/tar"})
    assert [u[2] for u in unknown] == ["[p.path, 'x']"]


# ---------------------------------------------------------------------------------------------
# The dynamic check, in a child session


def _child_session(tmp_path: Path, body: str, listed: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "programs.txt").write_text(listed)
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from pathlib import Path
        import programs

        def pytest_configure(config):
            config.pluginmanager.register(
                programs.ProgramAudit(Path({str(tmp_path / "programs.txt")!r})), "audit")
        """))
    (tmp_path / "test_child.py").write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "no:trio",
         "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )


BASE_LIST = "true coreutils\nsh dash\nenv coreutils\nldconfig libc-bin  # trio, at import\n"
CHILD_TESTS = """\
    import os, subprocess, sys

    def test_listed():
        subprocess.run(["true"], check=True)
        subprocess.run([sys.executable, "-c", "pass"], check=True)

    def test_shell_string():
        subprocess.run("uname -r >/dev/null", shell=True, check=True)

    def test_wrapped():
        subprocess.run(["env", "A=1", "/usr/bin/nproc"], check=True, capture_output=True)
"""


def test_a_session_that_runs_an_unlisted_program_fails(tmp_path: Path) -> None:
    r = _child_session(tmp_path, CHILD_TESTS, BASE_LIST)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "3 passed" in out, out
    assert "programs the scripts do not install" in out, out
    assert "uname, run by test_child.py::test_shell_string: not in" in out, out
    assert "nproc, run by test_child.py::test_wrapped: not in" in out, out
    assert "programs run" in out and "true (1)" in out, out


def test_a_session_that_runs_only_listed_programs_passes(tmp_path: Path) -> None:
    r = _child_session(tmp_path, CHILD_TESTS,
                       BASE_LIST + "uname coreutils\n"
                       "nproc coreutils\n")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "programs the scripts do not install" not in out, out


def test_a_listed_program_whose_package_scripts_test_lacks_fails_the_session(
    tmp_path: Path,
) -> None:
    r = _child_session(tmp_path, CHILD_TESTS,
                       BASE_LIST + "uname coreutils\n"
                       "nproc no-such-package\n")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "nproc, run by test_child.py::test_wrapped: its package no-such-package" in out, out
