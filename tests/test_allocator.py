"""The allocator choice of train.py / eval.py / bench.py (capsnets.utils.allocator): when it re-executes with
jemalloc preloaded, what it keeps of the user's environment, and the errors that name the fix."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from capsnets.errors import ConfigError
from capsnets.utils.allocator import (
    ACTIVE_ENV,
    JEMALLOC_CONF,
    MODE_ENV,
    PATH_ENV,
    allocator_env,
    find_jemalloc,
    without_allocator,
)


@pytest.fixture
def libdir(tmp_path):
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    return str(tmp_path)


def test_auto_preloads_the_jemalloc_it_finds_and_keeps_freed_pages(libdir):
    env = allocator_env({"PATH": "/bin"}, platform="linux", search_dirs=(libdir,))
    library = str(Path(libdir) / "libjemalloc.so.2")
    assert env["LD_PRELOAD"] == library and env[ACTIVE_ENV] == library
    assert env["MALLOC_CONF"] == JEMALLOC_CONF == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert env["PATH"] == "/bin"  # the rest of the environment goes along


def test_the_users_preloads_and_malloc_conf_are_kept(libdir):
    env = allocator_env(
        {"LD_PRELOAD": "/opt/libother.so", "MALLOC_CONF": "narenas:2"}, platform="linux", search_dirs=(libdir,)
    )
    assert env["LD_PRELOAD"] == f"{Path(libdir) / 'libjemalloc.so.2'}:/opt/libother.so"
    assert env["MALLOC_CONF"] == "narenas:2"


@pytest.mark.parametrize(
    "environ",
    [
        {MODE_ENV: "system"},  # opted out
        {ACTIVE_ENV: "/x/libjemalloc.so.2"},  # already re-executed: never loops
        {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},  # preloaded by the user
    ],
)
def test_nothing_to_do_when_opted_out_already_done_or_preloaded_by_the_user(libdir, environ):
    assert allocator_env(environ, platform="linux", search_dirs=(libdir,)) is None


def test_without_allocator_undoes_exactly_what_was_added(libdir):
    user = {"LD_PRELOAD": "/opt/libother.so", "PATH": "/bin"}
    env = allocator_env(user, platform="linux", search_dirs=(libdir,))
    assert without_allocator(env) == user
    assert without_allocator({**env, "MALLOC_CONF": "narenas:2"}) == {**user, "MALLOC_CONF": "narenas:2"}
    assert without_allocator(user) == user  # nothing added, nothing taken


def test_without_jemalloc_auto_goes_on_with_the_system_malloc_and_jemalloc_asks_for_it(tmp_path):
    assert allocator_env({}, platform="linux", search_dirs=(str(tmp_path),)) is None
    with pytest.raises(ConfigError, match="apt-get install libjemalloc2.*CAPSNETS_JEMALLOC"):
        allocator_env({MODE_ENV: "jemalloc"}, platform="linux", search_dirs=(str(tmp_path),))


def test_off_linux_auto_does_nothing_and_jemalloc_is_refused(libdir):
    assert allocator_env({}, platform="darwin", search_dirs=(libdir,)) is None
    with pytest.raises(ConfigError, match="Linux only"):
        allocator_env({MODE_ENV: "jemalloc"}, platform="darwin", search_dirs=(libdir,))


def test_a_misspelt_mode_or_a_missing_library_path_is_named(tmp_path):
    with pytest.raises(ConfigError, match="CAPSNETS_ALLOCATOR=jemaloc: choose one of auto, jemalloc, system"):
        allocator_env({MODE_ENV: "jemaloc"}, platform="linux")
    with pytest.raises(ConfigError, match="CAPSNETS_JEMALLOC=.*no such file"):
        find_jemalloc({PATH_ENV: str(tmp_path / "nope.so")})
    explicit = tmp_path / "custom-jemalloc.so"
    explicit.write_bytes(b"")
    assert find_jemalloc({PATH_ENV: str(explicit)}, search_dirs=()) == str(explicit)


def mapped_path(name: str) -> str | None:
    """The file this process maps for shared library ``name`` (loading it), or None."""
    soname = ctypes.util.find_library(name)
    if soname is None:
        return None
    ctypes.CDLL(soname)
    stem = soname.split(".so")[0] + ".so"  # libz.so.1 -> libz.so, the file may be libz.so.1.2.13
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if Path(path).name.startswith(stem):
            return path
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux's")
def test_use_fast_allocator_reexecutes_the_same_command_once_in_the_same_process_with_the_library_preloaded(
    tmp_path,
):
    # any shared library a bare Python does not load stands in for jemalloc: the mechanism is the same
    library = mapped_path("z")
    assert library is not None, "libz not found: the test needs one shared library to preload"
    code = (
        "import json, os, sys; from pathlib import Path; "
        "from capsnets.utils.allocator import use_fast_allocator; "
        "print('START', os.getpid(), flush=True); use_fast_allocator(); "
        f"print(json.dumps({{'pid': os.getpid(), 'argv': sys.argv[1:], 'active': os.environ.get('{ACTIVE_ENV}'), "
        "'conf': os.environ.get('MALLOC_CONF'), 'thp': os.environ.get('THP_MEM_ALLOC_ENABLE'), "
        f"'mapped': {library!r} in Path('/proc/self/maps').read_text()}}))"
    )
    env = {k: v for k, v in os.environ.items() if k not in (ACTIVE_ENV, "LD_PRELOAD", "MALLOC_CONF", MODE_ENV)}
    env[PATH_ENV] = library
    proc = subprocess.run(
        [sys.executable, "-c", code, "a", "b=1"], capture_output=True, text=True, env=env, check=True, timeout=120
    )
    lines = proc.stdout.splitlines()
    starts = [line for line in lines if line.startswith("START")]
    result = json.loads(lines[-1])
    assert len(starts) == 2 and len({s.split()[1] for s in starts}) == 1  # re-executed once, same PID
    assert result["pid"] == int(starts[0].split()[1]) and result["argv"] == ["a", "b=1"]
    assert result["active"] == library and result["mapped"]
    assert result["conf"] == JEMALLOC_CONF and result["thp"] == "1"
    # opted out: one start, nothing preloaded
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env, MODE_ENV: "system"}, check=True
    )
    result = json.loads(proc.stdout.splitlines()[-1])
    assert proc.stdout.count("START") == 1 and result["active"] is None and not result["mapped"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux's")
def test_the_launcher_runs_a_command_under_the_allocator_and_passes_its_exit_status():
    library = mapped_path("z")
    assert library is not None, "libz not found: the test needs one shared library to preload"
    env = {k: v for k, v in os.environ.items() if k not in (ACTIVE_ENV, "LD_PRELOAD", "MALLOC_CONF", MODE_ENV)}
    code = (
        "import os, sys; from pathlib import Path; "
        f"print(os.environ['LD_PRELOAD'], {library!r} in Path('/proc/self/maps').read_text()); sys.exit(3)"
    )
    launcher = [sys.executable, "-m", "capsnets.utils.allocator"]
    proc = subprocess.run(
        [*launcher, sys.executable, "-c", code], capture_output=True, text=True, env={**env, PATH_ENV: library}
    )
    assert proc.returncode == 3 and proc.stdout.split() == [library, "True"]
    proc = subprocess.run(launcher, capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "usage: python -m capsnets.utils.allocator COMMAND" in proc.stderr
