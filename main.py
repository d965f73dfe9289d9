"""Test whether one model was derived from another.

    python main.py --base_model_id meta-llama/Llama-2-7b-hf --ft_model_id lmsys/vicuna-7b-v1.5 --stat csu --align
    python main.py --demo
"""

import sys

from tracing.cli import main

if __name__ == "__main__":
    sys.exit(main())
