"""neox's older path for GPT-NeoX's merge_datasets.py (tools/datasets/merge_datasets.py is the one GPT-NeoX has).

    python tools/merge_datasets.py --input DIR --output-prefix OUT

merges every PREFIX.bin/.idx pair in DIR (sorted by name) into OUT.bin/.idx. See `neox data merge --help`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "merge", *sys.argv[1:]]))
