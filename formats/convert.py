"""
formats/convert.py: what you train here, used elsewhere, and what others trained, used here. Our
adapter file (train.py's adapters.pt) goes out as a peft LoRA folder (transformers, peft, vLLM) or
a llama.cpp control vector; a peft folder or a control vector (llama.cpp's, repeng's) comes in.

    python formats/convert.py --init smollm2-135m --adapters out/weight-listops/adapters.pt --to-peft out/peft
    python formats/convert.py --init smollm2-135m --adapters A.pt --to-cvec out/listops.gguf
    python formats/convert.py --init smollm2-135m --from-peft out/peft --adapters out/imported.pt
    python formats/convert.py --init smollm2-135m --from-cvec v.gguf --adapters out/imported.pt

--init is the base model the adapters belong to: --to-* loads --adapters onto it (refused if they
were trained on other weights); --from-* checks the file against it and writes --adapters, which
sample.py --adapters and formats/adapters.load read. formats/peft_lora.py and
formats/control_vectors.py say what maps onto what, and what is refused.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from formats import adapters, checkpoints  # noqa: E402
from formats.control_vectors import load_cvec, save_cvec  # noqa: E402
from formats.peft_lora import CONFIG, WEIGHTS, load_peft, save_peft  # noqa: E402
from machinery.checks import OneLineParser  # noqa: E402
from nanosteer import LoRALinear  # noqa: E402


def parse_args(argv=None):
    p = OneLineParser(prog="convert.py", description="Adapters to and from other tools' formats: a peft "
                      "LoRA folder, a llama.cpp control vector.")
    p.add_argument("--init", required=True, help="the base model: our checkpoint, a Hugging Face GPT-2 or "
                   f"Llama folder, a .gguf, {checkpoints.SMOLLM2}")
    p.add_argument("--adapters", required=True, help="our adapter file (train.py's adapters.pt): read by "
                   "--to-peft / --to-cvec, written by --from-peft / --from-cvec")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-peft", metavar="FOLDER", help="write the LoRA as a peft adapter folder "
                     "(adapter_config.json, adapter_model.safetensors)")
    way.add_argument("--to-cvec", metavar="FILE", help="write the block_out vectors as a llama.cpp "
                     "control-vector GGUF")
    way.add_argument("--from-peft", metavar="FOLDER", help="read a peft LoRA adapter folder")
    way.add_argument("--from-cvec", metavar="FILE", help="read a control-vector GGUF (llama.cpp's, repeng's)")
    return p.parse_args(argv)


def check_new(args):
    """What convert.py writes must not exist yet: nothing a user saved is overwritten."""
    if args.to_peft:        # the folder may exist (empty, or holding other files), the adapter not
        out, taken = args.to_peft, any(os.path.exists(os.path.join(args.to_peft, f)) for f in (CONFIG, WEIGHTS))
    else:
        out = args.to_cvec or args.adapters          # --from-* write --adapters
        taken = os.path.exists(out)
    if taken:
        raise ValueError(f"{out} already holds {'a peft adapter' if args.to_peft else 'a file'}: give a "
                         "new name (convert.py never overwrites)")


def convert(args):
    """Do what the arguments say -> the line to print."""
    check_new(args)
    model, _ = checkpoints.load(args.init)
    if args.to_peft or args.to_cvec:
        adapters.load(model, args.adapters)
    if args.to_peft:
        modules = save_peft(model, args.to_peft)
        lora = next(m for m in model.modules() if isinstance(m, LoRALinear))
        return (f"wrote {args.to_peft}: peft LoRA r={lora.rank}, lora_alpha={lora.alpha:g} on {len(modules)} "
                "modules (adapter_config.json, adapter_model.safetensors)")
    if args.to_cvec:
        layers = save_cvec(model, args.to_cvec)
        return (f"wrote {args.to_cvec}: llama.cpp control vector, direction.{layers[0]}..{layers[-1]} "
                f"({len(layers)} block_out vectors of width {model.config.n_embd})")
    if args.from_peft:
        load_peft(model, args.from_peft)
        what = f"LoRA on {sum(isinstance(m, LoRALinear) for m in model.modules())} Linear layers"
    else:
        layers = load_cvec(model, args.from_cvec)
        what = f"block_out vectors at layers {layers[0]}..{layers[-1]}"
    adapters.save(model, args.adapters)
    return f"wrote {args.adapters}: {what}, from {args.from_peft or args.from_cvec}"


def main(argv=None):
    args = parse_args(argv)
    try:
        print(convert(args))
    except ValueError as e:  # every user error is raised as a ValueError with a one-line message
        print(f"convert.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
