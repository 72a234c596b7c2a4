"""A private nginx for tests and benchmarks: where its binary is and the configuration frame
every use shares (no daemon, one worker, every path under a private prefix).

It has no dependencies, so ``bench/`` imports it as well as the tests.
"""

from __future__ import annotations

import os
import pathlib
import shutil

#: nginx's binary, or ``None`` where it is not installed (``.ci/run`` installs nginx-light);
#: Debian puts it in /usr/sbin, which an unprivileged PATH may not have.
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def nginx_conf(
    prefix: pathlib.Path, http: str, *, log_level: str = "info", connections: int = 64
) -> str:
    """A whole ``nginx.conf`` running in the foreground with every file under ``prefix``;
    ``http`` is the body of its ``http`` block (the ``server`` blocks and maps of the use)."""
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log {log_level};
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http}
}}
"""
