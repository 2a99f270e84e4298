"""GPT-NeoX's tools/datasets/preprocess_data.py, at the same path and with the same flags, run by `neox preprocess`.

    python tools/datasets/preprocess_data.py --input data.jsonl --output-prefix data/mydata \
        --tokenizer-type HFTokenizer --vocab-file 20B_tokenizer.json --append-eod --workers 4

Flags: --input (comma-separated), --jsonl-keys, --num-docs, --tokenizer-type, --vocab-file, --merge-file,
--append-eod, --ftfy, --output-prefix, --dataset-impl mmap, --workers, --log-interval. Writes
OUTPUT_PREFIX_{key}_document.bin/.idx. See `neox preprocess --help` for the flags neox adds.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from neox.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
