"""The process's CPU memory allocator: jemalloc that keeps the pages it frees, when the machine has it.

Capsule layers allocate and free vote-sized tensors of tens of MB several times per step (em_caps_small's
ConvCaps2 votes: 75 MB at batch 32). glibc's malloc serves every block above 32 MB with a fresh ``mmap``
and hands it back with ``munmap`` on free, so each step faults all of that memory in again and the
kernel zeroes it page by page. jemalloc told never to return freed pages (``MALLOC_CONF``
``dirty_decay_ms:-1,muzzy_decay_ms:-1``, the setting Intel's PyTorch CPU tuning guide gives) reuses them
instead. Training steps on this project's 2-core development machine, one run each (``scripts/bench.py``
reports which allocator its figures ran under):

* em_caps, smallNORB 32x32, batch 32: 6.3-7.1 s per step (4.7-6.5 s of it system time) -> 2.0-2.6 s;
* em_caps_small, batch 32: 0.55-0.76 s -> 0.33-0.40 s, with a lower peak RSS (1.68 vs 1.78 GB);
* dr_caps, batch 128: 1.7-1.9 s -> 1.5-1.6 s;
* jemalloc with its default decay (pages returned after 10 s): 1.57 s for em_caps_small, worse than glibc.

``make bench`` (medians of 3 repeats, each case under both allocators in one run): 1.26-1.47x the training
speed on every case (em_caps 10.6 -> 15.5 img/s), at a higher peak RSS for em_caps (7.9 GB; 5.7 GB in an
earlier glibc run).

A process can only choose its allocator when it starts (``LD_PRELOAD``), so ``train.py``, ``eval.py`` and
``scripts/bench.py`` call :func:`use_fast_allocator` before anything imports torch (``make test`` runs
pytest through ``python -m capsnets.utils.allocator``): it re-executes the same command line once (same
PID, so signals, Hydra and Lightning's DDP launcher see one process; children inherit the environment)
with jemalloc preloaded. Settings, from the environment:

* ``CAPSNETS_ALLOCATOR``: ``auto`` (default: jemalloc when found, else the system's malloc),
  ``jemalloc`` (an error naming the fix when it is not found), ``system`` (no re-execution);
* ``CAPSNETS_JEMALLOC``: the library's path, else it is looked for in the usual places
  (``libjemalloc.so.2`` / ``libjemalloc.so`` under the conda/venv prefix and the system library directories);
  Debian/Ubuntu: ``apt-get install libjemalloc2``; conda: ``conda install jemalloc``;
* ``MALLOC_CONF``: set by the user, it is kept as it is.

Also set here, for the same reason: ``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages for PyTorch's
allocations under the system's malloc, read when torch loads; export 0 to opt out).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from capsnets.errors import ConfigError

MODE_ENV = "CAPSNETS_ALLOCATOR"
PATH_ENV = "CAPSNETS_JEMALLOC"
ACTIVE_ENV = "CAPSNETS_ALLOCATOR_ACTIVE"  # set in the re-executed process: the library it preloaded
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # keep freed pages for reuse: no page faults after step 1
MODES = ("auto", "jemalloc", "system")
NAMES = ("libjemalloc.so.2", "libjemalloc.so")
SYSTEM_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
)


def find_jemalloc(environ: Mapping[str, str], search_dirs: tuple[str, ...] | None = None) -> str | None:
    """The jemalloc library to preload: ``CAPSNETS_JEMALLOC`` if set, else the first found, else None."""
    explicit = environ.get(PATH_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise ConfigError(
                f"{PATH_ENV}={explicit}: no such file. Point it at libjemalloc.so.2 "
                f"(Debian/Ubuntu: apt-get install libjemalloc2), or unset it to search the usual places"
            )
        return explicit
    if search_dirs is None:
        prefixes = [environ.get("CONDA_PREFIX"), sys.prefix, sys.base_prefix]
        search_dirs = (*(str(Path(p) / "lib") for p in prefixes if p), *SYSTEM_DIRS)
    for directory in search_dirs:
        for name in NAMES:
            candidate = Path(directory) / name
            if candidate.is_file():
                return str(candidate)
    return None


def allocator_env(
    environ: Mapping[str, str], *, platform: str = sys.platform, search_dirs: tuple[str, ...] | None = None
) -> dict[str, str] | None:
    """The environment to re-execute with (jemalloc preloaded), or None to go on as the process is."""
    mode = environ.get(MODE_ENV, "auto")
    if mode not in MODES:
        raise ConfigError(
            f"{MODE_ENV}={mode}: choose one of {', '.join(MODES)} (auto: jemalloc when the machine has it)"
        )
    if mode == "system" or ACTIVE_ENV in environ or "jemalloc" in environ.get("LD_PRELOAD", ""):
        return None  # asked not to, already re-executed, or preloaded by the user
    if not platform.startswith("linux"):
        if mode == "jemalloc":
            raise ConfigError(f"{MODE_ENV}=jemalloc: preloading the allocator is supported on Linux only")
        return None
    library = find_jemalloc(environ, search_dirs)
    if library is None:
        if mode == "jemalloc":
            raise ConfigError(
                f"{MODE_ENV}=jemalloc but no libjemalloc was found: install it (Debian/Ubuntu: apt-get install "
                f"libjemalloc2; conda: conda install jemalloc), set {PATH_ENV}=/path/to/libjemalloc.so.2, "
                f"or set {MODE_ENV}=auto to go on with the system's malloc"
            )
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[ACTIVE_ENV] = library
    return env


def without_allocator(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without what :func:`allocator_env` added (a process started with it chooses again)."""
    env = dict(environ)
    library = env.pop(ACTIVE_ENV, None)
    if library is not None:
        preload = [p for p in env.pop("LD_PRELOAD", "").split(":") if p and p != library]
        env.update({"LD_PRELOAD": ":".join(preload)} if preload else {})
        if env.get("MALLOC_CONF") == JEMALLOC_CONF:
            del env["MALLOC_CONF"]
    return env


def loaded_allocator() -> str:
    """``jemalloc`` when this process has jemalloc mapped, else ``system``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "jemalloc" in maps else "system"


def use_fast_allocator(command: list[str] | None = None, environ: MutableMapping[str, str] = os.environ) -> None:
    """Call before torch is imported: sets THP_MEM_ALLOC_ENABLE and re-executes this command line once with
    jemalloc preloaded (see the module docstring); returns in the re-executed process, or where nothing is
    to be done. With ``command``, executes that command instead, under the same allocator, and never returns."""
    environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    env = allocator_env(environ)
    sys.stdout.flush()
    sys.stderr.flush()
    if command is not None:
        os.execvpe(command[0], command, env or dict(environ))
    if env is not None:
        os.execve(sys.executable, list(sys.orig_argv), env)


def main() -> None:
    """``python -m capsnets.utils.allocator COMMAND [ARGS...]``: run a command under the allocator ``train.py``
    uses (``make test`` runs pytest so, whose in-process tests then allocate as training does)."""
    if len(sys.argv) < 2:
        sys.exit("usage: python -m capsnets.utils.allocator COMMAND [ARGS...]")
    use_fast_allocator(sys.argv[1:])


if __name__ == "__main__":
    main()
