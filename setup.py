"""Packaging for xenddev: a Xend-style device controller framework on Twisted."""

from setuptools import find_packages, setup

setup(
    name="xenddev",
    version="0.1.0",
    description="Xend-style Xen device controllers on Twisted, with the "
    "driver-domain protocol and an embedded xenstored",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The packages live at the root of the checkout, and saying so makes the
    # layout "simple" for setuptools: an editable install then puts a
    # directory holding twisted/plugins/ on sys.path (the checkout in the
    # default and compat modes, a link tree under build/ in strict mode),
    # which is where Twisted's plugin loader looks for plugin directories.
    # Without it the default mode installs an import hook instead, and
    # twistd lists neither xenddev nor xenstored.
    package_dir={"": "."},
    packages=[
        # xenddev.controllers is the top-level controllers/ folder, linked
        # into xenddev/ (find_packages follows the link): installed under
        # xenddev's name, site-packages gets no generic "controllers".
        *find_packages(include=["xenddev", "xenddev.*"]),
        "twisted.plugins",
    ],
    package_data={"twisted.plugins": ["*.py"]},
    entry_points={"console_scripts": ["xenddev = xenddev.cli:main"]},
    install_requires=[
        # [tls]: pyOpenSSL and service_identity, for Twisted's TLS (the pool's
        # https:// etcd members, the xmlrpc.tls listener); cryptography with them
        # reads the certificates and keys the daemon is given.
        "twisted[tls]>=24.3.0",
        "zope.interface>=6.0",
        # Pinned: we reuse its exception classes and opcode numbering and work
        # around bugs that exist in exactly this release.
        "pyxs==0.4.1",
        "pyyaml>=6.0",
        "attrs>=23.1.0",
    ],
    extras_require={
        "test": [
            "hypothesis>=6.100",
            "coverage>=7.4",
            "ruff>=0.5",
            "mypy>=1.10",
            "mypy-zope>=1.0.5",
            "types-PyYAML",
        ],
        "bench": [],
    },
)
