"""Test whether one model was derived from another.

    python main.py --base_model_id meta-llama/Llama-2-7b-hf --ft_model_id lmsys/vicuna-7b-v1.5 --stat csu --align
    python main.py --demo
"""

from tracing.cli import main
from tracing.errors import leave

if __name__ == "__main__":
    leave(main())
