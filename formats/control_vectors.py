"""
formats/control_vectors.py: vector shifts at block_out as a llama.cpp control vector, and back.

    save_cvec(model, "v.gguf")     # then: llama-cli -m model.gguf --control-vector v.gguf
    load_cvec(model, "v.gguf")     # llama.cpp's file, or repeng's, as block_out vector shifts

llama.cpp adds a control vector where we put a block_out vector shift (THEORY §1, the paper's
post-block site). Its Llama graph (src/models/llama.cpp) runs blocks il = 0 .. n_layer − 1, and
each ends `cur = ggml_add(ctx0, cur, ffn_inp); cur = build_cvec(cur, il);`: the vector of layer il
added to the block's output after the second residual add, z + v, our slot. The file is a GGUF of
architecture "controlvector" with one float32 tensor of width n_embd per layer, named
direction.N; llama.cpp's loader (common_control_vector_load_one in common/common.cpp) puts
direction.N at il = N. So direction.N is our layer N (both count blocks from 0). repeng's export
(ControlVector.export_gguf) numbers the same way: its direction.i steers model.layers[i]'s output.
What llama.cpp cannot express, and so is refused here in one line:
- layer 0: llama.cpp keeps no vector for the first block (llama_adapter_cvec::init: "there's never a
  tensor for layer 0") and its loader refuses a file with direction.0. A zero vector there is skipped.
- any shift that is not a vector (it depends on the activation), at any site but block_out;
  LoRA (a control vector holds no weights); a vector of another width, or a layer the model lacks.
Writing goes through the gguf package (llama.cpp's own Python writer); reading, formats/tensor_files.py.
"""
import numpy as np
import torch

from formats.tensor_files import read_gguf
from machinery.files import write_atomically
from nanosteer import adapter_parameters, attach, shift_plan

ARCH = "controlvector"


def directions(model):
    """The model's block_out vectors as {layer: vector}, or the one-line refusal of the first
    adapter llama.cpp cannot apply."""
    lora = [name for name in adapter_parameters(model) if ".lora_" in name]
    if lora or getattr(model, "merged_lora", False):
        raise ValueError(f"this model holds LoRA ({lora[0] if lora else 'merged'}); a control vector holds "
                         "only block_out vectors: export LoRA with --to-peft")
    found = {}
    for layer, block in enumerate(model.transformer.h):
        for site, slot in block.slots.items():
            if slot.shift is None:
                continue
            if site != "block_out" or slot.shift.kind != "vector":
                raise ValueError(f"layer {layer} {site} holds a {slot.shift.kind} shift; llama.cpp adds only "
                                 "a vector, at block_out (the block's output)")
            if layer == 0 and slot.shift.v.any():
                raise ValueError("layer 0 block_out holds a non-zero vector; llama.cpp steers layers 1 and up "
                                 "only: train with --layers 1,2,...")
            if layer > 0:
                found[layer] = slot.shift.v.detach().to("cpu", torch.float32).numpy()
    if not found:
        raise ValueError("this model holds no block_out vector to export")
    return found


def save_cvec(model, path):
    """Write the model's block_out vectors as a llama.cpp control-vector GGUF, atomically; the
    header as llama.cpp's own generator writes it (model_hint: the architecture it was made on)."""
    found = directions(model)
    try:
        import gguf
    except ImportError:
        raise ValueError("writing a control vector needs the gguf package: pip install gguf") from None

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", "llama" if model.config.pos == "rotary" else "gpt2")
        writer.add_int32(f"{ARCH}.layer_count", len(found))
        for layer, v in found.items():
            writer.add_tensor(f"direction.{layer}", v)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    try:
        write_atomically(path, write)
    except OSError as e:
        raise ValueError(f"cannot write {path} ({e.strerror}: {e.filename}): give a writable file name") from None
    return sorted(found)


def read_cvec(path, n_layer, n_embd):
    """A control-vector GGUF -> {layer: float32 vector}, every tensor checked as llama.cpp checks
    it (name direction.N with N ≥ 1, float32, one dimension, one width) and against the model."""
    gguf, reader = read_gguf(path)
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch != ARCH:
        raise ValueError(f"{path}: architecture {arch!r} is not a control vector ({ARCH!r})")
    found = {}
    for t in reader.tensors:
        head, _, number = t.name.partition(".")
        if head != "direction" or not number.isdigit():
            raise ValueError(f"{path}: tensor {t.name!r} is not a direction.N of a control vector")
        layer = int(number)
        if layer == 0 or layer >= n_layer:
            raise ValueError(f"{path}: {t.name} is for a layer llama.cpp does not steer on this model "
                             f"(1..{n_layer - 1})")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1 or int(t.shape[0]) != n_embd:
            raise ValueError(f"{path}: {t.name} is {t.tensor_type.name} of shape {tuple(int(n) for n in t.shape)}; "
                             f"llama.cpp and this model need F32 of shape ({n_embd},)")
        if layer in found:
            raise ValueError(f"{path}: two tensors named {t.name}")
        found[layer] = np.array(t.data, dtype=np.float32)
    if not found or not all(np.isfinite(v).all() for v in found.values()):
        raise ValueError(f"{path}: no direction tensors, or one holds NaN or infinity")
    return found


def load_cvec(model, path):
    """A control vector (llama.cpp's or repeng's) as block_out vector shifts, one for each
    direction.N, onto a model that holds no adapters; refused whole if any part cannot be."""
    held = adapter_parameters(model)
    if held or getattr(model, "merged_lora", False):
        raise ValueError(f"this model already holds adapters ({next(iter(held), 'merged LoRA')}): "
                         "load the control vector onto a model without any")
    found = read_cvec(path, model.config.n_layer, model.config.n_embd)
    plan = shift_plan(model, "block_out", "vector", None, sorted(found), "silu")
    with torch.no_grad():
        for layer, (_, _, _, shift) in zip(sorted(found), plan):
            shift.v.copy_(torch.from_numpy(found[layer]))
    attach(plan)
    return sorted(found)
