"""``python -m hybridtrt.plugins build [--tensorrt-root DIR] [--build-dir DIR] [--cuda-archs "89;90"]``."""

from __future__ import annotations

import sys

from hybridtrt.plugins.build import main

if __name__ == "__main__":
    sys.exit(main())
