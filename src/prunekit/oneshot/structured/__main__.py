"""``python -m prunekit.oneshot.structured``: the structured command with the flags of ``prunekit oneshot``."""
import sys

from prunekit.oneshot.structured.cli import main

sys.exit(main())
