"""A stand-in for mount(8) on a daemon's PATH: a share mount (`mount -t TYPE
-o OPTS -- EXPORT MP`) becomes a bind mount of one directory plus a remount
with the level; every other call goes to the real mount(8), with a plain
`remount` turned into a bind remount (never the source's superblock). Used
where no NFS server or client can be: it exercises the daemon, not NFS.
Each call is appended to a log file when one is given."""

import os

_SCRIPT = """#!/bin/sh
{log}if [ "$1" = "-t" ]; then
  case ",$4," in *,ro,*) lvl=ro;; *) lvl=rw;; esac
  /usr/bin/mount --bind {src} "$7" && exec /usr/bin/mount -o remount,bind,$lvl,nosuid,nodev "$7"
fi
if [ "$1" = "-o" ]; then
  case "$2" in remount,bind*) ;; remount*) set -- -o "remount,bind${{2#remount}}" "$3" "$4";; esac
fi
exec /usr/bin/mount "$@"
"""


def install(bindir: str, src: str, calls: str = "") -> str:
    """Write bindir/mount binding src; calls: a file every call is logged to."""
    os.makedirs(bindir, exist_ok=True)
    path = os.path.join(bindir, "mount")
    with open(path, "w") as f:
        f.write(_SCRIPT.format(src=src, log=f'echo "$*" >> {calls}\n' if calls else ""))
    os.chmod(path, 0o755)
    return path
