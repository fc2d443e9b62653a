"""Extract steering vectors into a `steering_vectors.pt` file: SAE decoder directions or contrastive prompts.

The usage, with examples: `python extract_steering_vectors.py --help` (llm_steering/extract.py).
"""

import sys

from llm_steering.extract import main

if __name__ == "__main__":
    sys.exit(main())
