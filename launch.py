"""Fan model pairs from a YAML list out to Slurm (or local processes) through submitit.

    python launch.py --config config/demo.yaml --cluster local --save results/demo_runs --stat csu --wait
    python launch.py --config config/llama7b.yaml --save results/llama7b --stat csu --align --dry_run
    python launch.py --config config/llama7b.yaml --save results/llama7b --status
    python launch.py --config config/llama7b.yaml --save results/llama7b --stat csu --wait --max_wait 3600
    python -m tracing.aggregate results/llama7b --truth config/llama7b_tree.yaml

Flags not listed here (--stat, --align, --dataset, ...) are main.py's and go to every job unchanged;
they override the YAML's `main:` block. The Hugging Face token comes from $HF_TOKEN, never a flag.
"""

import sys

from tracing.launcher import main

if __name__ == "__main__":
    sys.exit(main())
