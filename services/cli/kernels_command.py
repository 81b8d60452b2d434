"""``splitserve kernels``: build the CPU kernels ahead of time, or show which build loads.

``kernels build --portable`` compiles every portable ISA level of this
architecture (the container image runs it at build time into
``/opt/splitserve-cache``, so a read-only root fs needs no compiler at
start); ``kernels build`` alone compiles the ``-march=native`` build for this
CPU. ``kernels show`` prints the library a pod on this CPU would load, or
says it would use the torch path.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("kernels", help="build the CPU kernels ahead of time, or show which loads",
                                   description="Build the C kernels of the CPU backend, or show which build loads.")
    actions = parser.add_subparsers(dest="kernels_action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="compile the CPU kernels into the cache dir",
                               description="Compile the CPU kernels (needs a C compiler: $CC, else cc).")
    build.add_argument("--portable", action="store_true",
                       help="every portable ISA level of this architecture (x86-64-v2/v3/v4, armv8-a) "
                            "instead of -march=native")
    build.add_argument("--cache-dir", type=Path, default=None,
                       help="cache dir (default $SPLITSERVE_CACHE_DIR, else ~/.cache/splitserve)")
    build.set_defaults(handler=run_build)
    show = actions.add_parser("show", help="print the library this CPU would load",
                              description="Print the prebuilt CPU kernel library this CPU would load.")
    show.add_argument("--cache-dir", type=Path, default=None, help="cache dir (default as for build)")
    show.set_defaults(handler=run_show)


def run_build(args: argparse.Namespace) -> int:
    import subprocess

    from splitserve.kernels.cpu_library import build_library, build_portable

    try:
        paths = build_portable(args.cache_dir) if args.portable else [build_library(args.cache_dir)]
    except (OSError, ValueError, subprocess.CalledProcessError) as exc:  # no cc, read-only dir, compile error
        print(f"splitserve kernels build: {getattr(exc, 'stderr', None) or exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from splitserve.kernels.cpu_library import default_cache_dir, find_library

    found = find_library(args.cache_dir)
    if found is None:
        print(f"no prebuilt CPU kernels for this CPU in {args.cache_dir or default_cache_dir()}: "
              f"a pod builds them on first use (needs a C compiler) or uses the torch path", file=sys.stderr)
        return 1
    print(found)
    return 0
