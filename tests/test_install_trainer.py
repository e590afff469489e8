"""The trainer installer (training_server_install.py) against local sources made here.

Small git repositories stand for gaussian-splatting-lightning, diff-gaussian-rasterization
(with glm as a submodule) and simple-knn; a fake `nvidia-smi` and `nvcc` sit first on the
PATH; torch and lightning are tiny stand-in packages (a site folder of an interpreter, or local
wheels pip installs with no index); the CUDA build is a stand-in command that fails the way
a real build fails when asked to. Everything else (git, venv, pip, the status file, serve.sh,
the server) is real.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import httpx
import pytest

import training_server_install as inst
from conftest import FAKE_TRAINER_DIR, REPO, free_port, settings_env, upload, wait_status

INSTALLER = REPO / "training_server_install.py"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}

FAKE_TORCH = textwrap.dedent(
    """\
    __version__ = "2.11.0+cu130"
    class version:
        cuda = "13.0"
    class cuda:
        @staticmethod
        def is_available():
            return True
        @staticmethod
        def get_device_name(index=0):
            return "Stand-in GPU"
        @staticmethod
        def get_device_capability(index=0):
            return (9, 0)
    class hub:
        @staticmethod
        def get_dir():
            return "/nonexistent/torch-hub"
    """
)

BUILD_STAND_IN = textwrap.dedent(
    """\
    # Stand-in for `pip install --no-build-isolation SOURCE` of a CUDA extension (tests only).
    import os, pathlib, sys, sysconfig
    src = pathlib.Path(sys.argv[1])
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    print(f"Processing {src}")
    print("running build_ext")
    if not arch:
        print("nvcc fatal   : Unsupported gpu architecture 'compute_'")
        sys.exit(1)
    sm = arch.replace(".", "")
    print(f"nvcc -gencode=arch=compute_{sm},code=sm_{sm} -c {src}/ext.cu")
    if (src / ".gitmodules").exists() and not (src / "third_party/glm/glm/glm.hpp").exists():
        print("ext.cu:1:10: fatal error: glm/glm.hpp: No such file or directory")
        sys.exit(1)
    if os.environ.get("FAKE_BUILD_FAIL") == src.name:
        print(f'{src}/forward.cu(42): error: identifier "glm" is undefined')
        print("error: command '/usr/local/cuda/bin/nvcc' failed with exit code 1")
        print("error: subprocess-exited-with-error")
        sys.exit(1)
    module = src.name.replace("-", "_")
    package = pathlib.Path(sysconfig.get_paths()["purelib"]) / module
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "_C.py").write_text(f"ARCH = {arch!r}\\n")
    print(f"Successfully installed {module}")
    """
)


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    done = subprocess.run(
        ["git", "-c", "protocol.file.allow=always", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def make_repo(path: Path, files: dict[str, str]) -> None:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    commit_files(path, files, "first")


def commit_files(path: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", message)
    return git(path, "rev-parse", "HEAD")


def make_wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel that pip installs with no index."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    entries = {
        **files,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for entry, text in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{entry},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for entry, text in entries.items():
            zf.writestr(entry, text)
        zf.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


class World:
    """Local sources, fake GPU tools and stand-in packages under one temp folder."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.src = base / "src"
        gsl = self.src / "yzslab" / "gaussian-splatting-lightning"
        # The stand-in trainer's main.py passes the server's dry run like the real one.
        make_repo(gsl, {"main.py": (FAKE_TRAINER_DIR / "main.py").read_text()})
        commit_files(gsl, {"internal/cli.py": "CLI = None\n"}, "cli")
        glm = self.src / "g-truc" / "glm"
        make_repo(glm, {"glm/glm.hpp": "// glm\n"})
        rast = self.src / "graphdeco-inria" / "diff-gaussian-rasterization"
        make_repo(rast, {"setup.py": "# rasterizer\n", "ext.cu": "// ext\n"})
        git(rast, "submodule", "add", "-q", str(glm), "third_party/glm")
        git(rast, "commit", "-q", "-m", "glm submodule")
        knn = self.src / "yzslab" / "simple-knn"
        make_repo(knn, {"setup.py": "# simple-knn\n", "ext.cu": "// knn\n"})
        self.pinned = {
            "gaussian-splatting-lightning": git(gsl, "rev-parse", "HEAD"),
            "diff-gaussian-rasterization": git(rast, "rev-parse", "HEAD"),
            "glm": git(glm, "rev-parse", "HEAD"),
            "simple-knn": git(knn, "rev-parse", "HEAD"),
        }
        # Newer commits on the branches, which the pins must ignore.
        commit_files(gsl, {"main.py": "raise SystemExit('newer, not pinned')\n"}, "newer")
        commit_files(glm, {"glm/glm.hpp": "// newer glm\n"}, "newer")
        commit_files(rast, {"setup.py": "# newer rasterizer\n"}, "newer")
        commit_files(knn, {"setup.py": "# newer knn\n"}, "newer")

        self.bin = base / "bin"
        self.bin.mkdir()
        self.write_tool(
            "nvidia-smi",
            """case "$*" in
  *--query-gpu*) echo "NVIDIA H200, 580.159.03, 9.0" ;;
  *) echo "| NVIDIA-SMI 580.159.03   Driver Version: 580.159.03   CUDA Version: 13.0 |" ;;
esac""",
        )
        self.write_tool("nvcc", 'echo "Cuda compilation tools, release 13.0, V13.0.88"')

        # An interpreter that already has (a stand-in of) a CUDA torch.
        site = base / "torch_site"
        (site / "torch").mkdir(parents=True)
        (site / "torch" / "__init__.py").write_text(FAKE_TORCH)
        self.python_with_torch = self.write_tool(
            "python-with-torch", f'PYTHONPATH={site} exec {sys.executable} "$@"', folder=base
        )
        # PyPI stand-ins: torch/torchvision wheels, and the trainer's requirements as a wheel.
        self.wheels = base / "wheels"
        make_wheel(self.wheels, "torch", "2.11.0", {"torch/__init__.py": FAKE_TORCH})
        make_wheel(self.wheels, "torchvision", "0.26.0", {"torchvision/__init__.py": ""})
        lightning = make_wheel(base / "req", "lightning", "2.6.6", {"lightning/__init__.py": ""})
        self.requirements = base / "requirements-trainer.txt"
        self.requirements.write_text(f"{lightning}\n")
        self.build = base / "build_stand_in.py"
        self.build.write_text(BUILD_STAND_IN)

    def write_tool(self, name: str, body: str, folder: Path | None = None) -> Path:
        path = (folder or self.bin) / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
        return path

    def pins(self, **overrides: str) -> str:
        pins = {name: commit[:7] for name, commit in self.pinned.items()}
        return json.dumps({**pins, **overrides})

    def env(self, python: Path | str | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINING_SERVER_")}
        env.update(GIT_ENV)
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env['PATH']}",
            PIP_NO_INDEX="1",
            PIP_FIND_LINKS=str(self.wheels),
            PIP_DISABLE_PIP_VERSION_CHECK="1",
            TRAINING_SERVER_INSTALL_PYTHON=str(python or self.python_with_torch),
            TRAINING_SERVER_TRAINER_SOURCES=str(self.src),
            TRAINING_SERVER_TRAINER_PINS=self.pins(),
            TRAINING_SERVER_INSTALL_BUILD_COMMAND=json.dumps(
                ["{python}", str(self.build), "{source}"]
            ),
        )
        env.update(extra)
        return env

    def install(
        self, root: Path, env: dict[str, str], *args: str
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(INSTALLER), "--root", str(root)]
        argv += ["--requirements", str(self.requirements), *args]
        return subprocess.run(
            argv, cwd=self.base, env=env, capture_output=True, text=True, timeout=240
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def installed(world: World) -> tuple[Path, subprocess.CompletedProcess[str], float]:
    """One finished install (torch reused from the interpreter), shared by the tests."""
    root = world.base / "installed" / "third_party"
    started = time.monotonic()
    done = world.install(root, world.env())
    return root, done, time.monotonic() - started


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD")


# -- the whole install -------------------------------------------------------------------


def test_install_checks_out_the_pins_and_ends_ready(installed, world):
    root, done, seconds = installed
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"first install with local sources: {seconds:.1f} s")
    for name in ("gaussian-splatting-lightning", "diff-gaussian-rasterization", "simple-knn"):
        assert head(root / name) == world.pinned[name], name  # not the newer branch head
    assert head(root / "diff-gaussian-rasterization" / "third_party" / "glm") == world.pinned["glm"]
    main = (root / "gaussian-splatting-lightning" / "main.py").read_text()
    assert "newer" not in main

    status = json.loads((root / "trainer-install.json").read_text())
    assert status["state"] == "done"
    assert status["trainer_path"] == str(root / "gaussian-splatting-lightning")
    assert status["trainer_python"] == str(root / "trainer-venv" / "bin" / "python")
    assert all(step["state"] == "done" for step in status["steps"].values())
    assert len(status["steps"]) == 9
    assert "reusing torch 2.11.0+cu130" in status["steps"]["torch"]["detail"]
    assert "torch 2.11.0+cu130 on Stand-in GPU" in status["steps"]["check"]["detail"]
    assert inst.install_problem(root) is None

    # Progress in words, each step numbered; the extensions were built for the GPU's arch.
    assert "NVIDIA H200 (driver 580.159.03, CUDA 13.0, compute capability 9.0)" in done.stdout
    assert "[9/9] check: torch 2.11.0+cu130 on Stand-in GPU" in done.stdout
    assert "TORCH_CUDA_ARCH_LIST=9.0" in done.stdout
    python = root / "trainer-venv" / "bin" / "python"
    arch = subprocess.run(
        [str(python), "-c", "import diff_gaussian_rasterization._C as c; print(c.ARCH)"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=True,
    )
    assert arch.stdout.strip() == "9.0"
    build_log = (root / "logs" / "build-diff-gaussian-rasterization.log").read_text()
    assert "nvcc -gencode=arch=compute_90,code=sm_90" in build_log


def test_rerun_skips_finished_steps(installed, world):
    root, _, _ = installed
    started = time.monotonic()
    again = world.install(root, world.env())
    seconds = time.monotonic() - started
    print(f"rerun with everything done: {seconds:.1f} s")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("done before") == 9
    assert "cloning" not in again.stdout
    assert seconds < 30


def test_exports_point_at_the_install_unless_a_trainer_path_is_set(installed, world):
    root, _, _ = installed
    env = world.env()
    lines = world.install(root, env, "--exports").stdout
    assert f"TRAINING_SERVER_TRAINER_PATH={root / 'gaussian-splatting-lightning'}" in lines
    assert f"TRAINING_SERVER_TRAINER_PYTHON={root / 'trainer-venv/bin/python'}" in lines
    explicit = world.install(root, {**env, "TRAINING_SERVER_TRAINER_PATH": "/opt/gsl"}, "--exports")
    assert explicit.stdout == ""


def test_serve_sh_starts_the_server_on_the_installed_trainer(installed, world, tmp_path):
    root, _, _ = installed
    project = copy_project(tmp_path / "project", world)
    # Reuse the finished install: the project's third_party/ is the one installed above.
    (project / "third_party").symlink_to(root)
    with serve(project, world.env(), trainer_require_cuda="true") as (url, output):
        training = httpx.get(f"{url}/health?recheck=true", timeout=60).json()["training"]
        assert training["available"] is True, training
        assert training["detail"].startswith("torch 2.11.0+cu130 on Stand-in GPU")
    assert "check: done before" in output()


# -- failures, opting out, explicit trainer ----------------------------------------------


def test_failed_build_is_named_and_a_rerun_resumes(world, tmp_path):
    """No torch to reuse: torch comes from the (stand-in) package index; the build fails."""
    root = tmp_path / "third_party"
    env = world.env(python=sys.executable, FAKE_BUILD_FAIL="diff-gaussian-rasterization")
    failed = world.install(root, env)
    assert failed.returncode == 1
    assert "FAILED at step 'build diff-gaussian-rasterization': building" in failed.stdout
    assert 'error: identifier "glm" is undefined' in failed.stdout  # the log's last lines
    assert "installed torch 2.11.0+cu130 (CUDA 13.0), which sees the GPU" in failed.stdout
    assert "Successfully installed torch-2.11.0 torchvision-0.26.0" in failed.stdout
    status = json.loads((root / "trainer-install.json").read_text())
    assert status["state"] == "failed"
    assert status["failed_step"] == "build diff-gaussian-rasterization"
    assert status["log"] == str(root / "logs" / "build-diff-gaussian-rasterization.log")
    assert any("exited-with-error" in line for line in status["log_tail"])
    problem = inst.install_problem(root)
    assert problem is not None
    assert "failed at step 'build diff-gaussian-rasterization'" in problem
    assert str(root / "logs" / "build-diff-gaussian-rasterization.log") in problem
    assert "restart ./serve.sh" in problem
    assert world.install(root, env, "--exports").stdout == ""

    env.pop("FAKE_BUILD_FAIL")
    resumed = world.install(root, env)
    assert resumed.returncode == 0, resumed.stdout
    for step in ("fetch gaussian-splatting-lightning", "venv", "torch", "requirements"):
        assert f"{step}: done before" in resumed.stdout
    assert "build diff-gaussian-rasterization: diff_gaussian_rasterization built" in resumed.stdout
    assert inst.install_problem(root) is None


def test_compiler_of_another_cuda_major_fails_the_build_in_words(world, tmp_path):
    root = tmp_path / "third_party"
    bin12 = tmp_path / "bin12"
    bin12.mkdir()
    nvcc = bin12 / "nvcc"
    nvcc.write_text('#!/bin/sh\necho "Cuda compilation tools, release 12.4, V12.4.131"\n')
    nvcc.chmod(0o755)
    env = world.env()
    env["PATH"] = f"{bin12}{os.pathsep}{env['PATH']}"
    failed = world.install(root, env)
    assert failed.returncode == 1
    assert "FAILED at step 'build diff-gaussian-rasterization'" in failed.stdout
    assert "is CUDA 12.4 but torch is built for CUDA 13.0" in failed.stdout


def test_never_installs_nothing(world, tmp_path):
    root = tmp_path / "third_party"
    done = world.install(root, world.env(TRAINING_SERVER_INSTALL_TRAINER="never"))
    assert done.returncode == 0
    assert "TRAINING_SERVER_INSTALL_TRAINER=never" in done.stdout
    assert not root.exists()


def test_explicit_trainer_path_wins(world, tmp_path):
    root = tmp_path / "third_party"
    done = world.install(root, world.env(TRAINING_SERVER_TRAINER_PATH="/opt/my-gsl"))
    assert done.returncode == 0
    assert "TRAINING_SERVER_TRAINER_PATH is /opt/my-gsl" in done.stdout
    assert not root.exists()
    # The same from a .env file in the working directory, as the server reads it.
    (world.base / ".env").write_text("TRAINING_SERVER_TRAINER_PATH=/opt/from-dotenv\n")
    try:
        done = world.install(root, world.env())
    finally:
        (world.base / ".env").unlink()
    assert "TRAINING_SERVER_TRAINER_PATH is /opt/from-dotenv" in done.stdout
    assert not root.exists()


def test_no_gpu_installs_nothing(world, tmp_path):
    root = tmp_path / "third_party"
    nogpu = tmp_path / "nogpu"
    nogpu.mkdir()
    smi = nogpu / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
    smi.chmod(0o755)
    env = world.env(python=sys.executable)
    env["PATH"] = f"{nogpu}{os.pathsep}{env['PATH']}"
    done = world.install(root, env)
    assert done.returncode == 0
    assert "no NVIDIA GPU found" in done.stdout
    assert not root.exists()


def test_unknown_pin_fails_the_fetch_and_the_server_still_starts(world, tmp_path):
    project = copy_project(tmp_path / "project", world)
    env = world.env(TRAINING_SERVER_TRAINER_PINS=world.pins(**{"simple-knn": "0123abc"}))
    with serve(project, env) as (url, output):
        health = httpx.get(f"{url}/health?recheck=true", timeout=60).json()
        assert health["preprocessing"]["available"] is True
        assert health["training"]["available"] is False
        with httpx.Client(base_url=url, timeout=30) as client:
            task = upload(client, auto_training="false").json()["task_id"]
            assert wait_status(client, task, "preprocessing_completed")["status"]
    text = output()
    assert "FAILED at step 'fetch simple-knn'" in text
    assert "has no commit 0123abc" in text
    assert "starting without training" in text
    status = json.loads((project / "third_party" / "trainer-install.json").read_text())
    assert status["failed_step"] == "fetch simple-knn"
    # The steps before the failing one are done and kept for the next start.
    assert status["steps"]["fetch diff-gaussian-rasterization"]["state"] == "done"


def test_health_explains_a_failed_install(world, tmp_path):
    project = copy_project(tmp_path / "project", world)
    env = world.env(TRAINING_SERVER_TRAINER_PINS=world.pins(**{"simple-knn": "0123abc"}))
    with serve(project, env) as (url, _):
        detail = httpx.get(f"{url}/health?recheck=true", timeout=60).json()["training"]["detail"]
    assert "failed at step 'fetch simple-knn'" in detail
    assert "restart ./serve.sh" in detail


# -- pure decisions ----------------------------------------------------------------------


def test_torch_choice_follows_the_driver():
    pair, why = inst.choose_torch((13, 0))
    assert (pair.torch, pair.torchvision) == ("2.11.0", "0.26.0")
    assert "tested with" in why
    pair, why = inst.choose_torch((12, 6))
    assert pair.torch == "2.7.1"
    assert "older than the CUDA 13.0 that torch 2.11.0 from PyPI is built for" in why
    assert inst.choose_torch((12, 4))[0].torch == "2.5.1"
    assert inst.choose_torch(None)[0].torch == "2.11.0"
    with pytest.raises(inst.StepFailed, match=r"supports CUDA up to 11\.8"):
        inst.choose_torch((11, 8))


def test_nvidia_smi_parsing_and_arch_list():
    gpu = inst.parse_nvidia_smi(
        "NVIDIA A100-SXM4-40GB, 550.54.15, 8.0\nNVIDIA GeForce RTX 4090, 550.54.15, 8.9\n",
        "Driver Version: 550.54.15      CUDA Version: 12.4",
    )
    assert gpu is not None
    assert gpu.cuda == (12, 4)
    assert inst.arch_list(gpu, {}) == "8.0;8.9"
    assert inst.arch_list(gpu, {"TORCH_CUDA_ARCH_LIST": "8.6"}) == "8.6"
    assert inst.parse_nvidia_smi("", "") is None


def test_reusable_torch_needs_a_recent_cuda_build():
    assert (
        inst.reusable_torch({"torch": "2.11.0+cu130", "build": "13.0", "cuda": True}, True) is None
    )
    assert "CPU-only" in inst.reusable_torch({"torch": "2.11.0+cpu", "build": None}, True)
    assert "older than 2.1" in inst.reusable_torch({"torch": "2.0.1", "build": "11.8"}, True)
    assert "sees no CUDA device" in inst.reusable_torch(
        {"torch": "2.5.1", "build": "12.4", "cuda": False}, True
    )
    assert "cannot import torch" in inst.reusable_torch({"error": "ModuleNotFoundError"}, True)


# -- helpers: a copy of the project run through serve.sh --------------------------------


def copy_project(dest: Path, world: World) -> Path:
    """The project's files serve.sh needs, with a .venv that is the test's interpreter."""
    dest.mkdir(parents=True)
    for path in REPO.glob("*.py"):
        shutil.copy2(path, dest / path.name)
    for name in ("serve.sh", "requirements.txt"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "static", dest / "static")
    shutil.copytree(
        REPO / "pipeline", dest / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy2(world.requirements, dest / "requirements-trainer.txt")
    venv_bin = dest / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv_bin / "python").chmod(0o755)
    shutil.copy2(REPO / "requirements.txt", dest / ".venv" / ".installed-requirements")
    return dest


class serve:
    """`./serve.sh` in a project copy until /health answers; killed (its group) on exit."""

    def __init__(self, project: Path, env: dict[str, str], **settings: str) -> None:
        self.project = project
        self.port = free_port()
        values = settings_env(project, trainer_path=None, **settings)
        self.env = {**env, **values, "PYTHONUNBUFFERED": "1"}
        self.log = project / "serve.log"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def __enter__(self):
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["bash", "serve.sh", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.project,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve.sh exited:\n{self.output()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return url, self.output
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server did not start:\n{self.output()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
