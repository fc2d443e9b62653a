"""Extract steering vectors into a `steering_vectors.pt` file: SAE decoder directions or contrastive prompts.

    # SAE features (hub repo id or a local directory with the same layout), for Llama-3.1-8B-Instruct:
    python extract_steering_vectors.py --sae-source andyrdt/saes-llama-3.1-8b-instruct \\
        --features 15:21576 19:93 --model meta-llama/Llama-3.1-8B-Instruct --output steering_vectors_llama31_8b.pt
    # Find the features that fire most on a text (printed; with --output, also written as vectors):
    python extract_steering_vectors.py --sae-source andyrdt/saes-llama-3.1-8b-instruct --layers 15 \\
        --find "The Eiffel Tower in Paris" --top-k 10 --model meta-llama/Llama-3.1-8B-Instruct
    # Contrastive concepts (YAML of positive/negative texts) for the embedded model, at each concept's layer:
    python extract_steering_vectors.py --contrastive concepts.yaml --output steering_vectors.pt
    # ... or at given layers (one layer: named after the concept; several: "{concept}_L{layer}"):
    python extract_steering_vectors.py --contrastive concepts.yaml --layers 6 9 12 --output sweep_vectors.pt

SAE layouts (detected from the files; `--sae-format` forces one; details in saes.py): andyrdt
(dictionary_learning), llamascope, saelens (every version's cfg.json), sparsify (EleutherAI) and
goodfire. A layer is the residual stream after that decoder layer: an SAE on resid_post L is
layer L, one on resid_pre L is layer L-1; SAEs on other hook points are used only when
`--hook-point` names them. Only the needed elements are read. Vectors are scaled to unit
length; each SAE vector records its source, file, format and hook point in its metadata.

The output records the model's typical residual norm after every layer it has vectors for
(measured on a neutral text; `--skip-norms` to leave it out). An existing output file is
kept and merged into (same name: replaced) unless `--overwrite`. Errors (OS errors too):
one line on stderr, exit code 2, and the output file is left as it was.
"""

import sys

from llm_steering.extract import main

if __name__ == "__main__":
    sys.exit(main())
