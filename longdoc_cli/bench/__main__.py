"""The child process of one measurement: ``python -m longdoc_cli.bench --child JOB_JSON``."""

import json
import sys

from ..runtime import return_freed_memory, tune_memory

if len(sys.argv) == 3 and sys.argv[1] == "--child":
    tune_memory()
    if json.loads(sys.argv[2]).get("mode") == "infer":
        return_freed_memory()
    from .child import child_main

    child_main(sys.argv[2])
else:
    sys.exit("usage: python -m longdoc_cli.bench --child JOB_JSON (use `longdoc bench` instead)")
