"""GPT-NeoX's tools/datasets/preprocess_data_with_mask.py, same path and flags, run by `neox preprocess`.

    python tools/datasets/preprocess_data_with_mask.py --input data.jsonl --output-prefix data/ft \
        --tokenizer-type HFTokenizer --vocab-file 20B_tokenizer.json --append-eod --mask-before-token 0,1,1270

writes OUTPUT_PREFIX_text_document and OUTPUT_PREFIX_label_document, where every token up to and including the
first occurrence of the --mask-before-token ids is -100 (set train_data_paths / label_data_paths to them).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from neox.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
