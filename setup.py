"""sharedd: share daemon (sharedd) and client mount daemon (sharedd-mountd)."""

from setuptools import find_packages, setup

from sharedd import __version__

setup(
    name="sharedd",
    version=__version__,
    description="Shared file systems for Linux hosts: a share daemon on D-Bus "
                "and a client mount daemon",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["sharedd", "sharedd.*", "mountd", "mountd.*"]),
    install_requires=["dbus-next", "pyinotify", "netaddr", "sdnotify", "pyroute2"],
    entry_points={
        "console_scripts": [
            "sharedd = sharedd.cli:main",
            "sharectl = sharedd.sharectl:main",
            "sharedd-mountd = mountd.cli:main",
        ],
    },
)
