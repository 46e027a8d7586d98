"""nox sessions: tests (default), lint, typecheck, bench."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CPU, tiny backend and the full-size architectures at 64x64)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the sources, tests and benchmarks."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over src/."""
    session.install("-e", ".", "mypy")
    session.run("mypy", "src")


@nox.session
def bench(session: nox.Session) -> None:
    """Speed and memory benchmarks; results land in benchmarks/results/."""
    session.install("-e", ".")
    if session.posargs:
        session.run("python", "-m", "benchmarks.run", *session.posargs)
        return
    session.run("python", "-m", "benchmarks.run", "--backend", "tiny", "--name", "tiny-cpu", "--accel", "compile")
    for backend in ("tiny-sdxl", "tiny-sd3"):  # the new versions' code paths, side by side with their naive twins
        session.run("python", "-m", "benchmarks.run", "--backend", backend, "--steps", "10", "--loop-steps", "5",
                    "--repeats", "2", "--name", f"{backend}-cpu")
    session.run("python", "-m", "benchmarks.batching", "--backend", "tiny", "--name", "batching-tiny-cpu")
    session.run("python", "-m", "benchmarks.run", "--arch", "sd14", "--sample-size", "8", "--batch", "3",
                "--steps", "10", "--loop-steps", "3", "--repeats", "2", "--name", "sd14-64px-cpu")
