"""neox's older path for GPT-NeoX's preprocess_data.py (tools/datasets/preprocess_data.py is the one GPT-NeoX has).

    python tools/preprocess_data.py --input data.jsonl --output-prefix data/mydata \
        --tokenizer-type HFTokenizer --vocab-file 20B_tokenizer.json --append-eod --workers 4

Flags are the same (--input, --jsonl-keys/--json-keys, --tokenizer-type, --vocab-file, --merge-file,
--append-eod, --output-prefix, --dataset-impl mmap, --workers, --ftfy, --log-interval, --num-docs); the
--mask-before-token flag of preprocess_data_with_mask.py is accepted too. See `neox preprocess --help`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
