"""pytest-benchmark micro-benchmarks (not part of the test suite, whose testpaths is tests/).

    .venv/bin/python -m pytest benchmarks --benchmark-enable        # pyproject disables benchmarks by default
    SYMMPO_BENCH_SIZE=accept .venv/bin/python -m pytest benchmarks --benchmark-enable -k head

``SYMMPO_BENCH_SIZE``: ``small`` (default, a minute or two), ``accept`` (issue 2's CPU point,
N=4096 D=1024 V=32000 fp32).  Peak extra memory goes into each benchmark's ``extra_info``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
