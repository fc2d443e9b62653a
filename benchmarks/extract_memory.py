"""Peak memory of extracting a few SAE features (or finding features) from a ~1 GB SAE file, against importing torch alone.

    .venv/bin/python benchmarks/extract_memory.py                       # andyrdt .pt layout, 1 GB, 3 features
    .venv/bin/python benchmarks/extract_memory.py --layout llamascope   # safetensors layout
    .venv/bin/python benchmarks/extract_memory.py --find                # find the top 10 features of 64 tokens
    .venv/bin/python benchmarks/extract_memory.py --keep /tmp/sae_bench # reuse the written SAE next time

It writes a random SAE in the chosen layout (encoder + decoder, d_model 1024, d_sae 131072:
2 x 512 MiB of float32) into a temporary directory, then runs two fresh processes and
reads their peak resident memory (VmHWM): one that only imports torch, one that imports
llm_steering.saes and extracts the features (with --find: runs saes.top_features on 64 random
hidden states, the encoder read in 64 MiB chunks). It prints both and their ratio
(target: under 2x), and checks the extracted columns (or the found features) against the
written ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
D_MODEL, D_SAE = 1024, 131072

CHILD_TORCH = """
import torch
print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])
"""

CHILD_EXTRACT = """
import sys
from llm_steering import saes
vecs = saes.extract_sae_features({source!r}, {features!r})
import torch
ref = torch.load({ref!r}, weights_only=True)
for v in vecs:
    want = ref[v.name]
    assert torch.allclose(v.vector, want / want.norm(), atol=1e-6), v.name
print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])
"""


CHILD_FIND = """
import sys, time
import torch
from llm_steering import saes
src = saes.SAESource.open({source!r})
enc = saes.load_encoder(src, saes.locate_sae(src, {layer}))
hidden = torch.randn(64, {d_model}, generator=torch.Generator().manual_seed(1))
t0 = time.perf_counter()
found = saes.top_features(enc, hidden, {layer}, k=10)
took = time.perf_counter() - t0
want = torch.load({ref!r}, weights_only=True)["find"].tolist()
assert [f.index for f in found] == want, ([f.index for f in found], want)
print(f"took {{took:.2f}} s", file=sys.stderr)
print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])
"""


def write_sae(root: Path, layout: str, layer: int, features: list[int]) -> None:
    """Write a ~1 GB SAE for `layer` in `layout`, and the reference columns for `features`."""
    import torch

    g = torch.Generator().manual_seed(0)
    enc = torch.randn(D_SAE, D_MODEL, generator=g)
    dec = torch.randn(D_MODEL, D_SAE, generator=g)  # [d_model, d_sae]
    hidden = torch.randn(64, D_MODEL, generator=torch.Generator().manual_seed(1))  # as CHILD_FIND makes it
    top = torch.relu(hidden @ enc.T).mean(0).topk(10).indices  # the plain computation, all at once
    torch.save({**{f"L{layer}F{i}": dec[:, i].clone() for i in features}, "find": top}, root / "reference.pt")
    if layout == "andyrdt":
        folder = root / f"resid_post_layer_{layer}" / "trainer_1"
        folder.mkdir(parents=True)
        # dictionary_learning's AutoEncoder (relu(encoder(x - bias))), as trainSAE saves it
        torch.save({"encoder.weight": enc, "encoder.bias": torch.zeros(D_SAE), "decoder.weight": dec,
                    "bias": torch.zeros(D_MODEL)}, folder / "ae.pt")
        (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "layer": layer}}))
    else:
        from safetensors.torch import save_file

        folder = root / f"Llama3_1-8B-Base-L{layer}R-8x" / "checkpoints"
        folder.mkdir(parents=True)
        save_file({"encoder.weight": enc, "encoder.bias": torch.zeros(D_SAE), "decoder.weight": dec,
                   "decoder.bias": torch.zeros(D_MODEL)}, str(folder / "final.safetensors"))
        (folder.parent / "hyperparams.json").write_text('{"norm_activation": "inference", "act_fn": "relu"}')


def peak_kib(code: str) -> int:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"benchmark child failed:\n{out.stderr[-2000:]}")
    for line in out.stderr.splitlines():
        if line.startswith("took "):
            print(f"find: {line}")
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("andyrdt", "llamascope"), default="andyrdt", help="SAE file layout to write")
    parser.add_argument("--features", type=int, nargs="+", default=[5, 70000, 131071], help="feature indices to extract")
    parser.add_argument("--find", action="store_true", help="measure finding the top 10 features of 64 tokens instead")
    parser.add_argument("--keep", help="directory to write the SAE into and keep (default: a temporary one, removed)")
    args = parser.parse_args()

    layer = 15
    with tempfile.TemporaryDirectory(prefix="sae_bench_") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "reference.pt").exists():
            write_sae(root, args.layout, layer, args.features)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "reference.pt")
        torch_only = peak_kib(CHILD_TORCH)
        if args.find:
            what = "find top 10 of 64 tokens"
            extract = peak_kib(CHILD_FIND.format(root=str(ROOT), source=str(root), ref=str(root / "reference.pt"),
                                                 layer=layer, d_model=D_MODEL))
        else:
            what = f"extract {len(args.features)} features"
            extract = peak_kib(CHILD_EXTRACT.format(root=str(ROOT), source=str(root), ref=str(root / "reference.pt"),
                                                    features=[(layer, i) for i in args.features]))
    print(f"SAE file(s): {size / 2**30:.2f} GiB ({args.layout}), features {args.features}")
    print(f"peak RSS, import torch only:        {torch_only / 1024:7.1f} MiB")
    print(f"peak RSS, {what + ':':<25} {extract / 1024:7.1f} MiB")
    print(f"ratio: {extract / torch_only:.2f}x (target < 2x)")


if __name__ == "__main__":
    main()
