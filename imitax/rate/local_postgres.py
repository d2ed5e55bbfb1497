"""A throwaway PostgreSQL server on loopback, for the tests and the benchmark of rating studies.

``initdb`` refuses to run as root, so as root the server runs as the ``postgres`` system user
(through ``runuser``), in a temporary data directory it owns. The server listens on 127.0.0.1 at
a free port, trusts local connections (nothing else can reach it) and is stopped and deleted on
exit. :func:`fresh_database` gives each user an empty database of its own on any server.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator

import sqlalchemy

from imitax.rate.models import database_url


def server_binaries() -> str | None:
    """The directory holding initdb and pg_ctl (Debian's newest, else the PATH's), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(durable: bool = False) -> Iterator[str]:
    """Runs a new server for the duration of the block; yields its URL.

    ``durable=False`` turns off fsync (tests: nothing to keep); ``True`` keeps PostgreSQL's defaults.
    """
    bin_dir = server_binaries()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    as_user: list[str] = []
    root = tempfile.mkdtemp(prefix="imitax-postgres-")
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(root, "data"), _free_port()
    options = f"-h 127.0.0.1 -p {port} -k {root} -c max_connections=300"
    if not durable:
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    run = lambda *args: subprocess.run([*as_user, *args], check=True, capture_output=True, text=True)
    try:
        run(f"{bin_dir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync")
        run(f"{bin_dir}/pg_ctl", "-D", data, "-o", options, "-l", os.path.join(root, "log"), "-w", "-t", "60", "start")
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            run(f"{bin_dir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(e.cmd)} failed: {(e.stderr or e.stdout).strip()}") from None
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new empty database on the server at ``server_url``, dropped afterwards; yields its URL."""
    url = sqlalchemy.make_url(database_url(server_url))
    name = f"imitax_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')  # a generated identifier, not input
        yield url.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
