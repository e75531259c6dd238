"""Peak RSS of ``prunekit.oneshot`` on a path does not grow with depth (issue 11's memory target).

Random-weight Llama checkouts of two depths are written into a temp dir (bf16 safetensors, one shard per block),
then each is pruned by ``prunekit.oneshot(path, ...)`` in a fresh subprocess that reports its peak RSS from the
end of its imports on (Linux ``VmHWM`` after a ``clear_refs`` reset; ``ru_maxrss`` elsewhere). A
control holds every tensor of the checkout in memory (``safetensors.torch.load_file``) during the same run, so
the run shows both the streamed growth and what the same measurement reads when the whole model is resident.

    python bench/oneshot_memory.py                       # hidden 2048, 6 vs 12 layers (the issue's sizes)
    python bench/oneshot_memory.py --hidden 512 --layers 4 8 --intermediate 2048

Target: ``streamed_growth_bytes <= 0.25 * added_layer_bytes``. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, re, resource, sys, torch
mode, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
import prunekit
ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
config = {"method": "magnitude", "target_sparsity": 0.5, "nsamples": 2, "seqlen": 64, "device": "cpu"}

def peak():  # VmHWM since the reset below (Linux); the process's ru_maxrss elsewhere
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

try:  # the imports' transient peak is the same for every run and would hide what the run itself needs
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
if mode == "stream":
    prunekit.oneshot(path, ids, config, output_dir=out, progress=False)
else:  # the control: every tensor of the checkout resident (as if the model were loaded whole), same run
    from pathlib import Path
    from safetensors.torch import load_file
    held = [{k: v.clone() for k, v in load_file(f).items()} for f in sorted(Path(path).glob("*.safetensors"))]
    prunekit.oneshot(path, ids, config, output_dir=out, progress=False)
print(json.dumps({"peak_rss_bytes": peak()}))
"""


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int = 32000) -> object:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 512),
                       vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False,
                       dtype="bfloat16")


def write_random_checkout(directory: Path, layers: int, hidden: int, intermediate: int,
                          vocab: int = 32000) -> int:
    """A random bf16 Llama checkout, one shard per block (written block by block); returns one block's bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = llama_config(layers, hidden, intermediate, vocab)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    names = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    parts: dict[str, list[tuple[str, tuple]]] = {}
    for name, shape in names:
        part = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        parts.setdefault(part, []).append((name, shape))
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, total, block_bytes = {}, 0, 0
    for k, (part, entries) in enumerate(parts.items(), 1):
        shard = f"model-{k:05d}-of-{len(parts):05d}.safetensors"
        tensors = {}
        for name, shape in entries:
            t = (torch.randn(shape, generator=gen) * (0.02 if len(shape) == 2 else 0.0)
                 + (0.0 if len(shape) == 2 else 1.0)).to(torch.bfloat16)
            tensors[name] = t
            weight_map[name] = shard
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        total += size
        if part != "rest":
            block_bytes = size
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(directory)
    return block_bytes


def child_rss(mode: str, path: Path, out: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, str(path), str(out)], check=True,
                          capture_output=True, text=True)
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def measure(hidden: int, layers: tuple[int, int], intermediate: int, vocab: int = 32000,
            control: bool = True, repeats: int = 1) -> dict:
    """Write both checkouts, prune each in a subprocess, and compare the peak RSS growth to the added bytes.

    With ``repeats`` > 1 each streamed size runs that many times, interleaved (small, large, small, ...), and its
    lowest peak counts: identical runs differ only by allocator and page-cache noise; the lowest is least
    disturbed.
    """
    if repeats < 1:
        raise ValueError(f"repeats: got {repeats}; allowed >= 1")
    small, large = layers
    with tempfile.TemporaryDirectory(prefix="oneshot-memory-") as tmp:
        root = Path(tmp)
        block = write_random_checkout(root / "small", small, hidden, intermediate, vocab)
        write_random_checkout(root / "large", large, hidden, intermediate, vocab)
        runs: dict[str, list[int]] = {"small": [], "large": []}
        for k in range(repeats):
            for n in runs:
                runs[n].append(child_rss("stream", root / n, root / f"out-{n}-{k}"))
        stream = {n: min(v) for n, v in runs.items()}
        result = {
            "hidden": hidden, "intermediate": intermediate, "vocab": vocab, "layers": [small, large],
            "block_bytes": block, "added_layer_bytes": block * (large - small),
            "streamed_rss_bytes": [stream["small"], stream["large"]], "repeats": repeats,
            "streamed_rss_runs": runs,
            "streamed_growth_bytes": stream["large"] - stream["small"],
        }
        result["growth_over_added"] = result["streamed_growth_bytes"] / result["added_layer_bytes"]
        result["target_met"] = result["growth_over_added"] <= 0.25
        if control:
            load = {n: child_rss("load", root / n, root / f"control-{n}") for n in ("small", "large")}
            result["whole_load_rss_bytes"] = [load["small"], load["large"]]
            result["whole_load_growth_over_added"] = (load["large"] - load["small"]) / result["added_layer_bytes"]
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, nargs=2, default=(6, 12))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--no-control", action="store_true", help="skip the whole-model from_pretrained control")
    p.add_argument("--repeats", type=int, default=1, help="streamed runs per size; the lowest peak counts")
    args = p.parse_args(argv)
    import torch
    import transformers

    if args.repeats < 1:
        p.error(f"--repeats: got {args.repeats}; allowed >= 1")
    result = measure(args.hidden, tuple(args.layers), args.intermediate, args.vocab, not args.no_control,
                     args.repeats)
    result.update(machine=platform.machine(), python=platform.python_version(), torch=torch.__version__,
                  transformers=transformers.__version__, protocol="magnitude 50%, 2 x 64 calibration tokens, "
                  "cpu, bf16 checkout, peak RSS (VmHWM) of a fresh subprocess per run, from after its imports")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
