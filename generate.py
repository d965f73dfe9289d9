"""Sample texts from models for `main.py --dataset generated`.

    python generate.py --model_id results/demo/base --model_id results/demo/derived --n 32 --max_new_tokens 64
    python generate.py --config config/demo.yaml --save results/generated
"""

import sys

from tracing.generate import main

if __name__ == "__main__":
    sys.exit(main())
